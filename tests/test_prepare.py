"""polypsam.curation.prepare on small archives in each official layout, built from real images."""

import contextlib
import csv
import hashlib
import io
import json
import re
import shutil
import socket
import threading
import time
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from polypsam.curation.prepare import main
from polypsam.data.files import find_pairs
from polypsam.data.kvasir_boxes import load_kvasir_boxes
from polypsam.errors import DataError

N = 3
KVASIR = re.compile(r"c[a-z0-9]{24}")


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _run(argv) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([str(a) for a in argv])
    return rc, out.getvalue(), err.getvalue()


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


def _zip(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def _encode(arr: np.ndarray, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt, **kw)
    return buf.getvalue()


def _tight(mask: np.ndarray) -> list[int]:
    ys, xs = np.nonzero(mask)
    return [int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())]


def _real_pairs(real_root: Path, sub: str, numbered: bool, n: int = N, skip: int = 0):
    folder = real_root / sub
    pairs = [p for p in find_pairs(folder / "images", folder / "masks")
             if bool(p.stem.isdigit()) == numbered][skip:skip + n]
    assert len(pairs) == n
    return pairs


@pytest.fixture(scope="module")
def sources(real_root, tmp_path_factory):
    """Fake official archives/folders: PraNet train (image/, mask/) and test zips, a folder holding a
    Kvasir-SEG zip without a .zip name and an ETIS zip, and an extracted CVC-ClinicDB with a neutral name."""
    src = tmp_path_factory.mktemp("sources")
    facts = {}

    train = {}
    for p in _real_pairs(real_root, "TrainDataset", False) + _real_pairs(real_root, "TrainDataset", True):
        train[f"TrainDataset/image/{p.image.name}"] = p.image.read_bytes()
        train[f"TrainDataset/mask/{p.mask.name}"] = p.mask.read_bytes()
    _zip(src / "TrainDataset.zip", train)

    test = {}
    for name, numbered in (("Kvasir", False), ("CVC-ClinicDB", True)):
        for p in _real_pairs(real_root, f"TestDataset/{name}", numbered):
            test[f"TestDataset/{name}/images/{p.image.name}"] = p.image.read_bytes()
            test[f"TestDataset/{name}/masks/{p.mask.name}"] = p.mask.read_bytes()
    _zip(src / "TestDataset.zip", test)

    bundle = src / "bundle"
    bundle.mkdir()
    kvasir, boxes, jpeg_masks = {}, {}, {}
    for i, p in enumerate(_real_pairs(real_root, "TrainDataset", False, skip=N)):
        mask = np.asarray(Image.open(p.mask))
        rgb_mask = np.repeat(mask[..., None], 3, axis=2)
        jpg = _encode(rgb_mask, "JPEG", quality=75)  # Kvasir-SEG's masks are JPEGs, artefacts included
        decoded = np.asarray(Image.open(io.BytesIO(jpg))).max(axis=2)
        jpeg_masks[p.stem] = decoded
        x0, y0, x1, y1 = _tight(decoded > 127)
        if i == 0:
            bbox = [{"label": "polyp", "xmin": x0, "ymin": y0, "xmax": x1 + 5, "ymax": y1}]  # off by 5 px
        elif i == 1:
            xm = (x0 + x1) // 2  # two boxes whose union is the tight box: agrees, but multi-box
            bbox = [{"label": "polyp", "xmin": x0, "ymin": y0, "xmax": xm, "ymax": y1},
                    {"label": "polyp", "xmin": xm + 1, "ymin": y0, "xmax": x1, "ymax": y1}]
        else:
            bbox = [{"label": "polyp", "xmin": x0, "ymin": y0, "xmax": x1, "ymax": y1}]
        boxes[p.stem] = {"height": mask.shape[0], "width": mask.shape[1], "bbox": bbox}
        kvasir[f"Kvasir-SEG/images/{p.stem}.jpg"] = p.image.read_bytes()
        kvasir[f"Kvasir-SEG/masks/{p.stem}.jpg"] = jpg
    kvasir["Kvasir-SEG/kavsir_bboxes.json"] = json.dumps(boxes).encode()
    _zip(bundle / "download-1", kvasir)  # no .zip suffix: recognised by content
    facts["kvasir_boxes"] = boxes
    facts["kvasir_jpeg_masks"] = jpeg_masks
    facts["kvasir_images"] = {s: kvasir[f"Kvasir-SEG/images/{s}.jpg"] for s in boxes}

    etis = {}
    etis_src = {}
    for n, p in enumerate(_real_pairs(real_root, "TrainDataset", True, skip=N), start=1):
        img = np.asarray(Image.open(p.image).convert("RGB"))
        etis[f"ETIS-LaribPolypDB/ETIS-LaribPolypDB/{n}.tif"] = _encode(img, "TIFF")
        etis[f"ETIS-LaribPolypDB/GroundTruth/p{n}.tif"] = _encode(np.asarray(Image.open(p.mask)), "TIFF")
        etis_src[str(n)] = img
    _zip(bundle / "ETIS-LaribPolypDB.zip", etis)
    facts["etis_images"] = etis_src

    clinic = src / "export1"  # a neutral name: the image size tells CVC-ClinicDB
    (clinic / "Original").mkdir(parents=True)
    (clinic / "Ground Truth").mkdir()
    for p in _real_pairs(real_root, "TrainDataset", True, skip=2 * N):
        Image.open(p.image).convert("RGB").save(clinic / "Original" / f"{p.stem}.tif")
        Image.open(p.mask).save(clinic / "Ground Truth" / f"{p.stem}.tif")

    facts["argv"] = [src / "TrainDataset.zip", src / "TestDataset.zip", bundle, clinic]
    facts["dir"] = src
    return facts


