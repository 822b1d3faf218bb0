"""Training-step throughput of the SAM variants, side by side: images/s, peak memory, model FLOP utilisation.

    PYTHONPATH=src python benchmarks/train_throughput.py            # CPU: reduced sizes; GPU: real sizes
    PYTHONPATH=src python benchmarks/train_throughput.py --probe    # GPU: which batch sizes fit
    PYTHONPATH=src python benchmarks/train_throughput.py --smoke    # seconds, the tiny model (tests)

A step is what ``PolypSAMModule`` does in training: forward (``PolypSAMModule._step``, Dice loss),
backward, AdamW step, on random weights (``build_model(name, pretrained=False)``) and random images
with one box each. Axes: model (vit_b, vit_l, lite), strategy (enc_dec; dec recomputing the frozen
encoder; dec from cached embeddings), stock vs ours (stock: segment_anything's attention and NCHW
mask head; sdpa: SDPA attention in encoder and decoder and the channels-last mask head), gradient
checkpointing. GPU: autocast bf16 (fp16 with a gradient scaler where bf16 is missing, e.g. V100);
CPU: fp32.

FLOPs are counted once per case with ``torch.utils.flop_counter.FlopCounterMode`` on the first
(warm-up) step. MFU uses *model* FLOPs: the count of the stock-attention, non-checkpointed path of
the same model and strategy, so recomputation (checkpointing) and the zero columns SDPA's folded
relative-position bias adds are not counted as useful work. Peak: the GPU's dense bf16 (or V100 fp16)
tensor-core figure; on a CPU, a measured fp32 GEMM rate (so CPU "MFU" is relative to that).

Peak memory: CUDA ``max_memory_allocated`` over the timed steps. CPU: each case runs in a forked child
process, so that no case inherits another's freed heap; its peak is the child's peak resident set (VmHWM,
reset through /proc/self/clear_refs) above its size before the model was built.

Results are printed as a table and written into benchmarks/RESULTS.md between markers named after
this script and the device kind (cpu / cuda), so CPU and GPU figures live side by side.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import pickle
import re
import statistics
import sys
import tempfile
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from functools import partial
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
try:
    import polypsam  # noqa: F401
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, str(REPO / "src"))

import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from polypsam.data.batch import Batch
from polypsam.models import attention as attn
from polypsam.models import build_model
from polypsam.models.freeze import STRATEGIES, freeze_strategy
from polypsam.models.lora import apply_lora
from polypsam.models.sam import ModelSpec, PromptableSAM
from polypsam.prompts import PromptBatch
from polypsam.prompts.box import BoxPrompt
from polypsam.training.module import PolypSAMModule

RESULTS = REPO / "benchmarks" / "RESULTS.md"
DEFAULT_DATA = REPO.parent / "shared" / "data" / "polyp"

# Dense tensor-core peaks in TFLOP/s (bf16; fp16 on V100, which has no bf16), from the vendors' sheets.
GPU_PEAK_TFLOPS = (("H100 PCIe", 756.0), ("H100", 989.0), ("H200", 989.0), ("GH200", 989.0), ("A100", 312.0),
                   ("V100", 125.0))


# -- cases -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    model: str  # registry name, or "<vit>@<px>": that ViT at a reduced input size (CPU runs)
    strategy: str = "enc_dec"  # enc_dec | dec | lora (peft adapters on the encoder, benchmarks/strategies.py)
    cache: bool = False  # dec: embeddings come from the cache, the step is decoder-only
    attention: str = "sdpa"  # stock (segment_anything's attention and mask head) | sdpa (ours)
    ckpt: bool = False  # gradient checkpointing of the ViT blocks
    batch: int = 1
    compile: bool = False

    @property
    def label(self) -> str:
        if self.strategy == "dec":
            parts = ["dec", "cached emb" if self.cache else "recompute enc"]
        else:
            parts = [self.strategy]
        parts.append(self.attention)
        if self.ckpt:
            parts.append("ckpt")
        if self.compile:
            parts.append("compiled")
        return f"{self.model} " + " ".join(parts)

    @property
    def base(self) -> str:
        return self.model.partition("@")[0]

    @property
    def group(self) -> tuple[str, str, bool]:
        return self.model, self.strategy, self.cache

    @property
    def is_stock(self) -> bool:
        """The reference path: segment_anything's own attention and mask head, no checkpointing, not compiled."""
        return self.attention == "stock" and not self.ckpt and not self.compile


def _vit_matrix(model: str, batch: int, compile_: bool, full: bool = True) -> list[Case]:
    """``full=False`` (CPU, vit_l): stock, SDPA and the cached decoder step only, for the time budget."""
    cases = [Case(model, attention="stock", batch=batch), Case(model, attention="sdpa", batch=batch)]
    if full:
        cases += [Case(model, attention="stock", ckpt=True, batch=batch),
                  Case(model, attention="sdpa", ckpt=True, batch=batch),
                  Case(model, strategy="dec", attention="sdpa", batch=batch)]
    cases += [Case(model, strategy="dec", cache=True, attention=a, batch=batch) for a in ("stock", "sdpa")]
    if compile_:
        cases.append(Case(model, attention="sdpa", batch=batch, compile=True))
    return cases


