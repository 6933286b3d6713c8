"""Continuous batching: one engine thread decodes every active request together.

    b = Batcher(model, max_queue=64)      # starts the engine thread
    req = Request(prompt_ids, max_tokens=32, emit=callback)
    b.submit(req)                         # QueueFull when max_queue requests already wait
    ...callback(("text", delta)) ... callback(("done", "stop" | "length")) or (("error", msg))

Each engine iteration: admit waiting requests into free KV slots and run each one's prompt as a
pass of its own, then one batched pass with one row per active sequence (its last token), then
sample each row with the request's own rng, deliver the text and retire the finished. A row's
arithmetic does not depend on the other rows while a pass has fewer than 32 rows
(quant.q8_0.matmul), so with at most 31 slots a request's output is the same alone or batched.
"""
from __future__ import annotations

import collections
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from client.generate import sample
from client.model import warn
from client.tokenizer import StreamDecoder

MAX_SLOTS = 31     # passes of 32+ rows take the SGEMM path, whose rounding depends on the batch
REJOIN_EVERY = 30.0


class QueueFull(Exception):
    """max_queue requests are already waiting for a slot."""


@dataclass(eq=False)
class Request:
    prompt_ids: list[int]
    max_tokens: int
    emit: Callable[[tuple], None]    # called from the engine thread with each event
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False
    cancelled: bool = False          # the client went away: the engine drops it at its next step
    completion_tokens: int = 0
    finish_reason: str | None = None

    def cancel(self) -> None:
        self.cancelled = True


class Sequence:
    """An admitted request: its KV slot, its tokens so far, its sampler and its text."""

    def __init__(self, req: Request, slot: int, tokenizer):
        self.req, self.slot = req, slot
        self.ids = list(req.prompt_ids)
        self.rng = np.random.default_rng(req.seed)
        self.decoder = StreamDecoder(tokenizer, req.prompt_ids)
        self.held = ""               # decoded text not sent yet: it may be the start of a stop string

    def sample(self, logits: np.ndarray) -> int:
        return sample(logits[-1], self.req.temperature, self.req.top_p, self.rng)


