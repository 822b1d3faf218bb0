"""The CPU study's rows and comparisons (what ``experiments/lite_cpu.py`` runs and reports).

A row is a training job (``conf/sweep/lite_cpu_jobs/<job>.yaml``) or a zero-shot model, plus an optional
extra evaluation; comparisons name rows, or the DERIVED per-image tables the driver builds. A row declares
what it needs (``Row.needs``: the jobs whose checkpoints it reads), and the driver runs those first.
"""

from __future__ import annotations

from dataclasses import dataclass
from graphlib import TopologicalSorter
from pathlib import Path

# select_auto's grid for every row that selects, pinned here so that a change of conf/select_auto.yaml's
# defaults never changes what a row means. ``blend`` is the stage-1 source: 0 the refiner's own
# prompt-free map, 1 the proposer alone, between them their weighted mean (a proposer only).
GRID = {"threshold": (0.3, 0.5, 0.7), "min_score": (0.5, 0.6, 0.7), "min_area": (0.001, 0.002, 0.005),
        "margin": (0.05, 0.1, 0.2), "score": ("mean_prob", "agreement", "prob_x_agreement", "iou_head"),
        "keep": ("all", "clear"), "clear_margin": (0.1, 0.3), "final_score": (0.0, 0.5, 0.7), "rebox": (0, 1),
        "blend": (1.0,)}


def grid(**axes) -> tuple[tuple[str, tuple], ...]:
    """A row's select_auto grid: the study's GRID with ``axes`` replaced, as (axis, values) pairs."""
    return tuple({**GRID, **axes}.items())


@dataclass(frozen=True)
class Row:
    name: str
    label: str
    job: str | None = None  # conf/sweep/lite_cpu_jobs/<job>.yaml; None: zero-shot
    evaluate: tuple[str, ...] = ()  # overrides of an extra evaluation; () with a job: the run's own eval/
    eval_dir: str = "eval"
    select: bool = False  # choose prompt=auto's settings on validation first (python -m polypsam.select_auto)
    proposer: str | None = None  # prompt=auto's stage 1 from another run's best.ckpt (the job's name)
    grid: tuple[tuple[str, tuple], ...] = ()  # select_auto's grid (grid()); its settings go to a file of its own
    model: str = "lite"  # what the row's network is (lite, unet): the fast mode's miniature stands in for it
    exploration: bool = False  # a method tried after looking at the test images: reported, never the headline

    def __post_init__(self):
        if self.select and not self.grid:
            raise ValueError(f"row {self.name}: a row that selects pins its own grid (grid=grid(...)), so that "
                             "conf/select_auto.yaml's defaults never change what it means")

    @property
    def needs(self) -> tuple[str, ...]:
        """The jobs whose checkpoints this row reads besides its own: the proposer's."""
        return (self.proposer,) if self.proposer else ()

    def grid_args(self, smallest: bool = False) -> list[str]:
        """select_auto's ``grid.<axis>=[...]`` overrides; ``smallest``: one value per axis but the stage-1
        source (the fast mode)."""
        return [f"grid.{k}=[{','.join(map(str, v if k == 'blend' or not smallest else v[:1]))}]"
                for k, v in self.grid]

    def proposer_args(self, runs: Path) -> list[str]:
        return [f"prompt.proposer={proposer_ckpt(self, runs)}"] if self.proposer else []


