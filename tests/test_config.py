"""The real Hydra config, composed with small overrides."""

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf, open_dict

from polypsam.config import CONF_DIR, derive_accumulation
from polypsam.devices import cpu_has_amx_bf16, device_count, resolve_precision
from polypsam.models import available_models

EXPERIMENTS = sorted(p.stem for p in (Path(CONF_DIR) / "experiment").glob("*.yaml"))


def _compose(overrides):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides, return_hydra_config=True)
    with open_dict(cfg):
        cfg.paths.output_dir = "/tmp/polypsam-compose-test"
        del cfg["hydra"]  # resolved by Hydra at run time; its sweep keys need a running job
    return cfg


def test_paper_experiments_exist():
    assert {"enc_dec_vitb", "dec_vitb", "enc_dec_vitl", "dec_vitl", "enc_dec_lite", "dec_lite", "demo"} <= set(EXPERIMENTS)


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_experiment_composes_and_resolves(name):
    cfg = _compose([f"+experiment={name}"])
    c = OmegaConf.to_container(cfg, resolve=True)
    assert c["model"]["name"] in available_models()
    assert c["data"]["batch_size"] == c["scratch"]["batch_size"]
    assert c["optimizer"]["lr"] == c["scratch"]["lr"]


@pytest.mark.parametrize("name,model,freeze", [
    ("enc_dec_vitb", "vit_b", []), ("dec_vitb", "vit_b", ["image_encoder", "prompt_encoder"]),
    ("enc_dec_vitl", "vit_l", []), ("dec_vitl", "vit_l", ["image_encoder", "prompt_encoder"])])
def test_paper_settings(name, model, freeze):
    cfg = _compose([f"+experiment={name}"])
    assert cfg.model.name == model and list(cfg.strategy.freeze) == freeze
    assert cfg.optimizer.lr == 4e-6 and cfg.data.effective_batch_size == 48 and cfg.loss == "dice"
    assert cfg.data.augment is None and cfg.prompt.type == "box" and cfg.prompt.mode == "tight"
    assert cfg.prompt.min_area == 0 and cfg.prompt.jitter_frac == 0  # the paper's literal tight box and cfg.data.val_fraction == 0.2
    assert list(cfg.data.train_dirs) == ["TrainDataset"]


def test_command_line_wins_over_experiment():
    cfg = _compose(["+experiment=enc_dec_vitb", "model=tiny", "scratch.lr=1e-3", "data=colondb_cvc300"])
    assert cfg.model.name == "tiny" and cfg.optimizer.lr == 1e-3
    assert list(cfg.data.train_dirs) == ["TrainDataset", "TestDataset/CVC-300"]
    assert list(cfg.data.test_sets) == ["CVC-ColonDB"]


@pytest.mark.parametrize("eff,bs,dev,nodes,expect", [
    (48, 4, 2, 1, (6, 48)), (48, 16, 1, 1, (3, 48)), (48, 8, 2, 1, (3, 48)), (48, 5, 2, 1, (5, 50)),
    (48, 64, 1, 1, (1, 64)), (48, 4, 2, 2, (3, 48))])
def test_gradient_accumulation_is_derived(eff, bs, dev, nodes, expect):
    assert derive_accumulation(eff, bs, dev, nodes) == expect


def test_device_count():
    assert device_count(2) == 2 and device_count([0, 3]) == 2 and device_count("0,1,2") == 3
    assert device_count("auto", "cpu") == 1


def test_precision_auto_picks_what_the_machine_runs_best(monkeypatch, tmp_path):
    import torch

    assert resolve_precision("16-mixed") == "16-mixed" and resolve_precision(32) == 32  # explicit values stay
    on_cpu = "bf16-mixed" if cpu_has_amx_bf16() else "32"  # this machine's CPU, for real
    assert resolve_precision("auto", "cpu") == on_cpu
    if not torch.cuda.is_available():
        assert resolve_precision("auto", "auto") == on_cpu
    # CPU generations, from their /proc/cpuinfo flags
    amx, epyc = tmp_path / "xeon_sapphire_rapids", tmp_path / "epyc_milan"
    amx.write_text("flags\t\t: fpu avx512f avx512_bf16 amx_bf16 amx_tile amx_int8\n")
    epyc.write_text("flags\t\t: fpu avx2 sha_ni\n")
    assert resolve_precision("auto", "cpu", cpuinfo=amx) == "bf16-mixed" and cpu_has_amx_bf16(amx)
    assert resolve_precision("auto", "cpu", cpuinfo=epyc) == "32" and not cpu_has_amx_bf16(epyc)
    assert resolve_precision("auto", "cpu", cpuinfo=tmp_path / "absent") == "32"
    # GPU generations (no GPU here: the two queries are stood in for)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for capability, expected in (((7, 0), "16-mixed"), ((7, 5), "16-mixed"), ((8, 0), "bf16-mixed"),
                                 ((9, 0), "bf16-mixed")):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, c=capability: c)
        assert resolve_precision("auto", "gpu") == expected, capability
    assert resolve_precision("auto", "cpu", cpuinfo=epyc) == "32"  # a CPU run on a GPU machine


STUDY_JOBS = sorted(p.stem for p in (Path(CONF_DIR) / "sweep" / "lite_cpu_jobs").glob("*.yaml"))  # new ones too


@pytest.mark.parametrize("job", STUDY_JOBS)
def test_every_study_row_pins_its_precision_and_runtime(job):
    """A row of the CPU study means one thing on every machine: no setting that resolves per machine."""
    cfg = _compose([f"+sweep/lite_cpu_jobs={job}"])
    assert str(cfg.trainer.precision) != "auto" and cfg.trainer.accelerator == "cpu"
    assert cfg.model.runtime != "auto" and cfg.model.runtime_precision == "fp32"
    twin = job.replace("_bf16", "")
    if twin != job:  # a bf16 twin is its fp32 row but for the precision
        fp32 = _compose([f"+sweep/lite_cpu_jobs={twin}"])
        assert (str(fp32.trainer.precision), cfg.trainer.precision) == ("32", "bf16-mixed")
        with open_dict(cfg):
            cfg.trainer.precision, cfg.task_name = fp32.trainer.precision, fp32.task_name
        assert cfg == fp32
