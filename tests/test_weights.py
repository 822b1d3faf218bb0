"""Checkpoint fetching and verification against a real HTTP server on loopback."""

import hashlib
import os
import re
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from polypsam import weights
from polypsam.download import sha256_file
from polypsam.errors import CheckpointError
from polypsam.weights import (
    ENV_VAR,
    SAM_CHECKPOINTS,
    CheckpointSpec,
    default_checkpoint_dir,
    download,
    fetch_command,
    resolve_checkpoint,
    verify,
)

PAYLOAD = os.urandom(300_000)
SHA = hashlib.sha256(PAYLOAD).hexdigest()
SRC = str(Path(__file__).resolve().parents[1] / "src")


class _Handler(BaseHTTPRequestHandler):
    """Serves PAYLOAD with Range support (SimpleHTTPRequestHandler has none), in the server's mode."""

    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def do_GET(self):
        srv = self.server
        srv.ranges.append(self.headers.get("Range"))
        m = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
        n = len(PAYLOAD)
        if m and srv.mode != "ignore_range":
            start = int(m.group(1))
            if start >= n:
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{n}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            body = PAYLOAD[start:]
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{n - 1}/{n}")
        else:
            body = PAYLOAD
            self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if srv.mode == "cut_first" and len(srv.ranges) == 1:
            self.wfile.write(body[: srv.cut_at])  # then hang up mid-body
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body)


@pytest.fixture
def server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.mode, srv.cut_at, srv.ranges = "range", 0, []
    thread = threading.Thread(target=srv.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    srv.url = f"http://127.0.0.1:{srv.server_address[1]}/model.pth"
    yield srv
    srv.shutdown()
    srv.server_close()


def _spec(url, sha=SHA, size=None):
    return CheckpointSpec("test", "model.pth", sha, size, url)


def _closed_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def test_full_download(server, tmp_path):
    path = download(_spec(server.url, size=len(PAYLOAD)), tmp_path, progress=True)
    assert path == tmp_path / "model.pth"
    assert path.read_bytes() == PAYLOAD and sha256_file(path) == SHA
    assert not (tmp_path / "model.pth.part").exists()
    assert server.ranges == [None]
    # present and verified: no second request
    assert download(_spec(server.url), tmp_path, progress=False) == path
    assert len(server.ranges) == 1


def test_interrupted_download_resumes_with_range(server, tmp_path):
    server.mode, server.cut_at = "cut_first", 120_000
    spec = _spec(server.url)
    with pytest.raises(CheckpointError, match=r"broke after 120000 of 300000 bytes.*resume"):
        download(spec, tmp_path, progress=True)  # the progress bar must stop cleanly on the error
    part = tmp_path / "model.pth.part"
    assert part.stat().st_size == 120_000
    assert not (tmp_path / "model.pth").exists()

    path = download(spec, tmp_path, progress=False)
    assert server.ranges == [None, "bytes=120000-"]
    assert path.read_bytes() == PAYLOAD and not part.exists()


def test_server_ignoring_range_restarts(server, tmp_path):
    server.mode = "ignore_range"
    (tmp_path / "model.pth.part").write_bytes(b"\0" * 5000)  # stale bytes that must not survive
    path = download(_spec(server.url), tmp_path, progress=False)
    assert server.ranges == ["bytes=5000-"]
    assert path.read_bytes() == PAYLOAD


def test_complete_part_answered_416_is_finished(server, tmp_path):
    (tmp_path / "model.pth.part").write_bytes(PAYLOAD)
    path = download(_spec(server.url), tmp_path, progress=False)
    assert server.ranges == [f"bytes={len(PAYLOAD)}-"]
    assert path.read_bytes() == PAYLOAD


def test_oversized_part_answered_416_restarts(server, tmp_path):
    (tmp_path / "model.pth.part").write_bytes(PAYLOAD + b"junk")
    path = download(_spec(server.url), tmp_path, progress=False)
    assert server.ranges == [f"bytes={len(PAYLOAD) + 4}-", None]
    assert path.read_bytes() == PAYLOAD


def test_wrong_checksum_leaves_nothing(server, tmp_path):
    with pytest.raises(CheckpointError, match=r"model\.pth.*corrupt or not the official file") as e:
        download(_spec(server.url, sha="0" * 64), tmp_path, progress=False)
    assert "\n" not in str(e.value)
    assert list(tmp_path.iterdir()) == []


def test_wrong_announced_size_fails_before_downloading(server, tmp_path):
    with pytest.raises(CheckpointError, match=r"serves 300000 bytes but model\.pth has 300001"):
        download(_spec(server.url, size=len(PAYLOAD) + 1), tmp_path, progress=False)
    assert not (tmp_path / "model.pth").exists()


def test_unreachable_fails_fast(tmp_path):
    url = f"http://127.0.0.1:{_closed_port()}/sam.pth"
    t0 = time.monotonic()
    with pytest.raises(CheckpointError) as e:
        download(_spec(url), tmp_path, progress=False, timeout=20.0)
    assert time.monotonic() - t0 < 5.0
    msg = str(e.value)
    assert url in msg and "wget" in msg and str(tmp_path) in msg and "weights verify" in msg


def test_resolve_missing_names_path_url_and_command(tmp_path):
    spec = SAM_CHECKPOINTS["vit_b"]
    with pytest.raises(CheckpointError) as e:
        resolve_checkpoint("vit_b", tmp_path)
    msg = str(e.value)
    assert str(tmp_path / spec.filename) in msg
    assert "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_b_01ec64.pth" in msg
    assert "python -m polypsam.weights download vit_b" in msg and ENV_VAR in msg
    assert isinstance(e.value, FileNotFoundError)


def test_resolve_corrupt_and_unknown(tmp_path):
    (tmp_path / SAM_CHECKPOINTS["vit_b"].filename).write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match=r"sam_vit_b_01ec64\.pth is corrupt.*download vit_b"):
        resolve_checkpoint("vit_b", tmp_path)
    assert resolve_checkpoint("vit_b", tmp_path, verify=False) == tmp_path / "sam_vit_b_01ec64.pth"
    # known size: caught without hashing
    (tmp_path / SAM_CHECKPOINTS["vit_h"].filename).write_bytes(b"x")
    with pytest.raises(CheckpointError, match=r"is 1 bytes, expected 2564550879"):
        resolve_checkpoint("vit_h", tmp_path)
    with pytest.raises(CheckpointError, match=r"vit_b, vit_l, vit_h"):
        resolve_checkpoint("vit_x", tmp_path)


