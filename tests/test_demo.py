import json

from difflab.cli import main


def test_analytic_demo_writes_png_and_metrics(tmp_path):
    assert main(["demo", "analytic", "--out", str(tmp_path), "--n", "300", "--steps", "8"]) == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert (tmp_path / "samples.png").stat().st_size > 1000
    # the second-order samplers beat DDIM on the exact mixture at the same NFE
    res = metrics["results"]
    assert res["scaled_linear/eps/dpmpp_2m"]["rmse_to_exact_ode"] < res["scaled_linear/eps/ddim"]["rmse_to_exact_ode"]


def test_digits_demo_plumbing(tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFLAB_CACHE", str(tmp_path / "cache"))
    args = ["demo", "digits", "--out", str(tmp_path), "--no-progress", "--set", "train.steps=20",
            "--set", "train.sample_every=0", "--set", "train.num_threads=1", "--steps", "4"]
    assert main(args) == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["samples"] == 1000 and 0.0 <= metrics["classifier_accuracy_on_samples"] <= 1.0
    assert metrics["classifier_test_accuracy_on_real_digits"] > 0.9
    assert (tmp_path / "samples.png").is_file() and (tmp_path / "run" / "final" / "pipeline.json").is_file()
    assert main(["demo", "analytic", "--out", str(tmp_path), "--n", "300", "--steps", "8"]) == 1  # refuses to overwrite
    assert main(["demo", "analytic", "--out", str(tmp_path), "--n", "300", "--steps", "4", "--overwrite"]) == 0
    assert json.loads((tmp_path / "metrics.json").read_text())["steps"] == 4
