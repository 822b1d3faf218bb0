"""Hydra's submitit launcher: the local executor runs a tiny DDP job; the SLURM config composes into the
sbatch script we mean; under SLURM (one task per GPU) polypsam starts no processes itself."""

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate
from omegaconf import OmegaConf, open_dict

from polypsam.config import CONF_DIR
from polypsam.errors import ConfigError
from polypsam.training.launch import run_maybe_distributed

pytestmark = pytest.mark.slow  # real data or several processes

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_local_submitit_launcher_runs_a_tiny_ddp_job(tmp_path):
    sweep = tmp_path / "sweep"
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled",
           "NO_ALBUMENTATIONS_UPDATE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "polypsam.train", "-m", "hydra/launcher=local",
                             "+experiment=tiny", "trainer.devices=2", "trainer.strategy=ddp",
                             "trainer.accelerator=cpu",
                             f"paths.root_dir={tmp_path}", f"hydra.sweep.dir={sweep}",
                             "test_after_training=false"],  # the evaluation after training is tested elsewhere
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, f"{out[-3000:]}\n{err[-5000:]}"
    assert "Submitit 'local' sweep output dir" in out + err
    run = sweep / "0"
    assert (run / "checkpoints" / "best.ckpt").is_file() and (run / "csv" / "metrics.csv").is_file()
    assert json.loads((run / "results.json").read_text())["best_val_dice"] is not None
    launch = json.loads((run / "ddp" / "launch.json").read_text())
    assert launch["status"] == "ok" and launch["world_size"] == 2
    assert launch["parent_pid"] != proc.pid  # the job ran in submitit's process, which started the ranks
    for rank in (0, 1):
        assert json.loads((run / "ddp" / f"rank{rank}.json").read_text())["epochs"][0]["images"] == 8
    logs = list((sweep / ".submitit").glob("*/*_0_log.out"))
    assert len(logs) == 1 and list(logs[0].parent.glob("*_0_result.pkl"))


def _compose(overrides):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3", job_name="train"):
        return compose(config_name="train", overrides=overrides, return_hydra_config=True)


def test_slurm_launcher_asks_for_one_task_per_gpu_on_each_node(tmp_path, monkeypatch):
    import submitit
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf

    cfg = _compose(["hydra/launcher=slurm", "trainer.devices=4", "trainer.num_nodes=2",
                    "hydra.launcher.partition=gpu", f"hydra.sweep.dir={tmp_path}"])
    launcher = instantiate(cfg.hydra.launcher)
    assert type(launcher).__name__ == "SlurmLauncher"
    p = dict(launcher.params)
    assert (p["nodes"], p["tasks_per_node"], p["gpus_per_node"]) == (2, 4, 4)
    # The sbatch script submitit writes from these parameters, as the launcher passes them. submitit only
    # checks that an `srun` exists before it writes one; this machine has none.
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "srun").write_text("#!/bin/sh\nexit 1\n")
    (fake / "srun").chmod(stat.S_IRWXU)
    monkeypatch.setenv("PATH", f"{fake}{os.pathsep}{os.environ['PATH']}")
    folder = p.pop("submitit_folder")
    ex = submitit.AutoExecutor(cluster="slurm", folder=folder, slurm_max_num_timeout=p.pop("max_num_timeout"))
    base = set(OmegaConf.structured(BaseQueueConf).keys())
    ex.update_parameters(**{k if k in base else f"slurm_{k}": v for k, v in p.items()})
    sbatch = ex._executor._make_submission_file_text("python -u -m submitit.core._submit x", "uid")
    for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=4", "#SBATCH --gpus-per-node=4",
                 "#SBATCH --partition=gpu", "#SBATCH --cpus-per-task=8", "#SBATCH --time=2880"):
        assert line in sbatch, sbatch
    assert "srun" in sbatch


def _tiny_ddp(tmp_path, devices=2, nodes=1):
    cfg = _compose(["+experiment=tiny", f"trainer.devices={devices}", f"trainer.num_nodes={nodes}",
                    "trainer.strategy=ddp", "trainer.accelerator=cpu"])
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path / "run")
        del cfg["hydra"]
    return cfg


def _slurm_env(monkeypatch, ntasks, procid, per_node=None):
    for k in list(os.environ):
        if k.startswith(("SLURM_", "TORCHELASTIC_")) or k in ("LOCAL_RANK", "WORLD_SIZE", "RANK"):
            monkeypatch.delenv(k)
    monkeypatch.setenv("SLURM_NTASKS", str(ntasks))
    monkeypatch.setenv("SLURM_NTASKS_PER_NODE", str(per_node or ntasks))
    monkeypatch.setenv("SLURM_PROCID", str(procid))
    monkeypatch.setenv("SLURM_LOCALID", str(procid))
    monkeypatch.setenv("SLURM_NODEID", "0")
    monkeypatch.setenv("SLURM_JOB_NAME", "train")
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_NODELIST", "node1")


def test_under_slurm_each_task_is_one_rank_and_nothing_is_spawned(tmp_path, monkeypatch):
    """As srun starts it: task 1 of 2. polypsam runs the job in this very process as global rank 1."""
    from lightning.pytorch.utilities import rank_zero_only

    _slurm_env(monkeypatch, ntasks=2, procid=1)
    monkeypatch.setattr(rank_zero_only, "rank", 0)
    calls = []

    def job(cfg):
        calls.append((os.getpid(), rank_zero_only.rank, cfg.callbacks.rank_report.dirpath))
        return {"best_val_dice": 0.5}

    assert run_maybe_distributed(job, _tiny_ddp(tmp_path)) == {"best_val_dice": 0.5}
    assert calls == [(os.getpid(), 1, str(tmp_path / "run" / "ddp"))]
    log = (tmp_path / "run" / "ddp" / "rank1.log").read_text()
    assert "rank 1 of 2 (SLURMEnvironment)" in log and not (tmp_path / "run" / "ddp" / "launch.json").exists()


def test_slurm_task_count_must_match_the_trainer(tmp_path, monkeypatch):
    _slurm_env(monkeypatch, ntasks=4, procid=0, per_node=2)
    with pytest.raises(ConfigError, match=r"started 4 processes, but trainer.devices x trainer.num_nodes"):
        run_maybe_distributed(lambda cfg: pytest.fail("must not run"), _tiny_ddp(tmp_path))
    run_maybe_distributed(lambda cfg: None, _tiny_ddp(tmp_path, devices=2, nodes=2))  # 2 nodes x 2 tasks