def _lite_matrix(batch: int) -> list[Case]:
    """TinyViT has no SAM attention: stock vs sdpa is the mask decoder's attention and head."""
    return [Case("lite", strategy=st, cache=c, attention=a, batch=batch)
            for st, c in (("enc_dec", False), ("dec", False), ("dec", True)) for a in ("stock", "sdpa")]


def default_cases(device: str, models: list[str], compile_: bool, smoke: bool) -> list[Case]:
    if smoke:
        return [Case("tiny", attention="stock", batch=2), Case("tiny", attention="sdpa", batch=2),
                Case("tiny", attention="sdpa", ckpt=True, batch=2), Case("tiny", strategy="dec", batch=2),
                Case("tiny", strategy="dec", cache=True, attention="stock", batch=2),
                Case("tiny", strategy="dec", cache=True, batch=2)]
    cases = []
    for m in models:
        if m == "lite":
            cases += _lite_matrix(32 if device == "cuda" else 1)
        elif device == "cuda":
            cases += _vit_matrix(m, {"vit_b": 8, "vit_l": 4, "vit_h": 2}[m], compile_)
        else:
            # 224 px: 14x14 tokens, exactly one of SAM's 14x14 windows, every block full width and depth.
            cases += _vit_matrix(f"{m}@224", 1, compile_, full=(m == "vit_b"))
    return cases


def probe_cases() -> list[list[Case]]:
    """Ascending batch sizes, stopped at the first that does not fit (GPU only)."""
    return [[Case("vit_b", attention="sdpa", batch=b) for b in (16, 24, 32, 48)],
            [Case("vit_l", attention="sdpa", batch=b) for b in (8, 12, 16)],
            [Case("vit_l", attention="sdpa", ckpt=True, batch=b) for b in (8, 16, 24, 32)]]


# -- models ----------------------------------------------------------------------------------------
def _reduced_vit(name: str, px: int) -> PromptableSAM:
    """SAM's ViT (full width, depth, heads, window 14) with prompt encoder and decoder at ``px`` input."""
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, TwoWayTransformer

    from polypsam.models.registry import _VIT, SAM_MEAN, SAM_STD

    v = _VIT[name]
    grid = px // 16
    enc = ImageEncoderViT(img_size=px, patch_size=16, embed_dim=v["embed_dim"], depth=v["depth"],
                          num_heads=v["num_heads"], mlp_ratio=4, out_chans=256, qkv_bias=True,
                          norm_layer=partial(nn.LayerNorm, eps=1e-6), use_rel_pos=True, window_size=14,
                          global_attn_indexes=v["global_attn_indexes"])
    prompt = PromptEncoder(embed_dim=256, image_embedding_size=(grid, grid), input_image_size=(px, px),
                           mask_in_chans=16)
    dec = MaskDecoder(num_multimask_outputs=3, transformer_dim=256, iou_head_depth=3, iou_head_hidden_dim=256,
                      transformer=TwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8))
    spec = ModelSpec(f"{name}@{px}", px, SAM_MEAN, SAM_STD, "mean_std", grid, 256, f"{name} at {px} px")
    return PromptableSAM(enc, prompt, dec, spec)


def build(case: Case) -> PromptableSAM:
    if "@" in case.model:
        net = _reduced_vit(case.base, int(case.model.partition("@")[2]))
        if case.attention == "sdpa":
            attn.use_sdpa_attention(net.image_encoder)
            attn.use_sdpa_decoder_attention(net.mask_decoder)
        net.use_stock_mask_head(case.attention == "stock")  # as build_model does
        if case.ckpt:
            attn.enable_gradient_checkpointing(net.image_encoder)
        if case.strategy == "lora":
            apply_lora(net, {}, case.model)
        if case.compile:
            net.image_encoder.compile()
    else:
        net = build_model(case.base, pretrained=False, attention=case.attention, gradient_checkpointing=case.ckpt,
                          compile=case.compile, lora={} if case.strategy == "lora" else None)
    return net


