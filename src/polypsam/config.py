"""From a composed Hydra config to the objects a run needs (shared by train, evaluate and predict)."""

from __future__ import annotations

import logging
import math
from pathlib import Path

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from polypsam.curation.specks import speck_report
from polypsam.data.demo import generate_demo_dataset
from polypsam.data.embedding_cache import EmbeddingCache
from polypsam.data.image_cache import ImageCache
from polypsam.devices import accelerator_device, processes_per_node, resolve_num_workers
from polypsam.errors import ConfigError
from polypsam.hydra_conf import CONF_DIR  # noqa: F401 (the entry points' configs, and their resolvers, registered there)
from polypsam.models import build_model, takes_prompts
from polypsam.models.sam import PromptableSAM
from polypsam.prompts import PromptType, build_prompt, prompt_config
from polypsam.runtime import FrozenEncoder, RuntimeSettings, build_frozen_encoder
from polypsam.runtime.settings import without_runtime_keys

log = logging.getLogger(__name__)


def derive_accumulation(effective_batch_size: int, batch_size: int, devices: int, num_nodes: int = 1
                        ) -> tuple[int, int]:
    """Gradient-accumulation steps for an effective batch, and the effective batch they give."""
    per_step = batch_size * devices * num_nodes
    if per_step <= 0:
        raise ConfigError(f"batch size per step is {per_step}: data.batch_size, trainer.devices and "
                          "trainer.num_nodes must be positive.")
    accum = max(1, math.ceil(effective_batch_size / per_step))
    return accum, accum * per_step


def model_from_cfg(mcfg: DictConfig, pretrained: bool | None = None, lora=None, **overrides) -> PromptableSAM:
    """The ``model`` group's settings are ``build_model``'s arguments; ``lora``: a ``strategy.lora`` block."""
    settings = OmegaConf.to_container(mcfg, resolve=True) if OmegaConf.is_config(mcfg) else dict(mcfg)
    if pretrained is not None:
        settings["pretrained"] = pretrained
    if lora is not None and OmegaConf.is_config(lora):
        lora = OmegaConf.to_container(lora, resolve=True)
    return build_model(**without_runtime_keys({**settings, **overrides}), lora=lora)


def network_from_cfg(cfg: DictConfig) -> PromptableSAM:
    """The run's network (``strategy=lora``: peft adapters on the encoder); a prompt-free baseline turns the
    run's ``prompt`` into ``none`` in ``cfg``, as it segments the whole image in training and evaluation."""
    net = model_from_cfg(cfg.model, lora=cfg.strategy.get("lora"))
    prompt = prompt_from_cfg(cfg)
    if not takes_prompts(net) and not prompt.prompt_free:
        log.warning("model=%s is a prompt-free baseline: prompt=%s does not apply, the run uses prompt=none",
                    cfg.model.name, prompt.name)
        with open_dict(cfg):
            cfg.prompt = {"type": "none"}
    return net


def frozen_encoder_from_cfg(cfg: DictConfig, net: PromptableSAM) -> FrozenEncoder | None:
    """The runtime of the frozen encoder's passes without gradients (``model.runtime``) on the trainer's device;
    None when the encoder trains (enc_dec, LoRA) or the model is a prompt-free baseline."""
    if not takes_prompts(net) or any(p.requires_grad for p in net.image_encoder.parameters()):
        return None
    device = accelerator_device(cfg.trainer.get("accelerator", "auto"))
    return build_frozen_encoder(net, RuntimeSettings.from_cfg(cfg), device)


def embedding_cache_from_cfg(cfg: DictConfig, net: PromptableSAM, encoder: FrozenEncoder | None = None
                             ) -> EmbeddingCache | None:
    """The cache when it can be right: a SAM image encoder fully frozen and no augmentation. Its folder is
    ``encoder``'s model key (torch's fingerprint for exact runtimes, its own for reduced precision)."""
    want = cfg.data.get("embedding_cache", {}).get("enabled", "auto")
    if want is True and not takes_prompts(net):
        raise ConfigError(f"data.embedding_cache.enabled=true: model={net.spec.name} is a prompt-free baseline "
                          "without SAM image embeddings to cache; set data.embedding_cache.enabled=auto.")
    frozen = not any(p.requires_grad for p in net.image_encoder.parameters())
    augment = bool(cfg.data.get("augment"))
    if want == "auto":
        want = frozen and not augment and takes_prompts(net)
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
    key = encoder.model_key() if encoder is not None else None  # reduced precision: its own folder
    return EmbeddingCache.for_model(cfg.data.embedding_cache.dir, net, resident=resident, model_key=key)


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


def prompt_from_cfg(cfg: DictConfig) -> PromptType:
    """The run's prompt type from the ``prompt`` group (box when a config has none)."""
    group = cfg.get("prompt")
    return build_prompt(OmegaConf.to_container(group, resolve=True) if group is not None else None)


def datamodule_from_cfg(cfg: DictConfig, image_size: int, embedding_cache: EmbeddingCache | None = None,
                        output_dir: str | None = None, resize_method: str = "pil_bilinear"):
    image_cache = image_cache_from_cfg(cfg, image_size, resize_method)
    d = OmegaConf.to_container(cfg.data, resolve=True)
    for key in ("effective_batch_size", "embedding_cache", "image_cache", "generate_demo"):
        d.pop(key, None)
    if cfg.data.get("generate_demo"):
        generate_demo_dataset(d["root"])
    if output_dir is not None:
        d["output_dir"] = output_dir
    if "check_cache" not in d:  # train/val images checked once: remembered beside the other caches
        cache_dir = (cfg.get("paths") or {}).get("cache_dir")
        d["check_cache"] = str(Path(cache_dir).expanduser() / "image_checks.json") if cache_dir else None
    # "auto" given on the command line (the shipped default ${auto_workers:4} is an integer by now)
    d["num_workers"] = resolve_num_workers(d.get("num_workers", 0), processes=processes_per_node(cfg.get("trainer")))
    if cfg.data.get("num_workers") != d["num_workers"]:
        cfg.data.num_workers = d["num_workers"]  # what evaluation after training reads
    return instantiate(d, image_size=image_size, embedding_cache=embedding_cache, resize_method=resize_method,
                       image_cache=image_cache, prompt=prompt_config(prompt_from_cfg(cfg)), speck_report=speck_report,
                       _convert_="all")
