"""The CPU study's rows and comparisons (what ``experiments/lite_cpu.py`` runs and reports).

A row is a training job (``conf/sweep/lite_cpu_jobs/<job>.yaml``) or a zero-shot model, plus an optional
extra evaluation; comparisons name rows, or the DERIVED per-image tables the driver builds.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Row:
    name: str
    label: str
    job: str | None = None  # conf/sweep/lite_cpu_jobs/<job>.yaml; None: zero-shot
    evaluate: tuple[str, ...] = ()  # overrides of an extra evaluation; () with a job: the run's own eval/
    eval_dir: str = "eval"
    select: bool = False  # choose prompt=auto's settings on validation first (python -m polypsam.select_auto)
    proposer: str | None = None  # prompt=auto's stage 1 from another run's best.ckpt (the job's name)
    grid: tuple[str, ...] = ()  # select_auto's grid.<key>= overrides; the settings then go to a file of the row's own

    def proposer_args(self, runs: Path) -> list[str]:
        return [f"prompt.proposer={proposer_ckpt(self, runs)}"] if self.proposer else []


ROWS = (
    Row("zero_shot_box", "zero-shot, paper box (literal tight box)", evaluate=("model=lite",)),
    Row("zero_shot_clean_box", "zero-shot, clean box (specks under 16 px ignored)",
        evaluate=("model=lite", "prompt.min_area=16")),
    Row("dec_box_s42", "decoder only, box, seed 42", "dec_box_s42"),
    Row("dec_box_s43", "decoder only, box, seed 43", "dec_box_s43"),
    Row("dec_box_s44", "decoder only, box, seed 44", "dec_box_s44"),
    Row("dec_jitter_s42", "decoder only, jittered boxes", "dec_jitter_s42"),
    Row("lora_box_s42", "LoRA (encoder) + decoder, box", "lora_box_s42"),
    Row("dec_none", "decoder only, prompt-free (none)", "dec_mixed_s42"),
    Row("dec_auto", "decoder only, automatic (auto), default settings", "dec_mixed_s42",
        ("prompt=auto", "prompt.settings=null"), "eval_auto"),
    Row("dec_auto_sel", "decoder only, automatic (auto), settings chosen on validation", "dec_mixed_s42",
        ("prompt=auto",), "eval_auto_sel", select=True),
    Row("dec_auto_unet", "decoder only refining a U-Net's boxes (auto, stage 1: unet_conv_s42), settings chosen "
        "on validation (before blend: stage 1 the U-Net alone)", "dec_mixed_s42", ("prompt=auto",), "eval_auto_unet",
        select=True, proposer="unet_conv_s42"),
    Row("dec_auto_ens", "decoder only, auto with stage 1 the mean of the U-Net and the decoder's own no-prompt map "
        "(blend chosen on validation)", "dec_mixed_s42", ("prompt=auto",), "eval_auto_ens", select=True,
        proposer="unet_conv_s42", grid=("grid.blend=[0.5,1.0]",)),
    Row("lora_box_bf16_s42", "LoRA (encoder) + decoder, box, bf16 autocast training", "lora_box_bf16_s42"),
    Row("dec_box_bf16_s42", "decoder only, box, seed 42, bf16 autocast training", "dec_box_bf16_s42"),
    Row("unet_s42", "U-Net baseline (smp), no prompt, 3 epochs (under-trained)", "unet_s42"),
    Row("unet_conv_s42", "U-Net baseline (smp), no prompt, to convergence", "unet_conv_s42"),
    Row("unetpp_conv_s42", "U-Net++ baseline (smp), no prompt, to convergence", "unetpp_conv_s42"),
)
SEEDS = ("dec_box_s42", "dec_box_s43", "dec_box_s44")
# Comparisons name rows, or DERIVED per-image tables: "dec_box", the decoder-only box row as the per-image
# mean over its seeds (never one lucky seed); "dec_mixed_box", the prompt-free checkpoint given the oracle box
# (dec_auto's per_image_box.csv), so oracle box against automatic boxes compares one checkpoint.
PAIRS = (("what fine-tuning buys", "dec_box", "zero_shot_box"),
         ("specks in the paper box", "zero_shot_clean_box", "zero_shot_box"),
         ("jittered training boxes", "dec_jitter_s42", "dec_box"),
         ("LoRA against decoder only", "lora_box_s42", "dec_box"),
         ("SAM against a U-Net", "dec_box", "unet_conv_s42"),
         ("no box: automatic boxes against a U-Net", "dec_auto_sel", "unet_conv_s42"),
         ("no box: automatic boxes against a U-Net++", "dec_auto_sel", "unetpp_conv_s42"),
         ("oracle box against automatic boxes (one checkpoint)", "dec_mixed_box", "dec_auto"),
         ("refining the proposals", "dec_auto", "dec_none"),
         ("settings chosen on validation against the defaults", "dec_auto_sel", "dec_auto"),
         ("chosen automatic boxes against no box", "dec_auto_sel", "dec_none"),
         ("oracle box against chosen automatic boxes", "dec_mixed_box", "dec_auto_sel"),
         ("a U-Net's boxes refined by SAM against the U-Net alone", "dec_auto_unet", "unet_conv_s42"),
         ("a U-Net's boxes against SAM's own automatic boxes", "dec_auto_unet", "dec_auto_sel"),
         ("a U-Net's boxes against no box", "dec_auto_unet", "dec_none"),
         ("oracle box against a U-Net's boxes", "dec_mixed_box", "dec_auto_unet"),
         ("ensemble stage 1 against the U-Net's boxes", "dec_auto_ens", "dec_auto_unet"),
         ("ensemble stage 1 against SAM's own automatic boxes", "dec_auto_ens", "dec_auto_sel"),
         ("ensemble stage 1 against no box", "dec_auto_ens", "dec_none"),
         ("ensemble stage 1 against the U-Net alone", "dec_auto_ens", "unet_conv_s42"),
         ("oracle box against the ensemble's boxes", "dec_mixed_box", "dec_auto_ens"),
         ("bf16 training against fp32 (LoRA)", "lora_box_bf16_s42", "lora_box_s42"),
         ("bf16 training against fp32 (decoder only, seed 42)", "dec_box_bf16_s42", "dec_box_s42"))
ERRATA_CAUSE = (
    "Lightning 2.6 never calls `LightningModule.train()` during fit, so LiteMedSAM's \"frozen\" TinyViT encoder "
    "ran with its 27 BatchNorm layers in train mode: training embeddings (and the cache entries made from them) "
    "used batch statistics, the running statistics drifted, and `best.ckpt` stored a drifted encoder that the "
    "test evaluation then used. Frozen parts are now put in eval mode before every training batch and "
    "checked bit for bit (`polypsam.models.frozen`), and the embedding cache moved to format v2, so no old "
    "entry is read.")
DERIVED = {"dec_box": "the decoder-only box row, per-image mean over the seeds it has run",
           "dec_mixed_box": "the prompt-free checkpoint (`dec_mixed_s42`) given the oracle box"}


def proposer_ckpt(row: Row, runs: Path) -> Path | None:
    return runs / row.proposer / "checkpoints" / "best.ckpt" if row.proposer else None