def make_batch(spec: ModelSpec, batch: int, cache: bool, device: torch.device) -> dict:
    """Random images on a Kvasir-like 4:5 canvas, one box each, an elliptic mask inside the box."""
    g = torch.Generator().manual_seed(0)
    s = spec.image_size
    h, w = round(s * 0.8), s
    images = torch.randint(0, 256, (batch, 3, s, s), dtype=torch.uint8, generator=g)
    images[:, :, h:] = 0
    lo = torch.rand(batch, 2, generator=g) * 0.3 + 0.1
    hi = lo + torch.rand(batch, 2, generator=g) * 0.3 + 0.2
    boxes = torch.stack([lo[:, 0] * w, lo[:, 1] * h, hi[:, 0] * w, hi[:, 1] * h], 1)
    ys, xs = torch.meshgrid(torch.arange(s).float(), torch.arange(s).float(), indexing="ij")
    cx, cy = (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2
    rx, ry = (boxes[:, 2] - boxes[:, 0]) / 2, (boxes[:, 3] - boxes[:, 1]) / 2
    masks = (((xs - cx.view(-1, 1, 1)) / rx.view(-1, 1, 1)) ** 2
             + ((ys - cy.view(-1, 1, 1)) / ry.view(-1, 1, 1)) ** 2 <= 1).unsqueeze(1)
    names = [f"img{i}" for i in range(batch)]
    embeddings = None
    if cache:  # what the loader delivers from the embedding cache: fp16
        e = spec.embedding_size
        embeddings = torch.randn(batch, spec.embedding_dim, e, e, generator=g).half().to(device)
    hw = torch.tensor([[h, w]] * batch)
    return Batch(masks=masks.to(device), input_hw=hw.to(device), original_hw=hw.to(device),
                 prompts=PromptBatch(torch.arange(batch, device=device), boxes.to(device)),
                 prompts_original=[], index=torch.arange(batch), names=names, sources=names, image_paths=names,
                 mask_paths=names, keys=[""] * batch, embedded=torch.full((batch,), cache), embeddings=embeddings,
                 images=None if cache else images.to(device))


# -- measuring -------------------------------------------------------------------------------------
def _proc_mib(key: str) -> float:
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{key}:\s+(\d+)", f.read(), re.MULTILINE).group(1)) / 1024


def _reset_cpu_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def amp_dtype(device: torch.device) -> torch.dtype | None:
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Stepper:
    """One model, one optimiser, one batch: ``step()`` is a full training step (``PolypSAMModule._step``,
    backward, AdamW). ``dtype``: autocast's; "auto": bf16 (fp16 without bf16) on a GPU, none (fp32) on a CPU."""

    def __init__(self, case: Case, device: torch.device, dtype: torch.dtype | None | str = "auto"):
        net = build(case)
        frozen = freeze_strategy(net, STRATEGIES[case.strategy], BoxPrompt().unused_parameters)
        self._setup(PolypSAMModule(net, loss="dice", frozen_modules=frozen), case.batch, case.cache, device, dtype)

    @classmethod
    def for_module(cls, module: PolypSAMModule, batch: int, device: torch.device,
                   dtype: torch.dtype | None | str = "auto") -> Stepper:
        """A stepper of a module built elsewhere (the smp baselines of benchmarks/cpu_bf16.py)."""
        self = cls.__new__(cls)
        self._setup(module, batch, False, device, dtype)
        return self

    def _setup(self, module: PolypSAMModule, batch: int, cache: bool, device: torch.device, dtype) -> None:
        self.device, self.module = device, module.to(device)
        net = module.net
        self.module.frozen.set_training_modes(net)  # as PolypSAMModule before every training batch
        self.opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-6)
        self.batch = make_batch(net.spec, batch, cache, device)
        self.dtype = amp_dtype(device) if dtype == "auto" else dtype
        self.scaler = torch.amp.GradScaler("cuda") if self.dtype == torch.float16 else None

    def step(self) -> None:
        ctx = torch.autocast(self.device.type, dtype=self.dtype) if self.dtype else nullcontext()
        with ctx:
            loss, _ = self.module._step(self.batch)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.opt)
            self.scaler.update()
        else:
            loss.backward()
            self.opt.step()
        self.opt.zero_grad(set_to_none=True)


@dataclass
class Result:
    case: Case
    steps: int = 0
    images_per_s: float | None = None
    step_ms: float | None = None
    peak_mib: float | None = None
    counted_gflop_per_img: float | None = None
    model_gflop_per_img: float | None = None
    warmup_s: float | None = None
    error: str | None = None
    extra: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        d = asdict(self)
        d["label"] = self.case.label
        return d


