"""bin/worker PORT: serve slices of LLaMA models to tensorlan clients.

gRPC on PORT (Hello, Upload, Ping, Session) and the step channel, plain TCP, on the data port
(PORT + 1 unless --data-port). A client uploads its shard's slices, opens a session on the step
channel, and sends one StepRequest per layer block; the worker runs it with the same SliceSet
code the client runs in-process and answers with the partial sum. A bad request gets an error
reply (a gRPC status code and a message); the worker goes on serving.

With a token, every gRPC call and every step-channel connection must carry it (worker/gate.py);
with TLS files, both channels are encrypted. `Limits` bound what clients may take: message size,
sessions (worker/sessions.py: idle ones expire), context length and memory.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import resource
import signal
import socket
import threading
import time
import uuid
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np

from client.config import LlamaConfig
from client.errors import UserError
from client.host import (available_memory, cfs_quota, cpu_quota, default_threads, human_bytes,
                         room_for_huge_pages)
from client.slices import KV_DTYPES, Shard, SliceSet, shard_nbytes, shard_shapes
from proto import tensorlan_pb2 as pb
from proto.security import ServerTLS, check_bind, is_loopback
from worker.cache import TensorCache
from worker.gate import Gate, peer_host
from worker.sessions import FIRST_REQUEST_S, Sessions
from worker.steploop import BROKEN, CLOSED, Loop
from proto import tensorlan_pb2_grpc as rpc
from proto.wire import (PROTOCOL_VERSION, WIRES, FrameReader, FrameTooLarge, WireError, decode, decode_q8,
                        encode, finite, frame, parse, request_wire, send_frame, tensor_nbytes,
                        unpack_tensor)
from quant import q8_0

log = logging.getLogger("tensorlan.worker")
OPS = {pb.ATTENTION: "attention", pb.FFN: "ffn", pb.LOGITS: "logits"}
MAX_SLOTS = 256              # KV cache slots (sequences decoded together) per session
MAX_LAYERS, MAX_HEAD_DIM = 1024, 1024   # an uploaded config beyond these is refused (no model is near)


@dataclass(frozen=True)
class Limits:
    """What a worker grants its clients (bin/worker --max-...)."""
    max_message: int = 64 << 20      # bytes of one gRPC message or step-channel frame
    max_sessions: int = 16           # step-channel connections + gRPC Session streams at once
    max_ctx: int = 32768             # KV cache positions of one session
    max_memory: int | None = None    # bytes of shards + KV caches; None: what is available
    session_timeout: float = 600.0   # seconds a session may stay idle before it expires


class Uploaded:
    """A received shard: config, shard and tensors, shared by the sessions that open it."""

    def __init__(self, cfg: LlamaConfig, shard: Shard, tensors: dict):
        self.cfg, self.shard, self.tensors = cfg, shard, tensors
        self.sessions = 0        # open sessions using it; idle uploads may be dropped
        self.nbytes = sum(t.nbytes for t in tensors.values())


class Worker(rpc.WorkerServicer):
    def __init__(self, data_port: int, threads: int, cache: TensorCache, limits: Limits = Limits(),
                 gate: Gate | None = None, tls: ServerTLS | None = None):
        self.id = uuid.uuid4().hex[:8]
        self.cache, self.limits, self.gate, self.tls = cache, limits, gate or Gate(None), tls
        # between steps the step channel polls its socket for a few ms (wakes ~120 us sooner),
        # unless a CPU quota caps this host: there polling spends the quota, and the next step
        # waits for the next CFS period (measured: 0.25-core worker 23 -> 15 tok/s); an SSL
        # socket cannot poll (no MSG_DONTWAIT)
        self.quota, self.cfs = cpu_quota(), cfs_quota()
        self.spin = 0.0 if self.quota or tls else 0.005
        self.speed = q8_0.measure_speed(self.quota)
        self.step_cpu_us = 0.0   # see note_step_cpu
        warm_up()
        self.data_port, self.threads = data_port, threads
        self.uploads: dict[str, Uploaded] = {}
        self.reserved = 0        # bytes announced by uploads in progress
        self.lock = threading.Lock()
        self.probe_lock = threading.Lock()  # one speed probe at a time
        self.sessions = Sessions(limits.max_sessions, limits.session_timeout, self.close)

    # -- gRPC ------------------------------------------------------------------------------
    def Hello(self, request, context):
        # a client about to plan: the speed now, not at this worker's start (the probe takes
        # ~100 MB for a moment: not where that would press against a memory limit)
        if request.measure_speed and self.room()[0] > 512 << 20:
            with self.probe_lock:
                q8_0.set_threads(self.threads)  # (Numba's thread count is per calling thread)
                self.speed = q8_0.measure_speed(self.quota)
        return pb.HelloReply(protocol_version=PROTOCOL_VERSION, worker_id=self.id,
                             cores=len(os.sched_getaffinity(0)), threads=self.threads,
                             memory_bytes=self.room()[0], speed_gb_s=self.speed,
                             data_port=self.data_port, cfs_quota_us=self.cfs[0] if self.cfs else 0,
                             cfs_period_us=self.cfs[1] if self.cfs else 0,
                             sessions=self.sessions.count(), session_bytes=self.sessions.kv_bytes(),
                             q8_activations=q8_0.VNNI, step_cpu_us=self.step_cpu_us)

    def Ping(self, request, context):
        return pb.PingReply(payload=request.payload)

    def Have(self, request, context):
        if any(len(d) != 32 for d in request.sha256):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "Have takes sha256 digests (32 bytes each)")
        return pb.HaveReply(have=[self.cache.has(d) for d in request.sha256])

    def Upload(self, request_iterator, context):
        """header, then per tensor: TensorInfo (+ its bytes unless cached). The header's size is
        counted against the worker's memory before any tensor arrives; every tensor must be one
        the shard needs, of its shape, within that size and match its checksum; the shard must
        be complete. A stalled upload expires like an idle session; whatever way it ends, what
        it received is freed unless it was accepted."""
        first = next(request_iterator, None)
        if first is None or first.WhichOneof("part") != "header":
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "an upload starts with a header")
        h = first.header
        huge = room_for_huge_pages(h.total_bytes)   # (asked before this upload's bytes are counted)
        self.reserve(h.total_bytes, context)
        watch = self.sessions.open("upload", peer_host(context.peer()), context.cancel)
        try:
            cfg, shard = self.upload_plan(h)
            tensors, received, cached = self.receive(request_iterator, context, h, cfg, shard, watch, huge)
            SliceSet.from_tensors(cfg, shard, tensors, 1, "f32")
        except (UserError, WireError, KeyError, ValueError, json.JSONDecodeError) as e:
            self.unreserve(h.total_bytes)
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"bad upload: {e}")
        except BaseException:  # aborted, cancelled, expired, or the client went away
            self.unreserve(h.total_bytes)
            raise
        finally:
            self.sessions.close(watch)
        digest = hashlib.sha256(h.SerializeToString())
        for name in sorted(tensors):
            digest.update(name.encode())
        sid = digest.hexdigest()[:16]
        with self.lock:
            self.reserved -= h.total_bytes
            self.uploads.pop(sid, None)
            self.uploads[sid] = Uploaded(cfg, shard, tensors)  # newest last
        self.drop_idle(keep=2)
        log.info("upload %s: heads %s units %s rows %s, %.1f MB received, %.1f MB from the cache",
                 sid, shard.heads, shard.units, shard.rows, received / 1e6, cached / 1e6)
        return pb.UploadReply(slice_set_id=sid, bytes_received=received)

    def reserve(self, nbytes: int, context) -> None:
        """Count an upload's announced size against this worker's memory before any of it
        arrives (idle shards are dropped first if that makes room: they stay in the disk cache);
        RESOURCE_EXHAUSTED, with the sizes, if it does not fit."""
        for attempt in range(2):
            with self.lock:
                room, source = self.room_locked()
                if nbytes <= room:
                    self.reserved += nbytes
                    return
            if attempt == 0:
                self.drop_idle(keep=0)
        context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                      f"the shard needs {human_bytes(nbytes)}, this worker has {human_bytes(room)} "
                      f"({source}): give it a smaller share (more workers, or a *W weight)"
                      + (", or raise its --max-memory" if self.limits.max_memory else ""))

    def unreserve(self, nbytes: int) -> None:
        with self.lock:
            self.reserved -= nbytes

    def room(self) -> tuple[int, str]:
        with self.lock:
            return self.room_locked()

    def room_locked(self) -> tuple[int, str]:
        """(bytes a new shard or KV cache may still take, why): the memory available less
        uploads in progress, and within --max-memory less what shards and sessions hold."""
        avail, source = available_memory()
        room = max(0, avail - self.reserved)
        cap = self.limits.max_memory
        if cap is not None:
            held = sum(up.nbytes for up in self.uploads.values()) + self.reserved + self.sessions.kv_bytes()
            if cap - held < room:
                room, source = max(0, cap - held), (f"--max-memory {human_bytes(cap)}, of which "
                                                    f"{human_bytes(held)} in use")
        return room, source

    @staticmethod
    def upload_plan(h) -> tuple[LlamaConfig, Shard]:
        """The config and shard an upload header names, checked: a shard within the model, a
        model within MAX_LAYERS and MAX_HEAD_DIM."""
        cfg = LlamaConfig.from_dict(json.loads(h.config_json), "uploaded config")
        if cfg.n_layers > MAX_LAYERS or cfg.head_dim > MAX_HEAD_DIM:
            raise UserError(f"{cfg.n_layers} layers of head_dim {cfg.head_dim}: a worker takes at most "
                            f"{MAX_LAYERS} layers and head_dim {MAX_HEAD_DIM}")
        shard = Shard((h.head_begin, h.head_end), (h.unit_begin, h.unit_end), (h.row_begin, h.row_end))
        for (a, b), n, what in ((shard.heads, cfg.n_heads, "heads"), (shard.units, cfg.ffn_dim, "FFN units"),
                                (shard.rows, cfg.vocab_size, "classifier rows")):
            if not a <= b <= n:
                raise UserError(f"{what} [{a}, {b}) are not within the model's {n}")
        return cfg, shard

    def receive(self, chunks, context, h, cfg: LlamaConfig, shard: Shard, watch,
                huge: bool = False) -> tuple[dict, int, int]:
        """The tensors of an upload, after its header: (name -> tensor, bytes received, bytes
        taken from the cache). A tensor's buffer is allocated when its description arrives and
        has been checked against the shard and the header's total. huge: held in huge pages
        (q8_0.runnable)."""
        tensors, expected, fmt = {}, None, None
        arena = q8_0.Arena() if huge else None
        received = cached = announced = 0
        info, buf, filled = None, None, 0
        for chunk in chunks:
            watch.touch()
            part = chunk.WhichOneof("part")
            if part == "header":
                raise WireError("a second header in one upload")
            if part == "tensor":
                if buf is not None:
                    raise WireError(f"tensor {info.name}: {filled} of {buf.nbytes} bytes before the next")
                info = chunk.tensor
                if expected is None:
                    fmt = info.dtype
                    if fmt not in ("q8_0", "f32"):
                        raise WireError(f"tensor {info.name}: dtype {fmt!r}, expected q8_0 or f32")
                    expected = shard_shapes(cfg, shard, fmt)
                nbytes = check_tensor(info, fmt, expected, tensors)
                announced += nbytes
                if announced > h.total_bytes:
                    raise WireError(f"tensors beyond the {h.total_bytes} bytes the header announced")
                if info.cached:
                    t = self.cache.held(info.sha256)
                    if t is None:
                        data = self.cache.get(info.sha256, nbytes)
                        if data is None:
                            context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                          f"tensor {info.name} ({info.sha256.hex()[:16]}) is not cached here")
                        t = self.cache.keep(info.sha256, q8_0.runnable(unpack_tensor(info, data, verify=False), arena))
                    tensors[info.name] = t
                    cached += nbytes
                    continue
                # numpy buffers, not bytearrays: without VNNI this buffer is the tensor held, and
                # numpy advises transparent huge pages for large arrays, which measured here made
                # matvecs ~10% faster (on VNNI, runnable() repacks it: q8_0.Arena)
                buf, filled = np.empty(nbytes, np.uint8), 0
            elif part == "data":
                data = memoryview(chunk.data)
                if buf is None or filled + len(data) > buf.nbytes:
                    raise WireError("more data than the tensor announced")
                buf[filled:filled + len(data)] = np.frombuffer(data, np.uint8)
                filled += len(data)
                received += len(data)
            else:
                raise WireError("an upload chunk with no header, tensor or data")
            if filled == buf.nbytes:  # held as the kernels run it, one copy for all sessions
                tensors[info.name] = self.cache.put(info.sha256, buf, q8_0.runnable(
                    unpack_tensor(info, buf), arena))  # (unpack_tensor checks the sha256)
                buf = None
        if buf is not None:
            raise WireError(f"upload ended inside tensor {info.name}")
        missing = sorted(set(expected or shard_shapes(cfg, shard)) - set(tensors))
        if missing:
            raise WireError(f"the upload lacks {len(missing)} of the shard's tensors ({', '.join(missing[:3])}...)")
        return tensors, received, cached

    def drop_idle(self, keep: int) -> None:
        """Forget all but the `keep` newest shards that no session uses, so that a worker serving
        plan after plan does not hold them all in memory (a reconnect reloads from disk)."""
        with self.lock:
            idle = [sid for sid, up in self.uploads.items() if up.sessions == 0]
            for sid in idle[:max(0, len(idle) - keep)]:
                del self.uploads[sid]
                log.info("upload %s dropped from memory (idle)", sid)

    # -- sessions: the same steps over gRPC (Session) or the TCP step channel ---------------
    def handle(self, state: dict, req) -> pb.StepReply:
        """One request of a session -> its reply; errors become an error reply, never a crash
        (an unexpected exception: INTERNAL, its traceback logged)."""
        reply = pb.StepReply(seq=req.seq)
        try:
            if req.op == pb.PING:  # echo: the client times the channel with a step's bytes
                reply.y = req.x
                return reply
            if req.op == pb.OPEN:  # (again: a new KV cache; a refused one keeps the old)
                opened = self.open(req)
                self.close(state)
                state["slices"], state["upload"], state["kv_bytes"] = opened
                state["wire"] = req.wire or "f32"
                state["x_wire"] = req.x_wire or request_wire(state["wire"])
                state["loop"] = (None if self.tls else  # (the step channel's plain socket only)
                                 Loop.of(state["slices"], state["x_wire"], state["wire"], self.limits.max_message))
                state["opened"] = state.get("steps", 0)  # (see note_step_cpu)
                state.pop("step_cpu_from", None)
            elif state.get("slices") is None:
                raise StepError(grpc.StatusCode.FAILED_PRECONDITION, "no OPEN before steps")
            else:
                t, c = time.perf_counter(), time.thread_time()
                reply.y = self.step(state["slices"], req, state["x_wire"], state["wire"])
                reply.compute_us = int((time.perf_counter() - t) * 1e6)
                state["steps"] = state.get("steps", 0) + 1
                state["compute_us"] = state.get("compute_us", 0) + reply.compute_us
                state["compute_cpu_us"] = state.get("compute_cpu_us", 0) + (time.thread_time() - c) * 1e6
                self.mark_step_cpu(state)
        except StepError as e:
            reply.error_code, reply.error = e.code.value[0], e.message
        except Exception as e:  # a worker bug: the session and the worker go on
            log.exception("step %s failed", req.op)
            reply.error_code, reply.error = grpc.StatusCode.INTERNAL.value[0], f"worker error: {e!r}"
        return reply

    def close(self, state: dict) -> None:
        """The end of a session (or a second OPEN in it, or its expiry): its KV caches are
        freed and its shard is no longer in use by it."""
        state.pop("slices", None)
        state.pop("loop", None)
        state.pop("kv_bytes", None)
        up = state.pop("upload", None)
        if up is not None:
            with self.lock:
                up.sessions -= 1

    def Session(self, request_iterator, context):
        q8_0.set_threads(self.threads)
        session = self.sessions.open("grpc", peer_host(context.peer()), context.cancel)
        if session is None:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, self.full_message())
        self.sessions.started(session)  # the gate checked its token
        try:
            for req in request_iterator:
                with session.serving() as live:
                    if not live:
                        return
                    reply = self.handle(session.state, req)
                yield reply
        finally:
            self.sessions.close(session)

    def full_message(self) -> str:
        return (f"this worker serves at most {self.limits.max_sessions} sessions at once: retry "
                "later, or raise its --max-sessions")

    def serve_steps(self, conn: socket.socket, addr) -> None:
        """One step-channel connection, in a thread of its own: the TLS handshake if any, a
        session slot, the token on the first frame, then a reply per request until the client
        closes, a frame breaks or the session expires."""
        q8_0.set_threads(self.threads)  # Numba's thread count is per calling thread
        session, t0, c0 = None, time.perf_counter(), time.thread_time()
        try:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn = self.handshake(conn)
            session = self.sessions.open("steps", addr[0], lambda: self.expire(conn), FIRST_REQUEST_S)
            if session is None:
                send_frame(conn, error_reply(0, grpc.StatusCode.RESOURCE_EXHAUSTED, self.full_message()))
                return
            self.serve_session(conn, session, addr)
        except (WireError, OSError) as e:
            log.info("session %s:%d: %s", *addr[:2], e)
        finally:
            conn.close()
            self.sessions.close(session)
        if session is not None and session.authenticated:
            state = session.state
            log.info("session %s:%d closed after %d steps, %.1f s (%.2f s of CPU; computing %.2f s); "
                     "worker peak RSS %.2f GB", *addr[:2], state.get("steps", 0), time.perf_counter() - t0,
                     time.thread_time() - c0, state.get("compute_us", 0) / 1e6,
                     resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9)
            self.note_step_cpu(state)

    @staticmethod
    def mark_step_cpu(state: dict) -> None:
        """Once a session has run 100 steps since it opened, the start of the window over which
        note_step_cpu counts (the steps before carry the session's start-up: counted from the
        OPEN, eight alike 0.125-core hosts reported 41-149 ms of quota a token)."""
        if ("opened" in state and "step_cpu_from" not in state
                and state.get("steps", 0) - state["opened"] >= 100):
            state["step_cpu_from"] = (time.process_time(), state["steps"], state.get("compute_cpu_us", 0))

    def note_step_cpu(self, state: dict) -> None:
        """What a step cost this worker's CPU beyond its kernels, from a step-channel session
        that ended: the process's CPU over 100+ steps (from mark_step_cpu's window on), less the
        part its steps' kernels took (the serving thread's, times the kernel threads), for
        HelloReply.step_cpu_us. The process's, as the CPU quota charges it (the step thread's
        alone gave about the same figures on the emulated LAN). A plan weighs it for a host under
        a CPU quota, whose steps' fixed CPU (system calls, wake-ups, the classifier's step in
        Python) eats the quota whatever its share (client.model.time_balanced). Not while it
        polls between steps (uncapped: that CPU is spent waiting)."""
        if "step_cpu_from" not in state or self.spin:
            return
        cpu0, steps0, kernels0 = state["step_cpu_from"]
        steps = state.get("steps", 0) - steps0
        if steps < 100:
            return
        in_kernels = (state.get("compute_cpu_us", 0) - kernels0) * 1e-6 * self.threads
        self.step_cpu_us = max(0.0, (time.process_time() - cpu0 - in_kernels) / steps * 1e6)
        log.info("a step cost %.0f us of CPU beyond its kernels", self.step_cpu_us)

    def expire(self, conn: socket.socket) -> None:
        """A step-channel session expired: tell its client why (best effort, without blocking;
        not over TLS, whose socket the session's thread is reading), then wake that thread,
        which closes the connection."""
        if self.tls is None:
            notice = error_reply(0, grpc.StatusCode.CANCELLED,
                                 f"the session expired after {self.limits.session_timeout:g} s idle and its "
                                 "KV caches were freed: start again (or raise the worker's --session-timeout)")
            try:
                conn.send(frame(notice), socket.MSG_DONTWAIT)
            except OSError:
                pass
        shutdown(conn)

    def handshake(self, conn: socket.socket) -> socket.socket:
        """The connection, wrapped in TLS when the worker has a certificate (the handshake must
        finish within FIRST_REQUEST_S)."""
        if self.tls is None:
            return conn
        conn.settimeout(FIRST_REQUEST_S)
        conn = self.tls.context.wrap_socket(conn, server_side=True)
        conn.settimeout(None)
        return conn

    def serve_session(self, conn: socket.socket, session, addr) -> None:
        """Read requests and answer them. A frame over --max-message-mb: RESOURCE_EXHAUSTED and
        the connection closes (its bytes cannot be skipped); one that does not parse:
        INVALID_ARGUMENT (the connection closes if it was the first); a first frame without the
        token: UNAUTHENTICATED, closed."""
        frames = FrameReader(conn, spin=self.spin, max_frame=self.limits.max_message)
        while True:
            loop = session.state.get("loop")
            if loop is not None and session.authenticated:  # plain steps: compiled (steploop.py)
                with session.serving() as live:
                    if not live:
                        return
                    why, frames.start, frames.end = loop.run(conn.fileno(), np.frombuffer(frames.buf, np.uint8),
                                                             frames.start, frames.end, self.spin)
                    steps, us, cpu = loop.take_stats()
                    session.state["steps"] = session.state.get("steps", 0) + steps
                    session.state["compute_us"] = session.state.get("compute_us", 0) + us
                    session.state["compute_cpu_us"] = session.state.get("compute_cpu_us", 0) + cpu
                    self.mark_step_cpu(session.state)
                if why == BROKEN:  # a reply could not be sent: the client is gone
                    return
                # anything else (a frame for Python, an idle or closed socket, a full buffer): below
            try:
                raw = frames.read_raw()
            except FrameTooLarge as e:
                send_frame(conn, error_reply(0, grpc.StatusCode.RESOURCE_EXHAUSTED,
                                             f"{e} (the worker's --max-message-mb)"))
                return
            if raw is None:
                return
            try:
                req = parse(pb.StepRequest, raw)
            except WireError as e:
                send_frame(conn, error_reply(0, grpc.StatusCode.INVALID_ARGUMENT, str(e)))
                if not session.authenticated:
                    return
                continue
            if not session.authenticated:
                if not self.gate.allows(req.token, addr[0]):
                    send_frame(conn, error_reply(req.seq, grpc.StatusCode.UNAUTHENTICATED,
                                                 "wrong or missing token: give the worker's token "
                                                 "(--token, --token-file or $TENSORLAN_TOKEN)"))
                    return
                self.sessions.started(session)
                log.info("session %s:%d started", *addr[:2])
            with session.serving() as live:
                if not live:
                    return
                reply = self.handle(session.state, req)
            send_frame(conn, reply)

    def open(self, req) -> tuple[SliceSet, Uploaded, int]:
        """A session's slices with fresh KV caches for req.ctx positions, the upload they come
        from, and the caches' bytes."""
        with self.lock:
            up = self.uploads.get(req.slice_set_id)
        if up is None:
            raise StepError(grpc.StatusCode.NOT_FOUND, f"unknown slice set {req.slice_set_id!r}: upload it first")
        slots = req.slots or 1
        if req.ctx > self.limits.max_ctx:
            raise StepError(grpc.StatusCode.INVALID_ARGUMENT,
                            f"ctx {req.ctx} exceeds this worker's --max-ctx {self.limits.max_ctx}: "
                            "lower --ctx (or raise the worker's --max-ctx)")
        if (req.kv_dtype not in KV_DTYPES or not 0 < req.ctx <= up.cfg.max_seq_len
                or req.wire not in ("", *WIRES) or req.x_wire not in ("", "f32", "bf16", "q8_0")
                or slots > MAX_SLOTS):
            raise StepError(grpc.StatusCode.INVALID_ARGUMENT,
                            f"ctx {req.ctx} / kv_dtype {req.kv_dtype!r} / wire {req.wire!r} / x_wire "
                            f"{req.x_wire!r} / slots {slots}: need 0 < ctx <= {up.cfg.max_seq_len}, "
                            f"kv_dtype one of {sorted(KV_DTYPES)}, wire one of {WIRES}, x_wire f32, "
                            f"bf16 or q8_0, slots <= {MAX_SLOTS}")
        kv = (shard_nbytes(up.cfg, up.shard, "f32", req.ctx, req.kv_dtype, slots)
              - shard_nbytes(up.cfg, up.shard, "f32", 0, req.kv_dtype))
        room, source = self.room()
        if kv > room:
            raise StepError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                            f"KV caches for {slots} x {req.ctx} positions need {human_bytes(kv)}, this "
                            f"worker has {human_bytes(room)} ({source}): lower --ctx")
        with self.lock:
            up.sessions += 1
        return SliceSet.from_tensors(up.cfg, up.shard, up.tensors, req.ctx, req.kv_dtype, slots), up, kv

    def step(self, slices: SliceSet, req, x_wire: str, wire: str) -> bytes:
        """x in `x_wire` -> the bytes of the slices' partial sum in `wire` (logits: f32). q8_0
        activations stay quantized: the kernels take them as they are (quant.q8_0.matmul), from
        the request's bytes to the reply's in one compiled call (SliceSet.run_wire), the same
        bits as decode, run, encode."""
        op = OPS.get(req.op)
        if op is None:
            raise StepError(grpc.StatusCode.INVALID_ARGUMENT, f"unknown op {req.op}")
        D, T = slices.classifier.shape[1], req.tokens
        if req.layer >= len(slices.ffn):
            raise StepError(grpc.StatusCode.INVALID_ARGUMENT,
                            f"step {op} layer {req.layer}: expected layer < {len(slices.ffn)}")
        segs = Worker.segments(slices, req) if op == "attention" else None  # (only it has caches)
        out = T * (slices.classifier.shape[0] * 4 if op == "logits" else D * 8)
        if out > self.limits.max_message - 64:
            raise StepError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                            f"step {op} of {T} tokens: its reply would take {human_bytes(out)}, "
                            f"over this worker's --max-message-mb: send fewer tokens per step")
        try:
            if x_wire == "q8_0" and op != "logits" and 0 < T and len(req.x) == q8_0.nbytes(T, D):
                # (a writable copy, as the compiled step loop's buffer is: one compiled variant
                # of the kernels for both, not one per read-only flag)
                y = slices.run_wire(op, req.layer, np.frombuffer(req.x, np.uint8).copy(), T, segs, wire)
                if y is not None:
                    return y.tobytes()
            x = decode_q8(req.x, T, D) if x_wire == "q8_0" else decode(req.x, T, D, x_wire)
            if not finite(x):
                raise FloatingPointError("x holds NaN or infinity")
            y = slices.run(op, req.layer, x, segs)
        except (WireError, FloatingPointError) as e:
            raise StepError(grpc.StatusCode.INVALID_ARGUMENT, f"step {op}: {e}")
        except ArithmeticError as e:  # a Numba kernel with Python's error model (quant) raises on a zero divisor
            raise StepError(grpc.StatusCode.INVALID_ARGUMENT, f"step {op}: {e} (activations too large?)")
        return encode(np.zeros((T, D), np.float64) if y is None else y, "f32" if op == "logits" else wire)

    @staticmethod
    def segments(slices: SliceSet, req) -> list[tuple[int, int, int]]:
        """The request's rows as segments (slot, p0, n), checked against the session's caches."""
        a = next((a for a in slices.attn if a is not None), None)
        slots, ctx = (a.cache_v.shape[0], a.cache_v.shape[2]) if a else (MAX_SLOTS, 1 << 30)
        if not (req.seg_slot or req.seg_pos or req.seg_len):  # one sequence, in slot 0 (decoding)
            if 0 < req.tokens <= ctx - req.pos:
                return [(0, req.pos, req.tokens)]
        segs = list(zip(req.seg_slot, req.seg_pos, req.seg_len)) or [(0, req.pos, req.tokens)]
        if (not len(req.seg_slot) == len(req.seg_pos) == len(req.seg_len)
                or sum(n for _, _, n in segs) != req.tokens
                or any(b >= slots or n == 0 or p0 + n > ctx for b, p0, n in segs)):
            raise StepError(grpc.StatusCode.INVALID_ARGUMENT,
                            f"segments {segs[:8]} of {req.tokens} tokens: need one slot, position and "
                            f"length per segment, lengths summing to the tokens, slot < {slots}, "
                            f"position + length <= {ctx}")
        return segs


