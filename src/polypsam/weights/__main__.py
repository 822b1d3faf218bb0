"""``python -m polypsam.weights``: download the official SAM checkpoints, or verify those present."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from polypsam.cli import EXIT_INTERRUPTED, run_cli
from polypsam.errors import CheckpointError
from polypsam.weights import (
    ENV_VAR,
    SAM_CHECKPOINTS,
    CheckpointSpec,
    default_checkpoint_dir,
    download,
    fetch_command,
    verify,
)


def _print_table(folder: Path, status: dict[str, str]) -> None:
    style = {"ok": "green", "missing": "yellow", "partial": "yellow", "corrupt": "red"}
    table = Table(title=f"SAM checkpoints in {folder}")
    for col in ("name", "file", "status"):
        table.add_column(col)
    for name, state in status.items():
        table.add_row(name, SAM_CHECKPOINTS[name].filename, f"[{style[state]}]{state}[/]")
    Console().print(table)


def _source(name: str, url: str | None, many: bool) -> CheckpointSpec:
    spec = SAM_CHECKPOINTS[name]
    if url is None:
        return spec
    if url.endswith("/"):  # a mirror of the whole folder
        return CheckpointSpec(spec.name, spec.filename, spec.sha256, spec.size, url + spec.filename)
    if many:
        raise CheckpointError(f"--url {url} names one file but several checkpoints were asked for; give a "
                              f"folder URL ending in '/' or download one name at a time")
    return CheckpointSpec(spec.name, spec.filename, spec.sha256, spec.size, url)


def main(argv: list[str] | None = None) -> int:
    names = list(SAM_CHECKPOINTS)
    parser = argparse.ArgumentParser(prog="python -m polypsam.weights", description=__doc__.split(": ", 1)[1].rstrip(".` \n"))
    sub = parser.add_subparsers(dest="command", required=True)
    dl = sub.add_parser("download", help="fetch (or resume) checkpoints and verify their sha256")
    dl.add_argument("names", nargs="+", choices=names + ["all"], metavar="NAME",
                    help=f"one or more of {', '.join(names)}, or all")
    dl.add_argument("--dir", default=None, help=f"target folder (default: ${ENV_VAR} or ~/.cache/polypsam/checkpoints)")
    dl.add_argument("--url", default=None, help="another source: a file URL, or a mirror folder URL ending in '/'")
    dl.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for the server (default 30)")
    dl.add_argument("--quiet", action="store_true", help="no progress bar")
    vf = sub.add_parser("verify", help="report which checkpoints are present and intact")
    # no choices= here: Python 3.11 argparse rejects an empty nargs="*" list against choices
    vf.add_argument("names", nargs="*", metavar="NAME", help=f"limit to these of {', '.join(names)} (default: all)")
    vf.add_argument("--dir", default=None)
    args = parser.parse_args(argv)
    if args.command == "verify" and (unknown := sorted(set(args.names) - set(names))):
        parser.error(f"unknown checkpoint {', '.join(unknown)}; known: {', '.join(names)}")

    folder = default_checkpoint_dir(args.dir)
    if args.command == "verify":
        wanted = args.names or names
        status = {n: s for n, s in verify(folder).items() if n in wanted}
        _print_table(folder, status)
        return 0 if all(s == "ok" for s in status.values()) else 1

    wanted = names if "all" in args.names else list(dict.fromkeys(args.names))
    # failures follow the command line's one policy (polypsam.cli): one line each, status 2; Ctrl-C 130
    sources = run_cli(lambda: [_source(name, args.url, len(wanted) > 1) for name in wanted], return_code=True)
    if isinstance(sources, int):
        return sources
    status = 0
    for name, spec in zip(wanted, sources):  # one failed checkpoint does not stop the others
        code = run_cli(lambda: download(spec, folder, progress=not args.quiet, timeout=args.timeout) and 0,
                       return_code=True)
        if code == EXIT_INTERRUPTED:
            print(f"rerun to resume: {fetch_command(name, folder, args.url)}", file=sys.stderr)
            return code
        status = status or code
    return status


if __name__ == "__main__":
    sys.exit(main())
