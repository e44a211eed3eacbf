"""``pathrobust data fetch``, ``pathrobust data list`` and ``pathrobust models fetch``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from pathrobust import cli_options as opt
from pathrobust.cli import console, data_app, err_console, models_app

Revision = Annotated[Optional[str], typer.Option("--revision", help="Hub branch, tag or commit (default: the repository's main branch).")]


@data_app.command("fetch")
def data_fetch_command(
    name: Annotated[str, typer.Argument(help="Dataset: plism-tiles, plism-slides, hest-bench, pathorob-camelyon, pathorob-tcga, pathorob-tolkach-esca (`pathrobust data list`).")],
    subset: Annotated[Optional[str], typer.Option("--subset", help="Comma-separated part to fetch. plism-tiles: shard numbers/ranges (0,3-7), shard names or slides; plism-slides: slides (GMH_S60), stainings (GIV) or scanners (AT2); hest-bench: tasks (IDC,PRAD).")] = None,
    dest: Annotated[Optional[Path], typer.Option("--dest", help="Put the files in this folder (default: the Hugging Face cache, HF_HOME).")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="List the files and total size; download nothing.")] = False,
    revision: Revision = None,
    as_json: opt.Json = False,
    no_progress: opt.NoProgress = False,
) -> None:
    """Download a benchmark dataset from the Hugging Face hub (resumable), verify every file's
    sha256 and record a fetch manifest. Suites then find it by name: --data NAME.

    Interrupted (Ctrl-C, lost network, full disk)? Run the same command again: finished files
    are kept and skipped. Gated datasets need their conditions accepted on the hub page and a
    token (`hf auth login` or HF_TOKEN).

    Examples:
      pathrobust data fetch plism-tiles --dry-run
      pathrobust data fetch plism-tiles --subset 0-9
      pathrobust data fetch plism-slides --subset GMH_S60,GIV_AT2 --dest /data/plism
      pathrobust data fetch hest-bench --subset IDC,PRAD
      pathrobust run plism --model h0-mini --data plism-tiles
    """
    from pathrobust.hub import fetch_dataset, fmt_bytes, plan_dataset

    if dry_run:
        plan = plan_dataset(name, subset, dest, revision, progress=not no_progress)
        if as_json:
            print(json.dumps(plan.to_dict(), indent=2))
            return
        here = set(plan.present)
        for f in plan.files:
            console.print(f"{fmt_bytes(f.size):>10}  {f.path}{'  (here)' if f.path in here else ''}", highlight=False)
        console.print(f"{len(plan.files)} files, {fmt_bytes(plan.total_bytes)} ({fmt_bytes(plan.download_bytes)} to "
                      f"download) from {plan.dataset.repo_id}@{plan.commit[:12]} into {plan.root}; licence "
                      f"{plan.dataset.license}{', gated' if plan.dataset.gated else ''}", highlight=False)
        return
    manifest = fetch_dataset(name, subset, dest, revision, progress=not no_progress)
    if as_json:
        print(json.dumps(manifest, indent=2))
        return
    n = len(manifest["files"])
    extra = "" if manifest["complete"] else f" ({n} of the {manifest['files_in_dataset']} files of the dataset)"
    err_console.print(f"[green]✓[/] {manifest['name']}: {n} files, {fmt_bytes(manifest['total_bytes'])}{extra}, "
                      f"sha256 verified, at {manifest['path']} ({manifest['repo_id']}@{manifest['commit'][:12]}); "
                      f"use it with --data {manifest['name']}", highlight=False, soft_wrap=True)


@data_app.command("list")
def data_list_command(as_json: opt.Json = False) -> None:
    """The datasets `pathrobust data fetch` knows: repository, licence, size, gated, and for
    the fetched ones where they are, their size and hub commit.

    Examples:
      pathrobust data list
      pathrobust data list --json
    """
    from pathrobust.hub import fetched_datasets, fmt_bytes

    rows = fetched_datasets()
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    table = Table(title="datasets (pathrobust data fetch NAME)", pad_edge=False)
    for col in ("name", "repo", "licence", "gated", "fetched", "where", "size", "commit"):
        table.add_column(col, overflow="fold")
    for r in rows:
        if r["fetched"]:
            state = "[green]yes[/]" if r["complete"] else f"[yellow]part[/] ({r['files']} files)"
            size = fmt_bytes(r["bytes"])
        elif r["path"]:
            state, size = "[red]gone[/]", "-"
        else:
            state, size = "[dim]-[/]", f"[dim]{r['approx_size']}[/]"
        table.add_row(r["name"], r["repo_id"], r["license"], "yes" if r["gated"] else "no", state,
                      r["path"] or "-", size, (r["commit"] or "-")[:12])
    console.print(table)


@models_app.command("fetch")
def models_fetch_command(
    name: Annotated[str, typer.Argument(help="Registered encoder (`pathrobust models list`).")],
    dest: Annotated[Optional[Path], typer.Option("--dest", help="Put the files in DIR/<name>/ (use DIR as PATHROBUST_WEIGHTS_DIR); default: the Hugging Face cache, where pathrobust finds them.")] = None,
    revision: Revision = None,
    as_json: opt.Json = False,
    no_progress: opt.NoProgress = False,
) -> None:
    """Download the weights a registered encoder needs (only those files), check that they
    load into its architecture (every key and shape) and record their sha256.

    Examples:
      pathrobust models fetch h0-mini
      pathrobust models fetch uni --dest /data/weights   # then PATHROBUST_WEIGHTS_DIR=/data/weights
    """
    from pathrobust.hub import fetch_model, fmt_bytes

    manifest = fetch_model(name, dest, revision, progress=not no_progress)
    if as_json:
        print(json.dumps(manifest, indent=2))
        return
    err_console.print(f"[green]✓[/] {manifest['name']}: {', '.join(f['path'] for f in manifest['files'])} "
                      f"({fmt_bytes(manifest['total_bytes'])}) from {manifest['repo_id']}@{manifest['commit'][:12]} "
                      f"at {manifest['path']}; fits the architecture ({manifest['verified']['tensors']} tensors); "
                      f"sha256 {manifest['sha256']}", highlight=False, soft_wrap=True)
