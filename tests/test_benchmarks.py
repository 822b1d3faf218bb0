"""The benchmark scripts run end to end at their smallest size and report what they measured."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import warm

REPO = Path(__file__).resolve().parents[1]


def _run(script: str, *args: str, timeout: int = 400) -> str:  # generous: a loaded 2-core machine
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "NO_ALBUMENTATIONS_UPDATE": "1", "COLUMNS": "220"}
    proc = warm.run(f"benchmarks.{script}", "--smoke", *args, cwd=REPO, env=env, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc.stdout


def test_train_throughput_smoke(real_root, tmp_path):
    md, js = tmp_path / "RESULTS.md", tmp_path / "train.json"
    md.write_text("# notes kept by hand\n\n<!-- BEGIN train_throughput cpu -->\nold figures\n"
                  "<!-- END train_throughput cpu -->\n\ntext after the block\n")
    out = _run("train_throughput", "--results", str(md), "--json", str(js), "--data-root", str(real_root))
    for col in ("img/s", "peak MiB", "speed x stock", "model GFLOP/img", "MFU"):
        assert col in out
    res = json.loads(js.read_text())
    labels = [c["label"] for c in res["cases"]]
    assert labels == ["tiny enc_dec stock", "tiny enc_dec sdpa", "tiny enc_dec sdpa ckpt",
                      "tiny dec recompute enc sdpa", "tiny dec cached emb stock", "tiny dec cached emb sdpa"]
    for lab in labels:
        assert lab in out
    cases = {c["label"]: c for c in res["cases"]}
    assert all(c["error"] is None and c["images_per_s"] > 0 and c["counted_gflop_per_img"] > 0
               for c in res["cases"])
    # model FLOPs: the stock path's count, shared by attention/checkpointing variants of a strategy
    stock = cases["tiny enc_dec stock"]["model_gflop_per_img"]
    assert cases["tiny enc_dec sdpa ckpt"]["model_gflop_per_img"] == stock
    # checkpointing recomputes the encoder forward in backward: more FLOPs executed than the model needs
    assert cases["tiny enc_dec sdpa ckpt"]["counted_gflop_per_img"] > cases["tiny enc_dec sdpa"]["counted_gflop_per_img"]
    # a decoder-only step does less work than one that also runs the encoder
    cached = cases["tiny dec cached emb sdpa"]
    assert cached["model_gflop_per_img"] < cases["tiny dec recompute enc sdpa"]["model_gflop_per_img"] < stock
    assert cached["model_gflop_per_img"] == cases["tiny dec cached emb stock"]["counted_gflop_per_img"]
    assert res["device"]["kind"] == "cpu" and res["device"]["peak_gflops"] > 0
    ep = res["epoch"]
    assert set(ep["seconds"]) == {"recompute", "cache_cold", "cache_warm", "resident_warm"}
    assert ep["cache_entries"] == ep["images"] and len(ep["resident_ratios"]) == ep["repeats"]
    assert "speed-up over recomputing" in out
    text = md.read_text()  # the block is replaced, what surrounds it is kept
    assert text.startswith("# notes kept by hand") and text.rstrip().endswith("text after the block")
    assert "old figures" not in text and text.count("<!-- BEGIN train_throughput cpu -->") == 1
    assert "tiny dec cached emb sdpa" in text and "Speed-up of a cached epoch" in text


def test_data_throughput_smoke(real_root, tmp_path):
    js = tmp_path / "data.json"
    out = _run("data_throughput", "--json", str(js), "--data-root", str(real_root))
    for col in ("decode img/s", "image cache warm img/s", "embedding cache warm img/s", "resident img/s"):
        assert col in out
    (row,) = json.loads(js.read_text())["rows"]
    assert row["images"] == 8 and row["workers"] == 0 and row["size"] == 64
    assert all(v > 0 for v in row["images_per_s"].values())
    assert row["image_cache_mib_per_image"] > 0 and row["embedding_cache_mib_per_image"] == pytest.approx(2.0, 0.01)


@pytest.mark.slow  # a subprocess
def test_missing_data_root_is_a_clear_error(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "NO_ALBUMENTATIONS_UPDATE": "1"}
    proc = subprocess.run([sys.executable, "-m", "benchmarks.data_throughput", "--smoke", "--data-root",
                           str(tmp_path)], cwd=REPO, env=env, check=False, capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and f"{tmp_path}: no TrainDataset folder" in proc.stderr


@pytest.mark.slow
def test_auto_cost_smoke(real_root):
    out = _run("auto_cost", "--runtime", "torch", "--data-root", str(real_root), timeout=300)
    lines = {ln.split("│")[1].strip(): ln for ln in out.splitlines() if ln.count("│") >= 3}
    assert "1.00x" in lines["none"]  # the reference row
    ratio = float(lines["auto, conf/prompt/auto.yaml"].split("│")[3].strip().rstrip("x"))
    assert ratio > 0


@pytest.mark.slow  # a subprocess
def test_encoder_steps_smoke():
    """Each variant is timed against the plain step and checked against its loss and gradient norm."""
    out = _run("encoder_steps")
    rows = {c[1].strip(): [x.strip() for x in c[2:6]] for c in (ln.split("│") for ln in out.splitlines())
            if len(c) >= 6 and c[1].strip().startswith(("enc_dec", "lora"))}
    assert set(rows) == {f"{s} {v}" for s in ("enc_dec", "lora") for v in ("plain", "channels_last", "checkpointed")}
    assert rows["enc_dec plain"][1] == "1.00x" and float(rows["enc_dec plain"][0]) > 0
    assert float(rows["enc_dec channels_last"][3]) < 1e-4  # the same gradients in the other layout


@pytest.mark.slow  # a subprocess
def test_cpu_bf16_smoke():
    out = _run("cpu_bf16")
    for label in ("tiny dec cached emb, batch 2", "U-Net 64 px, batch 2"):
        row = next(ln for ln in out.splitlines() if label in ln and "│" in ln)
        fp32, bf16, ratio = (float(c.strip().rstrip("x")) for c in row.split("│")[2:5])
        assert fp32 > 0 and bf16 > 0 and ratio > 0


def test_runtime_rows_name_the_encoder_that_ran(real_root, tmp_path):
    """benchmarks/runtimes.py: a runtime that falls back to torch (here its store cannot be written) is a torch
    row, not a row of the runtime asked for. Checked: labelled by the (runtime, precision) asked for, it fails."""
    from benchmarks import runtimes

    from polypsam.models import build_model

    blocked = tmp_path / "a file where the store should be"
    blocked.write_text("")
    net = build_model("tiny").eval()
    encoders = runtimes.build_encoders(net, [("torch", "fp32"), ("onnxruntime", "fp32")], str(blocked))
    rows = runtimes.encoder_rows(net, encoders, runtimes.images(real_root / "TestDataset" / "Kvasir", 2))
    assert [r[0] for r in rows] == ["torch fp32", "torch fp32"] and rows[1][-1] == "0.0e+00"
