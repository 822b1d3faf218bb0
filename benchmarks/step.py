"""A training step of a benchmark case: the module ``polypsam.training.build.build_module`` builds for a run,
``PolypSAMModule._step`` (its loss), backward and AdamW, on random weights and a random batch."""

from __future__ import annotations

import statistics
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field

import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.machine import amp_dtype, cleanup, proc_mib, reset_cpu_peak, sync
from polypsam.data.batch import Batch
from polypsam.models.freeze import STRATEGIES
from polypsam.models.sam import ModelSpec
from polypsam.prompts import PromptBatch
from polypsam.training.build import build_module
from polypsam.training.module import PolypSAMModule


@dataclass(frozen=True)
class Case:
    model: str  # registry name, or "<vit>@<px>": that ViT at a reduced input size (CPU runs)
    strategy: str = "enc_dec"  # enc_dec | dec | lora (peft adapters on the encoder)
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
    def group(self) -> tuple[str, str, bool]:
        return self.model, self.strategy, self.cache

    @property
    def is_stock(self) -> bool:
        """The reference path: segment_anything's own attention and mask head, no checkpointing, not compiled."""
        return self.attention == "stock" and not self.ckpt and not self.compile


def run_config(model: dict, strategy: str = "enc_dec", loss: str = "dice", prompt: str = "box",
               accelerator: str = "cpu") -> DictConfig:
    """The composed config a training run of ``model`` (the ``model`` group's settings) would have, as much
    of it as ``build_module`` reads: random weights, the torch encoder runtime, no embedding cache."""
    strat = {"name": strategy, "freeze": list(STRATEGIES[strategy]), **({"lora": {}} if strategy == "lora" else {})}
    return OmegaConf.create({"model": {"pretrained": False, "runtime": "torch", **model}, "strategy": strat,
                             "loss": loss, "optimizer": {}, "prompt": {"type": prompt},
                             "data": {"embedding_cache": {"enabled": False}}, "trainer": {"accelerator": accelerator}})


def case_config(case: Case, device: torch.device) -> DictConfig:
    name, _, px = case.model.partition("@")
    model = {"name": name, "attention": case.attention, "gradient_checkpointing": case.ckpt,
             "compile": case.compile, **({"image_size": int(px)} if px else {})}
    return run_config(model, case.strategy, accelerator=device.type)


def make_batch(spec: ModelSpec, batch: int, cache: bool, device: torch.device) -> Batch:
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


class Stepper:
    """One module, one optimiser, one batch: ``step()`` is a full training step. ``dtype``: autocast's;
    "auto": bf16 (fp16 without bf16) on a GPU, none (fp32) on a CPU."""

    def __init__(self, module: PolypSAMModule, batch: int, device: torch.device, cache: bool = False,
                 dtype: torch.dtype | None | str = "auto"):
        self.device, self.module = device, module.to(device)
        net = module.net
        self.module.frozen.set_training_modes(net)  # as PolypSAMModule before every training batch
        self.opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-6)
        self.batch = make_batch(net.spec, batch, cache, device)
        self.dtype = amp_dtype(device) if dtype == "auto" else dtype
        self.scaler = torch.amp.GradScaler("cuda") if self.dtype == torch.float16 else None

    @classmethod
    def for_case(cls, case: Case, device: torch.device, dtype: torch.dtype | None | str = "auto") -> Stepper:
        return cls(build_module(case_config(case, device)), case.batch, device, case.cache, dtype)

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


def run_case(case: Case, device: torch.device, steps: int, warmup: int, count_flops: bool = True) -> Result:
    """Warm-up steps (the first counts FLOPs), then ``steps`` timed ones; peak memory over the timed steps
    (CUDA's max_memory_allocated, a CPU's resident-set growth). A failure is the row's error, not an exception."""
    res = Result(case)
    cleanup(device)
    cpu_peak = device.type == "cpu" and reset_cpu_peak()
    base_rss = proc_mib("VmRSS") if cpu_peak else 0.0
    stepper = None
    try:
        stepper = Stepper.for_case(case, device)
        t0 = time.perf_counter()
        if count_flops:
            with FlopCounterMode(display=False) as fc:
                stepper.step()
            res.counted_gflop_per_img = fc.get_total_flops() / case.batch / 1e9
        for _ in range(max(0, warmup - int(count_flops))):
            stepper.step()
        sync(device)
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
        sync(device)
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
            res.peak_mib = max(0.0, proc_mib("VmHWM") - base_rss)
    except torch.OutOfMemoryError:
        res.error = "OOM"
    except Exception as exc:  # noqa: BLE001 - a benchmark row fails, the table goes on
        res.error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
    finally:
        del stepper
        cleanup(device)
    return res
