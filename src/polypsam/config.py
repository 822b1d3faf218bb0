"""From a composed Hydra config to the objects a run needs (shared by train, evaluate and predict)."""

from __future__ import annotations

import logging
import math
from pathlib import Path

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from polypsam.data.embedding_cache import EmbeddingCache
from polypsam.data.image_cache import ImageCache
from polypsam.errors import ConfigError
from polypsam.models import build_model
from polypsam.models.sam import PromptableSAM

log = logging.getLogger(__name__)

CONF_DIR = str(Path(__file__).resolve().parent / "conf")  # shipped inside the package (pip install .)


def derive_accumulation(effective_batch_size: int, batch_size: int, devices: int, num_nodes: int = 1
                        ) -> tuple[int, int]:
    """Gradient-accumulation steps for an effective batch, and the effective batch they give."""
    per_step = batch_size * devices * num_nodes
    if per_step <= 0:
        raise ConfigError(f"batch size per step is {per_step}: data.batch_size, trainer.devices and "
                          "trainer.num_nodes must be positive.")
    accum = max(1, math.ceil(effective_batch_size / per_step))
    return accum, accum * per_step


def model_from_cfg(mcfg: DictConfig, pretrained: bool | None = None) -> PromptableSAM:
    return build_model(mcfg.name, pretrained=mcfg.pretrained if pretrained is None else pretrained,
                       checkpoint_dir=mcfg.get("checkpoint_dir"), attention=mcfg.get("attention", "sdpa"),
                       gradient_checkpointing=mcfg.get("gradient_checkpointing", False),
                       compile=mcfg.get("compile", False))


def embedding_cache_from_cfg(cfg: DictConfig, net: PromptableSAM) -> EmbeddingCache | None:
    """The cache when it can be right: encoder fully frozen and no augmentation."""
    want = cfg.data.get("embedding_cache", {}).get("enabled", "auto")
    frozen = not any(p.requires_grad for p in net.image_encoder.parameters())
    augment = bool(cfg.data.get("augment"))
    if want == "auto":
        want = frozen and not augment
    elif want and not frozen:
        raise ConfigError("data.embedding_cache.enabled=true needs a frozen image encoder (strategy=dec); "
                          "with a trainable encoder every epoch changes the embeddings.")
    elif want and augment:
        raise ConfigError("data.augment and data.embedding_cache.enabled=true are mutually exclusive: a cached "
                          "embedding is of the unaugmented image. Set data.augment=null or disable the cache.")
    resident = bool(cfg.data.embedding_cache.get("resident", False))
    if not want:
        if resident:
            log.info("data.embedding_cache.resident ignored: the embedding cache is off for this run")
        return None
    return EmbeddingCache(cfg.data.embedding_cache.dir, net.encoder_fingerprint(), resident=resident)


def image_cache_from_cfg(cfg: DictConfig, image_size: int, resize_method: str = "pil_bilinear"
                         ) -> ImageCache | None:
    """``data.image_cache``: resized images on disk (used by the sets that are not augmented)."""
    icfg = cfg.data.get("image_cache") or {}
    enabled = icfg.get("enabled", False)
    if enabled not in (True, False):
        raise ConfigError(f"data.image_cache.enabled={enabled!r}: choose true or false.")
    if not enabled:
        return None
    if not icfg.get("dir"):
        raise ConfigError("data.image_cache.enabled=true needs data.image_cache.dir (a folder for the resized "
                          "images, e.g. ${paths.cache_dir}/images).")
    return ImageCache(icfg["dir"], image_size, resize_method)


def datamodule_from_cfg(cfg: DictConfig, image_size: int, embedding_cache: EmbeddingCache | None = None,
                        output_dir: str | None = None, resize_method: str = "pil_bilinear"):
    image_cache = image_cache_from_cfg(cfg, image_size, resize_method)
    d = OmegaConf.to_container(cfg.data, resolve=True)
    for key in ("effective_batch_size", "embedding_cache", "image_cache", "generate_demo"):
        d.pop(key, None)
    if cfg.data.get("generate_demo"):
        from polypsam.data.demo import generate_demo_dataset

        generate_demo_dataset(d["root"])
    if output_dir is not None:
        d["output_dir"] = output_dir
    return instantiate(d, image_size=image_size, embedding_cache=embedding_cache, resize_method=resize_method,
                       image_cache=image_cache, _convert_="all")