@pytest.fixture(scope="module")
def prepared(sources, tmp_path_factory):
    before = {p: _sha(p) for p in _files(sources["dir"])}
    root = tmp_path_factory.mktemp("prepared") / "data"
    rc, out, err = _run([*sources["argv"], "--out", root])
    return {"root": root, "rc": rc, "out": out, "err": err, "sources_before": before}


SETS = {"TrainDataset": 2 * N, "TestDataset/Kvasir": N, "TestDataset/CVC-ClinicDB": N,
        "Sources/Kvasir-SEG": N, "Sources/ETIS-LaribPolypDB": N, "Sources/CVC-ClinicDB": N}


def test_layout_pairs_and_binary_masks(prepared):
    assert prepared["rc"] == 0, prepared["err"]
    root = prepared["root"]
    for rel, n in SETS.items():
        pairs = find_pairs(root / rel / "images", root / rel / "masks")
        assert len(pairs) == n, rel
        for p in pairs:
            with Image.open(p.mask) as m:
                assert m.format == "PNG" and m.mode == "L"
                assert set(np.unique(np.asarray(m)).tolist()) <= {0, 255}
                assert m.size == Image.open(p.image).size
    assert sorted(p.name for p in (root / "Sources").iterdir()) == ["CVC-ClinicDB", "ETIS-LaribPolypDB", "Kvasir-SEG"]
    # ETIS: image <N>.tif pairs with mask p<N>.tif, both named <N> in the output
    assert sorted(p.name for p in (root / "Sources/ETIS-LaribPolypDB/masks").iterdir()) == ["1.png", "2.png", "3.png"]


def test_jpeg_copied_and_tiff_converted_losslessly(prepared, sources):
    root = prepared["root"]
    for stem, data in sources["kvasir_images"].items():
        assert (root / "Sources/Kvasir-SEG/images" / f"{stem}.jpg").read_bytes() == data
    for stem, rgb in sources["etis_images"].items():
        out = root / "Sources/ETIS-LaribPolypDB/images" / f"{stem}.png"
        assert np.array_equal(np.asarray(Image.open(out)), rgb)


def test_jpeg_masks_thresholded_and_counted(prepared, sources):
    root = prepared["root"]
    report = json.loads((root / "prepare_report.json").read_text())
    expected = 0
    for stem, decoded in sources["kvasir_jpeg_masks"].items():
        expected += int(np.count_nonzero((decoded != 0) & (decoded != 255)))
        out = np.asarray(Image.open(root / "Sources/Kvasir-SEG/masks" / f"{stem}.png"))
        assert np.array_equal(out == 255, decoded > 127)
    assert expected > 0
    assert report["sets"]["Sources/Kvasir-SEG"]["thresholded_pixels"] == expected
    assert report["sets"]["TestDataset/Kvasir"]["thresholded_pixels"] == 0  # PNG 0/255 masks


