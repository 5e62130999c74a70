import warnings

import pytest
import torch

from difflab.metrics import compare, features
from difflab.metrics.classifiers import attribute_hits, load_classifier, shapes_tensors


class _TinyDetector(torch.nn.Module):
    """Stands in for NVIDIA's TorchScript Inception: uint8 in, features out with return_features."""

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        assert x.dtype == torch.uint8
        f = torch.nn.functional.adaptive_avg_pool2d(x.float() / 255, 2).flatten(1)
        return f if return_features else f.sum(1, keepdim=True)


def test_inception_loads_a_local_torchscript_file(tmp_path, monkeypatch):
    path = tmp_path / "inception.pt"
    with warnings.catch_warnings():  # TorchScript is deprecated, but NVIDIA's detector ships as one
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.save(torch.jit.script(_TinyDetector()), str(path))
    extract = features.get("inception", path=path)
    x = torch.rand(5, 1, 8, 8) * 2 - 1
    f = extract(x)
    assert f.shape == (5, 12)  # grayscale repeated to RGB, 3 x 2 x 2 pooled
    uint8 = ((x.repeat(1, 3, 1, 1) + 1) * 127.5).round().to(torch.uint8)
    assert torch.equal(f, torch.nn.functional.adaptive_avg_pool2d(uint8.float() / 255, 2).flatten(1))
    monkeypatch.setenv("DIFFLAB_INCEPTION", str(path))
    assert features.get("inception")(x).shape == (5, 12)


def test_inception_without_weights_says_how_to_get_them(monkeypatch):
    monkeypatch.delenv("DIFFLAB_INCEPTION", raising=False)
    with pytest.raises(FileNotFoundError, match=r"inception-2015-12-05\.pkl"):
        features.get("inception")
    with pytest.raises(FileNotFoundError, match=r"nowhere\.pt does not exist"):
        features.get("inception", path="nowhere.pt")


def test_digits_features_separate_real_digits_from_noise():
    from difflab.data import Digits

    train, test = Digits("train").x, Digits("test").x
    g = torch.Generator().manual_seed(0)
    noise = (torch.rand(test.shape, generator=g) * 2 - 1)
    real = compare(train, test, ("fd",), features="digits")["fd"]["value"]
    fake = compare(train, noise, ("fd",), features="digits")["fd"]["value"]
    assert real * 20 < fake
    with pytest.raises(ValueError, match="grayscale"):
        features.get("digits")(torch.zeros(2, 3, 8, 8))


def test_shapes_classifier_reads_every_attribute():
    model, held_out = load_classifier("shapes")
    assert held_out > 0.95  # all four attributes right at once, on images it never saw
    x, attrs = shapes_tensors(300, seed=12345)
    hits = attribute_hits(model, x, attrs)
    assert hits.float().mean(0).min() > 0.95
    assert features.get("shapes")(x[:4]).shape == (4, 128)


def test_helper_cache_is_keyed_by_the_settings_and_code_that_made_it(tmp_path, monkeypatch):
    import dataclasses

    from difflab.metrics import classifiers

    helper = classifiers.HELPERS["digits"]
    quick = dataclasses.replace(helper, settings={**helper.settings, "epochs": 1})
    assert quick.key() != helper.key()
    monkeypatch.setenv("DIFFLAB_CACHE", str(tmp_path))
    monkeypatch.setitem(classifiers.HELPERS, "digits", quick)
    stale = tmp_path / f"digits_classifier_{helper.key()}.safetensors"
    stale.write_bytes(b"not a classifier")  # another version's file must not be read
    threads = torch.get_num_threads()
    _, first = classifiers.load_classifier("digits")
    assert torch.get_num_threads() == threads
    assert (tmp_path / f"digits_classifier_{quick.key()}.safetensors").is_file()
    _, again = classifiers.load_classifier("digits")  # from the cache: the same accuracy
    assert again == first
