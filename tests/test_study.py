"""The study layer: paired comparisons on the same images, the seed spread, the figures and the report."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from omegaconf import OmegaConf
from scipy.stats import wilcoxon

from polypsam.download import sha256_file
from polypsam.reporting.study import paired_comparison, seed_spread
from polypsam.reporting.study.figures import robustness_all, validation_curves
from polypsam.reporting.study.report import paired_markdown


def _per_image(dice, sets=("Kvasir",), start=0):
    return pd.DataFrame([{"dataset": s, "image": f"i{i}", "dice": d} for s in sets
                         for i, d in enumerate(dice, start=start)])


def test_paired_comparison_pairs_images_not_rows():
    rng = np.random.default_rng(0)
    b = rng.uniform(0.5, 0.9, 40)
    a = b + 0.02 + rng.normal(0, 0.005, 40)  # better on every image by a little
    t = paired_comparison(_per_image(a), _per_image(b)).iloc[0]
    assert t["n_images"] == 40 and t["diff"] == pytest.approx(np.mean(a - b))
    assert 0 < t["ci_low"] < t["diff"] < t["ci_high"] < 0.03  # paired: tight although rows spread widely
    assert t["wilcoxon_p"] == pytest.approx(wilcoxon(a - b).pvalue) and t["wilcoxon_p"] < 1e-6
    # only the images both rows hold are compared
    part = paired_comparison(_per_image(a[:10]), _per_image(b)).iloc[0]
    assert part["n_images"] == 10 and part["mean_b"] == pytest.approx(b[:10].mean())
    same = paired_comparison(_per_image(b), _per_image(b)).iloc[0]
    assert same["diff"] == 0 and same["wilcoxon_p"] is None


def test_seed_spread_and_the_noise_verdict():
    sums = {f"s{k}": pd.DataFrame({"dataset": ["Kvasir"], "dice": [v]}) for k, v in enumerate([0.90, 0.92, 0.91])}
    s = seed_spread(sums).iloc[0]
    assert s["seeds"] == 3 and s["sd"] == pytest.approx(0.01) and (s["min"], s["max"]) == (0.90, 0.92)
    small = pd.DataFrame([{"dataset": "Kvasir", "n_images": 5, "mean_a": 0.915, "mean_b": 0.90, "diff": 0.015,
                           "ci_low": 0.01, "ci_high": 0.02, "wilcoxon_p": 0.01}])
    big = small.assign(diff=0.05, ci_low=0.04, ci_high=0.06)
    md = paired_markdown([("q1", "a", "b", small), ("q2", "a", "b", big)], seed_spread(sums))
    assert "noise (smaller than the seed spread)" in md.splitlines()[2] and "a higher" in md.splitlines()[3]


def test_figures_draw_every_row(tmp_path):
    m = pd.DataFrame({"epoch": [0, 0, 1], "step": [0, 60, 120], "val/dice": [0.9, 0.92, 0.93]})
    fig = validation_curves({"dec": m})
    line = fig.axes[0].lines[0]
    assert list(line.get_xdata()) == [0, 1, 2] and list(line.get_ydata()) == [0.9, 0.92, 0.93]
    rob = pd.DataFrame({"dataset": ["Kvasir"] * 2, "noise": [0.0, 0.1], "dice": [0.9, 0.8]})
    fig = robustness_all({"dec": rob}, {"auto": pd.DataFrame({"dataset": ["Kvasir"], "dice": [0.85]})})
    assert len(fig.axes[0].lines) == 2 and fig.axes[0].lines[1].get_ydata()[0] == 0.85


def _driver(monkeypatch):
    """experiments/lite_cpu.py, the study's driver (a script, not part of the package)."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "experiments" / "lite_cpu.py"
    spec = importlib.util.spec_from_file_location("lite_cpu_driver", path)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_driver_reports_rows_from_their_records_when_the_runs_are_elsewhere(tmp_path, monkeypatch, one_thread):
    """Rows finished in another session live only as records under experiments/results/: the driver skips
    them (no training, no evaluation) and the report, tables and paired comparisons still hold them."""
    from polypsam.data.demo import generate_demo_dataset
    from polypsam.evaluation import EvalSettings, evaluate_model
    from polypsam.models import build_model

    driver = _driver(monkeypatch)
    out = tmp_path / "results"
    root = generate_demo_dataset(tmp_path / "demo", n_train=2, n_test=3, size=(64, 80))
    net = build_model("tiny", pretrained=False)
    for name in ("zero_shot_box", "zero_shot_clean_box"):
        evaluate_model(net, root, out / "rows" / name, EvalSettings(noise=(0.0,)), verbose=False)
    for notes in ("specks.json", "neighbours.json"):  # the data notes are measured once; present: kept
        (out / notes).write_text("{}")
    runs = tmp_path / "runs"  # empty: no run folder of this session
    # no data: a row that ran would fail on it, loudly
    args = ["--runs", str(runs), "--out", str(out), "--data", str(tmp_path / "no-data")]
    assert driver.main(["--rows", "zero_shot_box", "zero_shot_clean_box", *args]) == 0
    assert not runs.exists()
    report = (out / "README.md").read_text()
    assert f"Rows finished: 2 of {len(driver.ROWS)}." in report and "`dec_box_s43`" in report
    assert "| specks in the paper box |" in report  # the paired comparison of the two records
    table = pd.read_csv(out / "table.csv")
    assert list(table["run"]) == ["zero_shot_box", "zero_shot_clean_box"]
    assert (out / "provenance.md").is_file() and (out / "figures" / "robustness.png").is_file()
    study = driver.Study(runs, out)
    assert driver.copy_records(study, driver.ROWS[2]) is None  # dec_box_s42: neither a run nor a record