def warm_up() -> None:
    """Run every kind of step once on a tiny random model, so that the kernels are compiled (or
    loaded from Numba's cache) before the worker answers Hello: a first step that compiled for
    seconds would look to the client like a hung worker."""
    cfg = LlamaConfig.from_dict({"architectures": ["LlamaForCausalLM"], "hidden_size": 64,
                                 "intermediate_size": 128, "num_hidden_layers": 1,
                                 "num_attention_heads": 2, "num_key_value_heads": 1,
                                 "vocab_size": 64, "max_position_embeddings": 40}, "warm-up")
    rng = np.random.default_rng(0)
    w = lambda r, c: q8_0.runnable(q8_0.quantize(rng.standard_normal((r, c)).astype(np.float32)))  # noqa: E731
    d = cfg.head_dim
    tensors = {"layers.0.wqkv": w(4 * d, 64), "layers.0.wo": w(64, 2 * d), "layers.0.wgu": w(256, 64),
               "layers.0.wdown": w(64, 128), "classifier": w(64, 64)}
    shard = Shard((0, 2), (0, 128), (0, 64))
    for kv in KV_DTYPES:
        slices = SliceSet.from_tensors(cfg, shard, tensors, 40, kv, slots=2)
        for T in (1, 2, 33):  # one token, a batch, a prompt (the SGEMM path)
            x = rng.standard_normal((T, 64)).astype(np.float32)
            xq = decode_q8(encode(x, "q8_0"), T, 64)  # activations as a q8_0 request brings them
            xf = decode(encode(x, "f32"), T, 64, "f32")  # or an f32 one (read-only, as xq)
            assert finite(xq) and finite(xf)
            for op in ("attention", "ffn", "logits"):
                for xs in (x, xq, xf):
                    slices.run(op, 0, xs, [(0, 0, T)])
            for op in ("attention", "ffn"):  # q8_0 activations (bytes) to a reply's bytes
                slices.run_wire(op, 0, np.frombuffer(encode(x, "q8_0"), np.uint8).copy(), T, [(0, 0, T)], "q8_0")
        loop = Loop.of(slices, "q8_0", "f32", 1 << 20)  # the compiled step loop, over a socket pair
        if loop is not None:
            a, b = socket.socketpair()
            with a, b:
                x = encode(rng.standard_normal((1, 64)).astype(np.float32), "q8_0")
                a.sendall(frame(pb.StepRequest(seq=7, op=pb.ATTENTION, layer=0, pos=3, tokens=1, x=x)))
                a.shutdown(socket.SHUT_WR)
                why, _, _ = loop.run(b.fileno(), np.zeros(4096, np.uint8), 0, 0, 0.0)
                reply, _ = FrameReader(a, spin=0.0).read(pb.StepReply)
                assert why == CLOSED and reply.seq == 7 and len(reply.y) == 64 * 4, (why, reply)
    for wire in WIRES:  # activations (float32) and partial sums (float64) on every wire
        for a in (np.ones((1, 64), np.float32), np.ones((1, 64), np.float64)):
            decode(encode(a, wire), 1, 64, wire)


