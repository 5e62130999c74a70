import pytest
import torch
from PIL import Image

from difflab import data


def test_shapes_are_deterministic_captioned_and_masked():
    a, b = data.Shapes(n=16, seed=3), data.Shapes(n=16, seed=3)
    for i in (0, 7, 15):
        ia, ib = a[i], b[i]
        assert torch.equal(ia["x"], ib["x"]) and ia["caption"] == ib["caption"]
        assert ia["x"].shape == (3, 32, 32) and -1 <= float(ia["x"].min()) and float(ia["x"].max()) <= 1
        words = ia["caption"].split()
        assert words[0] == "a" and words[3] in data.shapes.SHAPES
        assert ia["mask"].sum() > 10 and 0 < ia["edges"].sum() < ia["mask"].sum()
    assert not torch.equal(data.Shapes(n=4, seed=4)[0]["x"], a[0]["x"])
    held = data.Shapes(n=64, seed=0, holdout=(("circle", "red"),))
    assert all(not (at["shape"] == "circle" and at["colour"] == "red") for at in held.attributes)
    only = data.Shapes(n=8, seed=0, holdout=(("circle", "red"),), only_holdout=True)
    assert all("red circle" in only[i]["caption"] for i in range(8))


def test_digits_splits_are_disjoint_and_scaled():
    train, test = data.Digits("train"), data.Digits("test")
    assert len(train) + len(test) == 1797 and train.x.shape[1:] == (1, 8, 8)
    assert float(train.x.min()) == -1.0 and float(train.x.max()) == 1.0
    big = data.Digits("test", size=16)
    assert big.x.shape[1:] == (1, 16, 16) and torch.equal(big.labels, test.labels)


def test_image_folder_reads_classes_and_captions(tmp_path):
    for cls in ("cats", "dogs"):
        (tmp_path / cls).mkdir()
        Image.new("RGB", (40, 30), (200, 10, 10)).save(tmp_path / cls / "a.png")
    (tmp_path / "dogs" / "a.txt").write_text("a red dog\n")
    ds = data.ImageFolder(tmp_path, resolution=16)
    assert len(ds) == 2 and ds.classes == ["cats", "dogs"]
    item = ds[1]
    assert item["x"].shape == (3, 16, 16) and item["label"] == 1 and item["caption"] == "a red dog"
    with pytest.raises(FileNotFoundError, match="does not exist"):
        data.ImageFolder(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images"):
        data.ImageFolder(tmp_path / "empty")
    (tmp_path / "cats" / "b.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="cannot read image"):
        data.ImageFolder(tmp_path)[1]  # cats/b.png


@pytest.mark.parametrize("kind", ["ring", "moons", "checkerboard", "mixture"])
def test_toy_distributions(kind):
    ds = data.Toy2D(kind, n=500, seed=1)
    assert ds.x.shape == (500, 2) and torch.isfinite(ds.x).all()
    assert torch.equal(ds.x, data.Toy2D(kind, n=500, seed=1).x)
    with pytest.raises(ValueError, match="choose one of"):
        data.build("cifar")
