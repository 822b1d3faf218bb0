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
                              capture_output=True, text=True, timeout=400)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert "name: tiny" in proc.stdout
    proc = subprocess.run([sys.executable, "-c", "import polypsam; print(polypsam.__file__)"], cwd=elsewhere,
                          env=env, capture_output=True, text=True, check=True)
    assert proc.stdout.startswith(str(site))  # the installed copy, not the checkout


def test_console_scripts_point_at_importable_mains():
    import importlib
    import re

    text = (REPO / "pyproject.toml").read_text()  # no tomllib: Python 3.10 is supported
    block = text.split("[project.scripts]", 1)[1].split("\n\n", 1)[0]
    scripts = dict(re.findall(r'^([\w-]+) = "([\w.:]+)"$', block, re.M))
    assert "polypsam-prepare" in scripts
    for name, target in scripts.items():
        module, _, func = target.partition(":")
        assert callable(getattr(importlib.import_module(module), func, None)), f"{name} = {target}"


def test_old_prepare_command_names_its_new_home():
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    proc = subprocess.run([sys.executable, "-m", "polypsam.data.prepare", "--help"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "python -m polypsam.curation.prepare" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
