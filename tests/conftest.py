import os
import sys
from pathlib import Path

# Kernel tests run 1-3 threads on any machine: Numba fixes its maximum at import.
os.environ.setdefault("NUMBA_NUM_THREADS", "3")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

SHARED = ROOT.parent / "shared"
STORIES = SHARED / "models" / "stories260K"
if not STORIES.is_dir():
    raise RuntimeError(f"{STORIES} is missing: the tests need ../shared beside the repo")
