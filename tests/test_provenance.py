"""provenance.json (version, git commit, hardware per session) and compare's provenance table, on real git
repositories and real evaluations of the tiny model."""

import csv
import hashlib
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from polypsam import __version__
from polypsam.compare import main as compare_main
from polypsam.data.demo import generate_demo_dataset
from polypsam.data.splits import split_digest, write_split
from polypsam.evaluation import EvalSettings, evaluate_model
from polypsam.models import build_model
from polypsam.reporting.evaluation_dir import evaluated_bytes
from polypsam.reporting.provenance import PROVENANCE_NAME, git_state, read, record
from polypsam.reporting.study.strategies import row_cost


def _git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=cwd, check=True,
                          capture_output=True, text=True).stdout.strip()


def _checkout(top: Path, inner: str = "src/polypsam") -> Path:
    pkg = top / inner
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("x = 1\n")
    _git(top, "init", "-q")
    _git(top, "add", ".")
    _git(top, "commit", "-q", "-m", "one")
    return pkg


def test_git_state_of_a_checkout_clean_and_dirty(tmp_path):
    pkg = _checkout(tmp_path / "repo")
    state = git_state(pkg)
    assert state == {"commit": _git(pkg, "rev-parse", "HEAD"), "dirty": False}
    (pkg / "__init__.py").write_text("x = 2\n")
    assert git_state(pkg)["dirty"] is True


def test_git_state_outside_a_polypsam_checkout(tmp_path):
    plain = tmp_path / "site-packages" / "polypsam"
    plain.mkdir(parents=True)
    assert git_state(plain)["commit"] is None and "not in a git checkout" in git_state(plain)["note"]
    other = _checkout(tmp_path / "project", "venv/lib/polypsam")  # installed inside someone else's repo
    assert git_state(other)["commit"] is None


def test_runs_record_the_commit_of_the_checkout_polypsam_runs_from():
    """``git_state()`` with its default names the commit of the checkout polypsam was imported from. Its
    default once pointed at the subfolder the module lives in, and every run then recorded no commit: checked
    by restoring that default, which fails here."""
    import polypsam

    top = Path(polypsam.__file__).resolve().parents[2]
    if not (top / ".git").exists():
        pytest.skip(f"polypsam is imported from {top}, not a git checkout")
    assert git_state()["commit"] == _git(top, "rev-parse", "HEAD")


def test_record_appends_a_session_per_call(tmp_path):
    assert read(tmp_path) == []
    first = record(tmp_path / "run")
    record(tmp_path / "run")
    sessions = read(tmp_path / "run")
    assert len(sessions) == 2 and sessions[0] == first
    assert first["polypsam_version"] == __version__ and first["hardware"]["cpus"] >= 1
    assert first["hardware"]["cpu"] and first["hardware"]["gpus"] >= 0
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / PROVENANCE_NAME).write_text("{not json")
    assert read(tmp_path / "bad") == []


@pytest.fixture(scope="module")
def two_rows(tmp_path_factory):
    """A zero-shot evaluation, and a 'trained' run folder (config, split, checkpoint, results, two sessions)
    whose evaluation names its checkpoint, both evaluated for real with the tiny model."""
    tmp = tmp_path_factory.mktemp("prov")
    root = generate_demo_dataset(tmp / "demo", n_train=2, n_test=2, size=(64, 80))
    net = build_model("tiny", pretrained=False)
    evaluate_model(net, root, tmp / "zs", EvalSettings(noise=(0.0,)), verbose=False)
    run = tmp / "runs" / "dec"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "best.ckpt").write_bytes(b"weights")
    (run / "config_resolved.yaml").write_text("model:\n  name: tiny\ntrainer:\n  precision: '32'\n")
    (run / "split.json").write_text('{"train": [], "val": []}')
    (run / "results.json").write_text(json.dumps({
        "fit_seconds": 3700.4, "zero_shot_val_seconds": 23.0, "precision": "bf16-mixed",
        "encoder": {"runtime": "torch", "precision": "fp32", "trains": False,
                    "fallback": "model.runtime=openvino: the package openvino is not installed"}}))
    record(run)
    record(run)  # resumed once
    evaluate_model(net, root, run / "eval", EvalSettings(noise=(0.0,)), verbose=False,
                   identity={"checkpoint": str(run / "checkpoints" / "best.ckpt"), "strategy": "dec",
                             "proposer_sha256": PROPOSER})
    return tmp, run


PROPOSER = hashlib.sha256(b"proposer").hexdigest()  # prompt=auto's stage 1, as an evaluation records it


