"""The CPU study: every row on ../shared/data/polyp with one split file, then experiments/results/lite_cpu/.

    python experiments/lite_cpu.py                     # run what is missing, then write the report
    python experiments/lite_cpu.py --report-only       # the report from the rows finished so far
    python experiments/lite_cpu.py --rows dec_box_s43 dec_box_s44 --runs /scratch/lite_cpu
    python experiments/lite_cpu.py --fast --runs /tmp/r --out /tmp/o --data <PraNet tree>   # every kind of row, tiny

Rows run in the order of what they need (``lite_cpu_rows.ordered``): a row whose proposer another row
trains runs after it, and ``--rows`` adds the rows a named row needs. A finished row is skipped: its
evaluation in the runs folder holds summary.csv, or its records are already in the results folder
(``--rerun`` runs such rows again), each of the checkpoint and proposer the runs folder holds now (one that
read others is stale: run again, and set aside; ``lite_cpu_records``); a job another row needs is trained
whenever its checkpoint is missing from the runs folder. A run with a last.ckpt resumes (``resume=<run>``); the others start fresh from
conf/sweep/lite_cpu_jobs/. Stop it at any time (Ctrl-C, SIGTERM, the end of a session): the next call
continues where it stopped. The report is built from the records, so rows run in other sessions stay in it.

``--fast`` runs the same driver on a miniature: the random tiny SAM for LiteMedSAM, 64 px U-Nets, a few
images and one epoch per job, one value per selection axis; by default one row of each kind (FAST_ROWS).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from polypsam.curation import neighbours, specks
from polypsam.data.datamodule import folder_records
from polypsam.data.splits import make_split, write_split

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the rows and the report beside this script
from lite_cpu_records import copy_records, current_bytes, set_aside, stale  # noqa: E402
from lite_cpu_report import write_report  # noqa: E402
from lite_cpu_rows import FAST_ROWS, PROBES, ROWS, Row, ordered, proposer_ckpt, trainers  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "experiments" / "results" / "lite_cpu"
DATA = Path(os.environ.get("POLYPSAM_DATA_ROOT", REPO.parent / "shared" / "data" / "polyp"))
# the fast mode's miniature of each network, and its limits
FAST_MODEL = {"lite": ("model=tiny", "model.runtime=torch"), "unet": ("model.image_size=64",)}
FAST_TRAIN = ("data.limit_train=6", "data.limit_val=3", "scratch.max_epochs=1", "scratch.batch_size=2",
              "scratch.effective_batch_size=2", "data.num_workers=0")
FAST_EVAL = ("data.limit_test=2", "robustness.noise=[0.0]", "figures=false", "save_masks=false")


@dataclass(frozen=True)
class Study:
    """Where one call of the driver reads and writes."""

    runs: Path
    out: Path = OUT
    data: Path = DATA
    fast: bool = False

    @property
    def split(self) -> Path:
        return self.out / "split.json"

    def run_dir(self, job: str) -> Path:
        return self.runs / job

    def eval_dir(self, row: Row) -> Path:
        return self.run_dir(row.job) / row.eval_dir if row.job else self.run_dir(row.name)

    def record_dir(self, row: Row) -> Path:
        """The row's records beside the report (what the report reads)."""
        return self.out / "rows" / row.name / (row.eval_dir if row.job else "")

    def settings_file(self, row: Row) -> Path:
        """Where select_auto writes the row's chosen settings (every selecting row pins its own grid):
        ``best.auto-<row>.json`` beside the checkpoint."""
        return self.run_dir(row.job) / "checkpoints" / f"best.auto-{row.name}.json"

    def shared(self) -> list[str]:
        """Overrides of every training, evaluation and selection: the data, and the fast mode's own caches."""
        fast = [f"paths.cache_dir={self.runs / 'cache'}", f"data.embedding_cache.dir={self.runs / 'cache' / 'emb'}"]
        return [f"data.root={self.data}", *(fast if self.fast else [])]

    def fast_train(self, model: str) -> list[str]:
        """The fast mode's limits and miniature network for a training run of ``model``; nothing otherwise."""
        return [*FAST_TRAIN, *FAST_EVAL[:1], *FAST_MODEL[model]] if self.fast else []

    def call(self, module: str, *args: str) -> None:
        """``python -m module args`` with this checkout's package first on the path: a driver in a worktree
        pinned to a commit runs that commit, not the polypsam an editable install points at."""
        print(f"[lite_cpu] python -m {module} {' '.join(args)}", flush=True)
        path = os.pathsep.join(filter(None, (str(REPO / "src"), os.environ.get("PYTHONPATH"))))
        subprocess.run([sys.executable, "-m", module, *args], check=True, cwd=REPO,
                       env={**os.environ, "PYTHONPATH": path})


