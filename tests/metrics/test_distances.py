import numpy as np
import pytest
import scipy.linalg
import torch

from difflab.metrics import MetricError, compare, frechet_distance, kid, precision_recall, table
from difflab.metrics.distances import gaussian_frechet


def _spd(d, rng):
    a = rng.standard_normal((d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


def test_gaussian_frechet_matches_the_closed_form():
    rng = np.random.default_rng(0)
    d = 6
    mu1, mu2, c1, c2 = rng.standard_normal(d), rng.standard_normal(d), _spd(d, rng), _spd(d, rng)
    s1 = scipy.linalg.sqrtm(c1)
    exact = ((mu1 - mu2) ** 2).sum() + np.trace(c1 + c2 - 2 * scipy.linalg.sqrtm(s1 @ c2 @ s1).real)
    assert gaussian_frechet(mu1, c1, mu2, c2) == pytest.approx(exact, rel=1e-9)
    # commuting (diagonal) covariances: sum of squared differences of standard deviations
    a, b = rng.uniform(0.5, 2, d), rng.uniform(0.5, 2, d)
    assert gaussian_frechet(mu1, np.diag(a), mu1, np.diag(b)) == pytest.approx(((np.sqrt(a) - np.sqrt(b)) ** 2).sum())


def test_empirical_fd_converges_and_its_interval_covers_the_truth():
    g = torch.Generator().manual_seed(0)
    d, n = 4, 20000
    scale = torch.tensor([1.0, 2.0, 0.5, 1.5])
    real = torch.randn(n, d, generator=g, dtype=torch.float64)
    fake = torch.randn(n, d, generator=g, dtype=torch.float64) * scale + 0.3
    truth = 4 * 0.3 ** 2 + float(((1 - scale) ** 2).sum())
    out = frechet_distance(real, fake, bootstrap=30)
    assert out["value"] == pytest.approx(truth, rel=0.03)
    assert out["ci"][0] - 0.02 < truth < out["ci"][1] + 0.02
    assert out["n_real"] == out["n_fake"] == n


def test_kid_is_unbiased_for_samples_of_one_distribution():
    g = torch.Generator().manual_seed(1)
    same = [kid(torch.randn(40, 8, generator=g), torch.randn(40, 8, generator=g), subsets=1)["value"]
            for _ in range(400)]
    mean, sem = np.mean(same), np.std(same) / np.sqrt(len(same))
    assert abs(mean) < 3 * sem  # unbiased: zero within its standard error
    assert np.std(same) > 0  # ...and not trivially zero
    shifted = kid(torch.randn(200, 8, generator=g), torch.randn(200, 8, generator=g) + 0.5, subsets=20)
    assert shifted["value"] > 20 * sem and shifted["ci"][0] > 0


def test_precision_recall_on_known_overlap():
    g = torch.Generator().manual_seed(2)
    blob = lambda n, c: torch.randn(n, 2, generator=g) * 0.3 + torch.tensor(c)  # noqa: E731
    real = torch.cat([blob(500, [-5.0, 0.0]), blob(500, [5.0, 0.0])])
    same = precision_recall(real, torch.cat([blob(500, [-5.0, 0.0]), blob(500, [5.0, 0.0])]))
    assert same["precision"] > 0.9 and same["recall"] > 0.9
    dropped = precision_recall(real, blob(1000, [5.0, 0.0]))  # one mode only: precise, half the recall
    assert dropped["precision"] > 0.9 and 0.4 < dropped["recall"] < 0.6
    assert dropped["recall_ci"][0] < dropped["recall"] < dropped["recall_ci"][1]
    off = precision_recall(real, blob(1000, [0.0, 5.0]))  # elsewhere: neither
    assert off["precision"] < 0.01 and off["recall"] < 0.01


def test_bad_input_is_refused_clearly():
    x = torch.randn(10, 3)
    with pytest.raises(MetricError, match="dimensions"):
        frechet_distance(x, torch.randn(10, 4))
    with pytest.raises(MetricError, match="at least 4 fake samples"):
        precision_recall(x, torch.randn(3, 3), k=3)
    with pytest.raises(MetricError, match="at least 2 real"):
        kid(x[:1], x)
    with pytest.raises(MetricError, match="NaN"):
        frechet_distance(x, torch.full((10, 3), float("nan")))
    with pytest.warns(UserWarning, match="singular"):
        frechet_distance(x[:3], x[:3], bootstrap=0)
    with pytest.raises(ValueError, match="unknown metric"):
        compare(torch.zeros(4, 1, 8, 8), torch.zeros(4, 1, 8, 8), ("fid",))
    with pytest.raises(ValueError, match="unknown feature extractor 'clip'"):
        compare(torch.zeros(4, 1, 8, 8), torch.zeros(4, 1, 8, 8), ("fd",), features="clip")


def test_compare_and_table_on_pixels():
    g = torch.Generator().manual_seed(3)
    real, fake = torch.rand(300, 1, 4, 4, generator=g), torch.rand(300, 1, 4, 4, generator=g) * 0.5
    out = compare(real, fake, features="pixels")
    assert out["feature_dim"] == 16 and out["fd"]["value"] > 0
    text = table([{"sampler": "ddim", **out}], ["sampler"])
    assert text.count("\n") == 2 and "| ddim |" in text and "300 / 300" in text
