"""Frozen-encoder runtimes (OpenVINO, ONNX Runtime): the choice, the store on disk, exactness, cache keys.

Real runtimes throughout. The miniature ``tiny`` SAM exercises the store and the choice in seconds;
LiteMedSAM on real images (slow) checks exactness (fp32: within 1e-4 relative of torch) and that an exact
runtime fills torch's own embedding-cache folder while bf16 gets its own. Each test of a feature says how it
was seen to fail without it.
"""

import dataclasses
import json
import logging

import pytest
import torch
from hydra import compose, initialize_config_dir

from polypsam.config import CONF_DIR, embedding_cache_from_cfg, frozen_encoder_from_cfg, model_from_cfg
from polypsam.data.embedding_cache import FORMAT, EmbeddingCache, file_digest
from polypsam.data.io import read_image
from polypsam.errors import ConfigError
from polypsam.evaluation import EvalSettings
from polypsam.evaluation.runner import run_evaluation
from polypsam.inference import preprocess
from polypsam.models import build_model
from polypsam.runtime import (
    RUNTIMES,
    GraphEncoder,
    RuntimeSettings,
    TorchEncoder,
    build_frozen_encoder,
    embedding_model_key,
)
from polypsam.runtime.registry import TOLERANCE, resolve_runtime
from polypsam.runtime.store import EncoderStore
from polypsam.training.module import PolypSAMModule
from test_train import run_train

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def openvino_runs(precision: str) -> str:
    """What OpenVINO compiles a request for ``precision`` to on this CPU: bf16 needs bf16 support (AMX,
    AVX-512 BF16); without it OpenVINO runs fp32, and the encoder built must say so."""
    import openvino as ov

    supported = precision == "fp32" or "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    return precision if supported else "fp32"


@pytest.fixture(scope="module")
def tiny_store(tmp_path_factory):
    return tmp_path_factory.mktemp("runtimes")


@pytest.fixture(scope="module")
def tiny():
    return build_model("tiny").eval()


def test_auto_picks_the_fastest_exact_runtime_and_bad_choices_say_what_works():
    assert resolve_runtime("auto", "fp32", CPU) == ("openvino", "fp32")
    assert resolve_runtime("auto", "bf16", CPU) == ("openvino", "bf16")
    assert resolve_runtime("auto", "fp32", CUDA) == ("torch", "fp32")  # these runtimes are for CPUs
    with pytest.raises(ConfigError, match="openvino does: set model.runtime"):
        resolve_runtime("onnxruntime", "bf16", CPU)
    with pytest.raises(ConfigError, match="model.runtime=torch does not offer"):
        resolve_runtime("torch", "bf16", CPU)
    with pytest.raises(ConfigError, match="no runtime offers it yet"):
        resolve_runtime("auto", "int8", CPU)
    with pytest.raises(ConfigError, match="choose auto, torch, openvino, onnxruntime"):
        resolve_runtime("tensorrt", "fp32", CPU)
    with pytest.raises(ConfigError, match="device is cuda"):
        resolve_runtime("openvino", "fp32", CUDA)


def test_a_missing_package_falls_back_to_torch_with_one_line_naming_it(monkeypatch, caplog, tiny, tiny_store):
    absent = dataclasses.replace(RUNTIMES["openvino"], package="openvino_not_installed_here")
    monkeypatch.setitem(RUNTIMES, "openvino", absent)
    with caplog.at_level(logging.WARNING):
        enc = build_frozen_encoder(tiny, RuntimeSettings("openvino", "bf16", str(tiny_store)), CPU)
    assert isinstance(enc, TorchEncoder) and enc.model_key() == tiny.encoder_fingerprint()
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(lines) == 1 and "openvino_not_installed_here is not installed" in lines[0]
    assert enc.fallback in lines[0]  # kept for results.json


def test_a_failed_conversion_falls_back_to_torch_naming_runtime_and_model(caplog, tiny, tmp_path):
    blocked = tmp_path / "a file where the store should be"
    blocked.write_text("")
    with caplog.at_level(logging.WARNING):
        enc = build_frozen_encoder(tiny, RuntimeSettings("onnxruntime", "fp32", str(blocked)), CPU)
    assert isinstance(enc, TorchEncoder)
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(lines) == 1 and "model.runtime=onnxruntime could not run the image encoder of model tiny" in lines[0]