def train_job(study: Study, job: str, model: str) -> None:
    """Train a job (fresh, or resumed from its last.ckpt) unless its evaluation is there."""
    run = study.run_dir(job)
    if (run / "eval" / "summary.csv").is_file():
        return
    if (run / "checkpoints" / "last.ckpt").is_file():
        study.call("polypsam.train", f"resume={run}")
        return
    study.call("polypsam.train", "+sweep=lite_cpu", f"+sweep/lite_cpu_jobs={job}", f"hydra.run.dir={run}",
               f"data.split_file={study.split}", *study.shared(), *study.fast_train(model))


def run_row(study: Study, row: Row, rerun: bool = False) -> None:
    """Train what the row needs and the row's own job, then select and evaluate, skipping what is done. Done
    means of the bytes the runs folder holds now: an evaluation, a settings file or records that read another
    checkpoint or proposer than the runs folder's (one retrained since) are set aside or run again."""
    records = study.record_dir(row)
    if not rerun and (records / "summary.csv").is_file() and not study.eval_dir(row).exists():
        why = stale(records, current_bytes(study, row))
        if why is None:
            print(f"[lite_cpu] {row.name}: finished (records in {records}); skipped")
            return
        print(f"[lite_cpu] {row.name}: {why}; run again", flush=True)
    for job in row.needs:  # a proposer's checkpoint, trained here when the runs folder lacks it
        if not (study.run_dir(job) / "checkpoints" / "best.ckpt").is_file():
            train_job(study, job, trainers()[job].model)
    if row.job:
        train_job(study, row.job, row.model)
    out = study.eval_dir(row)
    now = current_bytes(study, row)
    if row.select and study.settings_file(row).is_file() and (why := stale(study.settings_file(row), now)):
        set_aside(study.settings_file(row), why)  # chosen for other bytes: chosen again, and evaluated again
        set_aside(out, "it read those settings")
    if row.evaluate and (why := stale(out, now)):
        set_aside(out, why)
    best = study.run_dir(row.job) / "checkpoints" / "best.ckpt" if row.job else None
    proposer = [f"prompt.proposer={proposer_ckpt(row, study.runs)}"] if row.proposer else []
    if row.select and not study.settings_file(row).is_file():
        study.call("polypsam.select_auto", f"ckpt_path={best}", f"out={study.settings_file(row)}", *proposer,
                   *row.grid_args(smallest=study.fast), f"data.split_file={study.split}", *study.shared(),
                   f"hydra.run.dir={out.with_name(f'select_{out.name}')}")
    if row.evaluate and not (out / "summary.csv").is_file():
        asked = [a for a in row.evaluate if not (study.fast and a.startswith("model"))]
        fast = [*FAST_EVAL, *(FAST_MODEL[row.model] if not row.job else ())] if study.fast else []
        study.call("polypsam.evaluate", *([f"ckpt_path={best}"] if best else []), *asked, *proposer,
                   *([f"prompt.settings={study.settings_file(row)}"] if row.select else []), *study.shared(),
                   *fast, f"hydra.run.dir={out}")


