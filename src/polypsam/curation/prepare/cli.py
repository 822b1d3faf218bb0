"""``python -m polypsam.curation.prepare``: the command line around :func:`polypsam.curation.prepare.run.prepare`."""

from __future__ import annotations

import argparse

from polypsam.cli import run_cli
from polypsam.curation.prepare.fetch import DOWNLOADS
from polypsam.curation.prepare.run import prepare


def _parse_url(value: str) -> tuple[str, str]:
    key, sep, url = value.partition("=")
    if not sep or not url:
        raise argparse.ArgumentTypeError(f"expected KEY=URL with KEY one of {', '.join(DOWNLOADS)}")
    return key, url


def main(argv: list[str] | None = None) -> int:
    """0: every set passed; 1: a set failed its checks; 2: unusable input (one line on stderr); 130: interrupted."""
    parser = argparse.ArgumentParser(
        prog="python -m polypsam.curation.prepare",
        description="Turn the official polyp archives or folders into polypsam's PraNet layout.")
    parser.add_argument("sources", nargs="*", metavar="SRC", help="dataset .zip archives or folders")
    parser.add_argument("--out", required=True, metavar="ROOT", help="output folder (the data root)")
    parser.add_argument("--download", action="store_true",
                        help="fetch the archives with a known URL into ROOT/downloads (resumable); "
                             "print the manual steps for the others")
    parser.add_argument("--force", action="store_true", help="rewrite every file, and remove files not from SRC")
    parser.add_argument("--url", action="append", type=_parse_url, default=[], metavar="KEY=URL",
                        help=f"another address for a download ({', '.join(DOWNLOADS)}), e.g. a mirror")
    args = parser.parse_args(argv)
    # failures follow the command line's one policy (polypsam.cli): one line, status 2; Ctrl-C 130. A rerun
    # continues where it stopped: finished files are kept.
    result = run_cli(lambda: prepare(args.sources, args.out, download=args.download, force=args.force,
                                     urls=dict(args.url)), return_code=True)
    if isinstance(result, int):
        return result
    return 0 if result.ok else 1
