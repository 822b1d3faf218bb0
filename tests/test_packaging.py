"""The configs ship inside the package: a non-editable install runs from any directory."""

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_wheel_carries_the_configs_and_runs_from_elsewhere(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path / "dist"), str(REPO)], check=True, capture_output=True, timeout=300)
    wheel, = (tmp_path / "dist").glob("polypsam-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for cfg in ("train.yaml", "eval.yaml", "predict.yaml", "prompt/box.yaml", "prompt/point.yaml",
                "experiment/tiny.yaml", "model/lite.yaml"):
        assert f"polypsam/conf/{cfg}" in names, cfg
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)  # what a non-editable `pip install .` puts in site-packages
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site), "NO_ALBUMENTATIONS_UPDATE": "1"}
    for module in ("polypsam.train", "polypsam.evaluate", "polypsam.predict"):
        args = ["+experiment=tiny", "prompt=point"] if module == "polypsam.train" else ["model=tiny"]
        proc = subprocess.run([sys.executable, "-m", module, *args, "--cfg", "job"], cwd=elsewhere, env=env,
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert "name: tiny" in proc.stdout
    proc = subprocess.run([sys.executable, "-c", "import polypsam; print(polypsam.__file__)"], cwd=elsewhere,
                          env=env, capture_output=True, text=True, check=True)
    assert proc.stdout.startswith(str(site))  # the installed copy, not the checkout
