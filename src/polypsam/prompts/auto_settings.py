"""The settings file of ``prompt=auto``: proposal settings chosen on validation by ``python -m
polypsam.select_auto``, written beside the checkpoint as ``<stem>.auto.json`` (``<stem>.auto-proposer-<sha>.json``
for a separate proposer), read by evaluate and predict.

Precedence: ``prompt.<key>=`` given on the command line > the file > ``conf/prompt/auto.yaml``. A file
is for one checkpoint (its sha256), model and preprocessing; another's is refused.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Any

from polypsam.download import sha256_file
from polypsam.errors import ConfigError
from polypsam.prompts.auto import TUNED, AutoPrompt

log = logging.getLogger("polypsam.prompts")

FORMAT = "polypsam auto settings 1"
_IDENTITY = ("checkpoint_sha256", "model", "preprocessing", "proposer_sha256")
_HOW = "choose settings for it with python -m polypsam.select_auto ckpt_path=<checkpoint>"


def beside(ckpt_path: str | Path, proposer: str | Path | None = None) -> Path:
    """``<checkpoint stem>.auto.json`` in the checkpoint's folder; with a separate proposer (``prompt.proposer``)
    ``<stem>.auto-proposer-<its sha256, 12 digits>.json``, so the settings of each stage 1 live side by side."""
    path = Path(ckpt_path).expanduser()
    if proposer is None:
        return path.with_name(f"{path.stem}.auto.json")
    return path.with_name(f"{path.stem}.auto-proposer-{sha256_file(proposer)[:12]}.json")


def identity(ckpt_path: str | Path | None, spec, proposer: str | Path | None = None) -> dict[str, Any]:
    """What a settings file is for: the checkpoint's bytes, its model and preprocessing, the proposer's bytes."""
    return {"checkpoint": str(Path(ckpt_path).expanduser().resolve()) if ckpt_path else None,
            "checkpoint_sha256": sha256_file(ckpt_path) if ckpt_path else None, "model": spec.name,
            "preprocessing": spec.preprocessing_key(),
            "proposer_sha256": sha256_file(proposer) if proposer else None}


def tuned(prompt: AutoPrompt) -> dict[str, Any]:
    return {k: getattr(prompt, k) for k in TUNED}


def write(path: str | Path, doc: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"format": FORMAT, **doc}, indent=1, default=str))
    tmp.replace(path)
    return path


def read(path: Path) -> dict:
    try:
        doc = json.loads(path.read_text())
        if doc.get("format") != FORMAT or not isinstance(doc.get("chosen"), dict):
            raise ValueError(f"format {doc.get('format')!r}, expected {FORMAT!r} with 'chosen' settings")
        unknown = sorted(set(doc["chosen"]) - set(TUNED))
        if unknown:
            raise ValueError(f"unknown setting(s) {', '.join(unknown)}")
        return doc
    except (OSError, ValueError, AttributeError) as exc:
        raise ConfigError(f"prompt.settings={path}: not a polypsam auto settings file ({exc}); {_HOW}, or "
                          "prompt.settings=null.") from None


def find(prompt: AutoPrompt, ckpt_path: str | Path | None) -> Path | None:
    """The file ``prompt.settings`` names: auto: beside the checkpoint (for its proposer) when there; a path:
    it must exist."""
    if prompt.settings is None:
        return None
    if prompt.settings == "auto":
        path = beside(ckpt_path, prompt.proposer) if ckpt_path else None
        return path if path is not None and path.is_file() else None
    path = Path(prompt.settings).expanduser()
    if not path.is_file():
        raise ConfigError(f"prompt.settings={path}: no such file; {_HOW}, or prompt.settings=null.")
    return path


def _who(ident: dict) -> str:
    sha = ident.get("checkpoint_sha256")
    return (f"checkpoint {ident.get('checkpoint')} (sha256 {sha[:12] if sha else None}, model "
            f"{ident.get('model')}, {ident.get('preprocessing')}"
            + (f", proposer sha256 {ident['proposer_sha256'][:12]}" if ident.get("proposer_sha256") else "") + ")")


def check(doc: dict, path: Path, mine: dict) -> None:
    theirs = doc.get("identity") or {}
    if any(theirs.get(k) != mine.get(k) for k in _IDENTITY):
        raise ConfigError(f"prompt.settings={path}: written for {_who(theirs)}, but this run uses {_who(mine)}; "
                          f"{_HOW}, or ignore the file with prompt.settings=null.")


def command_line_keys(overrides: list[str] | None = None) -> set[str]:
    """The ``prompt.<key>`` settings given on the command line (Hydra's task overrides by default)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.core.override_parser.overrides_parser import OverridesParser

    if overrides is None:
        overrides = list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []
    parsed = OverridesParser.create().parse_overrides(list(overrides))
    return {o.key_or_group.split(".")[1] for o in parsed if o.key_or_group.startswith("prompt.")}


def resolve(prompt, ckpt_path: str | Path | None, spec, explicit: set[str] | None = None
            ) -> tuple[Any, dict | None]:
    """``prompt`` with a settings file's choices (``prompt=auto`` only), and what to record in meta.json
    (None: no file, the prompt's own settings; ``prompt.settings`` is then None)."""
    if not isinstance(prompt, AutoPrompt):
        return prompt, None
    path = find(prompt, ckpt_path)
    if path is None:
        return dataclasses.replace(prompt, settings=None), None
    doc = read(path)
    check(doc, path, identity(ckpt_path, spec, prompt.proposer))
    explicit = command_line_keys() if explicit is None else explicit
    kept = sorted(explicit & set(doc["chosen"]))
    applied = dataclasses.replace(prompt, settings=str(path),
                                  **{k: v for k, v in doc["chosen"].items() if k not in explicit})
    dice = doc.get("validation_dice") or {}
    log.info("prompt=auto: settings from %s (validation Dice %.4f, default settings %.4f)%s: %s", path,
             dice.get("chosen", float("nan")), dice.get("default", float("nan")),
             f"; from the command line: {', '.join(kept)}" if kept else "",
             ", ".join(f"{k}={getattr(applied, k)}" for k in TUNED))
    return applied, {"file": str(path), "chosen": doc["chosen"], "command_line": kept, "validation_dice": dice}
