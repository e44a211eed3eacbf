"""``pathrobust run <suite>`` and ``pathrobust data synth-<suite>``, built from the suite registry.

Every registered suite (built-in or plugin) becomes one ``run`` command: the common options
are declared once here, the suite's own come from its ``Options`` dataclass
(:func:`pathrobust.suites.base.option`). Its ``[synthetic]`` protocol table becomes a
``data synth-<suite>`` command with one option per field.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import typing
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from pathrobust.cli import console, data_app, err_console, reflow_help, run_app
from pathrobust.errors import UserError
from pathrobust.suites.base import Suite, iter_options, list_suites

COMMON_HELP = {
    "model": "Encoder: registered name (`pathrobust models list`), pkg.module:factory, file.py:factory, or a "
             "`pathrobust distill` output directory.",
    "out": "Runs folder: <out>/<suite>/<model>/<run-id>/ and <out>/results.sqlite.",
    "pooling": "Pooling variant: cls, mean or cls+mean (default: the model's; see `pathrobust models show NAME`).",
    "weights": "Weights file (.safetensors, or .pth/.bin loaded with weights_only) or directory; 'random' for "
               "random init.",
    "device": "cpu, cuda, cuda:N or auto.",
    "precision": "auto (bf16/fp16 autocast on CUDA per the model, fp32 on CPU), fp32, bf16 or fp16.",
    "batch_size": "Tiles per forward pass.",
    "workers": "DataLoader worker processes (tile decoding and resizing; used for sources of 256 tiles or more).",
    "overwrite": "Recompute and replace finished outputs.",
    "protocol": "Another protocol TOML of the same shape as suites/<suite>.toml (a documented variant).",
    "trust_code": "Let the model folder's files (encoder.json, config.json) name code other than torch/timm layers.",
    "json": "Print the run's summary as JSON instead of a table.",
    "no_progress": "Hide progress bars.",
    "shard": "Job arrays without torchrun: this process embeds share I of N (0-based) of the suite's tile sources "
             "and leaves a marker; the last shard to finish (or `pathrobust merge RUN_DIR`) completes the run. "
             "'slurm' reads SLURM_ARRAY_TASK_ID/SLURM_ARRAY_TASK_COUNT. Under torchrun the ranks share the work "
             "without it.",
}


def _common_parameters(suite: Suite) -> list[inspect.Parameter]:
    def p(name: str, annotation: Any, default: Any) -> inspect.Parameter:
        return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation, default=default)

    params = [
        p("model", Annotated[Optional[str], typer.Option("--model", "-m", help=COMMON_HELP["model"])], None),
        p("data", Annotated[Optional[str], typer.Option("--data", "-d", help=suite.data_help)], None),
    ]
    if suite.features is not None:
        params.append(p("features", Annotated[Optional[Path], typer.Option(*suite.features.names,
                                                                             help=suite.features.help)], None))
    params += [
        p("out", Annotated[Path, typer.Option("--out", "-o", help=COMMON_HELP["out"])], Path("runs")),
        p("pooling", Annotated[Optional[str], typer.Option("--pooling", help=COMMON_HELP["pooling"])], None),
        p("weights", Annotated[Optional[str], typer.Option("--weights", help=COMMON_HELP["weights"])], None),
        p("device", Annotated[str, typer.Option("--device", help=COMMON_HELP["device"])], "auto"),
        p("precision", Annotated[str, typer.Option("--precision", help=COMMON_HELP["precision"])], "auto"),
        p("batch_size", Annotated[int, typer.Option("--batch-size", "-b", min=1, help=COMMON_HELP["batch_size"])], 64),
        p("workers", Annotated[int, typer.Option("--workers", "-j", min=0, help=COMMON_HELP["workers"])], 2),
        p("protocol", Annotated[Optional[Path], typer.Option("--protocol", help=COMMON_HELP["protocol"])], None),
        p("overwrite", Annotated[bool, typer.Option("--overwrite", help=COMMON_HELP["overwrite"])], False),
        p("trust_code", Annotated[bool, typer.Option("--trust-code", help=COMMON_HELP["trust_code"])], False),
        p("shard", Annotated[Optional[str], typer.Option("--shard", metavar="I/N", help=COMMON_HELP["shard"])], None),
        p("as_json", Annotated[bool, typer.Option("--json", help=COMMON_HELP["json"])], False),
        p("no_progress", Annotated[bool, typer.Option("--no-progress", help=COMMON_HELP["no_progress"])], False),
    ]
    return params


def _cli_type(hint: Any, meta: dict[str, Any]) -> Any:
    """The type typer parses for an option field (a ``parse`` function takes the raw string)."""
    if meta.get("invert") or hint is bool:
        return bool
    if meta.get("parse") is not None:
        return Optional[str]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    base = args[0] if args else hint
    return Optional[base] if base in (int, float, str, Path) else Optional[str]


def _option_parameters(suite: Suite) -> list[inspect.Parameter]:
    hints = typing.get_type_hints(suite.Options)
    params = []
    for f, meta in iter_options(suite):
        if not meta:
            continue  # a field the suite sets itself
        kwargs: dict[str, Any] = {"help": meta["help"]}
        if meta.get("min") is not None:
            kwargs["min"] = meta["min"]
        if meta.get("metavar"):
            kwargs["metavar"] = meta["metavar"]
        cli_type = _cli_type(hints[f.name], meta)
        default = False if cli_type is bool and meta.get("invert") else (f.default if cli_type is bool else None)
        option = typer.Option(meta["flag"], *meta.get("names", ()), **kwargs)
        params.append(inspect.Parameter(f"opt_{f.name}", inspect.Parameter.KEYWORD_ONLY,
                                        annotation=Annotated[cli_type, option], default=default))
    return params


def _options_from_cli(suite: Suite, values: dict[str, Any]) -> dict[str, Any]:
    """The suite's option values from what typer parsed (None = not given: the default)."""
    out = {}
    for f, meta in iter_options(suite):
        if not meta:
            continue
        value = values.pop(f"opt_{f.name}")
        if meta.get("invert"):
            out[f.name] = not value
        elif value is None:
            continue
        elif meta.get("parse") is not None:
            out[f.name] = meta["parse"](value)
        else:
            out[f.name] = value
    return out


