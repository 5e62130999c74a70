"""An installed difflab works outside the source tree: build the wheel, install it into a new
virtual environment (its dependencies borrowed from this one), and run the demos from elsewhere."""

import os
import shutil
import site
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("wheel")
    source = tmp / "source"  # a copy: setuptools writes build/ beside the sources it builds
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(ROOT / "src", source / "src", ignore=shutil.ignore_patterns("*.egg-info", "__pycache__"))
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(tmp / "dist"), str(source)], capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-2000:]
    wheel = next((tmp / "dist").glob("difflab-*.whl"))
    env_dir = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env_dir)], check=True, timeout=120)
    python = env_dir / "bin" / "python"
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    # torch and the rest come from this environment's site-packages, after the new one's own
    Path(purelib, "borrowed.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    install = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "-q",
                              str(wheel)], capture_output=True, text=True, timeout=300)
    assert install.returncode == 0, install.stderr[-2000:]
    return env_dir, tmp


def test_the_wheel_runs_the_demo_outside_the_checkout(installed):
    env_dir, tmp = installed
    work = tmp / "elsewhere"
    work.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ""}
    where = subprocess.run([str(env_dir / "bin" / "python"), "-c", "import difflab; print(difflab.__file__)"],
                           cwd=work, capture_output=True, text=True, env=env, check=True).stdout
    assert str(env_dir) in where and str(ROOT) not in where
    listed = subprocess.run([str(env_dir / "bin" / "python"), "-c",
                             "from difflab import recipes; print(recipes.available())"],
                            cwd=work, capture_output=True, text=True, env=env, check=True).stdout
    assert "digits" in listed and "shapes_t2i" in listed
    run = subprocess.run([str(env_dir / "bin" / "difflab"), "demo", "--out", str(work / "demo"), "--no-progress",
                          "--set", "train.steps=30", "--set", "train.checkpoint_every=30",
                          "--set", "train.sample_every=0", "--set", "train.num_threads=1", "--steps", "4"],
                         cwd=work, capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert (work / "demo" / "samples.png").is_file() and (work / "demo" / "metrics.json").is_file()
