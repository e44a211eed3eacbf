"""Decoder training throughput: cached token grids vs recomputing the frozen encoder each step.

eva trains its segmentation decoder "online": every step runs the frozen encoder on the batch
before the decoder. pathrobust embeds each tile once (``pathrobust.encoders.grid``) and
trains on the cached grids. This times one training step of eva's ``ConvDecoderWithImage``
(forward, Dice loss, backward, AdamW) on a ViT-B/14-shaped grid (16 x 16 x 768 from 224 px
tiles, 5 classes):

* cached: float16 grids from memory -> float32 -> decoder step;
* recompute: uint8 tiles -> encoder forward (no grad, as eva's frozen encoder) -> decoder step;
* cached, literal layers: the cached step with eva's layer sequence written out
  (``ConvDecoderWithImage.forward_layers``: the same function computed in eva's order), to
  show what the decoder's reordered forward gains on its own.

The encoder is H0-mini's architecture (ViT-B/14, 4 registers, SwiGLU) with random weights
(the cost does not depend on the weights). Steps alternate (recompute, cached, literal) in
``--pairs`` rounds after one warm-up step of each; the median of the per-round ratios is
printed with the ratio of the fastest steps. Target: cached >= 5x faster than recompute.

    python benchmarks/dense_decoder.py [--batch 8] [--pairs 5] [--threads N] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from pathrobust.encoders.base import build_encoder
from pathrobust.encoders.grid import token_grid
from pathrobust.probes.decoder import ConvDecoderWithImage, dice_loss, normalize_images


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=8, help="tiles per step (eva: 64; 8 keeps a CPU run short)")
    ap.add_argument("--pairs", type=int, default=5)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--model", default="h0-mini", help="a registered ViT-B/14-shaped encoder (random weights)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

    encoder = build_encoder(args.model, weights="random", device=dev)
    g = torch.Generator().manual_seed(0)
    tiles = torch.randint(0, 256, (args.batch, 3, 224, 224), generator=g, dtype=torch.uint8)
    masks = torch.randint(0, 5, (args.batch, 224, 224), generator=g)
    with torch.inference_mode():
        grids = token_grid(encoder, tiles.to(dev)).half().cpu()
    print(f"{args.model}: grid {tuple(grids.shape[1:])} per tile; batch {args.batch}; {args.device}, "
          f"{args.threads} threads")
    decoder = ConvDecoderWithImage(grids.shape[1], 5).to(dev)
    opt = torch.optim.AdamW(decoder.parameters(), lr=2e-3)
    mean, std = encoder.spec.mean, encoder.spec.std

    def step(mode: str) -> float:
        sync()
        t0 = time.perf_counter()
        x = tiles.to(dev)
        if mode == "recompute":
            with torch.no_grad():
                feats = token_grid(encoder, x)
        else:
            feats = grids.to(dev).float()
        forward = decoder.forward_layers if mode == "literal" else decoder.forward
        loss = dice_loss(forward(feats, normalize_images(x, mean, std)), masks.to(dev))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sync()
        return time.perf_counter() - t0

    modes = ("recompute", "cached", "literal")
    for mode in modes:  # warm-up: one-off allocations and kernel selection
        step(mode)
    times: dict[str, list[float]] = {mode: [] for mode in modes}
    for _ in range(args.pairs):
        for mode in modes:
            times[mode].append(step(mode))
    recompute, cached, literal = (times[m] for m in modes)
    ratios = [r / c for r, c in zip(recompute, cached)]
    for label, values in (("recompute encoder", recompute), ("cached grids", cached),
                          ("cached, literal layers", literal)):
        med = statistics.median(values)
        print(f"{label + ':':24s}{med:.3f} s/step ({args.batch / med:.2f} tiles/s)")
    print(f"decoder reordering alone: {statistics.median([lt / c for lt, c in zip(literal, cached)]):.2f}x "
          f"(median of {args.pairs} rounds)")
    print(f"speed-up (median of {args.pairs} rounds): {statistics.median(ratios):.2f}x; fastest steps: "
          f"{min(recompute) / min(cached):.2f}x (target >= 5x)")


if __name__ == "__main__":
    main()