def _help(suite: Suite) -> str:
    doc = inspect.cleandoc(suite.description or suite.summary)
    if suite.examples:
        doc += "\n\nExamples:\n" + "\n".join(f"  {e}" for e in suite.examples)
    return doc


def make_run_command(suite: Suite):
    """The ``pathrobust run <suite>`` callback, its signature built from the suite."""
    def command(**values: Any) -> None:
        from pathrobust.suites.base import run_suite

        as_json = values.pop("as_json")
        progress = not values.pop("no_progress")
        options = _options_from_cli(suite, values)
        summary = run_suite(suite.name, values.pop("model"), values.pop("data"), values.pop("out"),
                            progress=progress, say=lambda m: err_console.print(m, highlight=False, markup=False),
                            **values, **options)
        if summary is None or "missing_shards" in summary:
            return  # a rank other than 0, or a shard whose run others complete
        if as_json:
            print(json.dumps(summary, indent=2, default=str))
        else:
            print_summary(suite, summary)

    command.__signature__ = inspect.Signature(_common_parameters(suite) + _option_parameters(suite))
    command.__doc__ = _help(suite)
    command.__name__ = f"run_{suite.name}"
    return command


def print_summary(suite: Suite, summary: dict[str, Any]) -> None:
    """The run's scores as a table, as the suite's leaderboard shows them."""
    from rich.table import Table

    lb = suite.leaderboard
    rows = {r["task"]: r["metrics"] for r in summary.get("rows", [])}
    variant = f" [{summary['variant']}]" if summary.get("variant") else ""
    synthetic = " · synthetic data" if summary.get("synthetic") else ""
    table = Table(title=f"{lb.title} · {summary.get('model')}{variant}{synthetic}")
    if lb.kind == "metrics":
        metrics = rows.get("", {})
        table.add_column("metric")
        table.add_column("value", justify="right")
        for column in lb.columns:
            value = metrics.get(column.metric)
            table.add_row(column.label, "—" if value is None else f"{value:.4f}")
        if lb.ci and metrics.get(lb.ci[0]) is not None:
            table.add_row("95% CI", f"[{metrics[lb.ci[0]]:.4f}, {metrics[lb.ci[1]]:.4f}]")
    else:
        table.add_column("task")
        table.add_column(lb.task_metric.replace("_", " "), justify="right")
        for task, metrics in rows.items():
            metric, std_metric, label = lb.task_metric, lb.task_std, task
            if lb.separate_metric and metric not in metrics and lb.separate_metric in metrics:
                metric, std_metric, label = lb.separate_metric, lb.separate_std, f"{task} ({lb.separate_label})"
            value, std = metrics.get(metric), metrics.get(std_metric) if std_metric else None
            text = "—" if value is None else f"{value:.4f}" + ("" if std is None else f" ± {std:.4f}")
            name = f"[bold]{task}[/]" if task == lb.rank_task else label
            table.add_row(name, text)
    console.print(table)
    for note in summary.get("notes", []):
        err_console.print(f"note: {note}", highlight=False, markup=False, soft_wrap=True)
    err_console.print(f"[green]✓[/] {summary['run_dir']}", highlight=False, soft_wrap=True)


