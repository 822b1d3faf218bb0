"""Resuming from the command line: ``resume=<run dir>`` / ``ckpt_path=last`` become the run's own config.

:func:`resume_argv` rewrites ``sys.argv`` before Hydra starts (Hydra would otherwise open a new run
directory): the run's saved ``.hydra/config.yaml`` as the whole config, its folder, its split and its
``checkpoints/last.ckpt``. :func:`find_last_run` finds the newest run of a task for ``ckpt_path=last``;
:func:`check_run_dir` says what is wrong with a folder that cannot be resumed. A run saved before a class it
names as a Hydra ``_target_`` moved is pointed at the class's new home (:data:`MOVED_TARGETS`).
"""

from __future__ import annotations

import re
from pathlib import Path

import yaml
from hydra import compose, initialize_config_dir

from polypsam.cli import one_line
from polypsam.errors import CheckpointError, ConfigError
from polypsam.hydra_conf import CONF_DIR
from polypsam.run_dir import LAST_NAME, claim_run_dir

OWN_KEYS = ("hydra.run.dir", "ckpt_path", "data.split_file", "resume")  # set by resume_argv itself
# what a run's training means: a resume that changes one of these would mix two recipes in one run folder
DEFINING = ("strategy.", "scratch.lr", "optimizer.", "trainer.precision", "loss")

# Hydra targets a saved run may name, and where they live now (prefix -> prefix; issue 27 moved them)
MOVED_TARGETS = {
    "polypsam.callbacks.": "polypsam.training.callbacks.",
    "polypsam.launch.RankReport": "polypsam.training.rank.RankReport",
}


def _quote(value: str) -> str:
    """A Hydra override value: paths with characters the override grammar treats specially are quoted."""
    if re.fullmatch(r"[\w./\-:~+@]+", value):
        return value
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _split(arg: str) -> tuple[str, str | None]:
    key, sep, value = arg.partition("=")
    return (key, value) if sep else (arg, None)


def _newest_run(log_dir: Path, task: str) -> Path | None:
    found = [*log_dir.glob(f"{task}/runs/*/checkpoints/{LAST_NAME}"),
             *log_dir.glob(f"{task}/multiruns/*/*/checkpoints/{LAST_NAME}")]
    return max(found, key=lambda p: p.stat().st_mtime).parent.parent if found else None


def find_last_run(overrides: list[str]) -> Path:
    """The newest run of this command's task (``task_name``) under ``paths.log_dir`` with a ``last.ckpt``."""
    for a in overrides:
        key, value = _split(a)
        if key == "hydra.run.dir" and value and (Path(value) / "checkpoints" / LAST_NAME).is_file():
            return Path(value)
    # deletions (~key) only matter to the resumed job; they may name keys this composition lacks
    plain = [a for a in overrides if not a.startswith(("-", "~")) and not _split(a)[0].lstrip("+").startswith("hydra.")]
    try:
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3", job_name="train"):
            cfg = compose("train", overrides=plain)
        task, log_dir = str(cfg.task_name), Path(str(cfg.paths.log_dir))
    except Exception as exc:  # Hydra's errors for a bad override
        raise ConfigError(f"ckpt_path=last: cannot compose the config to find the run ({one_line(exc)}); "
                          "pass the run directory instead: resume=<run dir>.") from None
    run = _newest_run(log_dir, task)
    if run is None:
        raise ConfigError(f"ckpt_path=last: no run of task {task!r} under {log_dir / task} has "
                          f"checkpoints/{LAST_NAME}; pass the run directory instead: resume=<run dir>.")
    return run


def check_run_dir(run: Path) -> Path:
    """``run`` (or its ``checkpoints`` folder) as a resolved run directory that holds a config and a
    ``last.ckpt`` and that no live process is writing to; otherwise an error that says what is wrong."""
    run = run.expanduser().resolve()
    if run.name == "checkpoints":
        run = run.parent
    if not run.is_dir():
        raise ConfigError(f"{run}: run directory not found; give the folder a training run wrote "
                          "(it holds .hydra/config.yaml and checkpoints/last.ckpt).")
    if not (run / ".hydra" / "config.yaml").is_file():
        raise ConfigError(f"{run}: not a polypsam run directory (no .hydra/config.yaml); give the folder a "
                          "training run wrote, or ckpt_path=<a .ckpt file> to start a new run from it.")
    if not (run / "checkpoints" / LAST_NAME).is_file():
        raise CheckpointError(f"{run / 'checkpoints' / LAST_NAME}: not found; the run stopped before its first "
                              "checkpoint, so there is nothing to resume: start it again.")
    with claim_run_dir(run):  # a run still running is refused here, before Hydra rewrites its .hydra/
        pass
    return run


def _started_with(hydra_dir: Path) -> set[str]:
    """The overrides the run was started with (Hydra rewrites overrides.yaml for a resumed job, so the first
    one is kept as original_overrides.yaml)."""
    original = hydra_dir / "original_overrides.yaml"
    if not original.is_file() and (hydra_dir / "overrides.yaml").is_file():
        original.write_text((hydra_dir / "overrides.yaml").read_text())
    found = set()
    for f in (original, hydra_dir / "overrides.yaml"):
        if f.is_file():
            found.update(str(x) for x in (yaml.safe_load(f.read_text()) or []))
    return found