def test_manifest_lists_every_file_with_its_hash(prepared):
    root = prepared["root"]
    with open(root / "MANIFEST.sha256.csv", newline="") as f:
        rows = {r["path"]: r for r in csv.DictReader(f)}
    on_disk = [p for top in ("TrainDataset", "TestDataset", "Sources") for p in _files(root / top)]
    assert sorted(rows) == sorted(p.relative_to(root).as_posix() for p in on_disk)
    for p in on_disk:
        row = rows[p.relative_to(root).as_posix()]
        assert row["sha256"] == _sha(p) and int(row["bytes"]) == p.stat().st_size
        if p.suffix != ".json":
            assert (int(row["width"]), int(row["height"])) == Image.open(p).size
    report = json.loads((root / "prepare_report.json").read_text())
    assert report["manifest_sha256"] == _sha(root / "MANIFEST.sha256.csv")


def test_count_warning_expected_vs_found(prepared):
    assert "TestDataset/Kvasir: expected 100 pairs, found 3" in prepared["out"]
    report = json.loads((prepared["root"] / "prepare_report.json").read_text())
    entry = report["sets"]["TestDataset/Kvasir"]
    assert (entry["expected"], entry["pairs"], entry["status"]) == (100, 3, "count differs")


def test_kvasir_boxes_written_and_checked(prepared, sources):
    root = prepared["root"]
    stats = json.loads((root / "prepare_report.json").read_text())["sets"]["Sources/Kvasir-SEG"]["kvasir_boxes"]
    assert (stats["differ"], stats["compared"], stats["multi_box"]) == (1, N, 1)
    assert stats["differing"][0]["max_diff_px"] == 5
    assert "1 of 3 (33.3%) differ" in prepared["out"]
    written = load_kvasir_boxes(root / "Sources/Kvasir-SEG/boxes.json")
    want = {s: [[float(b[k]) for k in ("xmin", "ymin", "xmax", "ymax")] for b in e["bbox"]]
            for s, e in sources["kvasir_boxes"].items()}
    assert written == want
    original = sources["dir"] / "kavsir_bboxes.json"
    original.write_text(json.dumps(sources["kvasir_boxes"]))
    assert load_kvasir_boxes(original) == want  # the published format reads the same
    original.unlink()
    bad = root.parent / "bad_boxes.json"
    bad.write_text('{"x": [[1, 2, 3]]}')
    with pytest.raises(DataError, match="bad_boxes.json"):
        load_kvasir_boxes(bad)


def test_second_run_changes_nothing_and_sources_are_untouched(prepared, sources):
    root = prepared["root"]
    mtimes = {p: p.stat().st_mtime_ns for p in _files(root)}
    rc, out, err = _run([*sources["argv"], "--out", root])
    assert rc == 0, err
    assert "nothing changed" in out
    assert {p: p.stat().st_mtime_ns for p in _files(root)} == mtimes
    assert {p: _sha(p) for p in _files(sources["dir"])} == prepared["sources_before"]


def test_stale_files_warned_then_removed_by_force(sources, tmp_path):
    clinic = sources["argv"][-1]
    root = tmp_path / "data"
    assert _run([clinic, "--out", root])[0] == 0
    extra = root / "Sources/CVC-ClinicDB/images/999.png"
    shutil.copy(next((root / "Sources/CVC-ClinicDB/masks").iterdir()), extra)
    rc, out, _ = _run([clinic, "--out", root])
    assert rc == 1 and extra.exists()  # left in place, so the pairing check fails
    assert "999.png" in out and "--force" in out
    rc, out, _ = _run([clinic, "--out", root, "--force"])
    assert rc == 0 and not extra.exists()
    assert f"{2 * N + 2} file(s) written, 1 removed" in out  # pairs + manifest + report, all rewritten


def test_unrecognised_folder_is_one_line_naming_it(real_root, tmp_path):
    folder = tmp_path / "holiday"
    (folder / "photos").mkdir(parents=True)
    shutil.copy(next((real_root / "TestDataset/Kvasir/images").iterdir()), folder / "photos" / "a.jpg")
    rc, _, err = _run([folder, "--out", tmp_path / "data"])
    assert rc == 2
    assert err.count("\n") == 1 and str(folder) in err
    assert "photos (1 files)" in err and "expected one of" in err


