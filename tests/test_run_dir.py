"""Run folders: two runs started in the same second keep their own, and a folder in use is refused.

Without ``${run_stamp:}`` both compositions below resolve to the same ``runs/<second>`` folder and the second
run overwrites the first's config and checkpoints; without the claim (``polypsam.run_dir``) a second process
on a held folder writes into it (Hydra's ``.hydra/`` first) and exits 0; without closing the lock in forked
children, a DataLoader worker that outlives its run's block keeps the folder claimed.
"""

import hashlib
import os
import signal
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf, open_dict

from polypsam.config import CONF_DIR
from polypsam.errors import RunDirInUse
from polypsam.run_dir import RANK_VARIABLES, claim_run_dir, environment_rank
from polypsam.train import train
from polypsam.training.launch import run_maybe_distributed
from polypsam.training.run_metrics import read_metrics
from test_bad_input import assert_one_error, run_cli

REPO = Path(__file__).resolve().parents[1]
TINY = ["+experiment=tiny", "validate_before_training=false", "test_after_training=false",
        "callbacks.rich_progress_bar=null", "callbacks.val_overlays=null", "data.limit_train=8", "data.limit_val=4"]
HOLD = ("import sys\nfrom polypsam.run_dir import claim_run_dir\nwith claim_run_dir(sys.argv[1]):\n"
        "    print('held', flush=True)\n    sys.stdin.read()\n")


def _job(tmp: Path, *overrides: str):
    """A training config composed as ``python -m polypsam.train`` composes it, handed over as Hydra hands a job
    its config: the output folder is the default ``hydra.run.dir``, the ``hydra`` node removed."""
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("train", overrides=[*TINY, f"paths.root_dir={tmp}", *overrides], return_hydra_config=True)
    with open_dict(cfg):
        cfg.paths.output_dir = cfg.hydra.run.dir
        del cfg["hydra"]
    return cfg


def _second(cfg) -> str:
    return Path(cfg.paths.output_dir).name[:19]  # <date>_<time>, to the second


@contextmanager
def held_elsewhere(folder: Path):
    """``folder`` claimed by another live process (its pid) until the block ends."""
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout.readline().strip() == "held"
        yield proc
    finally:
        if proc.poll() is None:
            proc.stdin.close()
        proc.wait(timeout=60)


def _digest(run: Path) -> dict[str, str]:
    return {p.relative_to(run).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(run.rglob("*")) if p.is_file() and p.name != ".run.lock"}


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, one_thread):
    """Two tiny runs composed in the same second (one epoch and two epochs), then trained."""
    tmp = tmp_path_factory.mktemp("two_runs")
    for _ in range(5):  # a second boundary between the two compositions: compose both again
        a, b = _job(tmp, "scratch.max_epochs=1"), _job(tmp, "scratch.max_epochs=2")
        if _second(a) == _second(b):
            break
    assert _second(a) == _second(b)
    for cfg in (a, b):
        hydra_dir = Path(cfg.paths.output_dir) / ".hydra"  # as Hydra writes it before the job
        hydra_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(cfg, hydra_dir / "config.yaml")
        train(cfg)
    return tmp, Path(a.paths.output_dir), Path(b.paths.output_dir)


def test_two_runs_started_in_the_same_second_keep_their_own_folders(two_runs):
    tmp, a, b = two_runs
    assert a != b and a.parent == b.parent == tmp / "outputs" / "tiny" / "runs"
    for run, epochs in ((a, 1), (b, 2)):
        assert yaml.safe_load((run / "config_resolved.yaml").read_text())["scratch"]["max_epochs"] == epochs
        ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
        assert ckpt["epoch"] == epochs - 1 and ckpt["polypsam"]["config"]["scratch"]["max_epochs"] == epochs
        assert read_metrics(run / "csv")["val/dice"].notna().sum() == epochs


def test_a_second_process_on_a_folder_in_use_stops_with_one_line(two_runs, tmp_path, capfd):
    _, run, _ = two_runs
    before = _digest(run)
    with held_elsewhere(run) as holder:
        # a new run given the folder by name: refused before Hydra writes .hydra/ into it
        code, _, err = run_cli("polypsam.train", *TINY, f"paths.root_dir={tmp_path}", f"hydra.run.dir={run}",
                               capfd=capfd)
        assert_one_error(code, err, run, f"in use by pid {holder.pid}")
        # resuming the run while it runs
        code, _, err = run_cli("polypsam.train", f"resume={run}", capfd=capfd)
        assert_one_error(code, err, run, f"in use by pid {holder.pid}")
        # a DDP launcher: refused before its ddp/ folder is made
        cfg = _job(tmp_path, "trainer.devices=2", "trainer.strategy=ddp", "trainer.accelerator=cpu")
        cfg.paths.output_dir = str(run)
        with pytest.raises(RunDirInUse, match=f"in use by pid {holder.pid}"):
            run_maybe_distributed(train, cfg)
    assert _digest(run) == before and not (run / "ddp").exists()


def test_the_claim_ends_with_its_process_and_stays_out_of_forked_children(tmp_path):
    run = tmp_path / "run"
    with held_elsewhere(run) as holder:
        os.kill(holder.pid, signal.SIGKILL)  # as a run killed mid-epoch: resume= must find the folder free
        holder.wait(timeout=30)
        with claim_run_dir(run):
            pass
    ready, started = os.pipe()
    with claim_run_dir(run):
        child = os.fork()
        if child == 0:  # as a DataLoader worker: it lives on, and must close its copy of the lock
            try:
                os.write(started, b"1")  # fork() has returned here: the at-fork hooks have run
                signal.pause()
            finally:
                os._exit(0)
        assert os.read(ready, 1) == b"1"
    try:
        with claim_run_dir(run):  # free again, although the child lives on
            pass
    finally:
        os.kill(child, signal.SIGKILL)
        os.waitpid(child, 0)
        os.close(ready)
        os.close(started)


@pytest.mark.parametrize("variables", [{}, {"RANK": "1"}, {"LOCAL_RANK": "2"}, {"SLURM_PROCID": "3"},
                                       {"JSM_NAMESPACE_RANK": "1"}, {"SLURM_PROCID": "3", "LOCAL_RANK": "0"},
                                       {"RANK": "0", "SLURM_PROCID": "5"}])
def test_the_claims_rank_is_lightnings(variables, monkeypatch):
    """ClaimRunDir reads the rank as Lightning does without importing it (run_dir.environment_rank): the same
    answer for every variable Lightning reads, alone and in the orders it prefers them."""
    from lightning.fabric.utilities.rank_zero import _get_rank

    for key in RANK_VARIABLES:
        monkeypatch.delenv(key, raising=False)
    for key, value in variables.items():
        monkeypatch.setenv(key, value)
    assert environment_rank() == (_get_rank() or 0)