def test_rows_declare_what_they_need_and_run_after_it(monkeypatch):
    """The rows a named row needs are added and run first; every row that selects pins its own grid."""
    driver = _driver(monkeypatch)
    rows = sys.modules["lite_cpu_rows"]
    names = [r.name for r in rows.ordered(["dec_auto_blind_s43", "zero_shot_box"])]
    assert names == ["zero_shot_box", "unet_conv_s42", "dec_auto_blind_s43"]
    full = [r.name for r in rows.ordered()]
    assert sorted(full) == sorted(r.name for r in driver.ROWS)
    for row in driver.ROWS:
        for job in row.needs:
            assert full.index(rows.trainers()[job].name) < full.index(row.name)
        assert not row.select or dict(row.grid)["blend"]
    assert dict(rows.ROWS[[r.name for r in rows.ROWS].index("dec_auto_unet")].grid)["blend"] == (1.0,)
    with pytest.raises(ValueError, match="pins its own grid"):
        rows.Row("x", "x", "dec_mixed_s42", select=True)


def test_the_whole_study_from_an_empty_runs_folder_in_fast_mode(small_root, tmp_path, monkeypatch, capfd):
    """The driver's fast mode runs one row of each kind end to end (zero-shot, trained, an extra
    evaluation, selection with a proposer another row trains) from nothing; a second call runs nothing."""
    driver = _driver(monkeypatch)
    runs, out = tmp_path / "runs", tmp_path / "out"
    args = ["--fast", "--runs", str(runs), "--out", str(out), "--data", str(small_root)]
    assert driver.main(args) == 0
    calls = [line for line in capfd.readouterr().out.splitlines() if line.startswith("[lite_cpu] python -m")]
    unet = next(i for i, c in enumerate(calls) if "lite_cpu_jobs=unet_conv_s42" in c)
    select = next(i for i, c in enumerate(calls) if "polypsam.select_auto" in c)
    assert unet < select  # the proposer was trained before the row that reads it
    done = {p.name for p in (out / "rows").iterdir()}
    assert done == {*sys.modules["lite_cpu_rows"].FAST_ROWS, "unet_conv_s42"}
    chosen = json.loads(next((out / "rows" / "dec_auto_blind_s42").glob("*/best.auto-dec_auto_blind_s42.json"))
                        .read_text())
    assert chosen["grid"]["axes"]["blend"] == [0.0, 0.5, 1.0] and chosen["chosen"]["blend"] in (0.0, 0.5, 1.0)
    assert chosen["split"]["file"] == str(out / "split.json")  # chosen on the study's validation split
    assert list(pd.read_csv(out / "table.csv")["run"]) == [r.name for r in driver.ROWS if r.name in done]
    assert "no box: stage-1 source and settings chosen on validation, seed 42" in (out / "README.md").read_text()
    assert driver.main(args) == 0  # everything is finished: nothing is trained, selected or evaluated again
    assert "[lite_cpu] python -m polypsam.train" not in capfd.readouterr().out

    # A proposer retrained since: the row that read it is selected and evaluated again (without the staleness
    # check, checked by removing it from run_row, this call runs nothing); the old evaluation is kept aside.
    blind = runs / "dec_mixed_s42" / "eval_auto_blind"
    _other_bytes(runs / "unet_conv_s42" / "checkpoints" / "best.ckpt")
    assert driver.main(args) == 0
    assert _modules_run(capfd) == ["polypsam.select_auto", "polypsam.evaluate"]
    assert len(list(blind.parent.glob("eval_auto_blind.stale-*"))) == 1
    assert len(list((blind.parent / "checkpoints").glob("best.auto-dec_auto_blind_s42.json.stale-*"))) == 1
    record = out / "rows" / "dec_auto_blind_s42" / "eval_auto_blind" / "meta.json"
    assert json.loads(record.read_text())["proposer_sha256"] == sha256_file(runs / "unet_conv_s42" / "checkpoints"
                                                                            / "best.ckpt")
    # Records only (the row's evaluation is no longer in the runs folder, as after a session elsewhere), and its
    # checkpoint retrained since: the records no longer count as finished (before the check: skipped).
    blind.rename(blind.with_name("moved"))
    _other_bytes(runs / "dec_mixed_s42" / "checkpoints" / "best.ckpt")
    assert driver.main(args) == 0
    assert _modules_run(capfd) == ["polypsam.select_auto", "polypsam.evaluate"]
    assert json.loads(record.read_text())["checkpoint_sha256"] == sha256_file(runs / "dec_mixed_s42" /
                                                                              "checkpoints" / "best.ckpt")


