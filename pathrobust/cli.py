"""The ``pathrobust`` command line: a thin layer over the Python API.

Every command catches :class:`pathrobust.UserError` at the top (:func:`main`) and prints it
as one line with exit status 2; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from pathrobust import cli_options as opt
from pathrobust.errors import UserError

app = typer.Typer(
    name="pathrobust",
    help="Benchmark and distill pathology tile encoders: PLISM robustness, HEST, EVA, DINO+iBOT distillation, leaderboards.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
)
models_app = typer.Typer(help="List and inspect encoders.", no_args_is_help=True)
run_app = typer.Typer(help="Run an evaluation suite on an encoder.", no_args_is_help=True)
data_app = typer.Typer(help="Fetch the benchmark datasets from the Hugging Face hub, or build synthetic ones in the real layouts.", no_args_is_help=True)
app.add_typer(models_app, name="models")
app.add_typer(run_app, name="run")
app.add_typer(data_app, name="data")

console = Console()
err_console = Console(stderr=True)
_STATE = {"debug": False}


@app.callback()
def _root(debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks on errors.")] = False) -> None:
    _STATE["debug"] = debug


# -- models --------------------------------------------------------------------------------
def _fmt_params(n: int | None) -> str:
    if not n:
        return "0" if n == 0 else "?"
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.0f}K"


def _model_row(spec, local: str | None) -> dict:
    return {
        "name": spec.name,
        "family": spec.family,
        "params": spec.params,
        "dims": dict(spec.poolings),
        "default_pooling": spec.default_pooling,
        "input_size": spec.input_size,
        "access": "no weights" if not spec.pretrained else ("gated" if spec.gated else "open"),
        "license": spec.license,
        "hub_id": spec.hub_id,
        "weights_local": local,
    }


@models_app.command("list")
def models_list(as_json: opt.Json = False,
                family: Annotated[Optional[str], typer.Option("--family", help="Only this family.")] = None) -> None:
    """List registered encoders: size, output dim per pooling (* = default), input, access,
    licence and whether weights are on this machine.

    Examples:
      pathrobust models list
      pathrobust models list --family bioptimus --json
    """
    from pathrobust.registry import list_specs
    from pathrobust.weights import local_weights

    rows = [_model_row(s, local_weights(s) if s.pretrained else "n/a")
            for s in list_specs() if family is None or s.family == family]
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    table = Table(title="pathrobust encoders", show_lines=False, pad_edge=False)
    for col in ("name", "family", "params", "dim cls/cls+mean/mean", "input", "access", "licence", "weights"):
        table.add_column(col, overflow="fold")
    for r in rows:
        dims = " / ".join(f"{r['dims'][p]}{'*' if p == r['default_pooling'] else ''}" if p in r["dims"] else "-"
                          for p in ("cls", "cls+mean", "mean"))
        here = "n/a" if r["weights_local"] == "n/a" else ("[green]found[/]" if r["weights_local"] else "[dim]-[/]")
        table.add_row(r["name"], r["family"], _fmt_params(r["params"]), dims, str(r["input_size"]),
                      r["access"], r["license"], here)
    console.print(table)
    console.print("* = default pooling; choose another with [bold]--pooling[/] (cls, cls+mean, mean). "
                  "weights: found on this machine (--weights, $PATHROBUST_WEIGHTS_DIR, Hugging Face cache).")


@models_app.command("show")
def models_show(name: Annotated[str, typer.Argument(help="Encoder name, module:factory, file.py:factory or a distilled model directory.")],
                as_json: opt.Json = False) -> None:
    """Show one encoder's full spec (architecture, preprocessing, pooling, weights).

    Examples:
      pathrobust models show h0-mini
      pathrobust models show runs/distill/demo --json
    """
    from pathrobust.registry import resolve_spec
    from pathrobust.weights import local_weights

    spec = resolve_spec(name, trust_code=True)  # shown, not run: nothing named in its files is imported
    data = spec.to_dict()
    data["spec_hash"] = spec.hash
    data["weights_local"] = local_weights(spec) if spec.pretrained else "n/a"
    if as_json:
        print(json.dumps(data, indent=2))
        return
    table = Table(title=spec.name, show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value")
    for key, value in data.items():
        table.add_row(key, json.dumps(value) if isinstance(value, (dict, list)) else str(value))
    console.print(table)


# -- extract -------------------------------------------------------------------------------
@app.command()
def extract(
    model: opt.Model,
    data: Annotated[Path, typer.Option("--data", "-d", help="Folder of tiles (png/jpg/tif), h5 of tiles, slide file, or folder of slides/h5s.")],
    out: opt.OutDir = Path("features"),
    pooling: opt.Pooling = None,
    weights: opt.Weights = None,
    batch_size: opt.BatchSize = 64,
    workers: opt.Workers = 2,
    precision: opt.Precision = "auto",
    device: opt.Device = "auto",
    overwrite: opt.Overwrite = False,
    slides: Annotated[bool, typer.Option("--slides", help="Treat .tif/.tiff files in --data as whole-slide images.")] = False,
    target_mpp: Annotated[float, typer.Option("--target-mpp", help="Slides: tile resolution in µm/px.")] = 0.5,
    tile_size: Annotated[int, typer.Option("--tile-size", help="Slides: tile side in pixels.")] = 224,
    slide_mpp: Annotated[Optional[float], typer.Option("--slide-mpp", help="Slides: µm/px to assume when the file has none.")] = None,
    fmt: Annotated[str, typer.Option("--format", help="h5 (CLAM/TRIDENT-style, default) or plismbench (also writes <out>/<model>/<slide_id>/features.npy).")] = "h5",
    trust_code: opt.TrustCode = False,
    shard: opt.Shard = None,
    no_progress: opt.NoProgress = False,
) -> None:
    """Extract pooled tile features to h5 files (one per slide / tile folder / h5), resumable.

    Killed or interrupted? Run the same command again: finished chunks are kept and the
    result is byte-identical to an uninterrupted run. Finished files are skipped unless
    --overwrite.

    Several GPUs or nodes: launch it with torchrun; the ranks share the chunks of all files.
    Job arrays: --shard i/n (or --shard slurm) per task; the last one to finish completes the
    extraction (or `pathrobust merge OUT/MODEL`). Concurrent launches over the same outputs
    share the work too: every chunk is computed once (lock files, taken over from dead
    processes).

    Examples:
      pathrobust extract --model h0-mini --data tiles/ --out features/
      pathrobust extract --model virchow2 --pooling cls --data slides/ --slides --target-mpp 0.5
      pathrobust extract --model ./my_model.py:build --data patches.h5 --weights my.safetensors
      pathrobust extract --model h0-mini --data plism-dataset-tiles/ --format plismbench
      torchrun --nproc_per_node 8 -m pathrobust extract --model uni --data slides/ --slides
      pathrobust extract --model uni --data slides/ --slides --shard slurm   # in an sbatch --array job
    """
    from pathrobust.extract import extract_dataset

    extract_dataset(model, data, out, pooling=pooling, weights=weights, batch_size=batch_size, workers=workers,
                    precision=precision, device=device, overwrite=overwrite, slides=slides, target_mpp=target_mpp,
                    tile_size=tile_size, slide_mpp=slide_mpp, fmt=fmt, trust_code=trust_code,
                    progress=not no_progress, shard=shard,
                    say=lambda m: err_console.print(m, highlight=False, markup=False, soft_wrap=True))


# -- entry point ---------------------------------------------------------------------------


def _load_commands() -> None:
    """Import every module of :mod:`pathrobust.commands`; each registers its commands."""
    import importlib
    import pkgutil

    import pathrobust.commands as commands

    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        importlib.import_module(f"{commands.__name__}.{info.name}")
    for typer_app in (app, models_app, run_app, data_app):
        for command in typer_app.registered_commands:
            command.callback.__doc__ = reflow_help(command.callback.__doc__ or "")


def reflow_help(doc: str) -> str:
    """Join the hard-wrapped lines of a docstring's paragraphs so ``--help`` wraps them to the
    terminal; indented lines (the Examples) are kept as they are."""
    import inspect

    out: list[str] = []
    for line in inspect.cleandoc(doc).splitlines():
        prose = line.strip() and not line.startswith(" ")
        if prose and out and out[-1].strip() and not out[-1].startswith(" ") and not out[-1].endswith(":"):
            out[-1] += " " + line.strip()
        else:
            out.append(line)
    return "\n".join(out)


def _click_modules() -> list:
    """The click implementations this typer raises from: its vendored copy (typer >= 0.29)
    and/or the click package."""
    modules = []
    try:
        from typer import _click as vendored  # typer >= 0.29 ships its own click

        modules.append(vendored)
    except ImportError:
        pass
    try:
        import click

        modules.append(click)
    except ImportError:
        pass
    return modules


def _exception_classes(name: str) -> tuple[type, ...]:
    found = []
    for module in _click_modules():
        exceptions = getattr(module, "exceptions", module)
        cls = getattr(exceptions, name, None)
        if isinstance(cls, type):
            found.append(cls)
    return tuple(found)


def usage_line(exc: BaseException) -> str:
    """One line for a click/typer usage error: which option or command, and what is wrong."""
    message = exc.format_message() if hasattr(exc, "format_message") else str(exc)
    message = " ".join(message.split())
    ctx = getattr(exc, "ctx", None)
    where = ctx.command_path if ctx is not None and getattr(ctx, "command_path", None) else "pathrobust"
    return f"{where}: {message} (see `{where} --help`)"


def print_error(message: str) -> None:
    """``error: <message>`` on one stderr line; the message is printed literally (a path holding
    ``[bold]`` or ``[/]`` is not rich markup)."""
    from rich.text import Text

    err_console.print(Text.assemble(("error: ", "bold red"), " ".join(message.split())), soft_wrap=True,
                      highlight=False)


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point: runs the app; bad input (a UserError or a usage error) is
    one line on stderr and exit status 2; Ctrl-C exits 130 with a resume hint."""
    import warnings

    from pathrobust.cpu_memory import keep_freed_memory

    keep_freed_memory()  # CPU forward passes otherwise page-fault their activations every batch
    # Warnings are messages for the user, not for a developer: one line, no source location.
    warnings.formatwarning = lambda message, category, *args, **kwargs: f"warning: {message}\n"
    exit_types = _exception_classes("Exit")
    usage_types = _exception_classes("ClickException")
    abort_types = _exception_classes("Abort")
    try:
        _load_commands()
        app(args=argv, prog_name="pathrobust", standalone_mode=False)
    except UserError as exc:
        if _STATE["debug"]:
            raise
        print_error(str(exc))
        sys.exit(exc.exit_code)
    except exit_types as exc:
        sys.exit(getattr(exc, "exit_code", 0))
    except usage_types as exc:
        if _STATE["debug"]:
            raise
        print_error(usage_line(exc))
        sys.exit(2 if getattr(exc, "exit_code", 2) in (1, 2) else exc.exit_code)
    except (KeyboardInterrupt, *abort_types):
        err_console.out("interrupted: rerun the same command to resume", highlight=False)
        sys.exit(130)


if __name__ == "__main__":
    main()