def _cleanup(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run_case(case: Case, device: torch.device, steps: int, warmup: int, count_flops: bool = True) -> Result:
    res = Result(case)
    _cleanup(device)
    cpu_peak = device.type == "cpu" and _reset_cpu_peak()
    base_rss = _proc_mib("VmRSS") if cpu_peak else 0.0
    stepper = None
    try:
        stepper = Stepper(case, device)
        t0 = time.perf_counter()
        if count_flops:
            with FlopCounterMode(display=False) as fc:
                stepper.step()
            res.counted_gflop_per_img = fc.get_total_flops() / case.batch / 1e9
        for _ in range(max(0, warmup - int(count_flops))):
            stepper.step()
        _sync(device)
        res.warmup_s = time.perf_counter() - t0
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        times = []
        t0 = time.perf_counter()
        for _ in range(steps):
            t = time.perf_counter()
            stepper.step()
            if device.type == "cpu":
                times.append(time.perf_counter() - t)
        _sync(device)
        if device.type == "cpu":  # shared cores: the median step resists the other jobs' bursts
            dt = statistics.median(times)
            res.extra["step_spread"] = max(times) / min(times)
        else:  # no per-step synchronisation, which would hide the CPU's run-ahead
            dt = (time.perf_counter() - t0) / steps
        res.steps = steps
        res.step_ms = dt * 1e3
        res.images_per_s = case.batch / dt
        if device.type == "cuda":
            res.peak_mib = torch.cuda.max_memory_allocated(device) / 2**20
        elif cpu_peak:
            res.peak_mib = max(0.0, _proc_mib("VmHWM") - base_rss)
    except torch.OutOfMemoryError:
        res.error = "OOM"
    except Exception as exc:  # noqa: BLE001 - a benchmark row fails, the table goes on
        res.error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
    finally:
        del stepper
        _cleanup(device)
    return res


def in_child(fn, *args):
    """``fn(*args)`` in a forked process (CPU only): a clean heap for each case, nothing left behind.

    The parent never runs torch with more than one thread, so there is no OpenMP pool to break by forking.
    """
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        os.close(r)
        try:
            payload = pickle.dumps(("ok", fn(*args)))
        except BaseException as exc:  # noqa: BLE001 - reported by the parent
            payload = pickle.dumps(("error", f"{type(exc).__name__}: {exc}"))
        with os.fdopen(w, "wb") as f:
            f.write(payload)
        os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        data = f.read()
    _, status = os.waitpid(pid, 0)
    if not data:
        return "error", f"child process died (wait status {status}; out of memory?)"
    return pickle.loads(data)


def _with_threads(threads: int, fn, *args):
    torch.set_num_threads(threads)
    return fn(*args)


def count_model_flops(case: Case, device: torch.device) -> float | None:
    """Model GFLOP per image of a case's group: its stock, uncheckpointed, uncompiled path at batch 1."""
    ref = replace(case, attention="stock", ckpt=False, compile=False, batch=1)
    try:
        stepper = Stepper(ref, device)
        with FlopCounterMode(display=False) as fc:
            stepper.step()
        return fc.get_total_flops() / 1e9
    except Exception:  # noqa: BLE001 - no model-FLOP figure, the row says so
        return None
    finally:
        _cleanup(device)


def real_size_flops(models: list[str]) -> list[dict]:
    """Model TFLOP per image at the real input size, without running the real size on a CPU.

    The ViT encoder is counted on the meta device (shapes only, no arithmetic); the decoder-only step
    (prompt encoder, mask decoder, Dice loss, backward) is run for real at batch 1. A training image
    costs encoder forward+backward + decoder step (enc_dec) or encoder forward + decoder step (dec
    recomputing); a validation image the forwards.
    """
    rows = []
    for name in models:
        net = build_model(name, pretrained=False, attention="stock")
        s = net.spec.image_size
        if name == "lite":  # TinyViT: small enough to count for real
            enc_fwd = enc_fb = None
            with FlopCounterMode(display=False) as fc, torch.no_grad():
                net.image_encoder(torch.randn(1, 3, s, s))
            enc_fwd = fc.get_total_flops()
            x = torch.randn(1, 3, s, s)
            with FlopCounterMode(display=False) as fc:
                net.image_encoder(x).sum().backward()
            enc_fb = fc.get_total_flops()
        else:
            enc = net.image_encoder.to("meta")
            with FlopCounterMode(display=False) as fc, torch.no_grad():
                enc(torch.randn(1, 3, s, s, device="meta"))
            enc_fwd = fc.get_total_flops()
            with FlopCounterMode(display=False) as fc:
                enc(torch.randn(1, 3, s, s, device="meta")).sum().backward()
            enc_fb = fc.get_total_flops()
        del net
        stepper = Stepper(Case(name, strategy="dec", cache=True, attention="stock"), torch.device("cpu"))
        with FlopCounterMode(display=False) as fc:
            stepper.step()
        dec = fc.get_total_flops()
        with FlopCounterMode(display=False) as fc, torch.no_grad():
            stepper.module._step(stepper.batch)
        dec_fwd = fc.get_total_flops()
        del stepper
        gc.collect()
        rows.append({"model": name, "input": s, "encoder_fwd": enc_fwd / 1e12, "encoder_fwd_bwd": enc_fb / 1e12,
                     "decoder_step": dec / 1e12, "train_enc_dec": (enc_fb + dec) / 1e12,
                     "train_dec_recompute": (enc_fwd + dec) / 1e12, "eval": (enc_fwd + dec_fwd) / 1e12})
    return rows


REAL_FLOPS_HEAD = ["model", "input px", "encoder fwd", "encoder fwd+bwd", "decoder step (fwd+bwd)",
                   "train img, enc_dec", "train img, dec recomputing", "eval img (fwd)"]


def real_flops_rows(rows: list[dict]) -> list[list[str]]:
    keys = ("encoder_fwd", "encoder_fwd_bwd", "decoder_step", "train_enc_dec", "train_dec_recompute", "eval")
    return [[r["model"], str(r["input"])] + [f"{r[k]:.4g}" for k in keys] for r in rows]


def fill_model_flops(results: list[Result], device: torch.device, isolate: bool = False) -> None:
    by_group: dict = {}
    for r in results:
        if r.case.is_stock and r.counted_gflop_per_img:
            by_group.setdefault(r.case.group, r.counted_gflop_per_img)
    for r in results:
        g = r.case.group
        if g not in by_group:
            if isolate:
                status, val = in_child(count_model_flops, r.case, device)
                by_group[g] = val if status == "ok" else None
            else:
                by_group[g] = count_model_flops(r.case, device)
        r.model_gflop_per_img = by_group[g]


def measure_cpu_peak_gflops(seconds: float = 1.5) -> float:
    """fp32 GEMM rate with the threads in use: the CPU's practical ceiling, for a CPU 'MFU'."""
    n = 1024
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        a @ b
    best = 0.0
    for _ in range(3):
        k, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds / 3:
            a @ b
            k += 1
        best = max(best, 2 * n**3 * k / (time.perf_counter() - t0) / 1e9)
    return best


def device_info(device: torch.device) -> dict:
    info = {"torch": torch.__version__, "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = next((p for k, p in GPU_PEAK_TFLOPS if k in name), None)
        dt = amp_dtype(device)
        info.update(kind="cuda", name=name, precision=f"autocast {str(dt).replace('torch.', '')}",
                    peak_tflops=peak, peak_source="vendor dense tensor-core figure" if peak else "unknown GPU",
                    memory_gib=round(torch.cuda.get_device_properties(device).total_memory / 2**30, 1))
    else:
        name = "unknown CPU"
        try:
            m = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.MULTILINE)
            name = m.group(1).strip() if m else name
        except OSError:
            pass
        info.update(kind="cpu", name=name, precision="fp32", threads=torch.get_num_threads(),
                    cores=os.cpu_count(), loadavg_start=os.getloadavg()[0])
    return info


# -- the epoch benchmark: decoder-only epochs from the embedding cache --------------------------------
def epoch_bench(model: str, data_root: Path, n_images: int, batch: int, device: torch.device,
                workers: int = 0, repeats: int = 2) -> dict:
    """Epochs of strategy=dec on real images: recomputing the encoder vs reading cached embeddings.

    The real loader (PolypDataset, collate) and the real module (PolypSAMModule._embeddings fills the
    cache on the first cached epoch); random weights. After the cold epoch and one epoch that loads the
    entries into memory (``resident``), recompute, disk-cached and resident epochs alternate ``repeats``
    times; the medians are reported. Returns seconds and images/s per epoch kind.
    """
    import numpy as np
    from torch.utils.data import DataLoader

    from polypsam.data.batch import collate
    from polypsam.data.dataset import PolypDataset, Record
    from polypsam.data.embedding_cache import EmbeddingCache, file_digest
    from polypsam.data.files import find_pairs

    d = data_root / "TrainDataset"
    pairs = find_pairs(d / "images", d / "masks")
    pick = sorted(np.random.default_rng(0).permutation(len(pairs))[:n_images].tolist())
    records = [Record(pairs[i].image, pairs[i].mask, pairs[i].stem, "TrainDataset", pairs[i].image.name,
                      key=file_digest(pairs[i].image)) for i in pick]
    net = build_model(model, pretrained=False)
    frozen = freeze_strategy(net, STRATEGIES["dec"], BoxPrompt().unused_parameters)
    module = PolypSAMModule(net, loss="dice", frozen_modules=frozen).to(device)
    module.frozen.set_training_modes(net)  # what PolypSAMModule does before every training batch
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-6)
    dtype = amp_dtype(device)

    def epoch(cache, limit: int | None = None) -> float:
        module.embedding_cache = cache
        ds = PolypDataset(records, net.spec.image_size, BoxPrompt(), train=True, embedding_cache=cache,
                          resize_method=net.spec.resize_method)
        loader = DataLoader(ds, batch_size=batch, shuffle=True, num_workers=workers, collate_fn=collate)
        _sync(device)
        t0 = time.perf_counter()
        for i, b in enumerate(loader):
            if limit is not None and i >= limit:
                break
            b = move_data_to_device(b, device)  # what Lightning does with a Batch
            with torch.autocast(device.type, dtype=dtype) if dtype else nullcontext():
                loss, _ = module._step(b)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        _sync(device)
        return time.perf_counter() - t0

    with tempfile.TemporaryDirectory(prefix="polypsam-emb-bench-") as tmp:
        cache = EmbeddingCache.for_model(tmp, net)
        resident = EmbeddingCache.for_model(tmp, net, resident=True)
        epoch(None, limit=1)  # warm-up: one step, for first-call allocations
        cold = epoch(cache)
        written = len(cache)
        epoch(resident)  # reads each entry once into memory
        # interleaved: on shared cores the speed drifts, the ratios within a round do not
        rounds = [(epoch(None), epoch(cache), epoch(resident)) for _ in range(repeats)]
    module.resident.clear()
    out = {"recompute": statistics.median(r[0] for r in rounds), "cache_cold": cold,
           "cache_warm": statistics.median(r[1] for r in rounds),
           "resident_warm": statistics.median(r[2] for r in rounds)}
    return {"model": model, "images": len(records), "batch": batch, "workers": workers, "repeats": repeats,
            "seconds": out, "images_per_s": {k: len(records) / v for k, v in out.items()},
            "rounds_seconds": rounds, "disk_ratios": [r / w for r, w, _ in rounds],
            "resident_ratios": [r / m for r, _, m in rounds],
            "speedup_warm_vs_recompute": out["recompute"] / out["cache_warm"],
            "speedup_resident_vs_recompute": out["recompute"] / out["resident_warm"], "cache_entries": written}


