"""Run folders saved before the package moved into rooms (issue 27) still resume.

Their ``.hydra/config.yaml`` names callbacks at the old paths (``polypsam.callbacks.*``); their checkpoints
name no polypsam class, only strings. ``resume=`` points each old target at its new home, says so in one
line, and the resumed run saves its config with the new names.
"""

import json
import pickle

import pytest
import torch
import yaml

from polypsam.training.resume import MOVED_TARGETS, moved_targets
from test_resume import cli

pytestmark = pytest.mark.slow  # trains and resumes through the command line, in processes of their own

OLD_CALLBACKS = ("polypsam.callbacks.", "polypsam.training.callbacks.")


def test_moved_targets_names_old_homes_only():
    config = {"callbacks": {"timer": {"_target_": "polypsam.callbacks.EpochTimer"},
                            "rank_report": {"_target_": "polypsam.launch.RankReport", "dirpath": "ddp"},
                            "lr": {"_target_": "lightning.pytorch.callbacks.LearningRateMonitor"}},
              "data": {"_target_": "polypsam.data.datamodule.PolypDataModule"},
              "trainer": {"plugins": [{"_target_": "polypsam.callbacks.FaultGuard"}]}}
    assert moved_targets(config) == {
        "callbacks.timer._target_": ("polypsam.callbacks.EpochTimer", "polypsam.training.callbacks.EpochTimer"),
        "callbacks.rank_report._target_": ("polypsam.launch.RankReport", "polypsam.training.rank.RankReport"),
        "trainer.plugins.0._target_": ("polypsam.callbacks.FaultGuard", "polypsam.training.callbacks.FaultGuard"),
    }
    assert set(MOVED_TARGETS) == {"polypsam.callbacks.", "polypsam.launch.RankReport"}
    for new in ("polypsam.training.callbacks.EpochTimer", "polypsam.training.rank.RankReport"):
        module, _, name = new.rpartition(".")
        assert hasattr(__import__(module, fromlist=[name]), name)  # the new homes exist


def test_run_saved_with_old_targets_resumes(tmp_path):
    run = tmp_path / "old"
    cli("+experiment=tiny", f"hydra.run.dir={run}", f"paths.root_dir={tmp_path}", "test_after_training=false",
        "callbacks.rich_progress_bar=null", "callbacks.val_overlays=null")
    saved = run / ".hydra" / "config.yaml"
    text = saved.read_text()
    assert OLD_CALLBACKS[1] + "LastCheckpoint" in text
    saved.write_text(text.replace(OLD_CALLBACKS[1], OLD_CALLBACKS[0]))  # as the code before the move wrote it
    assert json.loads((run / "results.json").read_text())["epochs"] == 1
    # the checkpoint holds the run's config as plain strings: it unpickles without any polypsam class
    torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False, pickle_module=_NoPolypsam)

    proc = cli(f"resume={run}", "trainer.max_epochs=2")
    moved = [ln for ln in proc.stdout.splitlines() if "moved since" in ln]
    assert len(moved) == 1 and "polypsam.callbacks.LastCheckpoint -> polypsam.training.callbacks.LastCheckpoint" \
        in moved[0], proc.stdout[-2000:]
    assert json.loads((run / "results.json").read_text())["epochs"] == 2
    assert torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["epoch"] == 1
    targets = list(_targets(yaml.safe_load(saved.read_text())))
    assert "polypsam.training.callbacks.LastCheckpoint" in targets
    assert not any(t.startswith(OLD_CALLBACKS[0]) for t in targets)  # saved again with the new names


def _targets(node):
    if isinstance(node, dict):
        for k, v in node.items():
            if k == "_target_":
                yield v
            else:
                yield from _targets(v)
    elif isinstance(node, list):
        for v in node:
            yield from _targets(v)


class _NoPolypsam:
    """A pickle module for ``torch.load`` that refuses every class from polypsam."""

    class Unpickler(pickle.Unpickler):
        def find_class(self, module, name):
            assert not module.startswith("polypsam"), f"checkpoint pickles {module}.{name}"
            return super().find_class(module, name)

    load = staticmethod(pickle.load)
