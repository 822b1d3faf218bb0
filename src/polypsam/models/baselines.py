"""Prompt-free baselines from segmentation-models-pytorch (U-Net, U-Net++, any smp architecture).

``SmpSegmenter`` has ``PromptableSAM``'s interface (``spec``, ``encode``, ``forward``) so that the
LightningModule, the data module, evaluation and the tables treat a U-Net as they treat SAM: the encoder's
features play the image embedding, and the prompts are accepted and ignored. Input size and
normalisation come from its ``ModelSpec`` (ImageNet statistics, on the device, zero pad), as for SAM.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from polypsam.errors import ConfigError
from polypsam.models.sam import ModelSpec, encoder_fingerprint, normalize_canvas

IMAGENET_MEAN = (123.675, 116.28, 103.53)  # on the 0-255 scale, as ModelSpec keeps them
IMAGENET_STD = (58.395, 57.12, 57.375)
OPTIONS = ("encoder_name", "encoder_weights", "image_size", "arch_kwargs")  # model.<option> of every smp model


def default_spec(name: str, description: str) -> ModelSpec:
    """The registry's entry: the defaults (resnet34 encoder at 352 px); a built model carries its own spec."""
    return ModelSpec(name, 352, IMAGENET_MEAN, IMAGENET_STD, "mean_std", 11, 512, description)