# -- output ----------------------------------------------------------------------------------------
def _fmt(x, spec: str, none: str = "-") -> str:
    return none if x is None else format(x, spec)


def table_rows(results: list[Result], peak_tflops: float | None) -> tuple[list[str], list[list[str]]]:
    head = ["case", "batch", "steps", "spread", "img/s", "step ms", "peak MiB", "speed x stock", "mem x stock",
            "speed x same-case stock", "mem x same-case stock", "model GFLOP/img", "counted GFLOP/img", "TFLOP/s",
            "MFU"]
    ref, own = {}, {}
    for r in results:
        if r.case.strategy == "enc_dec" and r.case.is_stock and r.images_per_s and r.case.model not in ref:
            ref[r.case.model] = r
        if r.case.is_stock and r.images_per_s:
            own.setdefault((r.case.group, r.case.batch), r)
    rows = []
    for r in results:
        if r.error:
            rows.append([r.case.label, str(r.case.batch), "-", "-", r.error] + ["-"] * (len(head) - 5))
            continue
        s = ref.get(r.case.model)
        tflops = r.model_gflop_per_img * r.images_per_s / 1e3 if r.model_gflop_per_img else None
        mfu = tflops / peak_tflops if (tflops and peak_tflops) else None
        same_batch = s is not None and s.case.batch == r.case.batch
        o = own.get((r.case.group, r.case.batch))
        rows.append([r.case.label, str(r.case.batch), str(r.steps), _fmt(r.extra.get("step_spread"), ".2f"),
                     _fmt(r.images_per_s, ".3g"), _fmt(r.step_ms, ".4g"),
                     _fmt(r.peak_mib, ".0f"),
                     _fmt(r.images_per_s / s.images_per_s if s else None, ".2f"),
                     _fmt(r.peak_mib / s.peak_mib if (same_batch and r.peak_mib and s.peak_mib) else None, ".2f"),
                     _fmt(r.images_per_s / o.images_per_s if o else None, ".2f"),
                     _fmt(r.peak_mib / o.peak_mib if (o and r.peak_mib and o.peak_mib) else None, ".2f"),
                     _fmt(r.model_gflop_per_img, ".4g"), _fmt(r.counted_gflop_per_img, ".4g"),
                     _fmt(tflops, ".3g"), _fmt(mfu, ".1%", "n/a")])
        r.extra.update(tflops=tflops, mfu=mfu)
    return head, rows