def _other_bytes(ckpt: Path) -> None:
    """A checkpoint as if retrained: one trained weight moved."""
    import torch

    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    key = next(k for k, v in state["state_dict"].items() if "decoder" in k and v.is_floating_point())
    state["state_dict"][key] += 1e-3
    torch.save(state, ckpt)


def _modules_run(capfd) -> list[str]:
    return [line.split()[3] for line in capfd.readouterr().out.splitlines() if line.startswith("[lite_cpu] python -m")]


def test_learning_rate_probes_in_fast_mode(small_root, tmp_path, monkeypatch, capfd):
    """``--probe`` runs one short training per learning rate on the study's validation split, through the same
    fast mode (the tiny SAM, a few images), and writes each best validation Dice; a second call trains nothing."""
    driver = _driver(monkeypatch)
    runs, out = tmp_path / "runs", tmp_path / "out"
    args = ["--fast", "--probe", "enc_dec", "--runs", str(runs), "--out", str(out), "--data", str(small_root)]
    assert driver.main(args) == 0
    calls = [c for c in capfd.readouterr().out.splitlines() if c.startswith("[lite_cpu] python -m polypsam.train")]
    assert len(calls) == len(driver.PROBES["enc_dec"]) and all("model=tiny" in c for c in calls)
    table = pd.read_csv(out / "probes" / "enc_dec.csv")
    assert table["lr"].tolist() == list(driver.PROBES["enc_dec"])
    assert table["best_val_dice"].between(0, 1).all()
    for run, lr in zip(table["run"], table["lr"]):
        res = json.loads((runs / run / "results.json").read_text())
        assert res["best_val_dice"] == table.set_index("lr").loc[lr, "best_val_dice"]
        cfg = OmegaConf.load(runs / run / "config_resolved.yaml")
        assert cfg.scratch.lr == lr and cfg.data.split_file == str(out / "split.json")  # the study's split
        ran = json.loads((runs / run / "provenance.json").read_text())["sessions"][0]
        assert ran["argv"][0] == str(driver.REPO / "src" / "polypsam" / "train.py")  # the driver's own checkout
        assert ran["git"]["commit"] or not (driver.REPO / ".git").exists()  # and its commit is on record
    assert driver.main(args) == 0
    assert "[lite_cpu] python -m polypsam.train" not in capfd.readouterr().out


