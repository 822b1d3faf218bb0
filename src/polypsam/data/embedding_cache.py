"""On-disk cache of image-encoder outputs for frozen-encoder training.

With the encoder frozen, an image's embedding depends only on the encoder weights and buffers, the
preprocessing and the image bytes. The cache folder is named by a digest of the first two
(``PromptableSAM.encoder_fingerprint``) under a format version (``v2/``), and each file by a digest of the
image bytes, so a change of model, weights or preprocessing lands in another folder and can never serve
a stale embedding. A cache made for a network (``EmbeddingCache.for_model``) writes an entry only while
that encoder is wholly in eval mode and its state is still the one the folder is named after
(``EncoderWriteGuard``): version 1 folders (polypsam before this guard) hold entries that a frozen
LiteMedSAM encoder computed in train mode, with batch statistics, and are never read.
Files are written to a temporary name and renamed, so concurrent ranks or sweep jobs that fill the
same entry race harmlessly (both write identical bytes; the rename is atomic).

``resident=True`` is for GPUs, where a decoder-only step takes well under a millisecond per image and
reading 2 MiB per image from disk through loader workers becomes the bottleneck: the loader then
ships only the key of an image whose entry is on disk, and the training module keeps every embedding
in device memory after its first use (``PolypSAMModule``), 2 MiB per image (ViT-B's 1450 PraNet
training images: 2.8 GiB).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from polypsam.data.io import atomic_write
from polypsam.errors import FrozenStateChanged


def file_digest(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:32]


FORMAT = "v2"  # the folder of every entry; raise it when entries written before a change must be ignored


class EncoderWriteGuard:
    """Lets a network write cache entries only while its image encoder is what the cache folder is named after.

    Every write checks that no module of the encoder is in train mode (BatchNorm would use batch statistics,
    dropout would be active). The fingerprint (a digest of every weight and buffer) is recomputed only when
    a tensor of the encoder may have changed: PyTorch bumps a tensor's version counter on every in-place
    write (an optimiser step, BatchNorm's running statistics, ``load_state_dict``), so comparing the
    counters costs microseconds where the digest of a ViT-H costs seconds.
    """

    def __init__(self, net, model_key: str):
        self.net, self.model_key = net, model_key
        self.versions = self._versions()

    def _versions(self) -> list[int]:
        return [t._version for t in self.net.image_encoder.state_dict(keep_vars=True).values()]

    def check(self, folder: Path) -> None:
        training = [name or "image_encoder" for name, m in self.net.image_encoder.named_modules() if m.training]
        if training:
            raise FrozenStateChanged(f"{folder}: the image encoder's {training[0]!r} is in train mode; cache entries "
                                     "are written only by an encoder in eval mode (call .eval() on frozen parts).")
        versions = self._versions()
        if versions != self.versions:
            if self.net.encoder_fingerprint() != self.model_key:
                raise FrozenStateChanged(f"{folder}: the image encoder's weights or buffers changed since this cache "
                                         "folder was named after them; nothing is written there.")
            self.versions = versions


class EmbeddingCache:
    def __init__(self, folder: str | Path, resident: bool = False, guard: EncoderWriteGuard | None = None):
        self.dir = Path(folder).expanduser()
        self.resident = resident
        self.guard = guard
        self.dir.mkdir(parents=True, exist_ok=True)
        self.hits = 0
        self.writes = 0

    @classmethod
    def for_model(cls, root: str | Path, net, resident: bool = False, model_key: str | None = None
                  ) -> EmbeddingCache:
        """The cache of ``net``'s image encoder under ``root`` (``<root>/v2/<encoder fingerprint>``), guarded.
        ``model_key``: another folder name for the same encoder, a reduced-precision runtime's
        (``runtime.embedding_model_key``); exact runtimes share the fingerprint's folder."""
        key = net.encoder_fingerprint()
        return cls(Path(root).expanduser() / FORMAT / (model_key or key), resident, EncoderWriteGuard(net, key))

    def path(self, image_key: str) -> Path:
        return self.dir / image_key[:2] / f"{image_key}.pt"

    def has(self, image_key: str) -> bool:
        return self.path(image_key).exists()

    def load(self, image_key: str) -> torch.Tensor | None:
        p = self.path(image_key)
        if not p.exists():
            return None
        try:
            emb = torch.load(p, map_location="cpu", weights_only=True)
        except Exception:  # a torn file from a killed writer cannot happen (rename), but a bad disk can
            return None
        self.hits += 1
        return emb

    def save(self, image_key: str, embedding: torch.Tensor) -> None:
        if self.guard is not None:
            self.guard.check(self.dir)
        p = self.path(image_key)
        p.parent.mkdir(parents=True, exist_ok=True)
        half = embedding.detach().to("cpu", torch.float16).contiguous().clone()
        atomic_write(p, lambda f: torch.save(half, f))
        self.writes += 1

    def __len__(self) -> int:
        return sum(1 for _ in self.dir.glob("*/*.pt"))

    def __repr__(self) -> str:
        return f"EmbeddingCache({self.dir})"