def test_corrupt_zip_and_unreadable_member(sources, tmp_path):
    whole = (sources["dir"] / "TestDataset.zip").read_bytes()
    broken = tmp_path / "TestDataset.zip"
    broken.write_bytes(whole[: len(whole) // 2])
    rc, _, err = _run([broken, "--out", tmp_path / "a"])
    assert rc == 2 and err.count("\n") == 1
    assert str(broken) in err and "download it again" in err

    polyp = np.zeros((20, 30), np.uint8)
    polyp[5:15, 10:20] = 255  # an all-empty set would be refused before its image is decoded
    mask = _encode(polyp, "PNG")
    bad = _zip(tmp_path / "kvasir.zip", {"Kvasir-SEG/images/x1.jpg": b"\xff\xd8\xff\xe0 not really a jpeg",
                                         "Kvasir-SEG/masks/x1.png": mask})
    rc, _, err = _run([bad, "--out", tmp_path / "b"])
    assert rc == 2 and err.count("\n") == 1
    assert f"{bad}:Kvasir-SEG/images/x1.jpg" in err and "cannot decode" in err


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_download_offline_fails_fast_with_url(tmp_path):
    url = f"http://127.0.0.1:{_closed_port()}/kvasir-seg.zip"
    t0 = time.monotonic()
    rc, out, err = _run(["--download", "--url", f"kvasir-seg={url}", "--out", tmp_path / "data"])
    assert time.monotonic() - t0 < 5
    assert rc == 2 and err.count("\n") == 1
    assert url in err and "browser" in err
    assert "drive.google.com" in out  # PraNet's data: manual steps, not a silent skip


class _RangeHandler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):
        payload = self.server.payload
        rng = self.headers.get("Range")
        self.server.ranges.append(rng)
        m = re.fullmatch(r"bytes=(\d+)-", rng or "")
        start = int(m.group(1)) if m else 0
        self.send_response(206 if m else 200)
        if m:
            self.send_header("Content-Range", f"bytes {start}-{len(payload) - 1}/{len(payload)}")
        self.send_header("Content-Length", str(len(payload) - start))
        self.end_headers()
        self.wfile.write(payload[start:])


def test_download_resumes_a_partial_file(sources, tmp_path):
    payload = (sources["argv"][2] / "download-1").read_bytes()
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _RangeHandler)
    srv.payload, srv.ranges = payload, []
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        root = tmp_path / "data"
        (root / "downloads").mkdir(parents=True)
        (root / "downloads/kvasir-seg.zip.part").write_bytes(payload[:1000])
        url = f"http://127.0.0.1:{srv.server_address[1]}/kvasir-seg.zip"
        rc, _, err = _run(["--download", "--url", f"kvasir-seg={url}", "--out", root])
    finally:
        srv.shutdown()
        srv.server_close()
    assert rc == 0, err
    assert srv.ranges == ["bytes=1000-"]
    assert _sha(root / "downloads/kvasir-seg.zip") == hashlib.sha256(payload).hexdigest()
    report = json.loads((root / "prepare_report.json").read_text())
    assert report["downloads"]["kvasir-seg"]["sha256"] == hashlib.sha256(payload).hexdigest()
    assert report["sets"]["Sources/Kvasir-SEG"]["pairs"] == N


def test_duplicate_copies_and_source_inside_output(sources, tmp_path):
    clinic = sources["argv"][-1]
    members = {}
    for p in sorted((clinic / "Original").iterdir()):
        for sub in ("Original", "Ground Truth"):
            arr = np.asarray(Image.open(clinic / sub / p.name))
            members[f"CVC-ClinicDB/TIF/{sub}/{p.name}"] = (clinic / sub / p.name).read_bytes()
            members[f"CVC-ClinicDB/PNG/{sub}/{p.stem}.png"] = _encode(arr, "PNG")
    both = _zip(tmp_path / "clinic.zip", members)  # one archive holding the set twice, as TIF/ and PNG/
    root = tmp_path / "data"
    rc, out, err = _run([both, "--out", root])
    assert rc == 0, err
    assert len(find_pairs(root / "Sources/CVC-ClinicDB/images", root / "Sources/CVC-ClinicDB/masks")) == N
    assert f"used {both}:CVC-ClinicDB/TIF" in out

    rc, _, err = _run([both, clinic, "--out", tmp_path / "other"])  # two sources, one set: ambiguous
    assert rc == 2 and "Sources/CVC-ClinicDB found twice" in err and str(clinic) in err

    rc, _, err = _run([root / "Sources/CVC-ClinicDB", "--out", root])
    assert rc == 2 and "inside the output folder" in err