def test_subset_means_split_each_set_by_the_named_images():
    from polypsam.reporting.study import subset_means
    from polypsam.reporting.study.report import subset_markdown

    per_image = pd.concat([_per_image([0.2, 0.4, 0.9, 0.9]), _per_image([0.8, 0.6], sets=("CVC-ClinicDB",))])
    t = subset_means(per_image, {"Kvasir": {"i0", "i1"}, "Elsewhere": {"i0"}})
    kv, cl = t.to_dict("records")
    assert (kv["n_in"], kv["n_out"]) == (2, 2) and kv["mean_in"] == pytest.approx(0.3) and kv["mean_out"] == 0.9
    assert cl["n_in"] == 0 and np.isnan(cl["mean_in"]) and cl["mean_out"] == pytest.approx(0.7)
    md = subset_markdown([("row a", t)], "stretched box", "other images")
    assert "Kvasir, stretched box (2)" in md and "ClinicDB" not in md  # a set with no named image: no column
    assert "| row a | 0.300 | 0.900 |" in md


def test_seed_mean_averages_each_image_over_the_seeds():
    from polypsam.reporting.study import seed_mean

    m = seed_mean([_per_image([0.9, 0.5, 0.7]), _per_image([0.7, 0.7]), _per_image([0.8, 0.6, 0.1])])
    assert list(m["image"]) == ["i0", "i1"]  # i2: not in every seed's evaluation
    assert m["dice"].tolist() == pytest.approx([0.8, 0.6])


def test_noise_verdict_only_where_a_seed_can_vary():
    sums = {s: pd.DataFrame({"dataset": ["Kvasir"], "dice": [d]}) for s, d in (("s1", 0.90), ("s2", 0.93))}
    small = pd.DataFrame([{"dataset": "Kvasir", "n_images": 5, "mean_a": 0.915, "mean_b": 0.90, "diff": 0.015,
                           "ci_low": 0.01, "ci_high": 0.02, "wilcoxon_p": 0.01}])
    md = paired_markdown([("zero-shot pair", "zs_a", "zs_b", small), ("trained", "dec", "zs_a", small),
                          ("one checkpoint", "dec_auto", "dec", small)],
                         seed_spread(sums), runs={"dec": "run1", "dec_auto": "run1", "zs_a": None, "zs_b": None})
    lines = md.splitlines()
    assert "zs_a higher" in lines[2] and "noise" in lines[3] and "dec_auto higher" in lines[4]
    assert "Wilcoxon" not in lines[2]
    weak = small.assign(wilcoxon_p=0.2)  # the bootstrap interval excludes 0, the rank test does not agree
    assert "zs_a higher (bootstrap only: Wilcoxon p >= 0.05)" in paired_markdown([("q", "zs_a", "zs_b", weak)], None)
    tiny = weak.assign(diff=0.001, mean_a=0.901, ci_low=0.0005, ci_high=0.002)
    assert "no practical difference (under 0.005) |" in paired_markdown([("q", "zs_a", "zs_b", tiny)], None)


