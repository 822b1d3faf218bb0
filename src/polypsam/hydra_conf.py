"""Where the configs live (shipped inside the package, ``pip install .``) and the resolvers they name.

Light on purpose: every command line imports this, and checks its composed config (``polypsam.schema``),
before it imports what does the work. Lightning alone imports torchmetrics, torchvision and transformers
(about 5 s of a 2-core CPU's time), so a bad value stops in the time torch takes to import, not after them.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

from polypsam.devices import AUTO_WORKERS_CAP, processes_per_node, resolve_num_workers
from polypsam.run_dir import run_stamp

CONF_DIR = str(Path(__file__).resolve().parent / "conf")


def _auto_workers_resolver(cap=AUTO_WORKERS_CAP, *, _root_) -> int:
    """``${auto_workers:4}`` in a config: ``resolve_num_workers("auto")`` for the processes ``trainer`` asks for."""
    trainer_cfg = _root_.get("trainer") if OmegaConf.is_dict(_root_) else None
    return resolve_num_workers("auto", processes=processes_per_node(trainer_cfg), cap=int(cap))


if not OmegaConf.has_resolver("auto_workers"):  # registered on import: every entry point imports CONF_DIR from here
    OmegaConf.register_new_resolver("auto_workers", _auto_workers_resolver)
if not OmegaConf.has_resolver("run_stamp"):  # default run folders; cached: one name per composed config
    OmegaConf.register_new_resolver("run_stamp", run_stamp, use_cache=True)
