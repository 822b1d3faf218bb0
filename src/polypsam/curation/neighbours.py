"""Near-duplicates across the split: test and validation frames with a near-identical training frame.

    python -m polypsam.curation.neighbours ROOT [--split RUN/split.json] [--embeddings DIR] [--out FILE.json]
                                            [--figure FILE.png]

CVC-ClinicDB's frames come from videos, and PraNet's split puts neighbouring frames in training and test,
so ClinicDB test (and validation) Dice is optimistic. This command measures how many frames of each test
set, and of the validation part of the 80/20 split, have a near-duplicate among the frames the model was
fitted on (for a test set: all of ``TrainDataset``; for validation: the split's training part). It only
reads ROOT; the JSON names every query frame's nearest training frame with its distance.

**Perceptual hash** (the count that needs nothing but the images): ``imagehash.dhash`` with
``hash_size=16`` (256 bits, gradients of a 17x16 greyscale thumbnail), Hamming distance. A pair is a
near-duplicate at ``MAX_BITS`` = 40 bits or fewer (15.6 %). Calibrated on ``../shared/data/polyp``
(1,205 training, 60 Kvasir and 40 ClinicDB test frames) with the pairs side by side (``--figure``):
- the closest *unrelated* pairs: ClinicDB test frames against ClinicDB training frames more than 60
  frame numbers away (other videos) come no closer than 43 bits, Kvasir test frames against any training
  frame no closer than 49. 40 sits below both, so what it flags is the same scene;
- of the hashes tried (pHash, dHash, aHash, wHash at 8, 12 and 16), dHash 16 flags the most ClinicDB
  test frames below the closest unrelated pair (25 of 40; pHash 8 to 12, aHash 16 23, wHash 16 17):
  endoscopy frames share their low frequencies (vignette, black corners, pink mucosa), which pHash keeps.

**Embedding cosine** (``--embeddings DIR``, a polypsam embedding-cache folder holding every image, e.g.
``~/.cache/polypsam/embeddings/v2/<model key>`` after a cached LiteMedSAM run): cosine similarity of the
image-encoder embeddings average-pooled to 256x8x8. Near-duplicate at ``MIN_COSINE`` = 0.92 or more; the
closest unrelated pairs reach 0.910 (ClinicDB, frames more than 60 numbers apart) and 0.909 (two Kvasir
frames of different exams). It follows the same polyp across larger camera moves than the hash.

Both counts are lower bounds: the pairs just outside either threshold are still the same scene, and a
re-cropped copy is missed by both (Kvasir test ``cjyzl833ndne80838pzuq6ila`` is training frame
``cju5jx7jzf7c90871c2i9aiov`` cropped from 720x576 to 622x528: 73 bits, cosine 0.900). Measured there
(40 bits / 0.92): Kvasir test 0 / 0 of 60; ClinicDB test 20 / 36 of 40 (38 have the adjacent frame
number in training); validation (seed 42) 24 / 72 of 241, of which ClinicDB frames 23 / 71 of 97.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import imagehash
import numpy as np
from PIL import Image

from polypsam.cli import run_cli
from polypsam.data.embedding_cache import EmbeddingCache, file_digest
from polypsam.data.files import find_pairs, find_test_sets
from polypsam.data.io import read_image
from polypsam.data.splits import make_split, read_split
from polypsam.devices import usable_cpus
from polypsam.errors import DataError

HASH_SIZE = 16  # dhash of a 17x16 thumbnail: 256 bits
MAX_BITS = 40  # near-duplicate: Hamming distance <= 40 of 256 bits
MIN_COSINE = 0.92  # near-duplicate: cosine of 8x8-pooled embeddings >= 0.92
POOL = 8
_POPCOUNT = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint16)


def image_hash(path: Path) -> np.ndarray:
    """The packed 256-bit dHash (32 uint8) of an image file."""
    bits = imagehash.dhash(Image.fromarray(read_image(path)), hash_size=HASH_SIZE).hash
    return np.packbits(bits.flatten())


def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(len(a), len(b)) Hamming distances between packed hashes, in row blocks of bounded memory."""
    out = np.empty((len(a), len(b)), dtype=np.int32)
    for i in range(0, len(a), 256):
        out[i:i + 256] = _POPCOUNT[a[i:i + 256, None, :] ^ b[None, :, :]].sum(-1)
    return out


def pooled_embeddings(paths: Sequence[Path], folder: Path) -> np.ndarray:
    """Unit-norm embeddings pooled to 256x8x8 from a polypsam embedding cache; every image must be there."""
    import torch.nn.functional as F

    cache = EmbeddingCache(folder)
    rows, missing = [], []
    for p in paths:
        emb = cache.load(file_digest(p))
        if emb is None:
            missing.append(p)
            continue
        rows.append(F.adaptive_avg_pool2d(emb.float()[None], POOL).flatten().numpy())
    if missing:
        raise DataError(f"{folder}: {len(missing)} of {len(paths)} images have no embedding there (e.g. "
                        f"{missing[0]}); fill the cache with a cached training run on this data, or leave out "
                        "--embeddings.")
    x = np.stack(rows)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _groups(root: Path, split_file: str | None) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """Query frames and the training frames each group is compared with, as root-relative image paths."""
    train = [p.image.relative_to(root).as_posix()
             for p in find_pairs(root / "TrainDataset" / "images", root / "TrainDataset" / "masks")]
    split = read_split(split_file, set(train)) if split_file else make_split(train, 0.2, 42)
    queries, refs = {}, {}
    for name, folder in find_test_sets(root).items():
        queries[name] = [p.image.relative_to(root).as_posix()
                         for p in find_pairs(folder / "images", folder / "masks")]
        refs[name] = train
    queries["validation"], refs["validation"] = split["val"], split["train"]
    return queries, refs


