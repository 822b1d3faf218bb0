"""Command-line arguments the benchmarks share, with the same meaning and defaults in each."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from benchmarks.tables import RESULTS

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "polyp"


def parser(doc: str) -> argparse.ArgumentParser:
    """A parser described by the first paragraph of a script's docstring."""
    return argparse.ArgumentParser(description=doc.split("\n\n")[0])


def add_data_root(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-root", default=os.environ.get("POLYPSAM_DATA_ROOT", str(DEFAULT_DATA)))


def add_device(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])


def add_steps(p: argparse.ArgumentParser, threads_help: str = "torch threads on a CPU (see train_throughput)"
              ) -> None:
    """Timed and warm-up steps per case, torch threads of a CPU case."""
    p.add_argument("--steps", type=int, default=None, help="timed steps per case (CPU 3, GPU 10)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps (CPU 1, GPU 3)")
    p.add_argument("--threads", type=int, default=1, help=threads_help)


def step_counts(args: argparse.Namespace, gpu: bool) -> tuple[int, int]:
    """(timed steps, warm-up steps): the arguments', else 1 and 1 for --smoke, 10 and 3 on a GPU, 3 and 1 on a CPU."""
    steps = args.steps or (1 if args.smoke else 10 if gpu else 3)
    warmup = args.warmup if args.warmup is not None else (1 if args.smoke else 3 if gpu else 1)
    return steps, warmup


def add_outputs(p: argparse.ArgumentParser, block_help: str, smoke_help: str) -> None:
    """--smoke, --results (the markdown file), --block (its marker), --json (the raw figures)."""
    p.add_argument("--smoke", action="store_true", help=smoke_help)
    p.add_argument("--results", default=None, help=f"markdown file to update (default {RESULTS}; none for --smoke)")
    p.add_argument("--block", default=None, help=block_help)
    p.add_argument("--json", default=None, help="also write the raw results here")


def results_file(args: argparse.Namespace) -> Path | None:
    """Where the results block goes: --results, else RESULTS.md unless --smoke."""
    target = args.results or (None if args.smoke else str(RESULTS))
    return Path(target) if target else None
