import atexit
import os
import shutil
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("PATHROBUST_NO_PROGRESS", "1")

# Each test process (one per pytest-xdist worker) gets its own pathrobust cache, so tests never
# read what another run (or the user's ~/.cache/pathrobust) left behind.
if "PATHROBUST_CACHE" not in os.environ:
    _cache = tempfile.mkdtemp(prefix="pathrobust-test-cache-")
    os.environ["PATHROBUST_CACHE"] = _cache
    atexit.register(shutil.rmtree, _cache, True)