def test_which_parts_to_train_sets_each_strategy_beside_decoder_only_under_the_same_box(tmp_path, monkeypatch):
    """The report's strategy section, from the study's own committed records: the LoRA subset row's records
    stand in for the encoder-trained row. Each strategy's paired difference is against decoder only under the
    same box, and its cost is read from its results.json."""
    import shutil
    from pathlib import Path

    driver = _driver(monkeypatch)
    src = Path(__file__).resolve().parents[1] / "experiments" / "results" / "lite_cpu"
    out = tmp_path / "results"
    out.mkdir()
    for notes in ("specks.json", "neighbours.json", "split.json"):
        shutil.copy(src / notes, out / notes)
    for row in ("zero_shot_box", "zero_shot_clean_box", "dec_box_s42", "dec_box_s43", "dec_box_s44"):
        shutil.copytree(src / "rows" / row, out / "rows" / row)
    shutil.copytree(src / "rows" / "lora_box_s42", out / "rows" / "enc_dec_box_s42")
    shutil.copytree(src / "probes", out / "probes")
    args = ["--report-only", "--runs", str(tmp_path / "runs"), "--out", str(out), "--data", str(tmp_path)]
    assert driver.main(args) == 0
    report = (out / "README.md").read_text()
    section = report.split("## Which parts to train")[1].split("\n## ")[0]
    literal = section.split("Under the literal tight box")[1].split("Under the clean box")[0]
    line = next(ln for ln in literal.splitlines() if ln.startswith("| encoders + decoder (Enc-Dec)"))
    cells = [c.strip() for c in line.split("|")[1:-1]]
    res = json.loads((out / "rows" / "enc_dec_box_s42" / "results.json").read_text())
    steps = res["epochs"] * -(-res["data"]["train"]["used"] // res["effective_batch_size"])
    assert cells[-2] == f"{res['fit_seconds'] / steps:.1f}"
    assert cells[-5] == f"{res['trainable_params'] / 1e6:.2f} M"
    rows = sys.modules["lite_cpu_rows"]
    per_image = {n: pd.read_csv(out / "rows" / n / "eval" / "per_image.csv") for n in (*rows.SEEDS, "enc_dec_box_s42")}
    expected = paired_comparison(per_image["enc_dec_box_s42"],
                                 sys.modules["polypsam.reporting.study"].seed_mean([per_image[n] for n in rows.SEEDS]))
    kvasir = expected[expected["dataset"] == "Kvasir"].iloc[0]
    assert cells[4].startswith(f"{kvasir['diff']:+.3f} [")  # against the seed mean under the literal box
    clean = section.split("Under the clean box")[1]
    assert "| zero-shot |" in clean  # and no encoders + decoder line: its clean-box row has not run
    assert not any(ln.startswith("| encoders + decoder") for ln in clean.splitlines())
    assert "| Enc-Dec | 0.902 / 0.863 | 0.921 / 0.877 |" in section  # the paper's Table 1, quoted
    lora = pd.read_csv(src / "probes" / "lora.csv")  # the learning rates tried, the best one marked
    best = lora.loc[lora["best_val_dice"].idxmax()]
    line = f"| lora | {best['lr']:g} | {best['best_val_dice']:.4f} | {best['fit_seconds'] / 60:.0f} | best |"
    assert f"| lora_box_full_s42 {line}" in section and section.count("| lora |") == len(lora)
    rows = set(sys.modules["lite_cpu_rows"].PROBE_ROWS.values())
    assert section.count("| best |") == len(rows)  # one choice per row, over all the probes that serve it


def test_pinned_script_runs_the_driver_of_its_commit_from_a_worktree(small_root, tmp_path):
    """experiments/pinned.sh: a worktree at the commit (made, then reused), the driver run from it (its fast
    split written); a folder that is no worktree of the commit, and a name that is no commit, each refused with
    one line."""
    repo = Path(__file__).resolve().parents[1]
    head = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode != 0 or not (repo / ".git").exists():
        pytest.skip("not a git checkout of polypsam")
    wt, runs, out = tmp_path / "wt", tmp_path / "runs", tmp_path / "out"
    cmd = ["bash", str(repo / "experiments" / "pinned.sh"), "HEAD", str(wt), str(runs), "--fast", "--report-only",
           "--out", str(out), "--data", str(small_root)]
    try:
        for _ in range(2):  # made, then reused
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
            assert proc.returncode == 0, proc.stderr[-2000:]
            assert "[pinned] " in proc.stdout and head.stdout.strip()[:10] in proc.stdout
        wt_head = subprocess.run(["git", "-C", str(wt), "rev-parse", "HEAD"], capture_output=True, text=True)
        assert wt_head.stdout == head.stdout and (out / "split.json").is_file()
        plain = tmp_path / "plain"  # a folder that is no worktree of this commit
        plain.mkdir()
        for commit, folder, words in (("HEAD", plain, f"error: {plain} is at "),
                                      ("no-such-commit", wt, "error: no-such-commit is not a commit of")):
            other = subprocess.run(["bash", str(repo / "experiments" / "pinned.sh"), commit, str(folder), str(runs)],
                                   capture_output=True, text=True, timeout=60)
            assert other.returncode == 2 and other.stderr.startswith(words), other.stderr
    finally:
        subprocess.run(["git", "-C", str(repo), "worktree", "remove", "--force", str(wt)], capture_output=True)
