"""A worker's open sessions, bounded in number and in idle time.

A session is a step-channel connection or a gRPC Session stream: its own KV caches, which stay
in memory while it is open. At most `limit` are open at once; one idle for `timeout` seconds
(no request served) is expired: its KV caches are freed at once and its connection closed
(the step channel) or its RPC cancelled (gRPC). Upload streams are watched the same way, so a
client that stalls mid-upload does not hold the memory it reserved, but they do not count as
sessions.

    sessions = Sessions(limit=16, timeout=600, free=worker.close)
    s = sessions.open("steps", peer, on_expire=...)   # None when `limit` are open
    with s.serving() as live: ...                     # live False once expired
    sessions.close(s)
"""
from __future__ import annotations

import contextlib
import logging
import threading
import time

log = logging.getLogger("tensorlan.worker")
FIRST_REQUEST_S = 10.0   # a step-channel connection that sends nothing (no token yet) goes sooner


class Session:
    def __init__(self, kind: str, peer: str, on_expire, timeout: float):
        self.kind, self.peer, self.on_expire, self.timeout = kind, peer, on_expire, timeout
        self.state: dict = {}          # Worker.handle's: slices, upload, wire, kv_bytes, steps...
        self.lock = threading.Lock()   # held while a request is served: not idle then
        self.last = time.monotonic()
        self.expired = False
        self.authenticated = False     # its first request carried the token (see Sessions.started)

    def touch(self) -> None:
        self.last = time.monotonic()

    @contextlib.contextmanager
    def serving(self):
        """Hold the session while one request is served; yields False if it has expired."""
        with self.lock:
            yield not self.expired
            self.last = time.monotonic()


class Sessions:
    def __init__(self, limit: int, timeout: float, free):
        self.limit, self.timeout, self.free = limit, timeout, free
        self.open_: set[Session] = set()
        self.lock = threading.Lock()

    def open(self, kind: str, peer: str, on_expire, first_timeout: float | None = None) -> Session | None:
        """A new session (kind "steps" or "grpc"), or None if `limit` are open; kind "upload"
        is only watched for idleness. `first_timeout`: a shorter idle limit until its first
        request (see started)."""
        s = Session(kind, peer, on_expire, min(first_timeout or self.timeout, self.timeout))
        with self.lock:
            if kind != "upload" and self.count_locked() >= self.limit:
                return None
            self.open_.add(s)
        return s

    def started(self, s: Session) -> None:
        """Its first request arrived with the token: from now on the full idle timeout applies."""
        s.timeout, s.authenticated = self.timeout, True

    def close(self, s: Session | None) -> None:
        if s is None:
            return
        with self.lock:
            self.open_.discard(s)
        with s.lock:
            self.free(s.state)

    def count_locked(self) -> int:
        return sum(1 for s in self.open_ if s.kind != "upload")

    def count(self) -> int:
        with self.lock:
            return self.count_locked()

    def kv_bytes(self) -> int:
        """Bytes of the open sessions' KV caches."""
        with self.lock:
            return sum(s.state.get("kv_bytes", 0) for s in self.open_)

    def reap(self) -> int:
        """Expire every session idle past its timeout (not one serving a request); returns how many."""
        now = time.monotonic()
        with self.lock:
            idle = [s for s in self.open_ if now - s.last > s.timeout]
        n = 0
        for s in idle:
            if not s.lock.acquire(blocking=False):
                continue  # serving a request right now
            try:
                if s.expired or time.monotonic() - s.last <= s.timeout:
                    continue
                s.expired = True
                self.free(s.state)
            finally:
                s.lock.release()
            with self.lock:
                self.open_.discard(s)
            log.info("%s session from %s expired after %g s idle: %s", s.kind, s.peer, s.timeout,
                     "upload cancelled" if s.kind == "upload" else "KV caches freed")
            s.on_expire()
            n += 1
        return n

    def run_reaper(self, stop: threading.Event) -> None:
        """Reap until `stop` is set, checking a few times per timeout (at least once a second)."""
        period = min(1.0, self.timeout / 4, FIRST_REQUEST_S / 4)
        while not stop.wait(period):
            self.reap()
