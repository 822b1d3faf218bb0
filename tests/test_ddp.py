"""DDP inside Hydra multirun: the real CLI, 2 jobs x 2 CPU ranks on gloo; the paper sweep's grid."""

import csv
import json
import os
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf, open_dict

import warm
from polypsam.config import CONF_DIR
from polypsam.errors import ConfigError
from polypsam.training.launch import check_unused_parameters, run_maybe_distributed, world_plan

pytestmark = pytest.mark.slow  # real data or several processes

REPO = Path(__file__).resolve().parents[1]
TINY_DDP = ["+experiment=tiny", "trainer.devices=2", "trainer.strategy=ddp", "trainer.accelerator=cpu"]


def cli(*args, timeout=300):
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled",
           "NO_ALBUMENTATIONS_UPDATE": "1"}
    return warm.run("polypsam.train", *args, cwd=REPO, env=env, timeout=timeout)


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] not in ("Z", "X")
    except OSError:
        return False


@pytest.mark.slow
def test_multirun_of_two_jobs_each_a_world_of_two_ranks(tmp_path):
    sweep = tmp_path / "sweep"
    proc = cli("-m", *TINY_DDP, "scratch.lr=1e-3,2e-3", f"paths.root_dir={tmp_path}",
               f"hydra.sweep.dir={sweep}", "test_after_training=false")  # the evaluation is tested elsewhere
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    out = proc.stdout + proc.stderr
    assert out.count("Launching 2 jobs locally") == 1  # the sweep ran once, not once per rank
    assert out.count("validation Dice: best") == 2  # one report per job, from global rank 0 only
    assert sorted(p.name for p in sweep.iterdir()) == ["0", "1", "multirun.yaml"]

    ports = set()
    for job, lr in (("0", 1e-3), ("1", 2e-3)):
        run = sweep / job
        # one resolved config, one checkpoint folder, one metrics file, all in the job's one directory
        resolved = yaml.safe_load((run / "config_resolved.yaml").read_text())
        assert resolved["optimizer"]["lr"] == lr and resolved["paths"]["output_dir"] == str(run)
        assert (run / ".hydra" / "config.yaml").is_file()
        assert [p.relative_to(run).as_posix() for p in run.rglob("*.ckpt")] == ["checkpoints/best.ckpt",
                                                                                 "checkpoints/last.ckpt"]
        assert [p.relative_to(run).as_posix() for p in run.rglob("metrics.csv")] == ["csv/metrics.csv"]
        with open(run / "csv" / "metrics.csv") as f:
            dice = [float(r["val/dice"]) for r in csv.DictReader(f) if r.get("val/dice")]
        assert len(dice) == 2  # zero-shot + epoch 0, logged once (not once per rank)
        results = json.loads((run / "results.json").read_text())
        assert results["best_val_dice"] == pytest.approx(dice[-1], abs=1e-6)
        assert results["accumulate_grad_batches"] == 1 and results["effective_batch_size"] == 8  # 4 x 2 ranks

        launch = json.loads((run / "ddp" / "launch.json").read_text())
        assert launch["status"] == "ok" and launch["world_size"] == 2
        ports.add(launch["master_port"])
        assert not any(_alive(pid) for pid in launch["rank_pids"])  # the ranks are gone

        names = []
        for rank in (0, 1):
            log = (run / "ddp" / f"rank{rank}.log").read_text()
            assert f"Initializing distributed: GLOBAL_RANK: {rank}, MEMBER: {rank + 1}/2" in log
            assert f"rank {rank}: process group destroyed" in log
            report = json.loads((run / "ddp" / f"rank{rank}.json").read_text())
            assert report["global_rank"] == rank and report["world_size"] == 2
            assert report["environment"] == "LightningEnvironment" and report["strategy"] == "DDPStrategy"
            first = report["epochs"][0]
            assert first["batches"] == 2 and first["images"] == 8  # 16 training images over 2 ranks
            names.append(set(first["names"]))
        assert len(names[0]) == len(names[1]) == 8 and not names[0] & names[1]  # each rank its own share
    assert len(ports) == 2  # a free port per job


@pytest.mark.slow
def test_a_failing_rank_is_one_line_and_nothing_hangs(tmp_path):
    missing = tmp_path / "missing"
    run = tmp_path / "run"
    proc = cli(*TINY_DDP, "data=pranet", f"data.root={missing}", f"paths.root_dir={tmp_path}",
               f"hydra.run.dir={run}", timeout=240)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"error: {missing}: data root does not exist" in proc.stderr
    assert "Traceback" not in proc.stderr
    launch = json.loads((run / "ddp" / "launch.json").read_text())
    assert launch["status"] == "failed" and launch["error"]["type"] == "DataError"
    assert not any(_alive(pid) for pid in launch["rank_pids"])
    # the details are kept in the failed rank's log
    assert "Traceback" in (run / "ddp" / f"rank{launch['failed_rank']}.log").read_text()


