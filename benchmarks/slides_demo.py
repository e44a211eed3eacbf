"""What the slides suite adds to ``pathrobust demo``: the synthetic slides, then the suite on
the demo's kinds of models, each stage timed (wall and CPU seconds of this process), with the
numbers each model gets (balanced accuracy, AUROC, mean/min CCC and how many runs entered it).

    python benchmarks/slides_demo.py [--setting full|quick] [--threads N] [--out DIR]

Models: the demo's teacher (efficientnet-lite0-imagenet), the two colour-histogram floors and
a tiny random ViT (192 wide, 4 deep, 112 px: the demo student's architecture untrained).
CPU seconds bound what an idle machine needs: on a shared, loaded machine wall time is not
informative, CPU time still is (about; caches are shared too).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from pathrobust.registry import EncoderSpec
from pathrobust.suites.base import load_suite, run_suite


def tiny_vit() -> EncoderSpec:
    return EncoderSpec(name="tiny-vit-192x4-random", family="test", arch="vit_small_patch14_reg4_dinov2",
                       arch_kwargs={"img_size": 112, "embed_dim": 192, "depth": 4, "num_heads": 3},
                       input_size=112, poolings={"cls": 192}, num_prefix_tokens=5, pretrained=False,
                       precision="fp32")


def timed(fn):
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn()
    return result, time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--setting", choices=("full", "quick"), default="full")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--out", type=Path, default=None, help="work folder (default: a temporary one)")
    parser.add_argument("--models", default="efficientnet-lite0-imagenet,tiny-vit,rgb-histogram,hed-histogram")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    out = args.out or Path(tempfile.mkdtemp(prefix="slides-demo-"))
    suite = load_suite("slides")
    setting = suite.demo.full if args.setting == "full" else suite.demo.quick
    data, wall, cpu = timed(lambda: suite.build_synthetic(out / "data", setting.synthetic, progress=False))
    print(f"threads {torch.get_num_threads()}; data: {wall:.1f} s wall, {cpu:.1f} s CPU ({out / 'data'})")
    total_wall, total_cpu = wall, cpu
    for name in args.models.split(","):
        model = tiny_vit() if name == "tiny-vit" else name
        summary, wall, cpu = timed(lambda: run_suite("slides", model, data, out / "runs", progress=False,
                                                     **setting.options))
        total_wall, total_cpu = total_wall + wall, total_cpu + cpu
        m = summary["rows"][-1]["metrics"]

        def f(key):
            v = m.get(key)
            return "—" if v is None else f"{v:.3f}"

        print(f"{summary['model']:<30} {wall:6.1f} s wall {cpu:6.1f} s CPU | balanced acc {f('balanced_accuracy_mean')}"
              f" ± {f('balanced_accuracy_std')}, AUROC {f('auroc_mean')}, CCC mean {f('ccc_mean')} "
              f"[{f('ccc_ci_low')}, {f('ccc_ci_high')}] min {f('ccc_min')} ({m.get('ccc_runs')} runs in, "
              f"{m.get('ccc_runs_excluded')} flat), AUC drop max {f('auc_drop_max')}")
    print(f"total: {total_wall:.1f} s wall, {total_cpu:.1f} s CPU")


if __name__ == "__main__":
    main()