def print_table(title: str, head: list[str], rows: list[list[str]]) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=title)
    for i, h in enumerate(head):
        t.add_column(h, justify="left" if i == 0 else "right")
    for r in rows:
        t.add_row(*r)
    Console(width=260).print(t)  # wide enough that no header wraps (tests look for them)


def markdown_table(head: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * len(head)) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def write_block(path: Path, block: str, text: str) -> None:
    """Replace the text between this block's markers in ``path`` (append the block if absent)."""
    begin, end = f"<!-- BEGIN {block} -->", f"<!-- END {block} -->"
    body = f"{begin}\n{text.rstrip()}\n{end}"
    old = path.read_text() if path.exists() else ""
    if begin in old and end in old:
        new = old[:old.index(begin)] + body + old[old.index(end) + len(end):]
    else:
        new = old.rstrip() + ("\n\n" if old.strip() else "") + body + "\n"
    path.write_text(new)


def describe(info: dict) -> str:
    if info["kind"] == "cuda":
        return (f"{info['name']} ({info['memory_gib']} GiB), {info['precision']}, peak "
                f"{_fmt(info['peak_tflops'], '.0f', 'unknown')} TFLOP/s ({info['peak_source']}), torch {info['torch']}")
    return (f"{info['name']}, {info['threads']} torch threads on {info['cores']} cores, fp32, measured GEMM peak "
            f"{info['peak_gflops']:.0f} GFLOP/s, load average {info['loadavg_start']:.1f} at start and "
            f"{info.get('loadavg_end', float('nan')):.1f} at end (the cores are shared with other jobs), "
            f"torch {info['torch']}")