class StepError(Exception):
    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code, self.message = code, message


def check_tensor(info, fmt: str, expected: dict, received: dict) -> int:
    """An upload's tensor description against its shard: one of its tensors, not yet received,
    of the upload's dtype and the shape the shard needs, with a sha256. Returns its bytes."""
    name = info.name
    if name not in expected or name in received:
        raise WireError(f"tensor {name!r}: " + ("sent twice" if name in received else "not one of the shard's"))
    if info.dtype != fmt or tuple(info.shape) != expected[name]:
        raise WireError(f"tensor {name}: {info.dtype} {list(info.shape)}, the shard needs "
                        f"{fmt} {list(expected[name])}")
    if len(info.sha256) != 32:
        raise WireError(f"tensor {name}: a sha256 of {len(info.sha256)} bytes")
    nbytes = tensor_nbytes(fmt, info.shape)
    if info.nbytes != nbytes:
        raise WireError(f"tensor {name}: {info.nbytes} bytes announced, its shape takes {nbytes}")
    return nbytes


def error_reply(seq: int, code: grpc.StatusCode, message: str) -> pb.StepReply:
    return pb.StepReply(seq=seq, error_code=code.value[0], error=message)


def shutdown(conn: socket.socket) -> None:
    """Wake the thread blocked on a connection (it then closes it). socket.socket's own
    shutdown, also for an SSL socket, whose override would drop its TLS state under the
    thread still reading."""
    try:
        socket.socket.shutdown(conn, socket.SHUT_RDWR)
    except OSError:
        pass