def test_resolve_verified_and_stamp(monkeypatch, tmp_path):
    monkeypatch.setitem(SAM_CHECKPOINTS, "vit_b", CheckpointSpec("vit_b", "sam_vit_b_01ec64.pth", SHA, None, "x"))
    path = tmp_path / "sam_vit_b_01ec64.pth"
    path.write_bytes(PAYLOAD)
    assert resolve_checkpoint("vit_b", tmp_path) == path
    stamp = tmp_path / "sam_vit_b_01ec64.pth.sha256ok"
    assert stamp.exists()
    # same size and mtime: the stamp is trusted (no re-hash), even over changed bytes
    st = path.stat()
    path.write_bytes(b"\1" * len(PAYLOAD))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert resolve_checkpoint("vit_b", tmp_path) == path
    # a new mtime forces a re-hash, which finds the damage
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    with pytest.raises(CheckpointError, match="corrupt"):
        resolve_checkpoint("vit_b", tmp_path)


def test_verify_statuses(tmp_path):
    (tmp_path / "sam_vit_b_01ec64.pth").write_bytes(b"garbage")
    (tmp_path / "sam_vit_l_0b3195.pth.part").write_bytes(b"half")
    assert verify(tmp_path) == {"vit_b": "corrupt", "vit_l": "partial", "vit_h": "missing"}


def test_default_dir_and_fetch_command(monkeypatch, tmp_path):
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert default_checkpoint_dir() == Path.home() / ".cache" / "polypsam" / "checkpoints"
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "env"))
    assert default_checkpoint_dir() == tmp_path / "env"
    assert default_checkpoint_dir(tmp_path / "cfg") == tmp_path / "cfg"
    assert fetch_command("vit_l") == f"python -m polypsam.weights download vit_l --dir {tmp_path / 'env'}"
    with pytest.raises(CheckpointError, match="known"):
        fetch_command("sam2")
    assert weights.SAM_CHECKPOINTS["vit_h"].url.endswith("/segment_anything/sam_vit_h_4b8939.pth")


def _cli(*args):
    env = {**os.environ, "PYTHONPATH": SRC, "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "polypsam.weights", *args], check=False, capture_output=True,
                          text=True, env=env, timeout=60)


@pytest.mark.slow  # a subprocess
def test_cli_verify_table(tmp_path):
    (tmp_path / "sam_vit_b_01ec64.pth").write_bytes(b"garbage")
    r = _cli("verify", "--dir", str(tmp_path))
    assert r.returncode == 1, r.stderr
    rows = {line.split("│")[1].strip(): line for line in r.stdout.splitlines() if line.count("│") >= 4}
    assert "corrupt" in rows["vit_b"] and "missing" in rows["vit_l"] and "missing" in rows["vit_h"]
    assert "sam_vit_h_4b8939.pth" in rows["vit_h"]


@pytest.mark.slow  # a subprocess
def test_cli_download_checksum_error_is_one_line(server, tmp_path):
    r = _cli("download", "vit_b", "--dir", str(tmp_path), "--url", server.url, "--quiet")
    assert r.returncode == 2  # polypsam.cli.EXIT_ERROR, as every command
    err = r.stderr.strip()
    assert "\n" not in err and "Traceback" not in err
    assert err.startswith("error: ") and str(tmp_path / "sam_vit_b_01ec64.pth") in err and server.url in err
    assert list(tmp_path.iterdir()) == []