# -- main ------------------------------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--models", default="vit_b,vit_l,lite", help="comma list from vit_b, vit_l, vit_h, lite")
    p.add_argument("--steps", type=int, default=None, help="timed steps per case (CPU 2, GPU 10)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps, the first counts FLOPs (CPU 1, GPU 3)")
    p.add_argument("--compile", action="store_true", help="add torch.compile'd encoder cases")
    p.add_argument("--probe", action="store_true", help="GPU: batch-size probes (largest batch that fits)")
    p.add_argument("--no-matrix", action="store_true", help="skip the case matrix (e.g. probes only)")
    p.add_argument("--epoch", default="auto", choices=["auto", "on", "off"],
                   help="decoder-only epochs from the embedding cache vs recomputing (auto: on for CPU)")
    p.add_argument("--epoch-model", default="lite")
    p.add_argument("--epoch-images", type=int, default=8)
    p.add_argument("--epoch-repeats", type=int, default=2)
    p.add_argument("--epoch-workers", type=int, default=None, help="loader workers (default: 0 on CPU, 8 on GPU)")
    p.add_argument("--epoch-batch", type=int, default=8, help="dec_lite trains with batch 8")
    p.add_argument("--data-root", default=os.environ.get("POLYPSAM_DATA_ROOT", str(DEFAULT_DATA)))
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads on CPU (default 1: on shared cores, OpenMP's spinning barriers made "
                        "2 threads 5-10x slower than 1 here)")
    p.add_argument("--smoke", action="store_true", help="the tiny model, one step each: checks the script")
    p.add_argument("--results", default=None, help=f"markdown file to update (default {RESULTS}; none for --smoke)")
    p.add_argument("--json", default=None, help="also write the raw results here")
    p.add_argument("--real-flops", default="auto", choices=["auto", "on", "off"],
                   help="model TFLOP per image at the real input sizes (auto: on for a CPU run)")
    p.add_argument("--filter", default=None, help="regular expression: run only the cases whose label matches")
    p.add_argument("--batch", type=int, default=None, help="one batch size for every case of the matrix")
    p.add_argument("--block", default=None, help="marker name of the block in the results file "
                                                 "(default: 'train_throughput <cpu|cuda>')")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    dev = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(dev)
    gpu = device.type == "cuda"
    if not gpu:  # the parent stays single-threaded (see in_child); cases run with args.threads
        torch.set_num_threads(1)
    torch.set_float32_matmul_precision("high")
    steps = args.steps or (1 if args.smoke else 10 if gpu else 3)
    warmup = args.warmup if args.warmup is not None else (1 if args.smoke else 3 if gpu else 1)
    info = device_info(device)
    if not gpu:
        info["threads"] = args.threads
        status, peak = in_child(_with_threads, args.threads, measure_cpu_peak_gflops, 0.3 if args.smoke else 1.5)
        if status != "ok":
            raise RuntimeError(peak)
        info["peak_gflops"] = peak
    peak_tflops = info.get("peak_tflops") if gpu else info["peak_gflops"] / 1e3
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    out: dict = {"device": info, "steps": steps, "warmup": warmup}

    results: list[Result] = []
    # One-off runtime allocations (kernel libraries, autograd's threads) land in the first case measured:
    # a discarded tiny step takes them instead (in the parent, so every forked case starts with them).
    run_case(Case("tiny", batch=1), device, steps=1, warmup=1, count_flops=False)

    def measure(case: Case, n: int, warm: int, count: bool = True) -> Result:
        if gpu:
            return run_case(case, device, n, warm, count)
        status, res = in_child(_with_threads, args.threads, run_case, case, device, n, warm, count)
        return res if status == "ok" else Result(case, error=res)
    if not args.no_matrix:
        for case in default_cases(dev, models, args.compile, args.smoke):
            if args.filter and not re.search(args.filter, case.label):
                continue
            if args.batch:
                case = replace(case, batch=args.batch)
            n = steps if (gpu or args.steps or not case.model.startswith("vit_l")) else 2  # CPU time budget
            print(f"... {case.label} (batch {case.batch}, {n} timed steps)", flush=True)
            results.append(measure(case, n, warmup))
            if args.json:  # as we go: a run cut short by a time limit keeps what it measured
                Path(args.json).write_text(json.dumps({**out, "cases": [r.to_json() for r in results]},
                                                      indent=1, default=str))
        fill_model_flops(results, device, isolate=not gpu)
    head, rows = table_rows(results, peak_tflops)
    if results:
        print_table(f"training step, {info['name']}", head, rows)
    out["cases"] = [r.to_json() for r in results]

    probe_rows = []
    if args.probe and gpu:
        for ladder in probe_cases():
            for case in ladder:
                print(f"... probe {case.label} batch {case.batch}", flush=True)
                r = measure(case, 3, 1, False)
                probe_rows.append([case.label, str(case.batch), "fits" if not r.error else r.error,
                                   _fmt(r.images_per_s, ".3g"), _fmt(r.peak_mib and r.peak_mib / 1024, ".1f")])
                out.setdefault("probes", []).append(r.to_json())
                if r.error:
                    break
        print_table("batch-size probes", ["case", "batch", "result", "img/s", "peak GiB"], probe_rows)
    elif args.probe:
        print("batch-size probes need a GPU: skipped")

    if not gpu:  # no forks from here on: the parent may use every thread
        torch.set_num_threads(args.threads)
    real = None
    if args.real_flops == "on" or (args.real_flops == "auto" and not gpu and not args.smoke):
        print("... model FLOPs at the real input sizes", flush=True)
        real = real_size_flops(models)
        print_table("model TFLOP per image at the real input size (stock attention)", REAL_FLOPS_HEAD,
                    real_flops_rows(real))
    out["real_size_tflops"] = real

    epoch = None
    run_epoch = args.epoch == "on" or (args.epoch == "auto" and (not gpu or args.smoke))
    if run_epoch:
        root = Path(args.data_root)
        if (root / "TrainDataset").is_dir():
            model = "tiny" if args.smoke else args.epoch_model
            n = 4 if args.smoke else args.epoch_images
            print(f"... epochs: {model}, strategy dec, {n} real images, batch {args.epoch_batch}", flush=True)
            workers = args.epoch_workers if args.epoch_workers is not None else (8 if gpu else 0)
            epoch = epoch_bench(model, root, n, min(args.epoch_batch, n), device, workers=workers,
                                repeats=1 if args.smoke else args.epoch_repeats)
            s = epoch["seconds"]
            print_table(f"decoder-only epochs, {model}, {n} images", ["epoch", "seconds", "img/s"],
                        [[k, f"{v:.3g}", f"{epoch['images_per_s'][k]:.3g}"] for k, v in s.items()])
            print(f"cached-embedding epoch speed-up over recomputing the encoder: "
                  f"{epoch['speedup_warm_vs_recompute']:.1f}x from disk (rounds: "
                  + ", ".join(f"{r:.1f}x" for r in epoch["disk_ratios"]) + "), "
                  f"{epoch['speedup_resident_vs_recompute']:.1f}x resident (rounds: "
                  + ", ".join(f"{r:.1f}x" for r in epoch["resident_ratios"]) + ")")
        else:
            print(f"epoch benchmark skipped: no TrainDataset under {root}")
    out["epoch"] = epoch

    if not gpu:
        info["loadavg_end"] = os.getloadavg()[0]
    print(f"device: {describe(info)}")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1, default=str))
    target = args.results or (None if args.smoke else str(RESULTS))
    if target:
        text = _markdown(info, steps, warmup, head, rows, probe_rows, epoch, real)
        write_block(Path(target), args.block or f"train_throughput {info['kind']}", text)
        print(f"wrote {target}")
    return out