def serve(port: int, host: str = "127.0.0.1", data_port: int | None = None, threads: int | None = None,
          cache_dir: Path | None = None, cache_bytes: int = 20 << 30, limits: Limits = Limits(),
          token: str | None = None, tls: ServerTLS | None = None, insecure: bool = False):
    """Run until SIGINT / SIGTERM. cache_dir=None keeps received tensors in memory only."""
    check_bind(host, token, tls and tls.client_ca, insecure)
    q8_0.set_threads(threads or default_threads())
    data_port = data_port or port + 1
    lsock = socket.create_server((host, data_port), reuse_port=False)
    try:
        cache = TensorCache(cache_dir, cache_bytes)
    except OSError as e:
        raise UserError(f"--cache-dir {cache_dir}: {e.strerror}; choose a writable directory or --no-cache")
    worker = Worker(data_port, q8_0.nb.get_num_threads(), cache, limits, Gate(token), tls)
    server = grpc_server(worker, host, port, limits, tls)
    stop = threading.Event()

    def accept():
        while not stop.is_set():
            try:
                conn, addr = lsock.accept()
            except OSError as e:
                if stop.is_set() or lsock.fileno() < 0:
                    return
                log.warning("step channel: accept failed (%s); retrying", e)  # e.g. out of file descriptors
                time.sleep(0.1)
                continue
            threading.Thread(target=worker.serve_steps, args=(conn, addr), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    threading.Thread(target=worker.sessions.run_reaper, args=(stop,), daemon=True).start()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    log.info("worker %s serving on %s:%d (steps on %d), %d threads%s, %.1f GB/s, cache %s", worker.id,
             host, port, data_port, worker.threads,
             f" (CPU quota {worker.quota:.3g} cores: no polling)" if worker.quota else "", worker.speed,
             f"{cache_dir} ({cache.disk_bytes() / 1e9:.2f} of {cache_bytes / 1e9:.0f} GB)" if cache_dir else "off")
    log.info("token %s, TLS %s; at most %d sessions (idle ones expire after %.0f s), ctx %d, messages "
             "of %s, memory %s", "required" if token else "none",
             "off" if tls is None else "with client certificates" if tls.client_ca else "on",
             limits.max_sessions, limits.session_timeout, limits.max_ctx, human_bytes(limits.max_message),
             human_bytes(limits.max_memory) if limits.max_memory else "as available")
    if token and tls is None and not is_loopback(host):
        log.warning("the token crosses the network in clear: use TLS (--tls-cert, --tls-key) "
                    "where the network is not trusted")
    stop.wait()
    lsock.close()
    server.stop(1).wait()
    log.info("worker %s stopped", worker.id)


def grpc_server(worker: Worker, host: str, port: int, limits: Limits, tls: ServerTLS | None) -> grpc.Server:
    """The gRPC server, started: every call through the worker's Gate, messages within
    --max-message-mb, and as many calls at once as it has threads (beyond: RESOURCE_EXHAUSTED,
    never a queue)."""
    n = limits.max_sessions + 16
    server = grpc.server(futures.ThreadPoolExecutor(n), maximum_concurrent_rpcs=n, options=[
        ("grpc.max_receive_message_length", limits.max_message),
        ("grpc.max_send_message_length", limits.max_message)])
    server.add_generic_rpc_handlers((worker.gate.handler(worker),))
    address = f"{host}:{port}"
    if not (server.add_secure_port(address, tls.grpc_credentials()) if tls else server.add_insecure_port(address)):
        raise UserError(f"cannot listen on {host}:{port}: the port is taken or the address is wrong")
    server.start()
    return server