ZERO_SHOT = ("model=lite", "model.runtime=openvino", "model.runtime_precision=fp32")  # pinned, as the recipe's
CLEAN_BOX = ("prompt.min_area=16",)  # the box of the mask's components of 16 px and more
ROWS = (
    Row("zero_shot_box", "zero-shot, paper box (literal tight box)", evaluate=ZERO_SHOT),
    Row("zero_shot_clean_box", "zero-shot, clean box (specks under 16 px ignored)",
        evaluate=(*ZERO_SHOT, *CLEAN_BOX)),
    Row("dec_box_s42", "decoder only, box, seed 42", "dec_box_s42"),
    Row("dec_box_s43", "decoder only, box, seed 43", "dec_box_s43"),
    Row("dec_box_s44", "decoder only, box, seed 44", "dec_box_s44"),
    Row("dec_jitter_s42", "decoder only, jittered boxes", "dec_jitter_s42"),
    Row("lora_box_s42", "LoRA (encoder) + decoder, box (120-image subset, 3 epochs)", "lora_box_s42"),
    # which parts to train: the encoder-trained strategies on the full split, to early stop
    Row("enc_dec_box_s42", "encoders + decoder, box, full split", "enc_dec_box_s42"),
    Row("lora_box_full_s42", "LoRA (encoder) + decoder, box, full split", "lora_box_full_s42"),
    # the same checkpoints given the clean box, so that trained and zero-shot compare under one box
    *(Row(name, f"{label}, clean box (specks under 16 px ignored)", job, CLEAN_BOX, "eval_clean_box")
      for name, job, label in (
          ("dec_box_clean_s42", "dec_box_s42", "decoder only, seed 42"),
          ("dec_box_clean_s43", "dec_box_s43", "decoder only, seed 43"),
          ("dec_box_clean_s44", "dec_box_s44", "decoder only, seed 44"),
          ("dec_jitter_clean_s42", "dec_jitter_s42", "decoder only, jittered boxes"),
          ("lora_box_clean_s42", "lora_box_s42", "LoRA (encoder) + decoder (120-image subset, 3 epochs)"),
          ("enc_dec_box_clean_s42", "enc_dec_box_s42", "encoders + decoder, full split"),
          ("lora_box_full_clean_s42", "lora_box_full_s42", "LoRA (encoder) + decoder, full split"))),
    Row("dec_none", "decoder only, prompt-free (none)", "dec_mixed_s42"),
    Row("unet_s42", "U-Net baseline (smp), no prompt, 3 epochs (under-trained)", "unet_s42", model="unet"),
    Row("unet_conv_s42", "U-Net baseline (smp), no prompt, to convergence", "unet_conv_s42", model="unet"),
    Row("unetpp_conv_s42", "U-Net++ baseline (smp), no prompt, to convergence", "unetpp_conv_s42", model="unet"),
    # the no-box headline: the stage-1 source (SAM's own map, the U-Net, or their mean) and every proposal
    # setting chosen on each seed's validation split alone, then evaluated once
    *(Row(f"dec_auto_blind_s{s}", f"no box: stage-1 source and settings chosen on validation, seed {s}",
          f"dec_mixed_s{s}", ("prompt=auto",), "eval_auto_blind", select=True, proposer="unet_conv_s42",
          grid=grid(blend=(0.0, 0.5, 1.0))) for s in (42, 43, 44)),
    # exploration: four no-box methods each scored on the test images before the method was chosen blind
    Row("dec_auto", "decoder only, automatic (auto), default settings (exploration)", "dec_mixed_s42",
        ("prompt=auto", "prompt.settings=null"), "eval_auto", exploration=True),
    Row("dec_auto_sel", "decoder only, automatic (auto), settings chosen on validation (exploration)",
        "dec_mixed_s42", ("prompt=auto",), "eval_auto_sel", select=True, grid=grid(), exploration=True),
    Row("dec_auto_unet", "decoder only refining a U-Net's boxes (auto, stage 1: unet_conv_s42 alone), settings "
        "chosen on validation (exploration)", "dec_mixed_s42", ("prompt=auto",), "eval_auto_unet", select=True,
        proposer="unet_conv_s42", grid=grid(blend=(1.0,)), exploration=True),
    Row("dec_auto_ens", "decoder only, auto with stage 1 the mean of the U-Net and the decoder's own no-prompt map "
        "(blend chosen on validation; exploration)", "dec_mixed_s42", ("prompt=auto",), "eval_auto_ens",
        select=True, proposer="unet_conv_s42", grid=grid(blend=(0.5, 1.0)), exploration=True),
    Row("lora_box_bf16_s42", "LoRA (encoder) + decoder, box, bf16 autocast training", "lora_box_bf16_s42"),
    Row("dec_box_bf16_s42", "decoder only, box, seed 42, bf16 autocast training", "dec_box_bf16_s42"),
)
# one row of each kind, for the driver's fast mode: zero-shot, trained with its own evaluation, a
# baseline, an extra evaluation of a trained job, and selection on validation with a proposer from another row
FAST_ROWS = ("zero_shot_box", "dec_box_s42", "dec_none", "dec_auto_blind_s42")
SEEDS = ("dec_box_s42", "dec_box_s43", "dec_box_s44")
CLEAN_SEEDS = ("dec_box_clean_s42", "dec_box_clean_s43", "dec_box_clean_s44")
# which parts to train (the report's section): (strategy, what trains, row under the literal box, under the clean box)
STRATEGIES = (("zero-shot", "nothing", "zero_shot_box", "zero_shot_clean_box"),
              ("decoder only (Dec), seed 42", "mask decoder", "dec_box_s42", "dec_box_clean_s42"),
              ("encoders + decoder (Enc-Dec)", "image encoder, prompt encoder, mask decoder", "enc_dec_box_s42",
               "enc_dec_box_clean_s42"),
              ("LoRA + decoder", "rank-8 adapters on the encoder's attention, prompt encoder, mask decoder",
               "lora_box_full_s42", "lora_box_full_clean_s42"))