def _moved(target: str) -> str:
    for old, new in MOVED_TARGETS.items():
        if target.startswith(old):
            return new + target[len(old):]
    return target


def moved_targets(config: dict, at: str = "") -> dict[str, tuple[str, str]]:
    """``{key: (old, new)}`` for each ``_target_`` in a saved config that names a class at its old home."""
    found = {}
    items = config.items() if isinstance(config, dict) else enumerate(config if isinstance(config, list) else [])
    for k, v in items:
        key = f"{at}.{k}" if at else str(k)
        if k == "_target_" and isinstance(v, str) and _moved(v) != v:
            found[key] = (v, _moved(v))
        elif isinstance(v, (dict, list)):
            found.update(moved_targets(v, key))
    return found


def _changes(extras: list[str], saved: dict) -> list[str]:
    """``key=value (the run: old)`` for each override of a DEFINING key whose value differs from the run's."""
    found = []
    for a in extras:
        key, value = _split(a)
        key = key.lstrip("+")
        if value is None or a.startswith(("-", "~")) or not key.startswith(DEFINING):
            continue
        old = saved
        for part in key.split("."):
            old = old.get(part) if isinstance(old, dict) else None
        if yaml.safe_load(value) != old:
            found.append(f"{key}={value} (the run: {old})")
    return found


def resume_argv(argv: list[str]) -> list[str]:
    """Command-line arguments for resuming, or ``argv`` unchanged when nothing is resumed.

    ``resume=<run dir>``, ``ckpt_path=<run dir>`` and ``ckpt_path=last`` become: the run's saved
    ``.hydra/config.yaml`` as the whole config (``--config-dir``; the ``conf/`` files may have changed
    since), ``hydra.run.dir=<run dir>`` so Hydra writes into the same folder instead of a new one,
    ``ckpt_path=<run>/checkpoints/last.ckpt`` and ``data.split_file=<run>/split.json``, and ``_target_``s
    that name a moved class pointed at its new home (one line says which). Overrides the run
    was started with are dropped (they are in its config); other value overrides are kept
    (``~callbacks.x``, ``trainer.max_epochs=...``); config-group choices are refused.
    """
    target, rest = None, []
    for a in argv[1:]:
        key, value = _split(a)
        name = key.lstrip("+")
        if value is not None and name == "resume":
            target = value
        elif value is not None and name == "ckpt_path" and (value == "last" or Path(value).expanduser().is_dir()):
            target = value
        else:
            rest.append(a)
    if target is None:
        return argv
    if any(a in ("-m", "--multirun") or a.startswith(("--config-name", "-cn", "--config-dir", "-cd",
                                                       "--config-path", "-cp")) for a in rest):
        raise ConfigError("resume= / ckpt_path=last cannot be combined with --multirun or another config; "
                          "resume one run at a time.")
    run = check_run_dir(find_last_run(rest) if target == "last" else Path(target))
    hydra_dir = run / ".hydra"
    started_with = _started_with(hydra_dir)
    extras = [a for a in rest if a not in started_with and _split(a)[0].lstrip("+~") not in OWN_KEYS]
    groups = {p.name for p in Path(CONF_DIR).iterdir() if p.is_dir()}
    refused = [a for a in extras if not a.startswith("-") and "." not in _split(a)[0]
               and _split(a)[0].lstrip("+~").split("/")[0] in groups]
    if refused:
        raise ConfigError(f"resume={run}: {', '.join(refused)} would change config groups of the run being "
                          f"resumed; a resumed run keeps the config it started with ({hydra_dir / 'config.yaml'}). "
                          "Drop them, or start a new run.")
    saved = yaml.safe_load((hydra_dir / "config.yaml").read_text()) or {}
    changed = _changes(extras, saved)
    if changed:
        raise ConfigError(f"resume={run}: {'; '.join(changed)} would change what the run trains; a resumed run keeps "
                          "its strategy, learning rate, loss and precision. Drop the override, or start a new run "
                          "(another folder) for the change.")
    new = [argv[0], f"--config-dir={hydra_dir}", "--config-name=config", f"hydra.run.dir={_quote(str(run))}",
           f"ckpt_path={_quote(str(run / 'checkpoints' / LAST_NAME))}"]
    if (run / "split.json").is_file():
        new.append(f"data.split_file={_quote(str(run / 'split.json'))}")
    print(f"resuming {run} from {run / 'checkpoints' / LAST_NAME}", flush=True)
    moved = moved_targets(saved)
    if moved:
        print(f"resume={run}: its config names classes that have moved since; read at their new homes: "
              + ", ".join(f"{old} -> {new}" for old, new in moved.values()), flush=True)
    return new + [f"{key}={new}" for key, (_, new) in moved.items()] + extras