def test_compare_writes_the_provenance_table(two_rows):
    tmp, run = two_rows
    out = tmp / "report"
    assert compare_main([str(tmp / "zs"), str(run), "--out", str(out)]) == 0
    with open(out / "provenance.csv") as f:
        zs, dec = list(csv.DictReader(f))
    assert (zs["run"], dec["run"]) == ("zs", "dec")
    assert dec["checkpoint_sha256"] == hashlib.sha256(b"weights").hexdigest()
    assert dec["split_sha256"] == split_digest(run / "split.json")
    assert dec["config"] == "../runs/dec/config_resolved.yaml" and dec["train_sessions"] == "2"
    # what ran, as the run and the evaluation recorded it (results.json wins over the config)
    assert (dec["train_precision"], dec["eval_precision"], zs["train_precision"]) == ("bf16-mixed", "32", "")
    assert dec["train_encoder_runtime"] == "torch fp32 (fell back)" and zs["train_encoder_runtime"] == ""
    assert dec["eval_encoder_runtime"] == zs["eval_encoder_runtime"] == "torch fp32"
    assert float(dec["train_seconds"]) == pytest.approx(3723.4)
    commit = git_state()["commit"]
    assert dec["train_commit"] == dec["eval_commit"] == zs["eval_commit"]
    if commit:  # run from a git checkout of polypsam (CI clones one)
        assert dec["train_commit"].startswith(commit)
    assert zs["checkpoint_sha256"] == zs["split"] == zs["train_commit"] == ""  # zero-shot: nothing trained
    assert dec["polypsam_version"] == __version__ and float(dec["eval_seconds"]) > 0
    md = (out / "provenance.md").read_text()
    assert "1:02:03 (last session)" in md and f"`{dec['checkpoint_sha256'][:12]}`" in md
    assert dec["proposer_sha256"] == PROPOSER and zs["proposer_sha256"] == ""
    assert f"(proposer `{PROPOSER[:12]}`)" in md
    assert "| bf16-mixed / 32 | torch fp32 (fell back) / torch fp32 |" in md
    assert f"| zs | – | – | – | {__version__} |" in md
    links = re.findall(r"\]\(([^)]+)\)", md)
    assert links == ["../runs/dec/config_resolved.yaml", "../runs/dec/split.json"]
    assert all((out / link).is_file() for link in links)


def test_compare_writes_no_absolute_path(two_rows):
    """table.csv and provenance.csv name their files relative to the folder they are in: a results folder
    committed from one machine says nothing of its paths, and its links still lead to the files."""
    tmp, run = two_rows
    out = tmp / "report"
    assert compare_main([str(tmp / "zs"), str(run), "--out", str(out)]) == 0
    paths = {"table.csv": ["eval_dir"], "provenance.csv": ["config", "split", "checkpoint", "eval_dir"]}
    for name, columns in paths.items():
        text = (out / name).read_text()
        assert str(tmp) not in text, name
        rows = list(csv.DictReader(text.splitlines()))
        for r in rows:
            for c in columns:
                assert r[c] == "" or (not Path(r[c]).is_absolute() and (out / r[c]).exists()), (name, c, r[c])
    assert rows[1]["checkpoint"] == "../runs/dec/checkpoints/best.ckpt" and rows[0]["eval_dir"] == "../zs"
    table = list(csv.DictReader((out / "table.csv").read_text().splitlines()))
    assert [r["split"] for r in table] == ["none", "none"]  # a label there, not a path: left alone


def test_a_run_from_before_results_json_recorded_what_ran(two_rows, tmp_path):
    """The precision comes from the resolved config; the encoder runtime is not guessed from what was asked."""
    _, run = two_rows
    old = tmp_path / "old"
    for rel in ("config_resolved.yaml", "split.json", *(f"eval/{f}" for f in ("meta.json", "summary.csv",
                                                                          "per_image.csv"))):
        (old / rel).parent.mkdir(parents=True, exist_ok=True)
        (old / rel).write_bytes((run / rel).read_bytes())
    (old / "results.json").write_text(json.dumps({"fit_seconds": 10.0}))
    assert compare_main([str(old), "--out", str(tmp_path / "out")]) == 0
    with open(tmp_path / "out" / "provenance.csv") as f:
        (row,) = list(csv.DictReader(f))
    assert (row["train_precision"], row["train_encoder_runtime"]) == ("32", "")
    assert row["eval_encoder_runtime"] == "torch fp32"


def test_moved_results_folder_finds_its_checkpoint(two_rows, tmp_path):
    _, run = two_rows
    meta = json.loads((run / "eval" / "meta.json").read_text())
    moved = tmp_path / "copy" / "dec"
    for rel in ("eval/meta.json", "eval/summary.csv", "eval/per_image.csv", "checkpoints/best.ckpt"):
        (moved / rel).parent.mkdir(parents=True, exist_ok=True)
        (moved / rel).write_bytes((run / rel).read_bytes())
    meta["checkpoint"] = "/nowhere/dec/checkpoints/best.ckpt"
    (moved / "eval" / "meta.json").write_text(json.dumps(meta))
    assert compare_main([str(moved), "--out", str(tmp_path / "out")]) == 0
    with open(tmp_path / "out" / "provenance.csv") as f:
        (row,) = list(csv.DictReader(f))
    assert row["checkpoint_sha256"] == hashlib.sha256(b"weights").hexdigest()
    assert row["config"] == row["split"] == row["train_commit"] == ""  # not copied: not recorded, not guessed
    assert "| dec | – | – |" in (tmp_path / "out" / "provenance.md").read_text()


