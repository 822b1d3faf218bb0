"""Killed training resumes exactly: SIGKILL mid-epoch, SIGTERM from a scheduler, NaN, out of memory.

Real tiny training runs on real polyp images, through the real command line. A run killed and resumed
must end with the same weights, optimiser state and best checkpoint as an uninterrupted run of the same
seed (tolerance 1e-6; on the CPU they come out bit-identical).
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from hydra import compose, initialize_config_dir

import warm
from polypsam.cli import describe_failure, oom_message
from polypsam.config import CONF_DIR
from polypsam.data.sampler import EpochShuffleSampler
from polypsam.errors import CheckpointError, ConfigError, PolypSamError, TrainingDiverged
from polypsam.reporting.provenance import hardware
from polypsam.train import train
from polypsam.training.resume import resume_argv
from polypsam.training.run_metrics import read_metrics

REPO = Path(__file__).resolve().parents[1]
TOL = 1e-6
# 11 training images, batch 2, accumulation 2: 6 batches = 3 optimiser steps per epoch; 3 epochs
RUN = ["+experiment=tiny", "data=pranet", "data.num_workers=0", "data.limit_train=null", "data.limit_val=null",
       "scratch.max_epochs=3", "scratch.batch_size=2", "scratch.effective_batch_size=4",
       "callbacks.last_checkpoint.every_n_train_steps=2", "test_after_training=false",
       "callbacks.rich_progress_bar=null", "callbacks.val_overlays=null"]


def _env():
    return {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled",
            "NO_ALBUMENTATIONS_UPDATE": "1"}


def cli(*args, check=True):
    proc = warm.run("polypsam.train", *args, cwd=REPO, env=_env(), timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"train failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


@pytest.fixture(scope="module")
def work(real_root, tmp_path_factory):
    """A PraNet tree of 14 real training images (copied: the originals are never written to)."""
    import shutil

    tmp = tmp_path_factory.mktemp("resume")
    root = tmp / "pranet"
    for sub, n, off in (("images", 10, 0), ("images", 4, 1000)):
        for img in sorted((real_root / "TrainDataset" / sub).iterdir())[off:off + n]:
            mask = next((real_root / "TrainDataset" / "masks").glob(img.stem + ".*"))
            for src, dst in ((img, root / "TrainDataset" / "images"), (mask, root / "TrainDataset" / "masks")):
                dst.mkdir(parents=True, exist_ok=True)
                shutil.copy(src, dst / src.name)
    common = [*RUN, f"data.root={root}", f"paths.root_dir={tmp}", f"data.embedding_cache.dir={tmp / 'cache'}"]
    return tmp, common


@pytest.fixture(scope="module")
def baseline(work):
    tmp, common = work
    run = tmp / "uninterrupted"
    cli(*common, f"hydra.run.dir={run}")
    return run


def _ckpt(path):
    return torch.load(path, map_location="cpu", weights_only=False)


def _max_diff(a, b) -> float:
    """Largest absolute difference over every tensor of two nested structures (weights, optimiser state)."""
    if torch.is_tensor(a):
        return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0
    if isinstance(a, dict):
        assert set(a) == set(b), (set(a) ^ set(b))
        return max([_max_diff(a[k], b[k]) for k in a] or [0.0])
    if isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        return max([_max_diff(x, y) for x, y in zip(a, b)] or [0.0])
    assert a == b, (a, b)
    return 0.0


def _assert_same_end(run: Path, reference: Path) -> None:
    for name in ("best.ckpt", "last.ckpt"):
        a, b = _ckpt(reference / "checkpoints" / name), _ckpt(run / "checkpoints" / name)
        assert (a["epoch"], a["global_step"]) == (b["epoch"], b["global_step"]), name
        assert _max_diff(a["state_dict"], b["state_dict"]) <= TOL, name
        assert _max_diff(a["optimizer_states"], b["optimizer_states"]) <= TOL, name
        assert _max_diff(a["lr_schedulers"], b["lr_schedulers"]) <= TOL, name
    ra, rb = (json.loads((d / "results.json").read_text()) for d in (reference, run))
    assert rb["best_val_dice"] == pytest.approx(ra["best_val_dice"], abs=TOL)
    assert rb["epochs"] == ra["epochs"] == 3
    # what ran, recorded again by the resumed session
    assert rb["precision"] == ra["precision"] == "32"
    assert rb["encoder"] == ra["encoder"] == {"runtime": "torch", "precision": "fp32", "trains": True}


def test_sigkill_mid_epoch_then_resume_equals_uninterrupted(work, baseline):
    tmp, common = work
    run = tmp / "killed"
    fault = ["+callbacks.fault._target_=polypsam.training.callbacks.InjectFault", "+callbacks.fault.kind=sigkill",
             "+callbacks.fault.at_batch=17"]  # epoch 2, batch 5 of 6: after the step-8 checkpoint
    proc = cli(*common, f"hydra.run.dir={run}", *fault, check=False)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    last = _ckpt(run / "checkpoints" / "last.ckpt")
    progress = last["loops"]["fit_loop"]["epoch_loop.batch_progress"]["current"]
    assert (last["epoch"], last["global_step"], progress["processed"]) == (2, 8, 4)  # mid-epoch
    split_before = json.loads((run / "split.json").read_text())

    proc = cli(f"resume={run}", "~callbacks.fault")  # the fault is part of the saved config: drop it
    assert f"resuming {run}" in proc.stdout
    assert not (tmp / "outputs").exists()  # no new run directory: the same folder was continued
    split_after = json.loads((run / "split.json").read_text())
    assert (split_after["train"], split_after["val"]) == (split_before["train"], split_before["val"])
    started = yaml.safe_load((run / ".hydra" / "original_overrides.yaml").read_text())
    assert "+callbacks.fault.kind=sigkill" in started
    _assert_same_end(run, baseline)
    # the fit's wall time travels in the checkpoint: both sessions, each with its CPU (the study's training
    # hours); without the timer's state in last.ckpt the resumed run would list one session and no total
    res = json.loads((run / "results.json").read_text())
    assert [s["cpu"] for s in res["fit_sessions"]] == [hardware()["cpu"]] * 2
    assert all(s["seconds"] > 0 for s in res["fit_sessions"]) and len(res["epoch_seconds"]) == 3
    assert res["fit_seconds_all_sessions"] == pytest.approx(sum(s["seconds"] for s in res["fit_sessions"]))
    once = json.loads((baseline / "results.json").read_text())
    assert len(once["fit_sessions"]) == 1 and once["fit_seconds_all_sessions"] <= once["fit_seconds"]
    # the epochs logged before the kill survive the resume (Lightning's CSVLogger would delete them)
    assert (run / "csv" / "metrics.part0.csv").is_file()
    got, want = (read_metrics(d / "csv").dropna(subset=["val/dice"]) for d in (run, baseline))
    assert got[["epoch", "step"]].values.tolist() == want[["epoch", "step"]].values.tolist()
    assert got["val/dice"].tolist() == pytest.approx(want["val/dice"].tolist(), abs=TOL)


def test_sigterm_saves_last_then_ckpt_path_last_resumes(work, baseline):
    tmp, common = work
    marker = tmp / "paused"
    fault = ["+callbacks.fault._target_=polypsam.training.callbacks.InjectFault", "+callbacks.fault.kind=pause",
             "+callbacks.fault.at_batch=9", f"+callbacks.fault.marker={marker}"]
    args = [*common, "paths.log_dir=" + str(tmp / "logs"), *fault]  # Hydra picks a new run directory
    proc = subprocess.Popen([sys.executable, "-m", "polypsam.train", *args], cwd=REPO, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    t0 = time.monotonic()
    while not marker.exists():
        assert proc.poll() is None and time.monotonic() - t0 < 300, "training ended before it paused"
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)  # during batch 9, half-way through an accumulation (step 4 done)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 143, err[-3000:]
    lines = [ln for ln in err.splitlines() if ln.startswith(("stopped:", "error:", "Traceback"))]
    assert len(lines) == 1 and lines[0].startswith("stopped: SIGTERM at global step 5"), err[-2000:]
    runs = list((tmp / "logs" / "tiny" / "runs").iterdir())
    assert len(runs) == 1
    run = runs[0]
    assert f"resume={run}" in lines[0]
    last = _ckpt(run / "checkpoints" / "last.ckpt")
    # saved at the next optimiser step, not on the accumulating batch the signal arrived in
    assert (last["epoch"], last["global_step"]) == (1, 5)
    # a checkpoint written before the timer travelled in it: the fit's time of earlier sessions is unknown
    assert last["callbacks"].pop("EpochTimer")["sessions"]
    torch.save(last, run / "checkpoints" / "last.ckpt")

    # ckpt_path=last with the original command line: the newest run of the task is continued
    proc = cli(*args, "ckpt_path=last", "~callbacks.fault")
    assert f"resuming {run}" in proc.stdout
    assert list((tmp / "logs" / "tiny" / "runs").iterdir()) == [run]
    _assert_same_end(run, baseline)
    res = json.loads((run / "results.json").read_text())
    assert len(res["fit_sessions"]) == 1 and "fit_seconds_all_sessions" not in res  # no total it cannot know


def test_nan_loss_stops_with_one_line_naming_the_step(work):
    tmp, common = work
    run = tmp / "nan"
    # a real divergence: AdamW's first step moves every weight by ~1e36, the next forward overflows
    proc = cli(*common, f"hydra.run.dir={run}", "scratch.lr=1e37", "callbacks.last_checkpoint.every_n_train_steps=1",
               check=False)
    assert proc.returncode == 2
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr
    assert "non-finite training loss (nan) at global step 1, epoch 0" in errors[0]
    for ckpt in (run / "checkpoints").glob("*.ckpt"):  # what was saved before the NaN is all finite
        sd = _ckpt(ckpt)["state_dict"]
        assert all(torch.isfinite(v).all() for v in sd.values() if v.is_floating_point())


def _compose(common, out, *extra):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose("train", overrides=[*common, f"paths.output_dir={out}", "validate_before_training=false",
                                           *extra])


def test_non_finite_weights_are_never_checkpointed(work):
    tmp, common = work
    out = tmp / "nan_grad"
    cfg = _compose(common, out, "callbacks.last_checkpoint.every_n_train_steps=1",
                   "+callbacks.fault._target_=polypsam.training.callbacks.InjectFault", "+callbacks.fault.kind=nan_grad",
                   "+callbacks.fault.at_batch=4")  # the 2nd optimiser step makes every weight NaN
    with pytest.raises(TrainingDiverged, match=r"non-finite values in .* after global step 2 .*was not written"):
        train(cfg)
    last = _ckpt(out / "checkpoints" / "last.ckpt")
    assert last["global_step"] == 1  # the step-1 checkpoint is the one kept
    assert all(torch.isfinite(v).all() for v in last["state_dict"].values() if v.is_floating_point())
    assert not list((out / "checkpoints").glob(".*.tmp"))


def test_out_of_memory_names_the_knobs(work):
    tmp, common = work
    cfg = _compose(common, tmp / "oom", "+callbacks.fault._target_=polypsam.training.callbacks.InjectFault",
                   "+callbacks.fault.kind=oom", "+callbacks.fault.at_batch=3")
    with pytest.raises(torch.OutOfMemoryError) as info:
        train(cfg)
    failure = describe_failure(info.value, cfg)
    assert failure.code == 2 and "\n" not in failure.line
    assert failure.line.startswith("error: out of memory at global step 1 on cpu (CUDA out of memory.")
    for knob in ("data.batch_size=1 (now 2", "model.gradient_checkpointing=true", "trainer.precision=bf16-mixed",
                 "strategy=dec"):
        assert knob in failure.line


def test_oom_message_lists_only_knobs_not_yet_used():
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("train", overrides=["model=vit_b", "strategy=dec", "trainer=gpu", "scratch.batch_size=8",
                                          "model.gradient_checkpointing=true", "paths.output_dir=/nonexistent"])
    msg = oom_message(cfg, RuntimeError("CUDA error: out of memory\nmore"), step=None)
    assert msg.startswith("out of memory while starting on gpu (CUDA error: out of memory).")
    assert "data.batch_size=4 (now 8; gradient accumulation keeps the effective batch of 48)" in msg
    assert "gradient_checkpointing" not in msg and "precision" not in msg and "strategy=dec" not in msg
    # a DDP rank killed by a signal is reported as such, not as out of memory
    killed = PolypSamError("rank 0 of 2 exited with code -9 (SIGKILL); killed (out of memory?) or crashed")
    assert describe_failure(killed, cfg).line.startswith("error: rank 0 of 2 exited")
    oom_rank = PolypSamError("rank 1 of 2 failed: OutOfMemoryError: CUDA out of memory. Tried to allocate 8 GiB")
    assert describe_failure(oom_rank, cfg).line.startswith("error: out of memory while starting on gpu")


def test_epoch_order_is_seeded_split_across_ranks_and_resumable():
    one = EpochShuffleSampler(11, seed=42)
    one.set_epoch(2)
    full = list(one)
    assert sorted(full) == list(range(11)) and full == list(one)  # a permutation, the same every time
    one.set_epoch(3)
    assert list(one) != full
    ranks = [EpochShuffleSampler(11, seed=42, num_replicas=2, rank=r) for r in (0, 1)]
    for r in ranks:
        r.set_epoch(2)
    shares = [list(r) for r in ranks]
    assert [len(x) for x in shares] == [6, 6] and set(shares[0] + shares[1]) == set(range(11))
    assert shares[0][:5] == full[0:10:2] and shares[1][:5] == full[1:11:2]  # padded like DistributedSampler
    ranks[1].resume_at(2, 4)  # rank 1 had trained on 4 samples of epoch 2
    ranks[1].set_epoch(2)  # Lightning sets the epoch again before iterating: the skip stays
    assert list(ranks[1]) == shares[1][4:] and list(ranks[1]) == shares[1]  # one-off skip


def test_resume_arguments_and_their_errors(work, baseline, tmp_path):
    _, common = work
    argv = resume_argv(["prog", f"resume={baseline}", "trainer.max_epochs=5", *common])
    assert argv[1:6] == [f"--config-dir={baseline / '.hydra'}", "--config-name=config",
                         f"hydra.run.dir={baseline}", f"ckpt_path={baseline / 'checkpoints' / 'last.ckpt'}",
                         f"data.split_file={baseline / 'split.json'}"]
    assert argv[6:] == ["trainer.max_epochs=5"]  # the run's own overrides are in its config already
    assert resume_argv(["prog", "ckpt_path=/some/file.ckpt"]) == ["prog", "ckpt_path=/some/file.ckpt"]
    with pytest.raises(ConfigError, match="model=lite would change config groups"):
        resume_argv(["prog", f"ckpt_path={baseline}", "model=lite"])
    # what the run trains stays: another learning rate or precision needs a new run folder
    saved = yaml.safe_load((baseline / ".hydra" / "config.yaml").read_text())
    with pytest.raises(ConfigError, match=r"scratch.lr=0.5 \(the run: [^)]+\) would change what the run trains"):
        resume_argv(["prog", f"resume={baseline}", "scratch.lr=0.5"])
    with pytest.raises(ConfigError, match="trainer.precision=bf16-mixed"):
        resume_argv(["prog", f"resume={baseline}", "trainer.precision=bf16-mixed"])
    same = f"scratch.lr={saved['scratch']['lr']}"  # the value the run has: no change
    assert resume_argv(["prog", f"resume={baseline}", same])[-1] == same
    with pytest.raises(ConfigError, match="run directory not found"):
        resume_argv(["prog", f"resume={tmp_path / 'nope'}"])
    (tmp_path / "r" / ".hydra").mkdir(parents=True)
    (tmp_path / "r" / ".hydra" / "config.yaml").write_text("{}")
    with pytest.raises(CheckpointError, match="stopped before its first checkpoint"):
        resume_argv(["prog", f"resume={tmp_path / 'r'}"])
    with pytest.raises(ConfigError, match=r"no run of task 'tiny' under .*pass the run directory instead"):
        resume_argv(["prog", "+experiment=tiny", f"paths.root_dir={tmp_path}", "ckpt_path=last"])
