"""``pathrobust distill``: distil a registered teacher encoder into a timm ViT student."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Optional

import typer

from pathrobust import cli_options as opt
from pathrobust.cli import app, err_console


@app.command("distill")
def distill_command(
    recipe: Annotated[str, typer.Option("--recipe", "-r", help="Recipe TOML file, or a bundled recipe name (demo, h0-mini).")],
    teacher: Annotated[Optional[str], typer.Option("--teacher", "-t", help="Teacher encoder (overrides the recipe's): a registered name, module:factory or a model directory.")] = None,
    teacher_weights: Annotated[Optional[str], typer.Option("--teacher-weights", help="Teacher weights file/dir, or 'random' (overrides the recipe's).")] = None,
    data: Annotated[Optional[Path], typer.Option("--data", "-d", help="Tile folder, tile h5 (or a folder of them), slide file or folder of slides. Default: tiles from the bundled H&E slide.")] = None,
    out: opt.OutDir = Path("runs/distill"),
    resume: Annotated[bool, typer.Option("--resume", help="Continue from OUT/checkpoint.pt exactly where it stopped.")] = False,
    steps: Annotated[Optional[int], typer.Option("--steps", min=1, help="Student steps (overrides optim.steps).")] = None,
    stop_after: Annotated[Optional[int], typer.Option("--stop-after", min=1, help="Stop (with a checkpoint) after this many steps of this invocation; --resume continues.")] = None,
    device: opt.Device = "auto",
    workers: Annotated[Optional[int], typer.Option("--workers", "-j", min=0, help="DataLoader workers preparing crops (overrides data.workers).")] = None,
    threads: Annotated[Optional[int], typer.Option("--threads", min=1, help="torch CPU threads per process (default: torch's; torchrun sets 1).")] = None,
    trust_code: opt.TrustCode = False,
    no_progress: opt.NoProgress = False,
) -> None:
    """Distil a frozen teacher into a ViT student with DINO + iBOT + KoLeo (H0-mini recipe).

    Writes OUT/checkpoint.pt (atomically, every optim.checkpoint_every steps), OUT/history.json
    (loss terms per step) and, when finished, the EMA student as OUT/model.safetensors +
    OUT/encoder.json: OUT then works as --model in every suite and in `pathrobust models show`.
    Under torchrun each process takes a shard of every global batch (gloo on CPU, nccl on GPU).

    Examples:
      pathrobust distill --recipe demo --out runs/distill-demo
      pathrobust distill --recipe distill/h0-mini.toml --data /data/tcga-slides --out runs/h0-mini
      pathrobust distill --recipe demo --out runs/distill-demo --resume
      torchrun --nproc_per_node 8 -m pathrobust distill --recipe h0-mini --data tiles.h5 --out runs/h0
      pathrobust run plism --model runs/distill-demo
    """
    from pathrobust.distill import dist as D
    from pathrobust.distill.recipe import load_recipe
    from pathrobust.distill.trainer import distill

    r = load_recipe(recipe)
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    if teacher is not None:
        r.teacher.model = teacher
    if teacher_weights is not None:
        r.teacher.weights = teacher_weights
    if steps is not None:
        r.optim.steps = steps
    if workers is not None:
        r.data.workers = workers

    def log(message: str) -> None:
        if D.rank() == 0:
            err_console.print(message)

    summary = distill(r, out, data=data, device=device, resume=resume, stop_after=stop_after,
                      progress=not no_progress, log=log, trust_code=trust_code)
    if int(os.environ.get("RANK", "0")) == 0:  # the process group is gone by now
        last = summary.get("last", {})
        terms = " ".join(f"{k} {last[k]:.4f}" for k in ("loss", "dino", "ibot", "koleo", "cls", "patch") if k in last)
        if summary["finished"]:
            err_console.print(f"[green]✓[/] {out}: {summary['steps_done']} steps ({summary['it_per_s']:.2f} it/s, "
                              f"{summary['world_size']} process(es)); final {terms}")
            err_console.print(f"  student: --model {out}  (try `pathrobust models show {out}`)")
        else:
            err_console.print(f"stopped at step {summary['steps_done']}/{summary['total_steps']} ({terms}); "
                              f"continue with --resume")
        print(json.dumps({k: v for k, v in summary.items() if k != "last"} | {"last": last}))
