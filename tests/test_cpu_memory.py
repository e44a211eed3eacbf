import os
import subprocess
import sys

import pytest

# Three forward passes of a small CNN whose activations (~50 MB) exceed glibc's mmap threshold;
# prints whether the tuning took and the page faults of passes 2 and 3.
_PROBE = """
import resource, torch
from pathrobust.cpu_memory import keep_freed_memory
took = keep_freed_memory()
torch.manual_seed(0)
net = torch.nn.Sequential(torch.nn.Conv2d(3, 32, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(32, 32, 3, padding=1))
x = torch.rand(8, 3, 224, 224)
with torch.inference_mode():
    net(x)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    net(x), net(x)
print(took, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _warm_pass_faults(**env) -> tuple[str, int]:
    out = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, check=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1", **env}).stdout.split()
    return out[0], int(out[1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc tuning")
def test_warm_forward_passes_reuse_freed_memory():
    took, kept = _warm_pass_faults()
    assert took == "True"
    took, system = _warm_pass_faults(PATHROBUST_SYSTEM_MALLOC="1")
    assert took == "False"
    # glibc's default maps fresh pages for every activation: 2 passes x 3 activations x 12k faults
    assert system > 30_000
    assert kept < system / 4
