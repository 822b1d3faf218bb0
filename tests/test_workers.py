"""data.num_workers=auto: loader workers from the CPUs this process may use; an integer wins."""

import os

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf, open_dict

from polypsam.config import CONF_DIR, datamodule_from_cfg
from polypsam.devices import resolve_num_workers, usable_cpus
from polypsam.errors import ConfigError


@pytest.fixture(autouse=True)
def _no_cluster_env(monkeypatch):
    for k in ("SLURM_CPUS_PER_TASK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)


def _compose(overrides, name="train"):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name=name, overrides=overrides)
    with open_dict(cfg):
        cfg.paths.output_dir = "/tmp/polypsam-compose-test"
    return cfg


@pytest.mark.parametrize("cpus,processes,cap,expect", [
    (2, 1, 4, 1), (1, 1, 4, 0), (16, 1, 4, 4), (16, 2, 4, 4), (8, 2, 4, 3), (8, 4, 4, 1), (8, 8, 4, 0),
    (64, 1, 8, 8), (3, 2, 4, 0)])
def test_auto_is_capped_per_process_share_minus_one(cpus, processes, cap, expect):
    assert resolve_num_workers("auto", processes=processes, cpus=cpus, cap=cap) == expect


def test_integers_win_and_bad_values_are_config_errors():
    assert resolve_num_workers(7, cpus=2) == 7 and resolve_num_workers("3", cpus=2) == 3
    assert resolve_num_workers(0) == 0
    assert resolve_num_workers("auto:1", cpus=16) == 1
    for bad in (-1, "many", True):
        with pytest.raises(ConfigError, match="num_workers"):
            resolve_num_workers(bad)


def test_this_machine(monkeypatch):
    n = len(os.sched_getaffinity(0))
    assert usable_cpus() == n
    assert resolve_num_workers("auto") == max(0, min(4, n - 1))
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "1")  # a SLURM task's own share
    assert usable_cpus() == 1 and resolve_num_workers("auto") == 0


def test_shipped_default_resolves_to_an_integer_in_every_command():
    n = usable_cpus()
    cfg = _compose(["data=pranet"])
    assert OmegaConf.to_container(cfg, resolve=True)["data"]["num_workers"] == max(0, min(4, n - 1))
    ddp = _compose(["data=pranet", "trainer=ddp", "trainer.devices=2"])  # two ranks share the node's CPUs
    assert ddp.data.num_workers == max(0, min(4, n // 2 - 1))
    ev = _compose([], name="eval")  # evaluation reads data.num_workers as an integer too
    assert isinstance(ev.data.num_workers, int) and ev.data.num_workers == max(0, min(4, n - 1))
    assert _compose(["data=pranet", "data.num_workers=3"]).data.num_workers == 3
    assert _compose(["+experiment=demo"]).data.num_workers == 0  # the demo loads in the main process


def test_auto_on_the_command_line_reaches_the_data_module(tmp_path):
    cfg = _compose(["+experiment=tiny", "data=pranet", f"data.root={tmp_path}", "data.num_workers=auto",
                    f"paths.cache_dir={tmp_path}/cache"])
    dm = datamodule_from_cfg(cfg, image_size=64)
    assert dm.num_workers == max(0, min(4, usable_cpus() - 1))
    assert cfg.data.num_workers == dm.num_workers  # what evaluation after training reads