@pytest.mark.slow
def test_every_rank_keeps_a_frozen_batchnorm_encoder_frozen(tmp_path):
    """Decoder-only on tiny_bn over 2 gloo ranks: each rank runs the frozen-state guard at every checkpoint
    and at the end of fit, and the checkpoint holds the encoder the run started from, bit for bit."""
    import torch

    from polypsam.models import build_model

    run = tmp_path / "run"
    proc = cli(*TINY_DDP, "model=tiny_bn", "strategy=dec", "scratch.max_epochs=2", f"paths.root_dir={tmp_path}",
               f"hydra.run.dir={run}")
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    state = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    fresh = build_model("tiny_bn").image_encoder.state_dict()
    assert fresh and all(torch.equal(state[f"net.image_encoder.{k}"], v) for k, v in fresh.items())
    assert int(fresh["1.num_batches_tracked"]) == 0


def test_unused_parameters_under_ddp_are_a_clear_error_before_any_rank_starts(tmp_path):
    proc = cli(*TINY_DDP, "strategy.freeze_prompt_unused=false", f"paths.root_dir={tmp_path}",
               f"hydra.run.dir={tmp_path / 'run'}", timeout=120)
    assert proc.returncode == 2
    assert "error: strategy.freeze_prompt_unused=false" in proc.stderr
    assert "mask_decoder.iou_prediction_head" in proc.stderr
    assert "ddp_find_unused_parameters_true" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "run" / "ddp").exists()


def _compose(overrides):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name="train", overrides=overrides, return_hydra_config=True)


def test_which_configurations_ddp_accepts():
    ok = [[], ["strategy.freeze_prompt_unused=false", "trainer.strategy=ddp_find_unused_parameters_true"],
          # everything that gets no gradient is frozen by the strategy itself
          ["strategy=custom", "strategy.freeze_prompt_unused=false",
           "strategy.freeze=[prompt_encoder,mask_decoder.iou_prediction_head,mask_decoder.output_hypernetworks_mlps]"]]
    for extra in ok:
        check_unused_parameters(_compose(TINY_DDP + extra))
    with pytest.raises(ConfigError, match="output_hypernetworks_mlps.1"):
        check_unused_parameters(_compose(TINY_DDP + ["strategy=dec", "strategy.freeze_prompt_unused=false"]))
    cfg = _compose(TINY_DDP + ["trainer.strategy=ddp_spawn", f"paths.output_dir={REPO / 'nonexistent'}"])
    with pytest.raises(ConfigError, match="use trainer.strategy=ddp"):
        run_maybe_distributed(lambda c: pytest.fail("must not run"), cfg)
    assert world_plan(_compose(TINY_DDP + ["trainer.num_nodes=3"])) == (2, 3)


PAPER = {  # job -> (model, strategy, train dirs, test sets)
    "enc_dec_vitb": ("vit_b", "enc_dec", ["TrainDataset"], None),
    "dec_vitb": ("vit_b", "dec", ["TrainDataset"], None),
    "enc_dec_vitl": ("vit_l", "enc_dec", ["TrainDataset"], None),
    "dec_vitl": ("vit_l", "dec", ["TrainDataset"], None),
    "enc_dec_vitb_cvc300": ("vit_b", "enc_dec", ["TrainDataset", "TestDataset/CVC-300"], ["CVC-ColonDB"]),
    "enc_dec_vitl_cvc300": ("vit_l", "enc_dec", ["TrainDataset", "TestDataset/CVC-300"], ["CVC-ColonDB"]),
}


def test_paper_sweep_expands_to_the_papers_jobs_each_on_two_gpus():
    base = _compose(["+sweep=paper"])
    params = [f"{k}={v}" for k, v in base.hydra.sweeper.params.items()]
    jobs = BasicSweeper.split_arguments(OverridesParser.create().parse_overrides(params), None)[0]
    assert len(jobs) == len(PAPER)
    seen = {}
    for job in jobs:
        cfg = _compose(["+sweep=paper", *job])
        name = cfg.hydra.runtime.choices["sweep/paper_jobs"]
        with open_dict(cfg):
            cfg.paths.output_dir = "/tmp/polypsam-compose-test"
            del cfg["hydra"]
        c = OmegaConf.to_container(cfg, resolve=True)
        d = c["data"]
        seen[name] = (c["model"]["name"], c["strategy"]["name"], d["train_dirs"], d["test_sets"])
        assert c["trainer"]["devices"] == 2 and c["trainer"]["strategy"] == "ddp"
        assert c["optimizer"]["lr"] == 4e-6 and c["scratch"]["max_epochs"] == 200 and c["loss"] == "dice"
        assert c["trainer"]["precision"] == "auto"  # 16-mixed on the paper's V100s, bf16-mixed on A100/H100
    assert seen == PAPER
    sweep_dirs = OmegaConf.to_container(base.hydra.sweep, resolve=False)
    # job folders such as 0_enc_dec_vitb
    assert sweep_dirs["subdir"] == "${hydra.job.num}_${hydra.runtime.choices.sweep/paper_jobs}"