def make_synth_command(suite: Suite):
    """``pathrobust data synth-<suite>``: one option per field of its ``[synthetic]`` table."""
    synthetic = getattr(suite.protocol, "synthetic", None)
    if synthetic is None:
        return None
    hints = typing.get_type_hints(type(synthetic))
    params = [inspect.Parameter("out", inspect.Parameter.KEYWORD_ONLY, annotation=Annotated[
        Path, typer.Option("--out", "-o", help="Dataset folder to write.")])]
    for f in dataclasses.fields(synthetic):
        hint = hints[f.name]
        is_list = typing.get_origin(hint) in (list, tuple)
        flag = f.metadata.get("flag") or "--" + f.name.replace("_", "-")
        default = getattr(synthetic, f.name)
        help_text = f.metadata.get("help", f.name.replace("_", " ").capitalize() + ".")
        help_text += f" Default: {','.join(map(str, default)) if is_list else default}."
        if is_list:
            help_text = help_text.replace(" Default:", " Comma-separated. Default:")
        params.append(inspect.Parameter(f"syn_{f.name}", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=Annotated[
            Optional[str] if is_list else Optional[hint], typer.Option(flag, help=help_text)]))
    params.append(inspect.Parameter("no_progress", inspect.Parameter.KEYWORD_ONLY, default=False, annotation=Annotated[
        bool, typer.Option("--no-progress", help=COMMON_HELP["no_progress"])]))

    def command(**values: Any) -> None:
        from pathrobust.config import from_dict, to_dict

        out = values.pop("out")
        progress = not values.pop("no_progress")
        overrides = {}
        for f in dataclasses.fields(synthetic):
            value = values.pop(f"syn_{f.name}")
            if value is None:
                continue
            if typing.get_origin(hints[f.name]) in (list, tuple):
                value = [v.strip() for v in value.split(",") if v.strip()]
            overrides[f.name] = value
        flags = {f.name: f.metadata.get("flag") or "--" + f.name.replace("_", "-") for f in dataclasses.fields(synthetic)}
        try:  # the same checks as the TOML's [synthetic] table, named by option
            from_dict(type(synthetic), {**to_dict(synthetic), **overrides}, "synth")
        except UserError as exc:
            message = str(exc).removeprefix("synth: ")
            for name, flag in flags.items():
                message = message.replace(f"'{name}'", flag).replace(f"'{name}[", f"{flag}[")
            raise UserError(message) from None
        path = suite.build_synthetic(Path(out), overrides, progress)
        err_console.print(f"[green]✓[/] {path}  (synthetic {suite.name} data; options: "
                          f"{', '.join(flags[k] + '=' + str(v) for k, v in overrides.items()) or 'defaults'})",
                          highlight=False)

    command.__signature__ = inspect.Signature(params)
    command.__doc__ = (f"Write the synthetic {suite.name} dataset (the suite's default data) in its real on-disk "
                       f"layout, from real H&E pixels.\n\nExamples:\n  pathrobust data synth-{suite.name} --out "
                       f"synth-{suite.name}/\n  pathrobust run {suite.name} --model rgb-histogram --data "
                       f"synth-{suite.name}/")
    command.__name__ = f"synth_{suite.name}"
    return command


def register_suite_commands() -> None:
    for suite in sorted(list_suites(), key=lambda s: (s.demo.order if s.demo else 99, s.name)):
        run_app.command(suite.name, help=reflow_help(_help(suite)), short_help=suite.summary)(make_run_command(suite))
        synth = make_synth_command(suite)
        if synth is not None:
            data_app.command(f"synth-{suite.name}", short_help=f"Synthetic {suite.name} data in its real layout.")(synth)


register_suite_commands()
