import subprocess
import sys


def test_cli_help_lists_commands():
    out = subprocess.run([sys.executable, "-m", "pathrobust", "--help"], capture_output=True, text=True, check=True)
    for command in ("models", "extract", "run", "data"):
        assert command in out.stdout