def test_split_digest_follows_the_image_lists_not_the_file(tmp_path):
    """Two copies of one split that differ in metadata share a digest; moving one image changes it."""
    split = {"train": ["TrainDataset/images/b.png", "TrainDataset/images/a.png"], "val": ["TrainDataset/images/c.png"]}
    a = write_split(tmp_path / "a.json", split, seed=42, source="generated")
    b = write_split(tmp_path / "b.json", split, seed=42, source="/elsewhere/split.json")
    assert a.read_bytes() != b.read_bytes() and split_digest(a) == split_digest(b)
    moved = write_split(tmp_path / "c.json", {"train": split["train"][:1], "val": split["val"] + split["train"][1:]})
    assert split_digest(moved) != split_digest(a)


def test_an_older_evaluation_takes_the_digest_another_recorded_for_its_checkpoint(two_rows, tmp_path):
    """Two evaluations of one checkpoint, moved away from it: the older (no digest in its meta.json) reads
    the digest the newer recorded; alone, it reads as missing, never guessed."""
    _, run = two_rows
    meta = json.loads((run / "eval" / "meta.json").read_text())
    for name, keep in (("new", True), ("old", False)):
        ev = tmp_path / name / "eval"
        ev.mkdir(parents=True)
        for f in ("summary.csv", "per_image.csv"):
            (ev / f).write_bytes((run / "eval" / f).read_bytes())
        m = dict(meta, checkpoint="/nowhere/dec/checkpoints/best.ckpt")
        m.pop("checkpoint_sha256", None)
        if keep:
            m["checkpoint_sha256"] = hashlib.sha256(b"weights").hexdigest()
        (ev / "meta.json").write_text(json.dumps(m))
    both, alone = tmp_path / "both", tmp_path / "alone"
    assert compare_main([str(tmp_path / "new" / "eval"), str(tmp_path / "old" / "eval"), "--out", str(both)]) == 0
    assert compare_main([str(tmp_path / "old" / "eval"), "--out", str(alone)]) == 0
    with open(both / "provenance.csv") as f:
        assert {r["checkpoint_sha256"] for r in csv.DictReader(f)} == {hashlib.sha256(b"weights").hexdigest()}
    with open(alone / "provenance.csv") as f:
        assert next(csv.DictReader(f))["checkpoint_sha256"] == ""


def test_a_run_resumed_over_sessions_reports_its_whole_training_time(two_rows, tmp_path):
    """results.json's fit over every session (the timer travels in the checkpoint: tests/test_resume.py) is the
    table's training time and the strategy table's hours; a run with its last session's only gets no hours."""
    tmp, run = two_rows
    runs = tmp_path / "runs"
    shutil.copytree(tmp / "zs", tmp_path / "zs")
    shutil.copytree(run, runs / "dec")
    res = json.loads((runs / "dec" / "results.json").read_text())
    assert row_cost(runs / "dec").hours is None  # resumed once, before the sessions were recorded
    res.update(fit_seconds_all_sessions=7200.0, epochs=2, effective_batch_size=16, data={"train": {"used": 160}},
               fit_sessions=[{"cpu": "AMD EPYC", "seconds": 3600.0}, {"cpu": "AMD EPYC", "seconds": 3600.0}])
    (runs / "dec" / "results.json").write_text(json.dumps(res))
    assert compare_main([str(tmp_path / "zs"), str(runs / "dec"), "--out", str(tmp_path / "report")]) == 0
    md = (tmp_path / "report" / "provenance.md").read_text()
    assert "2:00:23 (2 sessions)" in md and "last session" not in md
    cost = row_cost(runs / "dec")
    assert cost.hours == pytest.approx(2.0) and cost.s_per_step == pytest.approx(7200 / 20)


def test_evaluated_bytes_reads_an_older_evaluations_proposer_from_its_settings_file(two_rows, tmp_path):
    """Evaluations from before meta.json named the proposer's sha256: the settings file they read names it
    (its identity), found beside the records when the run folder is elsewhere."""
    tmp, run = two_rows
    ev = tmp_path / "eval_auto"
    shutil.copytree(run / "eval", ev)
    meta = json.loads((ev / "meta.json").read_text())
    del meta["proposer_sha256"]
    meta["prompt"]["proposer"] = "/elsewhere/unet/checkpoints/best.ckpt"
    meta["auto_settings"] = {"file": "/elsewhere/dec/checkpoints/best.auto-row.json"}
    (ev / "meta.json").write_text(json.dumps(meta))
    assert evaluated_bytes(ev) == {"checkpoint_sha256": meta.get("checkpoint_sha256"), "proposer_sha256": None}
    (ev / "best.auto-row.json").write_text(json.dumps({"identity": {"proposer_sha256": PROPOSER}}))
    assert evaluated_bytes(ev)["proposer_sha256"] == PROPOSER