def _markdown(info, steps, warmup, head, rows, probe_rows, epoch, real=None) -> str:
    cmd = "python benchmarks/train_throughput.py " + " ".join(sys.argv[1:])
    parts = [(f"Measured {info['date']} with `{cmd.strip()}` on: {describe(info)}. "
              f"{warmup} warm-up step(s) per case (the first counts FLOPs), then the timed steps in the table; "
              + ("img/s from the median step, spread = slowest / fastest step."
                 if info["kind"] == "cpu" else "img/s over all timed steps.")
              + " Columns: peak = " + ("CUDA max_memory_allocated" if info["kind"] == "cuda" else
                                       "resident-set growth (weights, gradients, AdamW state, activations)")
              + "; x stock = against the model's enc_dec stock row (segment_anything's attention and mask head); "
                "x same-case stock = against the stock row of the same strategy, cache and batch (what our "
                "attention, mask head and checkpointing change); model GFLOP = the "
                "stock, uncheckpointed path's count (MFU uses it); counted = what this path executed.")]
    if rows:
        parts.append(markdown_table(head, rows))
    if real:
        parts.append("Model TFLOP per image at the real input size, stock attention (FlopCounterMode; ViT encoders "
                     "counted on the meta device, the decoder step run at batch 1; one box per image):\n\n"
                     + markdown_table(REAL_FLOPS_HEAD, real_flops_rows(real)))
    if probe_rows:
        parts.append("Batch-size probes (one training step each, ascending until the first failure):\n\n"
                     + markdown_table(["case", "batch", "result", "img/s", "peak GiB"], probe_rows))
    if epoch:
        s, ips = epoch["seconds"], epoch["images_per_s"]
        parts.append(
            f"Decoder-only epochs, {epoch['model']} strategy dec, {epoch['images']} real training images, batch "
            f"{epoch['batch']}, loader workers {epoch['workers']}; one cold epoch (fills the cache) and one "
            f"that reads it into memory, then {epoch['repeats']} rounds of recompute / disk-cached / resident "
            "epochs (medians below):\n\n"
            + markdown_table(["epoch", "seconds", "img/s"], [[k, f"{v:.3g}", f"{ips[k]:.3g}"] for k, v in s.items()])
            + f"\n\nSpeed-up of a cached epoch over recomputing the encoder: "
              f"**{epoch['speedup_warm_vs_recompute']:.1f}x** from the disk cache (per round: "
            + ", ".join(f"{r:.1f}x" for r in epoch["disk_ratios"]) + "), "
              f"**{epoch['speedup_resident_vs_recompute']:.1f}x** with `data.embedding_cache.resident=true` "
              "(per round: " + ", ".join(f"{r:.1f}x" for r in epoch["resident_ratios"]) + ").")
    return "\n\n".join(parts)


if __name__ == "__main__":
    main()