def stop_cut(text: str, stops: list[str]) -> tuple[str, str, bool]:
    """(text to send, text to hold back, stopped): up to the first stop string if one occurs,
    else all but the longest tail of text that could begin one."""
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    if hits:
        return text[:min(hits)], "", True
    hold = max((k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
    return text[:len(text) - hold], text[len(text) - hold:], False


class Batcher:
    def __init__(self, model, max_queue: int = 64, start: bool = True):
        """start=False: the caller runs the engine itself (run()), e.g. in the main thread,
        where the model was loaded: Numba's OpenMP kernels called from a second thread get a
        second thread team, and measured 20% slower (2.54 vs 2.16 s for 60 TinyLlama tokens)."""
        if not 1 <= model.slots <= MAX_SLOTS:
            raise ValueError(f"{model.slots} slots: 1..{MAX_SLOTS}")
        self.model, self.max_queue = model, max_queue
        self.eos = set(model.cfg.eos_ids)
        self.waiting: collections.deque[Request] = collections.deque()
        self.free = list(range(model.slots))
        self.active: list[Sequence] = []
        self.cv = threading.Condition()
        self.closed = False
        self.last_rejoin = 0.0
        self.thread = threading.Thread(target=self.run, name="engine", daemon=True)
        if start:
            self.thread.start()

    # ---- called from other threads ----
    def submit(self, req: Request) -> None:
        with self.cv:
            if self.closed:
                raise RuntimeError("the server is shutting down")
            if len(self.waiting) >= self.max_queue:
                raise QueueFull(f"{len(self.waiting)} requests are waiting for one of "
                                f"{self.model.slots} slots (--max-queue {self.max_queue})")
            self.waiting.append(req)
            self.cv.notify()

    def stats(self) -> dict:
        with self.cv:
            return {"active": len(self.active), "queued": len(self.waiting), "slots": self.model.slots}

    def stop(self) -> None:
        """Ask the engine to end (it fails what is still running or waiting)."""
        with self.cv:
            self.closed = True
            self.cv.notify()

    def close(self) -> None:
        self.stop()
        if self.thread.is_alive():
            self.thread.join(timeout=30)

    # ---- the engine thread ----
    def run(self) -> None:
        while True:
            if self._rejoin_due():
                self._rejoin()
            admitted = self._wait_for_work()
            if admitted is None:
                break
            for seq in admitted:
                self._prefill(seq)
            self._drop_cancelled()
            if self.active:
                self._decode_step()
        for seq in list(self.active):
            self._finish(seq, error="the server is shutting down")
        while self.waiting:
            _emit(self.waiting.popleft(), ("error", "the server is shutting down"))

    def _wait_for_work(self) -> list[Sequence] | None:
        """Sleep while there is nothing to do (waking up now and then while workers are lost, to
        try them again); then take waiting requests into the free slots. None when closed."""
        with self.cv:
            while not (self.closed or self.waiting or self.active):
                if not self.cv.wait(timeout=REJOIN_EVERY if self.model.lost else None):
                    return []
            if self.closed:
                return None
            admitted = []
            while self.waiting and self.free:
                req = self.waiting.popleft()
                if req.cancelled:
                    _emit(req, ("error", "cancelled"))
                    continue
                seq = Sequence(req, self.free.pop(0), self.model.tokenizer)
                self.active.append(seq)
                admitted.append(seq)
            return admitted

    def _rejoin_due(self) -> bool:
        """Lost workers are tried again between requests (no sequence active), every 30 s."""
        with self.cv:
            idle = not (self.active or self.waiting)
        return bool(idle and self.model.lost and time.monotonic() - self.last_rejoin >= REJOIN_EVERY)

    def _rejoin(self) -> None:
        self.last_rejoin = time.monotonic()
        try:
            back = self.model.rejoin()
            if back:
                warn(f"workers {', '.join(back)} answer again and are planned back in")
        except Exception as e:  # noqa: BLE001: the engine keeps serving with the nodes it has
            warn(f"rejoining lost workers failed: {e}")

    def _prefill(self, seq: Sequence) -> None:
        """The prompt as a pass of its own (its rows' rounding then never depends on others)."""
        try:
            logits = self.model.forward_batch([(seq.slot, seq.ids, 0)])[0]
        except Exception as e:  # noqa: BLE001: fail this request, keep serving
            self._finish(seq, error=_describe(e))
            return
        self._accept(seq, seq.sample(logits))

    def _decode_step(self) -> None:
        """One pass for every active sequence: one row each, its last token."""
        step = list(self.active)
        try:
            out = self.model.forward_batch([(s.slot, s.ids[-1:], len(s.ids) - 1) for s in step])
        except Exception as e:  # noqa: BLE001: fail this step's requests, keep serving
            for seq in step:
                self._finish(seq, error=_describe(e))
            return
        for seq, logits in zip(step, out):
            self._accept(seq, seq.sample(logits))

    def _accept(self, seq: Sequence, tok: int) -> None:
        """A sampled token: end at EOS, else append it, send its text, and end at a stop
        string, max_tokens or the context's end."""
        req = seq.req
        if tok in self.eos and not req.ignore_eos:
            return self._finish(seq, "stop")
        seq.ids.append(tok)
        req.completion_tokens += 1
        send, seq.held, stopped = stop_cut(seq.held + seq.decoder.push([tok]), req.stop)
        if send:
            _emit(req, ("text", send))
        if stopped:
            self._finish(seq, "stop", flush=False)
        elif req.completion_tokens >= req.max_tokens or len(seq.ids) > self.model.ctx:
            self._finish(seq, "length")

    def _finish(self, seq: Sequence, reason: str | None = None, error: str | None = None,
                flush: bool = True) -> None:
        """Send what is held back (unless a stop string ended it) and the end; free the slot."""
        req = seq.req
        if reason and flush:
            send, _, _ = stop_cut(seq.held + seq.decoder.flush(), req.stop)
            if send:
                _emit(req, ("text", send))
        req.finish_reason = reason
        _emit(req, ("error", error) if error else ("done", reason))
        with self.cv:
            self.active.remove(seq)
            self.free.append(seq.slot)
            self.free.sort()
        self.model.history.pop(seq.slot, None)  # nothing to replay for a free slot

    def _drop_cancelled(self) -> None:
        for seq in [s for s in self.active if s.req.cancelled]:
            self._finish(seq, error="cancelled")


def _emit(req: Request, event: tuple) -> None:
    try:
        req.emit(event)
    except Exception:  # noqa: BLE001: a listener that went away must not stop the engine
        pass


def _describe(e: Exception) -> str:
    from client.errors import UserError
    return str(e) if isinstance(e, UserError) else f"{type(e).__name__}: {e}"