def find_neighbours(root: str | Path, split_file: str | None = None, embeddings: str | Path | None = None,
                    max_bits: int = MAX_BITS, min_cosine: float = MIN_COSINE) -> dict:
    """The counts per group, the thresholds and every query frame's nearest training frame."""
    root = Path(root).expanduser()
    if not (root / "TrainDataset").is_dir():
        raise DataError(f"{root}: no TrainDataset folder; give a data root in PraNet's layout "
                        "(python -m polypsam.curation.prepare builds one).")
    queries, refs = _groups(root, split_file)
    names = sorted({p for group in (*queries.values(), *refs.values()) for p in group})
    index = {p: i for i, p in enumerate(names)}
    with ThreadPoolExecutor(max_workers=usable_cpus()) as pool:  # JPEG decoding releases the GIL
        hashes = np.stack(list(pool.map(lambda p: image_hash(root / p), names)))
    emb = pooled_embeddings([root / p for p in names], Path(embeddings).expanduser()) if embeddings else None
    sets, pairs = {}, []
    for group, query in queries.items():
        q, r = [index[p] for p in query], [index[p] for p in refs[group]]
        bits = hamming(hashes[q], hashes[r])
        cos = emb[q] @ emb[r].T if emb is not None else None
        for i, image in enumerate(query):
            j = int(bits[i].argmin())
            pair = {"set": group, "image": image, "hash_match": refs[group][j], "hash_bits": int(bits[i, j]),
                    "hash_near_duplicate": bool(bits[i, j] <= max_bits)}
            if cos is not None:
                k = int(cos[i].argmax())
                pair.update(embedding_match=refs[group][k], cosine=round(float(cos[i, k]), 4),
                            embedding_near_duplicate=bool(cos[i, k] >= min_cosine))
            pairs.append(pair)
        mine = pairs[-len(query):] if query else []
        sets[group] = {"images": len(query), "compared_with": len(refs[group]),
                       "hash_near_duplicates": sum(p["hash_near_duplicate"] for p in mine),
                       "embedding_near_duplicates": (sum(p["embedding_near_duplicate"] for p in mine)
                                                     if emb is not None else None)}
    method = {"hash": f"imagehash.dhash, hash_size {HASH_SIZE} ({HASH_SIZE ** 2} bits), Hamming distance",
              "max_bits": max_bits,
              "embedding": (f"cosine of image-encoder embeddings pooled to 256x{POOL}x{POOL}, cache {embeddings}"
                            if emb is not None else None),
              "min_cosine": min_cosine if emb is not None else None,
              "compared_with": "test sets: all of TrainDataset; validation: the split's training part",
              "split": str(split_file) if split_file else "generated: val_fraction 0.2, seed 42"}
    return {"root": str(root.resolve()), "method": method, "sets": sets, "pairs": pairs}


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m polypsam.curation.neighbours", description=__doc__.split("\n\n")[1])
    ap.add_argument("root", help="data root in PraNet's layout (only read)")
    ap.add_argument("--split", help="a run's split.json (default: the 80/20 split of seed 42, as training makes)")
    ap.add_argument("--embeddings", help="an embedding-cache folder holding every image (a second measure)")
    ap.add_argument("--max-bits", type=int, default=MAX_BITS, help=f"hash threshold (default {MAX_BITS})")
    ap.add_argument("--min-cosine", type=float, default=MIN_COSINE, help=f"cosine threshold ({MIN_COSINE})")
    ap.add_argument("--out", help="write the report as JSON to this file")
    ap.add_argument("--figure", help="PNG of the pairs either side of each threshold, side by side")
    return run_cli(_run, ap.parse_args(argv), return_code=True)


def _run(args: argparse.Namespace) -> int:
    report = find_neighbours(args.root, args.split, args.embeddings, args.max_bits, args.min_cosine)
    for group, s in report["sets"].items():
        emb = "" if s["embedding_near_duplicates"] is None else \
            f", {s['embedding_near_duplicates']} by embedding cosine >= {args.min_cosine}"
        print(f"{group}: {s['hash_near_duplicates']} of {s['images']} frames have a near-duplicate among "
              f"{s['compared_with']} training frames by dHash <= {args.max_bits} bits{emb}", flush=True)
    outputs = []
    if args.out:
        outputs.append((Path(args.out), lambda p: p.write_text(json.dumps(report, indent=1) + "\n")))
    if args.figure:  # the hash's pairs, and the embedding's beside it (<name>-embedding.png)
        from polypsam.curation.neighbours_figure import threshold_pairs_figure

        fig = Path(args.figure)
        outputs.append((fig, lambda p: threshold_pairs_figure(report, "hash").savefig(p)))
        if args.embeddings:
            outputs.append((fig.with_name(f"{fig.stem}-embedding{fig.suffix}"),
                            lambda p: threshold_pairs_figure(report, "embedding").savefig(p)))
    for path, write in outputs:
        path.parent.mkdir(parents=True, exist_ok=True)
        write(path)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