def probe(study: Study, name: str) -> pd.DataFrame:
    """``<name>_probe`` once per learning rate of PROBES (each resumable; finished ones skipped), and the best
    validation Dice of each in ``<out>/probes/<name>.csv``: the row's lr is chosen on validation."""
    found = []
    for lr in PROBES[name]:
        run = study.runs / f"{name}_probe" / f"lr_{lr:g}"
        if not (run / "results.json").is_file():
            if (run / "checkpoints" / "last.ckpt").is_file():
                study.call("polypsam.train", f"resume={run}")
            else:
                study.call("polypsam.train", "+sweep=lite_cpu", f"+sweep/lite_cpu_jobs={name}_probe", f"scratch.lr={lr}",
                           f"hydra.run.dir={run}", f"data.split_file={study.split}", *study.shared(),
                           *study.fast_train("lite"))
        res = json.loads((run / "results.json").read_text())
        found.append({"lr": lr, "best_val_dice": res["best_val_dice"], "precision": res.get("precision"),
                      "fit_seconds": round(res["fit_seconds"]), "run": run.relative_to(study.runs).as_posix()})
    table = pd.DataFrame(found)
    (study.out / "probes").mkdir(parents=True, exist_ok=True)
    table.to_csv(study.out / "probes" / f"{name}.csv", index=False)
    print(f"[lite_cpu] {name} probes (validation Dice):\n{table.to_string(index=False)}", flush=True)
    return table


def data_notes(study: Study) -> None:
    """polypsam's own data reports: masks stretched by specks, test frames with a near-duplicate in training.
    Plain command lines, run in this process."""
    if not (study.out / "specks.json").is_file():
        print(f"[lite_cpu] polypsam.curation.specks {study.data}", flush=True)
        if specks.main([str(study.data), "--out", str(study.out / "specks.json")]):
            raise SystemExit("lite_cpu: the speck report failed (above)")
    if not (study.out / "neighbours.json").is_file():
        print(f"[lite_cpu] polypsam.curation.neighbours {study.data}", flush=True)
        if neighbours.main([str(study.data), "--split", str(study.split), "--out", str(study.out / "neighbours.json")]):
            raise SystemExit("lite_cpu: the neighbour report failed (above)")


def fast_split(study: Study) -> None:
    """The fast mode's one split file for every row, as the study's split.json is for the real one."""
    if not study.split.is_file():
        names = [r.relpath for r in folder_records(study.data, "TrainDataset")]
        write_split(study.split, make_split(names, 0.2, 42), root=str(study.data), train_dirs=["TrainDataset"])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", default=str(REPO / "outputs" / "lite_cpu"), help="where the runs live")
    ap.add_argument("--out", default=str(OUT), help="the results folder (records, tables, report)")
    ap.add_argument("--data", default=str(DATA), help="the PraNet-layout data root")
    ap.add_argument("--rows", nargs="*", help="only these rows and the rows they need (default: all)")
    ap.add_argument("--report-only", action="store_true", help="write the report from the finished rows")
    ap.add_argument("--no-report", action="store_true", help="run rows, leave the report (parallel drivers)")
    ap.add_argument("--rerun", action="store_true", help="run rows again even when their records are in the results")
    ap.add_argument("--fast", action="store_true", help="the miniature of every kind of row (see above)")
    ap.add_argument("--jobs", nargs="*", help="only train these jobs (fresh or resumed), then stop")
    ap.add_argument("--probe", choices=sorted(PROBES), help="run a row's learning-rate probes, then stop")
    args = ap.parse_args(argv)
    study = Study(Path(args.runs).resolve(), Path(args.out).resolve(), Path(args.data).resolve(), args.fast)
    if study.fast:
        fast_split(study)
    if args.probe or args.jobs:
        for job in args.jobs or ():
            train_job(study, job, trainers()[job].model if job in trainers() else "lite")
        if args.probe:
            probe(study, args.probe)
        return 0
    if not args.report_only:
        for row in ordered(args.rows or (FAST_ROWS if study.fast else None)):
            run_row(study, row, args.rerun)
    if args.no_report:
        return 0
    data_notes(study)
    done = [(r, ev) for r in ROWS if (ev := copy_records(study, r)) is not None]
    if not done:
        print("[lite_cpu] no row has finished yet; nothing to report")
        return 1
    write_report(study.out, done, REPO / "experiments" / "lite_cpu_notes.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
