import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

# Kernel tests run 1-3 threads on any machine: Numba fixes its maximum at import.
os.environ.setdefault("NUMBA_NUM_THREADS", "3")
# the client's upload manifests and the workers' slice caches of this test run, not ~/.cache
os.environ["TENSORLAN_CACHE"] = tempfile.mkdtemp(prefix="tensorlan-test-cache-")
atexit.register(shutil.rmtree, os.environ["TENSORLAN_CACHE"], True)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

SHARED = ROOT.parent / "shared"
STORIES = SHARED / "models" / "stories260K"
if not STORIES.is_dir():
    raise RuntimeError(f"{STORIES} is missing: the tests need ../shared beside the repo")