@pytest.mark.parametrize("runtime,precision", [("onnxruntime", "fp32"), ("openvino", "fp32"), ("openvino", "bf16")])
def test_runtimes_match_torch_and_key_reduced_precision_apart(tiny, tiny_store, runtime, precision):
    """The encoder is named by the precision that runs (a bf16 request on a CPU without bf16 runs fp32: the
    encoder says fp32, why, and uses the exact folder). Checked: taking the precision asked for, it fails here."""
    ran = openvino_runs(precision) if runtime == "openvino" else precision
    enc = build_frozen_encoder(tiny, RuntimeSettings(runtime, precision, str(tiny_store)), CPU)
    assert isinstance(enc, GraphEncoder) and (enc.runtime, enc.precision) == (runtime, ran)
    assert bool(enc.fallback) == (ran != precision)
    x = torch.randint(0, 256, (3, 3, 64, 64), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    hw = torch.tensor([[64, 64], [40, 64], [64, 23]])
    want = TorchEncoder(tiny).encode(x, hw)
    assert enc.encode(x, hw).shape == want.shape == (3, 32, 8, 8)
    assert rel(enc.encode(x, hw), want) < (1e-4 if ran == "fp32" else 0.1)
    fingerprint = tiny.encoder_fingerprint()
    assert (enc.model_key() == fingerprint) == (ran == "fp32")  # exact runtimes share torch's folder
    record = json.loads(next(tiny_store.glob(f"{fingerprint}-64px-v*/encoder.json")).read_text())
    assert any(k.startswith(runtime) and k.endswith(ran) for k in record["checked"])


def test_a_torn_or_edited_export_is_rebuilt_not_trusted(tiny, tmp_path):
    store = EncoderStore(tmp_path, tiny, tiny.encoder_fingerprint())
    path = store.onnx_path()
    good = path.read_bytes()
    path.write_bytes(good[: len(good) // 2])  # a copy cut short
    assert store.onnx_path().read_bytes() == good  # the export is deterministic: the same bytes again
    enc = build_frozen_encoder(tiny, RuntimeSettings("onnxruntime", "fp32", str(tmp_path)), CPU)
    assert isinstance(enc, GraphEncoder)


def test_config_runtime_keys_reach_the_cache_and_not_the_model_builder(tiny_store):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        lite = compose("train", overrides=["+experiment=demo"])
        cfg = compose("train", overrides=["+experiment=tiny", "strategy=dec", f"paths.cache_dir={tiny_store.parent}",
                                          "model.runtime=openvino", "model.runtime_precision=bf16",
                                          "trainer.accelerator=cpu"])
    assert (lite.model.name, lite.model.runtime, lite.model.runtime_precision) == ("lite", "auto", "fp32")
    net = model_from_cfg(cfg.model)  # build_model does not take the runtime keys
    net.image_encoder.requires_grad_(False)
    assert RuntimeSettings.from_cfg(cfg).store == str(tiny_store.parent / "runtimes")
    enc = frozen_encoder_from_cfg(cfg, net)
    assert (enc.runtime, enc.precision) == ("openvino", openvino_runs("bf16"))
    cache = embedding_cache_from_cfg(cfg, net, enc)
    assert cache.dir.name == embedding_model_key(net.encoder_fingerprint(), "openvino", openvino_runs("bf16"))
    net.image_encoder.requires_grad_(True)  # a training encoder stays in torch
    assert frozen_encoder_from_cfg(cfg, net) is None


# -- LiteMedSAM on real images -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def lite_encoders(tmp_path_factory):
    """LiteMedSAM exported once for the module, run by each runtime."""
    store = str(tmp_path_factory.mktemp("lite_runtimes"))
    net = build_model("lite").eval()
    return net, store, {(r, p): build_frozen_encoder(net, RuntimeSettings(r, p, store), CPU)
                        for r, p in (("onnxruntime", "fp32"), ("openvino", "fp32"), ("openvino", "bf16"))}


def test_lite_runtimes_are_exact_in_fp32_on_real_images(real_root, lite_encoders):
    net, _, encoders = lite_encoders
    paths = [sorted((real_root / "TestDataset" / name / "images").iterdir())[0] for name in ("Kvasir", "CVC-ClinicDB")]
    pre = [preprocess(read_image(p), net.spec) for p in paths]
    x, hw = torch.stack([c for c, _ in pre]), torch.tensor([rz.input_hw for _, rz in pre])
    want = TorchEncoder(net).encode(x, hw)
    for (runtime, precision), enc in encoders.items():
        assert isinstance(enc, GraphEncoder), runtime
        got = enc.encode(x, hw)
        errors = [rel(g, w) for g, w in zip(got, want)]
        assert max(errors) < TOLERANCE[enc.precision], (runtime, precision, errors)  # fp32 1e-4; bf16 measured 4-5e-2


def test_lite_openvino_fills_torchs_cache_folder_and_torch_reads_it(small_root, lite_encoders, tmp_path):
    """OpenVINO fp32 writes into torch's own folder, and a torch evaluation reads those entries instead of
    encoding again: its counters say so, no entry is rewritten, and two entries swapped after the first
    evaluation change the Dice of exactly those two images (a reader that encoded again would score them as
    before). Checked: with ``batch_embeddings`` encoding every image after loading its entry (counters as
    before), the swapped images score as before and this test fails."""
    net, store, _ = lite_encoders
    cache = tmp_path / "embeddings"

    def evaluate(runtime: str):
        settings = EvalSettings(noise=(), save_masks=False, figures=False, device="cpu", embedding_dir=str(cache),
                                runtime=RuntimeSettings(runtime, "fp32", store))
        return run_evaluation(net, small_root, tmp_path / runtime, settings, verbose=False)

    def entries():
        return {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in cache.glob(f"{FORMAT}/*/*/*.pt")}

    fast = evaluate("openvino")
    assert fast.meta["encoder_runtime"] == "openvino fp32"
    assert [d.name for d in (cache / FORMAT).iterdir()] == [net.encoder_fingerprint()]
    assert "(0 read, 6 written; fp16)" in fast.meta["embeddings"]
    kvasir = sorted((small_root / "TestDataset" / "Kvasir" / "images").iterdir())[:2]
    a, b = (next(cache.glob(f"{FORMAT}/*/*/{file_digest(p)}.pt")) for p in kvasir)
    a_bytes, b_bytes = a.read_bytes(), b.read_bytes()
    a.write_bytes(b_bytes)
    b.write_bytes(a_bytes)
    written = entries()
    slow = evaluate("torch")
    assert slow.meta["encoder_runtime"] == "torch fp32"
    assert "(6 read, 0 written; fp16)" in slow.meta["embeddings"] and entries() == written
    before, after = (r.per_image.set_index(["dataset", "image"])["dice"] for r in (fast, slow))
    swapped = [("Kvasir", p.stem) for p in kvasir]
    assert after.drop(swapped).tolist() == before.drop(swapped).tolist()
    assert all(abs(after[k] - before[k]) > 1e-3 for k in swapped), (before[swapped], after[swapped])


def test_training_fills_the_cache_through_the_runtime(small_root, tmp_path):
    """The cache entries training writes are ONNX Runtime's embeddings, not torch's. Only training runs
    (no evaluation after it), so the export in the store and every entry come from the training process.
    Each entry equals ONNX Runtime's embedding of its image rounded to fp16, value for value; torch's rounds
    apart in a few values (87 of the 28,672 here: the two differ by about 1e-6 relative, the rounding is
    2^-11), which is what tells a runtime fill from a torch fill. Checked: with ``_encode_frozen`` calling
    ``TorchEncoder(self.net)`` (results.json still saying onnxruntime), and with train.py giving the module
    no frozen encoder, this test fails."""
    cache, store = tmp_path / "cache", tmp_path / "store" / "runtimes"
    run_train("+experiment=tiny", "strategy=dec", "data=pranet", f"data.root={small_root}", "data.num_workers=0",
              f"paths.root_dir={tmp_path}", f"paths.cache_dir={store.parent}", "model.runtime=onnxruntime",
              f"data.embedding_cache.dir={cache}", "scratch.max_epochs=1", "test_after_training=false",
              f"hydra.run.dir={tmp_path / 'run'}")
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["encoder"] == {"runtime": "onnxruntime", "precision": "fp32", "trains": False}
    assert not (tmp_path / "run" / "eval").exists() and list(store.glob("*/encoder.onnx"))
    net = build_model("tiny").eval()
    assert [d.name for d in (cache / FORMAT).iterdir()] == [net.encoder_fingerprint()]  # exact: torch's folder
    runtime = build_frozen_encoder(net, RuntimeSettings("onnxruntime", "fp32", str(store)), CPU)
    apart = 0
    for image in sorted((small_root / "TrainDataset" / "images").iterdir()):  # training and validation
        entry = torch.load(next(cache.glob(f"{FORMAT}/*/*/{file_digest(image)}.pt")), weights_only=True)
        canvas, rz = preprocess(read_image(image), net.spec)
        x, hw = canvas[None], torch.tensor([rz.input_hw])
        assert torch.equal(entry, runtime.encode(x, hw)[0].half()), image.name
        apart += int((entry != TorchEncoder(net).encode(x, hw)[0].half()).sum())
    assert apart > 0


def test_results_name_the_encoder_that_ran_and_why_not_the_one_asked_for(tmp_path):
    """``PolypSAMModule.encoder_record``, what train.py writes into results.json."""
    net = build_model("tiny").eval()
    blocked = tmp_path / "a file where the store should be"
    blocked.write_text("")
    fell_back = build_frozen_encoder(net, RuntimeSettings("onnxruntime", "fp32", str(blocked)), CPU)
    net.image_encoder.requires_grad_(False)
    record = PolypSAMModule(net, frozen_encoder=fell_back).encoder_record("bf16-mixed")
    assert (record["runtime"], record["precision"], record["trains"]) == ("torch", "bf16-mixed", False)  # autocast
    assert record["fallback"].startswith("model.runtime=onnxruntime could not run the image encoder of model tiny")
    cache = EmbeddingCache(tmp_path / "cache")  # a cache fill runs outside the autocast
    assert PolypSAMModule(net, embedding_cache=cache).encoder_record("bf16-mixed") == {
        "runtime": "torch", "precision": "fp32", "trains": False}
    net.image_encoder.requires_grad_(True)
    assert PolypSAMModule(net, frozen_encoder=fell_back).encoder_record(32) == {
        "runtime": "torch", "precision": "fp32", "trains": True}
