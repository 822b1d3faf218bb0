"""The LightningModule of a composed config: what ``polypsam.train`` fits and the benchmarks step."""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from polypsam.config import (
    embedding_cache_from_cfg,
    frozen_encoder_from_cfg,
    network_from_cfg,
    prompt_from_cfg,
)
from polypsam.errors import ConfigError
from polypsam.models.freeze import freeze_strategy
from polypsam.models.frozen import trainable_batchnorms
from polypsam.models.sam import PromptableSAM
from polypsam.training.module import PolypSAMModule


def build_module(cfg: DictConfig, net: PromptableSAM | None = None, run_config: dict | None = None
                 ) -> PolypSAMModule:
    """The LightningModule of a composed config: ``net`` (built by ``network_from_cfg`` when None) frozen by
    ``strategy``, its frozen encoder's runtime, the embedding cache, ``loss`` and ``optimizer``."""
    net = network_from_cfg(cfg) if net is None else net
    unused = prompt_from_cfg(cfg).unused_parameters if cfg.strategy.get("freeze_prompt_unused", True) else ()
    frozen = freeze_strategy(net, cfg.strategy.freeze, unused)
    norm_eval = cfg.strategy.get("norm_eval", False)
    if not isinstance(norm_eval, bool):
        raise ConfigError(f"strategy.norm_eval={norm_eval!r}: use true (every BatchNorm that trains keeps its "
                          "pretrained running statistics) or false (they follow the training batches).")
    norm_eval = trainable_batchnorms(net) if norm_eval else []
    encoder = frozen_encoder_from_cfg(cfg, net)  # model.runtime: OpenVINO / ONNX Runtime on a CPU
    cache = embedding_cache_from_cfg(cfg, net, encoder)
    return PolypSAMModule(net, loss=cfg.loss, frozen_modules=frozen, norm_eval_modules=norm_eval,
                          embedding_cache=cache, frozen_encoder=encoder,
                          run_config=run_config, **OmegaConf.to_container(cfg.optimizer, resolve=True))
