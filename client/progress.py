"""A one-line progress bar on stderr (only when stderr is a terminal, so logs stay clean)."""
from __future__ import annotations

import sys
import threading
import time


class Progress:
    def __init__(self, total: float, label: str, unit: str = "", scale: float = 1.0, stream=None):
        self.total, self.label, self.unit, self.scale = total, label, unit, scale
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty()
        self.t0 = self.last = time.perf_counter()
        self.done = 0.0
        self.lock = threading.Lock()

    def add(self, n: float) -> None:
        """n more done (from any thread: several uploads may share one bar)."""
        with self.lock:
            self.update(self.done + n)

    def update(self, done: float) -> None:
        self.done = done
        now = time.perf_counter()
        if not self.enabled or (now - self.last < 0.1 and done < self.total):
            return
        self.last = now
        frac = min(1.0, done / self.total) if self.total else 1.0
        bar = "#" * int(frac * 30)
        self.stream.write(f"\r{self.label} [{bar:<30}] {done / self.scale:,.0f}/"
                          f"{self.total / self.scale:,.0f}{self.unit} {now - self.t0:.1f}s")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self.update(self.total)
            self.stream.write("\n")
            self.stream.flush()
