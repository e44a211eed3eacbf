"""Extraction pipeline throughput ÷ bare model throughput, measured in one run.

The pipeline (PNG decode in DataLoader workers, uint8 batches, normalisation on device,
pooling, chunked atomic writes) should keep the model busy: a ratio near 1.0 means tile I/O
is hidden behind compute.

    python benchmarks/extract_throughput.py --model efficientnet-lite0-imagenet --tiles 256 --workers 2
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pathrobust.data.he import sample_he_tiles
from pathrobust.data.tiles import FolderTiles
from pathrobust.encoders.base import build_encoder
from pathrobust.extract import extract_features


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="efficientnet-lite0-imagenet")
    ap.add_argument("--weights", default=None)
    ap.add_argument("--tiles", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()

    encoder = build_encoder(args.model, weights=args.weights)
    size = encoder.input_size
    tiles = sample_he_tiles(args.tiles, size=size, seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "tiles"
        folder.mkdir()
        for i, tile in enumerate(tiles):
            Image.fromarray(tile).save(folder / f"tile_{i:05d}.png")
        source = FolderTiles(folder)
        from pathrobust.extract import resolve_device

        dev = resolve_device(args.device)
        encoder = encoder.to(dev)
        batch = torch.from_numpy(np.ascontiguousarray(tiles[: args.batch_size])).permute(0, 3, 1, 2).to(dev)
        with torch.inference_mode():
            encoder(batch)  # warm-up
            n_batches = max(1, args.tiles // args.batch_size)
            t0 = time.perf_counter()
            for _ in range(n_batches):
                encoder(batch)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            bare = n_batches * args.batch_size / (time.perf_counter() - t0)
        t0 = time.perf_counter()
        extract_features(encoder, source, Path(tmp) / "out.h5", batch_size=args.batch_size,
                         num_workers=args.workers, device=dev, progress=False)
        pipeline = len(source) / (time.perf_counter() - t0)
    print(f"model={args.model} device={dev} tiles={args.tiles} batch={args.batch_size} workers={args.workers}")
    print(f"bare model: {bare:.1f} tiles/s   pipeline: {pipeline:.1f} tiles/s")
    print(f"pipeline / bare = {pipeline / bare:.2f}")


if __name__ == "__main__":
    main()
