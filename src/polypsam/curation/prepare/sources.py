"""Each SRC (a zip archive, or a folder that may hold data and archives) as a read-only list of files."""

from __future__ import annotations

import os
import zipfile
from pathlib import Path, PurePosixPath

from polypsam.data.io import IMAGE_EXTENSIONS
from polypsam.errors import DataError

OTHER_ARCHIVES = (".rar", ".7z", ".tar", ".gz", ".tgz", ".bz2", ".xz")


class Tree:
    """Read-only view of one source; ``local`` gives a path that polypsam.data.io can open."""

    def __init__(self, path: Path, files: list[PurePosixPath], base_parts: tuple[str, ...]):
        self.path = path
        self.files = files
        self.base_parts = base_parts  # names above the tree root, for PraNet's TestDataset/<name> and hints
        self._zip: zipfile.ZipFile | None = None
        self._tmp: Path | None = None
        self._names: dict[PurePosixPath, str] = {}

    @classmethod
    def folder(cls, path: Path, files: list[PurePosixPath]) -> Tree:
        return cls(path, files, tuple(p for p in path.resolve().parts[-2:] if p not in ("/", "")))

    @classmethod
    def archive(cls, path: Path, tmp: Path) -> Tree:
        try:
            zf = zipfile.ZipFile(path)
            names = zf.namelist()
        except (zipfile.BadZipFile, OSError, EOFError) as e:
            raise DataError(f"{path}: not a readable zip archive ({e}); it is corrupt or truncated, "
                            "download it again") from None
        files = []
        for name in names:
            rel = PurePosixPath(name.replace("\\", "/"))
            if name.endswith("/") or _skip_name(rel):
                continue
            if rel.suffix.lower() in IMAGE_EXTENSIONS or rel.suffix.lower() == ".json":
                files.append(rel)
        tree = cls(path, sorted(files), (path.stem,))
        tree._zip, tree._tmp = zf, tmp
        tree._names = {PurePosixPath(n.replace("\\", "/")): n for n in names}
        return tree

    @property
    def in_archive(self) -> bool:
        return self._zip is not None

    def display(self, rel: PurePosixPath | str) -> str:
        rel = str(rel)
        if self._zip is not None:
            return f"{self.path}:{rel}" if rel not in ("", ".") else str(self.path)
        return str(self.path / rel)

    def read(self, rel: PurePosixPath) -> bytes:
        if self._zip is None:
            return (self.path / rel).read_bytes()
        try:
            return self._zip.read(self._names[rel])
        except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
            raise DataError(f"{self.path}: corrupt zip archive, member {rel} cannot be read ({e}); "
                            "download the archive again") from None

    def local(self, rel: PurePosixPath, role: str) -> tuple[bytes, Path]:
        """The bytes and a readable path (zip members are written to a private temporary folder)."""
        data = self.read(rel)
        if self._zip is None:
            return data, self.path / rel
        dest = self._tmp / role / rel.name
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(data)
        return data, dest

    def close(self) -> None:
        if self._zip is not None:
            self._zip.close()


def _skip_name(rel: PurePosixPath) -> bool:
    return any(p.startswith(".") or p == "__MACOSX" for p in rel.parts)


def _looks_like_zip(path: Path) -> bool:
    """A .zip name or zip's leading signature: such a file that does not open is a corrupt download."""
    if path.suffix.lower() == ".zip":
        return True
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"PK\x03\x04"
    except OSError:
        return False


def open_sources(srcs: list[Path], root: Path, tmp: Path) -> tuple[list[Tree], dict[Path, list[str]]]:
    """Trees for every SRC, and per folder SRC the archives in it that cannot be opened (.rar, ...).

    Folders are walked for data and for archives (told apart by content); ``tmp`` receives zip members
    that must be read from a path.
    """
    trees: list[Tree] = []
    others: dict[Path, list[str]] = {}
    root_res = root.resolve()
    for src in srcs:
        src = Path(src).expanduser()
        if not src.exists():
            raise DataError(f"{src}: no such file or folder; pass a dataset archive (.zip) or folder")
        res = src.resolve()
        for out in (root_res, root_res / "TrainDataset", root_res / "TestDataset", root_res / "Sources"):
            if res == out or (out != root_res and out in res.parents):
                raise DataError(f"{src}: this source is inside the output folder {root}; pass the original "
                                "archives or folders, or choose another --out")
        if src.is_file():
            if not zipfile.is_zipfile(src) and not _looks_like_zip(src):
                hint = " (unpack it first and pass the folder)" if src.suffix.lower() in OTHER_ARCHIVES else ""
                raise DataError(f"{src}: not a zip archive{hint}; pass a dataset .zip or an extracted folder")
            trees.append(Tree.archive(src, tmp / f"src{len(trees)}"))
            continue
        files: list[PurePosixPath] = []
        archives: list[Path] = []
        skipped: list[str] = []
        for dirpath, dirnames, filenames in os.walk(src):
            here = Path(dirpath)
            dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d != "__MACOSX"
                                 and (here / d).resolve() != root_res)
            for name in sorted(filenames):
                if name.startswith("."):
                    continue
                p = here / name
                suffix = p.suffix.lower()
                if suffix in IMAGE_EXTENSIONS or suffix == ".json":
                    files.append(PurePosixPath(p.relative_to(src).as_posix()))
                elif suffix == ".zip" or zipfile.is_zipfile(p) or _looks_like_zip(p):
                    archives.append(p)  # one that does not open is reported as corrupt
                elif suffix in OTHER_ARCHIVES:
                    skipped.append(str(p.relative_to(src)))
        if files:
            trees.append(Tree.folder(src, files))
        for a in archives:
            trees.append(Tree.archive(a, tmp / f"src{len(trees)}"))
        others[src] = skipped
    return trees, others


def describe(trees: list[Tree]) -> str:
    """The folders with image files in ``trees`` and their counts, for an 'unrecognised' error."""
    dirs: dict[str, int] = {}
    for t in trees:
        for rel in t.files:
            key = t.display(rel.parent)
            dirs[key] = dirs.get(key, 0) + 1
    if not dirs:
        return "no image files"
    shown = [f"{d} ({n} files)" for d, n in sorted(dirs.items())[:8]]
    return "; ".join(shown) + (f"; ... ({len(dirs)} folders)" if len(dirs) > 8 else "")
