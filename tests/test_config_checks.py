"""The config checked before any work: one line, exit 2, before a model is built or an image is read.

Through the real command line on the synthetic set (``+experiment=tiny``). The evidence that a check ran
early is what the run left behind: a bad value stops before ``train()`` writes config_resolved.yaml and
before the synthetic set is generated (``paths.root_dir`` is fresh, so its ``data/`` would appear); a
defect of a test set stops before the zero-shot validation and fit (no csv/, no checkpoints/).
"""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from polypsam.data.demo import generate_demo_dataset
from polypsam.devices import usable_cpus

REPO = Path(__file__).resolve().parents[1]
QUIET = ["callbacks.rich_progress_bar=null", "callbacks.val_overlays=null"]
pytestmark = pytest.mark.slow  # every test starts the command line in a process of its own (make test-fast skips them)


def train_cli(*overrides, wait=True, **env_extra):
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled",
           "NO_ALBUMENTATIONS_UPDATE": "1", **env_extra}
    cmd = [sys.executable, "-m", "polypsam.train", "+experiment=tiny", *QUIET, *overrides]
    if not wait:
        return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def error_lines(proc) -> list[str]:
    return [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]


def imported(proc) -> set[str]:
    """The modules a process run with PYTHONPROFILEIMPORTTIME=1 imported (Python's own report, on stderr)."""
    return {ln.rsplit("|", 1)[1].strip() for ln in proc.stderr.splitlines() if ln.startswith("import time:")}


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    return generate_demo_dataset(tmp_path_factory.mktemp("demo") / "demo")