BLIND_SEEDS = ("dec_auto_blind_s42", "dec_auto_blind_s43", "dec_auto_blind_s44")
# Comparisons name rows, or DERIVED per-image tables: "dec_box" and "dec_auto_blind", the decoder-only box
# row and the no-box headline as the per-image mean over their seeds (never one lucky seed); "dec_mixed_box", the prompt-free checkpoint given the oracle box
# (dec_auto's per_image_box.csv), so oracle box against automatic boxes compares one checkpoint.
PAIRS = (("what fine-tuning buys (literal box)", "dec_box", "zero_shot_box"),
         ("what fine-tuning buys (clean box)", "dec_box_clean", "zero_shot_clean_box"),
         ("the clean box, decoder only", "dec_box_clean", "dec_box"),
         ("no box (chosen on validation) against the U-Net alone", "dec_auto_blind", "unet_conv_s42"),
         ("no box (chosen on validation) against no box, seed 42", "dec_auto_blind_s42", "dec_none"),
         ("oracle box against the no-box headline, seed 42 (one checkpoint)", "dec_mixed_box", "dec_auto_blind_s42"),
         ("specks in the paper box", "zero_shot_clean_box", "zero_shot_box"),
         ("jittered training boxes", "dec_jitter_s42", "dec_box"),
         ("LoRA against decoder only", "lora_box_s42", "dec_box"),
         ("encoders + decoder against decoder only", "enc_dec_box_s42", "dec_box"),
         ("LoRA (full split) against decoder only", "lora_box_full_s42", "dec_box"),
         ("encoders + decoder against decoder only (clean box)", "enc_dec_box_clean_s42", "dec_box_clean"),
         ("LoRA (full split) against decoder only (clean box)", "lora_box_full_clean_s42", "dec_box_clean"),
         ("encoders + decoder against zero-shot (literal box)", "enc_dec_box_s42", "zero_shot_box"),
         ("encoders + decoder against zero-shot (clean box)", "enc_dec_box_clean_s42", "zero_shot_clean_box"),
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
           "dec_box_clean": "the same checkpoints given the clean box, per-image mean over the seeds",
           "dec_auto_blind": "the no-box headline (stage-1 source and settings chosen on validation), per-image "
                             "mean over the seeds it has run",
           "dec_mixed_box": "the prompt-free checkpoint (`dec_mixed_s42`) given the oracle box"}


def proposer_ckpt(row: Row, runs: Path) -> Path | None:
    return runs / row.proposer / "checkpoints" / "best.ckpt" if row.proposer else None


# learning-rate probes (conf/sweep/lite_cpu_jobs/<name>_probe.yaml: one epoch on a subset, validation only):
# the lr with the best validation Dice goes into the row's job config; a best at the edge of the range
# extends it (LoRA's 3e-4 was best of the first three, so 1e-3 was added)
# Plain enc_dec stops at the paper's lr: its loss against zero-shot came from the BatchNorm running statistics,
# which train mode moves at any lr (momentum 0.1 per batch), and the same weights with them put back recover
# it (probes/enc_dec_bn_check.json); the lr search is norm_eval's.
PROBES = {"enc_dec": (4e-6,), "enc_dec_norm_eval": (4e-6, 3e-5, 1e-5), "lora": (3e-5, 1e-4, 3e-4, 1e-3)}
# the row each probe chooses for: enc_dec's plain and norm_eval probes compete for one row
PROBE_ROWS = {"enc_dec": "enc_dec_box_s42", "enc_dec_norm_eval": "enc_dec_box_s42", "lora": "lora_box_full_s42"}


def trainers(rows=None) -> dict[str, Row]:
    """The row that trains each job (the first row naming it)."""
    out: dict[str, Row] = {}
    for row in rows or ROWS:
        if row.job:
            out.setdefault(row.job, row)
    return out


def ordered(names=None, rows=None) -> list[Row]:
    """The rows named (default: all) and every row they need, each after the rows training what it needs;
    otherwise in the order of ROWS."""
    rows = rows or ROWS
    by_name, train = {r.name: r for r in rows}, trainers(rows)
    unknown = sorted(set(names or ()) - set(by_name))
    if unknown:
        raise SystemExit(f"lite_cpu: unknown row(s) {', '.join(unknown)}; rows: {', '.join(by_name)}")
    todo, graph = list(names or by_name), {}
    while todo:
        row = by_name[todo.pop()]
        if row.name not in graph:
            graph[row.name] = {train[j].name for j in row.needs}
            todo.extend(graph[row.name])
    position = {r.name: i for i, r in enumerate(rows)}
    sorter, out = TopologicalSorter(graph), []
    sorter.prepare()
    while sorter.is_active():
        ready = sorted(sorter.get_ready(), key=position.get)
        out.extend(by_name[n] for n in ready)
        sorter.done(*ready)
    return out
