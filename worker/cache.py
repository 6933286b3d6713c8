"""The worker's tensors, kept by the sha256 of their bytes: in memory while a slice set uses them,
and on disk under a cache directory, so that a client reconnecting with the same model and plan
sends hashes instead of gigabytes.

    cache = TensorCache(Path("~/.cache/tensorlan/slices").expanduser(), limit_bytes=20e9)
    cache.has(digest)               in memory or on disk?
    cache.held(digest)              the tensor as the slice sets using it hold it, or None
    cache.get(digest, nbytes)       the bytes from disk as a uint8 array, or None
    cache.put(digest, buf, tensor)  keep them (written to a temporary file, then renamed); tensor:
                                    what the worker made of them, returned (see keep)
    cache.keep(digest, tensor)      remember a tensor while something holds it (kernels hold
                                    weights repacked, not the bytes that came: see q8_0.Q8Tiles)

The directory is bounded: before a file is added, the least recently used files go until the
rest fit (a file's modification time is refreshed whenever it is used). With root=None (the
worker's --no-cache) nothing is written to disk.
"""
from __future__ import annotations

import hashlib
import logging
import os
import threading
import weakref
from pathlib import Path

import numpy as np

from client.cluster import cache_root

log = logging.getLogger("tensorlan.worker")


def default_cache_dir() -> Path:
    return cache_root() / "slices"


class TensorCache:
    def __init__(self, root: Path | None, limit_bytes: int):
        self.root, self.limit = root, int(limit_bytes)
        self.resident: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
        self.lock = threading.Lock()
        if root is not None:
            root.mkdir(parents=True, exist_ok=True)

    def _path(self, digest: bytes) -> Path:
        return self.root / digest.hex()

    def has(self, digest: bytes) -> bool:
        with self.lock:
            if digest in self.resident:
                return True
        return self.root is not None and self._path(digest).is_file()

    def held(self, digest: bytes):
        """The tensor made of these bytes, shared with the slice sets already using it."""
        with self.lock:
            return self.resident.get(digest)

    def keep(self, digest: bytes, tensor):
        with self.lock:
            self.resident[digest] = tensor
        return tensor

    def get(self, digest: bytes, nbytes: int) -> np.ndarray | None:
        """The tensor's bytes read from disk into a fresh array (numpy asks for huge pages on
        large arrays: faster matvecs than a file mapping)."""
        if self.root is None:
            return None
        path = self._path(digest)
        try:
            if path.stat().st_size != nbytes:
                return None
            buf = np.empty(nbytes, np.uint8)
            with open(path, "rb") as f:
                if f.readinto(memoryview(buf)) != nbytes:
                    return None
            if hashlib.sha256(buf).digest() != digest:  # damaged on disk (~0.5 s per GB)
                log.warning("cache: %s is damaged; deleted", path)
                path.unlink(missing_ok=True)
                return None
            os.utime(path)  # recently used: evicted last
        except OSError:
            return None
        return buf

    def put(self, digest: bytes, buf: np.ndarray, tensor=None):
        self.keep(digest, buf if tensor is None else tensor)
        if self.root is None or buf.nbytes > self.limit:
            return tensor
        path = self._path(digest)
        if path.is_file():
            os.utime(path)
            return tensor
        self._evict(self.limit - buf.nbytes)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        try:
            with open(tmp, "wb") as f:
                f.write(memoryview(buf))
            os.replace(tmp, path)
        except OSError as e:  # a full disk costs the cache, not the upload
            log.warning("cache: cannot write %s (%s)", path, e.strerror or e)
            tmp.unlink(missing_ok=True)
        return tensor

    def _evict(self, room: int) -> None:
        """Delete the least recently used files until the rest take at most `room` bytes."""
        files = []
        for p in self.root.iterdir():
            try:
                st = p.stat()
            except OSError:
                continue
            if p.name.startswith("."):  # another writer's temporary file
                continue
            files.append((st.st_mtime_ns, st.st_size, p))
        total = sum(f[1] for f in files)
        for _, size, p in sorted(files):
            if total <= room:
                break
            p.unlink(missing_ok=True)
            total -= size
            log.info("cache: evicted %s (%.1f MB)", p.name[:16], size / 1e6)

    def disk_bytes(self) -> int:
        if self.root is None:
            return 0
        return sum(p.stat().st_size for p in self.root.iterdir() if not p.name.startswith("."))
