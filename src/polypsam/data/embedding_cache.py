"""On-disk cache of image-encoder outputs for frozen-encoder training.

With the encoder frozen, an image's embedding depends only on the encoder weights, the preprocessing
and the image bytes. The cache folder is named by a digest of the first two
(``PromptableSAM.encoder_fingerprint``) and each file by a digest of the image bytes, so a change of
model, weights or preprocessing lands in another folder and can never serve a stale embedding.
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


def file_digest(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:32]


class EmbeddingCache:
    def __init__(self, root: str | Path, model_key: str, resident: bool = False):
        self.dir = Path(root).expanduser() / model_key
        self.resident = resident
        self.dir.mkdir(parents=True, exist_ok=True)
        self.hits = 0
        self.writes = 0

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
        p = self.path(image_key)
        p.parent.mkdir(parents=True, exist_ok=True)
        half = embedding.detach().to("cpu", torch.float16).contiguous().clone()
        atomic_write(p, lambda f: torch.save(half, f))
        self.writes += 1

    def __len__(self) -> int:
        return sum(1 for _ in self.dir.glob("*/*.pt"))

    def __repr__(self) -> str:
        return f"EmbeddingCache({self.dir})"
