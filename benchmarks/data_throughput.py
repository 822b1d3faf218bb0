"""Data-loader throughput on the real polyp images: decoding every epoch vs the image and embedding caches.

    PYTHONPATH=src python -m benchmarks.data_throughput                 # CPU here: workers 0 and 2
    PYTHONPATH=src python -m benchmarks.data_throughput --workers 0,2,8 # a GPU box
    PYTHONPATH=src python -m benchmarks.data_throughput --smoke         # seconds (tests)

The loader is the training one (``PolypDataset`` + ``collate`` in a ``DataLoader``) over a seeded subset
of TrainDataset. For each input size (1024 px with SAM's PIL bilinear resize, 256 px with LiteMedSAM's
cv2 area resize) and worker count, one pass each of:

- ``decode``: no cache, every image decoded and resized (what every epoch costs without a cache);
- ``image cache cold``: the first epoch with ``data.image_cache``, decoding and writing each entry;
- ``image cache warm``: a later epoch, reading the resized ``.npy`` entries;
- ``embedding cache warm``: strategy dec's epochs after the first, reading fp16 embeddings (the cache is
  filled beforehand with random tensors of the right shape, 256x64x64: the loader does not look at values).
- ``resident``: the same with ``data.embedding_cache.resident=true``: the loader checks that the entry
  exists and ships the mask and boxes only (the module holds the embeddings in device memory).

Every mode still decodes the mask (boxes come from it). A pass includes the workers' start. The files are
in the OS page cache after the first pass (nothing here can drop it), so "cold" means cold caches of
ours, not a cold disk.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import args as args_
from benchmarks.tables import RESULTS


def _data_root(argv=None) -> Path:
    p = argparse.ArgumentParser(add_help=False)
    args_.add_data_root(p)
    root = Path(p.parse_known_args(argv)[0].data_root)
    if not (root / "TrainDataset").is_dir():
        sys.exit(f"error: {root}: no TrainDataset folder; pass --data-root (a folder in PraNet's layout).")
    return root


if __name__ == "__main__":
    _data_root()  # before the slow imports below

import numpy as np
import torch
from torch.utils.data import DataLoader

from benchmarks.machine import device_info
from benchmarks.tables import markdown_table, print_table, write_block
from polypsam.data.batch import collate
from polypsam.data.dataset import PolypDataset, Record
from polypsam.data.embedding_cache import EmbeddingCache, file_digest
from polypsam.data.files import find_pairs
from polypsam.data.image_cache import ImageCache
from polypsam.prompts.box import BoxPrompt

# "resident": data.embedding_cache.resident=true, the embedding stays on the device and the loader ships
# the mask and boxes only (what bounds a decoder-only epoch once the embeddings are in GPU memory)
MODES = ("decode", "image cache cold", "image cache warm", "embedding cache warm", "resident")


def records(root: Path, n: int) -> list[Record]:
    d = root / "TrainDataset"
    pairs = find_pairs(d / "images", d / "masks")
    pick = sorted(np.random.default_rng(0).permutation(len(pairs))[:n].tolist())
    return [Record(pairs[i].image, pairs[i].mask, pairs[i].stem, "TrainDataset", pairs[i].image.name,
                   key=file_digest(pairs[i].image)) for i in pick]


def one_pass(ds: PolypDataset, workers: int, batch: int) -> float:
    loader = DataLoader(ds, batch_size=batch, shuffle=False, num_workers=workers, collate_fn=collate)
    t0 = time.perf_counter()
    n = 0
    for b in loader:
        n += len(b)
    assert n == len(ds)
    return time.perf_counter() - t0


def _dir_mib(path: Path, pattern: str) -> tuple[int, float]:
    files = list(path.glob(pattern))
    return len(files), sum(f.stat().st_size for f in files) / 2**20


def bench(root: Path, n: int, sizes: list[tuple[int, str]], workers: list[int], batch: int, tmp: Path) -> list[dict]:
    recs = records(root, n)
    rows = []
    emb_cache = EmbeddingCache(tmp / "emb" / "bench-random")
    resident = EmbeddingCache(tmp / "emb" / "bench-random", resident=True)
    g = torch.Generator().manual_seed(0)
    for r in recs:  # filled once, outside the timing
        emb_cache.save(r.key, torch.randn(256, 64, 64, generator=g))
    _, emb_mib = _dir_mib(emb_cache.dir, "*/*.pt")
    for size, method in sizes:
        for w in workers:
            icache = ImageCache(tmp / f"img-{size}-{w}", size, method)

            def ds(size=size, method=method, **kw):
                return PolypDataset(recs, size, BoxPrompt(), train=True, resize_method=method, **kw)

            secs = {"decode": one_pass(ds(), w, batch),
                    "image cache cold": one_pass(ds(image_cache=icache), w, batch),
                    "image cache warm": one_pass(ds(image_cache=icache), w, batch),
                    "embedding cache warm": one_pass(ds(embedding_cache=emb_cache), w, batch),
                    "resident": one_pass(ds(embedding_cache=resident), w, batch)}
            count, img_mib = _dir_mib(icache.dir, "*/*.npy")
            assert count == len(recs), f"image cache holds {count} of {len(recs)} entries"
            rows.append({"size": size, "resize": method, "workers": w, "images": len(recs), "seconds": secs,
                         "images_per_s": {k: len(recs) / v for k, v in secs.items()},
                         "image_cache_mib_per_image": img_mib / len(recs),
                         "embedding_cache_mib_per_image": emb_mib / len(recs)})
            print(f"... {size} px {method}, {w} workers: "
                  + ", ".join(f"{k} {len(recs) / v:.3g} img/s" for k, v in secs.items()), flush=True)
    return rows


def table(rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    head = ["input", "workers"] + [f"{m} img/s" for m in MODES] + ["image cache x decode", "emb cache x decode",
                                                                  "MiB/entry (img, emb)"]
    out = []
    for r in rows:
        ips = r["images_per_s"]
        out.append([f"{r['size']} px {r['resize']}", str(r["workers"])] + [f"{ips[m]:.3g}" for m in MODES]
                   + [f"{ips['image cache warm'] / ips['decode']:.2f}", f"{ips['embedding cache warm'] / ips['decode']:.2f}",
                      f"{r['image_cache_mib_per_image']:.2f}, {r['embedding_cache_mib_per_image']:.2f}"])
    return head, out


def main(argv=None) -> list[dict]:
    p = args_.parser(__doc__)
    args_.add_data_root(p)
    p.add_argument("--images", type=int, default=200, help="seeded subset of TrainDataset")
    p.add_argument("--workers", default="0,2", help="comma list of DataLoader worker counts")
    p.add_argument("--sizes", default="1024:pil_bilinear,256:cv2_area", help="comma list of size:resize_method")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--tmp", default=None, help="folder for the caches (default: a temporary folder, removed)")
    p.add_argument("--smoke", action="store_true", help="8 images at 64 px, no workers: checks the script")
    p.add_argument("--results", default=None, help=f"markdown file to update (default {RESULTS}; none for --smoke)")
    p.add_argument("--json", default=None)
    p.add_argument("--block", default="data_throughput cpu", help="marker name of the block in the results file")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    root = _data_root(["--data-root", args.data_root])
    if args.smoke:
        args.images, args.workers, args.sizes = 8, "0", "64:pil_bilinear"
    workers = [int(w) for w in args.workers.split(",")]
    sizes = [(int(s.split(":")[0]), s.split(":")[1]) for s in args.sizes.split(",")]
    info = device_info(torch.device("cpu"))
    with tempfile.TemporaryDirectory(prefix="polypsam-data-bench-", dir=args.tmp) as tmp:
        rows = bench(root, args.images, sizes, workers, args.batch, Path(tmp))
    info["loadavg_end"] = os.getloadavg()[0]
    head, body = table(rows)
    print_table(f"loader images/s, {rows[0]['images']} real images, batch {args.batch}", head, body)
    load = f"load average {info['loadavg_start']:.1f} at start and {info['loadavg_end']:.1f} at end"
    print(f"host: {info['name']}, {os.cpu_count()} cores, {load}")
    if args.json:
        Path(args.json).write_text(json.dumps({"host": info, "rows": rows}, indent=1))
    target = args.results or (None if args.smoke else str(RESULTS))
    if target:
        cmd = " ".join(["python -m benchmarks.data_throughput", *sys.argv[1:]])
        text = (f"Measured {info['date']} with `{cmd}` on {info['name']} ({os.cpu_count()} cores, shared: {load}); "
                f"{rows[0]['images']} real TrainDataset images, batch {args.batch}, one pass per mode, "
                f"torch {info['torch']}.\n\n" + markdown_table(head, body))
        write_block(Path(target), args.block, text)
        print(f"wrote {target}")
    return rows


if __name__ == "__main__":
    main()