class SmpSegmenter(nn.Module):
    """An smp model's encoder, decoder and head, fed and read like ``PromptableSAM``.

    ``arch`` and ``options`` are what ``smp.create_model`` was given (``smp_state_dict`` rebuilds it).
    """

    def __init__(self, model: nn.Module, spec: ModelSpec, arch: str, options: dict[str, Any]):
        super().__init__()
        self.arch, self.options = arch, dict(options)
        self.image_encoder = model.encoder
        self.decoder = model.decoder
        self.segmentation_head = model.segmentation_head
        self.spec = spec
        self.register_buffer("pixel_mean", torch.tensor(spec.pixel_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(spec.pixel_std).view(1, 3, 1, 1), persistent=False)

    def normalize(self, images: torch.Tensor, input_hw: torch.Tensor) -> torch.Tensor:
        """SAM's on-device normalisation with this model's spec: uint8 canvas -> floats with a zero pad."""
        return normalize_canvas(images, input_hw, self.spec.normalization, self.pixel_mean, self.pixel_std)

    def encode(self, images: torch.Tensor, input_hw: torch.Tensor) -> list[torch.Tensor]:
        """The encoder's feature pyramid: what the decoder needs, the baseline's "embedding"."""
        return self.image_encoder(self.normalize(images, input_hw))

    def forward(self, images: torch.Tensor | None, input_hw: torch.Tensor, boxes: torch.Tensor | None,
                prompt_image_index: torch.Tensor, embeddings: list[torch.Tensor] | None = None,
                encoder_grad: bool = True, points=None, prompt_free=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Mask logits on the input canvas (B,1,S,S) for every image, whatever its prompts; NaN IoU (K,1).

        The arguments are ``PromptableSAM.forward``'s; prompts (boxes, points, prompt_free) are ignored.
        """
        if embeddings is None:
            with torch.set_grad_enabled(encoder_grad and torch.is_grad_enabled()):
                embeddings = self.encode(images, input_hw)
        logits = self.segmentation_head(self.decoder(embeddings))
        return logits, logits.new_full((prompt_image_index.shape[0], 1), float("nan"))

    def encoder_fingerprint(self) -> str:
        """``PromptableSAM.encoder_fingerprint``: whether two networks' encoders compute the same features."""
        return encoder_fingerprint(self.image_encoder, self.spec)

    def smp_state_dict(self) -> dict:
        """The weights in segmentation-models-pytorch's own layout (``smp.create_model(...).state_dict()``)."""
        model = _create(self.spec.name, self.arch, pretrained=False, **self.options)
        for part, mine in (("encoder", self.image_encoder), ("decoder", self.decoder),
                           ("segmentation_head", self.segmentation_head)):
            getattr(model, part).load_state_dict(mine.state_dict())
        return model.state_dict()


def _weights_source(encoder_name: str, weights: str) -> str:
    """Where smp fetches an encoder's weights from (a Hugging Face Hub repository)."""
    import timm
    from segmentation_models_pytorch.encoders import encoders

    if encoder_name.startswith("tu-"):
        cfg = timm.models.get_pretrained_cfg(encoder_name[3:])
        return f"Hugging Face Hub {getattr(cfg, 'hf_hub_id', None) or encoder_name[3:]}"
    settings = encoders.get(encoder_name, {}).get("pretrained_settings", {}).get(weights, {})
    return f"Hugging Face Hub {settings.get('repo_id', f'{encoder_name}.{weights}')}"


def _create(name: str, arch: str, pretrained: bool, encoder_name: str = "resnet34",
            encoder_weights: str | None = "imagenet", image_size: int = 352, arch_kwargs: dict | None = None):
    import segmentation_models_pytorch as smp

    if arch.lower() not in smp.MODEL_ARCHITECTURES_MAPPING:
        raise ConfigError(f"model.arch={arch!r}: not a segmentation-models-pytorch architecture; choose one of "
                          f"{', '.join(smp.MODEL_ARCHITECTURES_MAPPING)}.")
    weights = encoder_weights if pretrained else None
    if encoder_name.startswith("tu-") and weights is not None:
        weights = True  # timm encoders: the pretrained tag is part of the name (tu-<model>.<tag>)
    try:
        return smp.create_model(arch, encoder_name=encoder_name, encoder_weights=weights, classes=1,
                                **dict(arch_kwargs or {}))
    except KeyError as exc:  # smp: an unknown encoder or weights name, with the list of known ones
        raise ConfigError(f"model={name}: {str(exc.args[0])[:400]} (model.encoder_name, model.encoder_weights; "
                          "any timm model as tu-<name>).") from None
    except OSError as exc:  # the Hub, a URL or the cache: offline, or the weights are not there
        raise ConfigError(f"model.encoder_weights={encoder_weights}: cannot fetch the {encoder_weights} weights of "
                          f"encoder {encoder_name} from {_weights_source(encoder_name, str(encoder_weights))} "
                          f"({type(exc).__name__}); offline, model.encoder_weights=null trains the encoder from "
                          "scratch.") from None
    except RuntimeError as exc:  # timm: an unknown model name
        raise ConfigError(f"model.encoder_name={encoder_name!r}: {exc}.") from None


def _check_statistics(encoder_name: str, weights) -> None:
    """The fetched weights must expect ImageNet statistics on [0, 1] inputs: the spec feeds those."""
    from segmentation_models_pytorch.encoders import get_preprocessing_params

    try:
        p = get_preprocessing_params(encoder_name, weights)
    except (OSError, ValueError, RuntimeError, KeyError):
        return  # no record of the weights' statistics: nothing to compare
    ours = ([m / 255 for m in IMAGENET_MEAN], [s / 255 for s in IMAGENET_STD], [0, 1])
    theirs = (p["mean"], p["std"], p["input_range"])
    if any(abs(a - b) > 1e-3 for x, y in zip(ours, theirs) for a, b in zip(x, y)):
        raise ConfigError(f"model.encoder_weights={weights}: encoder {encoder_name}'s weights expect inputs with mean "
                          f"{p['mean']}, std {p['std']} on {p['input_range']}, not ImageNet's; choose other weights "
                          "or another encoder.")


def build_smp(name: str, pretrained: bool = True, checkpoint_dir=None, arch: str | None = None,
              **options: Any) -> SmpSegmenter:
    """An smp model as ``SmpSegmenter``; ``pretrained=False`` skips the encoder weights (a checkpoint has them)."""
    if not arch:
        raise ConfigError(f"model={name} needs model.arch, the segmentation-models-pytorch architecture "
                          "(e.g. unet, fpn, deeplabv3plus).")
    size = int(options.get("image_size", 352))
    if size <= 0 or size % 32:
        raise ConfigError(f"model.image_size={size}: an smp model needs a multiple of 32 (its encoder's stride), "
                          "e.g. 256 or 352.")
    model = _create(name, arch, pretrained, **options)
    enc = options.get("encoder_name", "resnet34")
    weights = options.get("encoder_weights", "imagenet")
    if pretrained and weights:
        _check_statistics(enc, weights)
    desc = f"{arch} ({enc} encoder, {weights if weights else 'no'} encoder weights; segmentation-models-pytorch)"
    spec = ModelSpec(name, size, IMAGENET_MEAN, IMAGENET_STD, "mean_std", size // model.encoder.output_stride,
                     model.encoder.out_channels[-1], desc)
    return SmpSegmenter(model, spec, arch, options)