def _shrink_masks(folder: Path) -> None:
    for m in sorted(folder.glob("*.png")):
        with Image.open(m) as im:
            small = im.resize((im.width // 2, im.height // 2))
        small.save(m)


# -- a bad value: stopped before the model, the data and the run's files ------------------------------------

BAD_VALUES = {  # override -> words its line must hold
    "scratch.lr=-1": ["scratch.lr=-1", "> 0"],
    "scratch.max_epochs=0": ["scratch.max_epochs=0", ">= 1"],
    "model.runtime=tensorrt": ["model.runtime=tensorrt", "onnxruntime"],
    "model.runtime_precision=fp8": ["model.runtime_precision=fp8", "fp32"],  # tiny is strategy=enc_dec
    f"trainer.devices={usable_cpus() + 1}": [f"trainer.devices={usable_cpus() + 1}", "usable CPU core"],
}


@pytest.mark.parametrize("override", list(BAD_VALUES))
def test_bad_value_stops_before_any_work(override, tmp_path):
    """Without polypsam.schema: lr=-1 is torch's traceback after the zero-shot validation, max_epochs=0
    exits 0, the runtime names fail after fit (enc_dec builds no frozen encoder) and devices=3 starts three
    ranks; each of those leaves config_resolved.yaml and the synthetic set behind."""
    run = tmp_path / "run"
    proc = train_cli(override, f"paths.root_dir={tmp_path}", f"hydra.run.dir={run}", PYTHONPROFILEIMPORTTIME="1")
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = error_lines(proc)
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert all(w in lines[0] for w in BAD_VALUES[override]), lines[0]
    assert not (run / "config_resolved.yaml").exists() and not (run / "ddp").exists()
    assert not (tmp_path / "data").exists()  # the synthetic set was never generated, no image read
    # nor Lightning imported (polypsam.hydra_conf): the line comes in the time torch takes to import, not ~3x
    # that. Checked: with train.py's or ClaimRunDir's former top-level Lightning import, this fails.
    assert "torch" in imported(proc) and not {"lightning", "torchmetrics"} & imported(proc)


def test_eval_uses_the_same_checks(tmp_path):
    """The evaluation's command checks its composed config the same way (a zero-shot row: model=tiny)."""
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled",
           "PYTHONPROFILEIMPORTTIME": "1"}
    proc = subprocess.run([sys.executable, "-m", "polypsam.evaluate", "model=tiny", "batch_size=0",
                           f"paths.root_dir={tmp_path}", f"hydra.run.dir={tmp_path / 'eval'}"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    lines = error_lines(proc)
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: batch_size=0 "), proc.stderr
    assert ">= 1" in lines[0] and not (tmp_path / "eval" / "config_resolved.yaml").exists()
    assert "lightning" not in imported(proc)  # nor what does the work


@pytest.mark.parametrize("command", ["predict", "select_auto"])
def test_the_other_commands_check_before_importing_lightning(command, tmp_path):
    """predict and select_auto stop on a bad value as train and evaluate do, before Lightning is imported.
    Checked: with predict's former top-level imports (load_model, the prediction helpers) this fails."""
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled",
           "PYTHONPROFILEIMPORTTIME": "1"}
    args = ["model=tiny", "batch_size=0"] if command == "predict" else ["threshold=2"]  # select_auto: a checkpoint's
    bad = args[-1]
    proc = subprocess.run([sys.executable, "-m", f"polypsam.{command}", *args, f"hydra.run.dir={tmp_path / 'out'}"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    lines = error_lines(proc)
    assert proc.returncode == 2 and len(lines) == 1 and bad.split("=")[0] in lines[0], proc.stderr[-3000:]
    assert "torch" in imported(proc) and not {"lightning", "torchmetrics"} & imported(proc)


# -- a defective test set: stopped before the zero-shot validation and fit ----------------------------------

@pytest.mark.parametrize("defect", ["empty", "mask_size"])
def test_test_set_defect_stops_before_fit(defect, demo, tmp_path):
    """Without train's check_test_data before fit, both are found by the evaluation after training: the
    run has trained (checkpoints/, csv/) by the time it stops."""
    root = tmp_path / "root"
    shutil.copytree(demo, root)
    if defect == "empty":
        for sub in ("images", "masks"):
            (root / "TestDataset" / "Empty" / sub).mkdir(parents=True)
    else:
        _shrink_masks(root / "TestDataset" / "Synthetic-Faint" / "masks")
    run = tmp_path / "run"
    proc = train_cli(f"data.root={root}", "data.generate_demo=false", f"paths.root_dir={tmp_path}",
                     f"hydra.run.dir={run}")
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = error_lines(proc)
    assert len(lines) == 1, proc.stderr[-3000:]
    assert ("Empty" in lines[0] and "no images" in lines[0]) if defect == "empty" else "masks must have" in lines[0]
    assert not (run / "checkpoints").exists() and not (run / "csv").exists()


# -- a failure after fit, then resume= ----------------------------------------------------------------------

def test_failure_after_fit_names_checkpoints_and_resume_keeps_zero_shot(demo, tmp_path):
    """A test mask shrunk while training runs (the run pauses on its last batch: InjectFault kind=pause)
    fails the evaluation after fit. Its line must name best.ckpt, last.ckpt and resume=<run> (without
    run_results.after_fit_error: the bare size message); resuming after the fix finishes the run, and its
    results.json keeps the zero-shot validation that ran before the first fit (without
    run_results.earlier_zero_shot: no zero_shot_val_dice)."""
    root, run, marker = tmp_path / "root", tmp_path / "run", tmp_path / "paused"
    shutil.copytree(demo, root)
    masks = root / "TestDataset" / "Synthetic-Faint" / "masks"
    kept = tmp_path / "masks"
    shutil.copytree(masks, kept)
    common = [f"data.root={root}", "data.generate_demo=false", f"paths.root_dir={tmp_path}"]
    proc = train_cli(*common, f"hydra.run.dir={run}", "+callbacks.fault._target_=polypsam.training.callbacks.InjectFault",
                     "+callbacks.fault.kind=pause", "+callbacks.fault.at_batch=4", f"+callbacks.fault.marker={marker}",
                     "+callbacks.fault.wait_s=30", wait=False)
    t0 = time.monotonic()
    while not marker.exists():
        assert proc.poll() is None and time.monotonic() - t0 < 300, "training ended before it paused"
        time.sleep(0.1)
    _shrink_masks(masks)
    marker.unlink()  # releases the pause: training ends and the evaluation after fit reads the shrunk masks
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 2, err[-3000:]
    line = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert len(line) == 1 and "masks must have" in line[0], err[-3000:]
    for words in ("best.ckpt", "last.ckpt", f"resume={run}"):
        assert words in line[0], line[0]
    assert not (run / "results.json").exists()

    shutil.rmtree(masks)
    shutil.copytree(kept, masks)
    proc = train_cli(f"resume={run}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((run / "results.json").read_text())
    assert results["zero_shot_val_dice"] is not None and results["zero_shot_val_seconds"] > 0
    assert "test/Synthetic-Faint/dice" in results["test"]


def test_lightning_tips_not_printed(tmp_path):
    """Without polypsam.lightning_tips: "💡 Tip: ... litlogger" on every Trainer, before the first step."""
    proc = train_cli(f"paths.root_dir={tmp_path}", f"hydra.run.dir={tmp_path / 'run'}", "test_after_training=false",
                     "validate_before_training=false", "data.limit_train=4", "data.limit_val=4")
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = proc.stdout + proc.stderr + (tmp_path / "run" / "train.log").read_text()
    assert "Trainer.fit" in text  # Lightning's own lines still come through
    assert "litlogger" not in text and "litmodels" not in text


def test_a_command_forked_warm_ends_as_a_fresh_one(tmp_path):
    """tests/warm.py, which most command-line tests use, gives what a fresh ``python -m`` gives: the status,
    the error line and nothing written, for a command that stops and one that fails after Hydra opened its run."""
    import warm

    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled",
           "NO_ALBUMENTATIONS_UPDATE": "1"}
    for bad in ("scratch.lr=-1", f"data.root={tmp_path / 'missing'}"):
        args = [bad, "data.generate_demo=false", f"paths.root_dir={tmp_path}"]
        fresh = train_cli(*args, f"hydra.run.dir={tmp_path / 'fresh'}")
        forked = warm.run("polypsam.train", "+experiment=tiny", *QUIET, *args, f"hydra.run.dir={tmp_path / 'warm'}",
                          env=env, cwd=REPO, timeout=300)
        assert forked.returncode == fresh.returncode == 2, (fresh.stderr[-2000:], forked.stderr[-2000:])
        assert error_lines(forked) == error_lines(fresh) != []
