"""Training through the real entry point: Hydra composition, Lightning Trainer, real files."""

import csv
import json
import os
from pathlib import Path

import pytest
import torch
import yaml

import warm
from polypsam.devices import cpu_has_amx_bf16

REPO = Path(__file__).resolve().parents[1]


def run_train(*overrides, cwd=None, check=True, env_extra=None):
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled",
           **(env_extra or {})}
    proc = warm.run("polypsam.train", *overrides, cwd=cwd or REPO, env=env, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"train failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def test_one_epoch_tiny_on_real_images(small_root, tmp_path):
    run = tmp_path / "run"
    proc = run_train("+experiment=tiny", "data=pranet", f"data.root={small_root}", "data.num_workers=0",
                     "data.limit_train=null", "data.limit_val=null", f"paths.root_dir={tmp_path}",
                     f"data.embedding_cache.dir={tmp_path / 'cache'}", f"hydra.run.dir={run}",
                     "trainer.precision=auto")
    assert (run / "checkpoints" / "best.ckpt").is_file() and (run / "checkpoints" / "last.ckpt").is_file()
    assert (run / "config_resolved.yaml").is_file() and (run / ".hydra" / "config.yaml").is_file()
    # the run records the precision it used: auto is bf16-mixed on a CPU with AMX, else 32
    precision = "bf16-mixed" if cpu_has_amx_bf16() else "32"
    assert yaml.safe_load((run / "config_resolved.yaml").read_text())["trainer"]["precision"] == precision
    split = json.loads((run / "split.json").read_text())
    assert split["counts"] == {"train": 11, "val": 3}
    rows = list(csv.DictReader(open(run / "csv" / "metrics.csv")))
    dice = [float(r["val/dice"]) for r in rows if r.get("val/dice")]
    assert len(dice) == 2 and all(0.0 <= d <= 1.0 for d in dice)  # zero-shot + epoch 0
    results = json.loads((run / "results.json").read_text())
    assert results["best_val_dice"] == pytest.approx(dice[-1], abs=1e-6)
    assert results["accumulate_grad_batches"] == 2 and results["effective_batch_size"] == 8
    # and what ran the image encoder: enc_dec trains it, in torch at the trainer's precision
    assert results["precision"] == precision and results["encoder"] == {
        "runtime": "torch", "precision": "fp32" if precision == "32" else precision, "trains": True}
    assert set(results["test"]) == {"test/Kvasir/dice", "test/Kvasir/iou", "test/CVC-ClinicDB/dice",
                                    "test/CVC-ClinicDB/iou"}
    ckpt = torch.load(run / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["polypsam"]["model"] == "tiny" and ckpt["polypsam"]["spec"]["image_size"] == 64
    assert "validation Dice: best" in proc.stdout
    assert (run / "overlays" / "epoch_000.png").is_file()


def test_dec_strategy_fills_and_reuses_the_embedding_cache(small_root, tmp_path):
    cache = tmp_path / "cache"
    common = ["+experiment=tiny", "strategy=dec", "data=pranet", f"data.root={small_root}", "data.num_workers=0",
              f"paths.root_dir={tmp_path}", f"data.embedding_cache.dir={cache}", "scratch.max_epochs=2"]
    run_train(*common, f"hydra.run.dir={tmp_path / 'a'}")
    files = sorted(cache.glob("v2/*/*/*.pt"))
    assert len(files) == 20  # 11 train + 3 val images, and the 6 test images evaluation encoded, once each
    meta = json.loads((tmp_path / "a" / "eval" / "meta.json").read_text())
    assert "(0 read, 6 written; fp16)" in meta["embeddings"]
    emb = torch.load(files[0], weights_only=True)
    assert emb.dtype == torch.float16 and emb.shape == (32, 8, 8)
    mtimes = {f: f.stat().st_mtime_ns for f in files}
    # the second run keeps the embeddings in memory (data.embedding_cache.resident): read once, same result
    run_train(*common, "data.embedding_cache.resident=true", f"hydra.run.dir={tmp_path / 'b'}")
    assert {f: f.stat().st_mtime_ns for f in sorted(cache.glob("v2/*/*/*.pt"))} == mtimes  # reused, not rewritten
    assert "(6 read, 0 written; fp16)" in json.loads((tmp_path / "b" / "eval" / "meta.json").read_text())["embeddings"]
    a = json.loads((tmp_path / "a" / "results.json").read_text())
    b = json.loads((tmp_path / "b" / "results.json").read_text())
    assert a["best_val_dice"] == pytest.approx(b["best_val_dice"], abs=1e-3)


@pytest.mark.slow  # a subprocess or a training run
def test_bad_input_is_one_clear_line(tmp_path):
    proc = run_train("+experiment=tiny", "data=pranet", f"data.root={tmp_path / 'missing'}",
                     f"paths.root_dir={tmp_path}", f"hydra.run.dir={tmp_path / 'run'}", check=False)
    assert proc.returncode == 2
    assert f"error: {tmp_path / 'missing'}: data root does not exist" in proc.stderr
    assert "Traceback" not in proc.stderr
    proc = run_train("+experiment=tiny", "strategy=dec", "data.embedding_cache.enabled=true",
                     "+data/augment=basic", f"paths.root_dir={tmp_path}", f"hydra.run.dir={tmp_path / 'run2'}",
                     check=False)
    assert proc.returncode == 2 and "mutually exclusive" in proc.stderr


@pytest.mark.slow  # a subprocess or a training run
def test_wandb_offline_logs_metrics_and_overlays(tmp_path):
    run = tmp_path / "run"
    run_train("+experiment=tiny", "logger=wandb", "logger.wandb.offline=true", f"paths.root_dir={tmp_path}",
              f"hydra.run.dir={run}", env_extra={"WANDB_MODE": "offline", "WANDB_SILENT": "true"})
    runs = list((run / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    files = {p.name for p in runs[0].rglob("*")}
    assert any(n.endswith(".wandb") for n in files)  # the offline run record, syncable with `wandb sync`
    overlays = list(runs[0].glob("files/media/images/val/overlays_*.png"))
    assert len(overlays) == 2  # zero-shot validation and epoch 0
    assert (run / "csv" / "metrics.csv").is_file()  # the CSV log is always written too
