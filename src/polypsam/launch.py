"""Running a job on one process or as a DDP world (filled in by the multi-GPU work)."""

from __future__ import annotations


def run_maybe_distributed(fn, cfg):
    return fn(cfg)
