"""``pathrobust merge``: complete a run or an extraction made by job-array shards."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from pathrobust.cli import app, err_console
from pathrobust.cli_options import Json, NoProgress


@app.command("merge")
def merge(
    run_dir: Annotated[Path, typer.Argument(help="The run directory (<out>/<suite>/<model>/<run-id>/) or extraction "
                                                 "folder (<out>/<model>/) the shards wrote.")],
    as_json: Json = False,
    no_progress: NoProgress = False,
) -> None:
    """Complete the work of `--shard i/n` launches once every shard is done: a suite run is
    evaluated and recorded (summary.json, DB rows), an extraction gets its last files
    assembled. The last shard to finish does this by itself; merge is for when it could not
    (or to check). Missing shards, or shards of different configurations, are named in one
    line (exit 2).

    Examples:
      pathrobust merge runs/plism/h0-mini/3f2a9c0d1e2b
      pathrobust merge features/h0-mini
    """
    from pathrobust.shards import merge as complete

    result = complete(run_dir, progress=not no_progress,
                      say=lambda m: err_console.print(m, highlight=False, markup=False, soft_wrap=True))
    if as_json:
        print(json.dumps(result, indent=2, default=str))
        return
    if "files" in result:
        err_console.print(f"✓ {run_dir}: {len(result['files'])} feature file(s) complete", highlight=False,
                          markup=False, soft_wrap=True)
        return
    from pathrobust.commands.suites import print_summary
    from pathrobust.shards import read_launch
    from pathrobust.suites.base import load_suite

    launch = read_launch(run_dir)
    print_summary(load_suite(launch["suite"], launch.get("protocol")), result)
