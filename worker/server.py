"""bin/worker PORT: serve slices of LLaMA models to tensorlan clients.

gRPC on PORT (Hello, Upload, Ping, Session) and the step channel, plain TCP, on the data port
(PORT + 1 unless --data-port). A client uploads its shard's slices, opens a session on the step
channel, and sends one StepRequest per layer block; the worker runs it with the same SliceSet
code the client runs in-process and answers with the partial sum. A bad request gets an error
reply (a gRPC status code and a message); the worker goes on serving.
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
from pathlib import Path

import grpc
import numpy as np

from client.config import LlamaConfig
from client.errors import UserError
from client.host import available_memory, cfs_quota, cpu_quota
from client.slices import KV_DTYPES, Shard, SliceSet, shard_nbytes
from proto import tensorlan_pb2 as pb
from worker.cache import TensorCache
from proto import tensorlan_pb2_grpc as rpc
from proto.wire import (PROTOCOL_VERSION, WIRES, FrameReader, WireError, decode, encode, request_wire,
                        send_frame, tensor_nbytes, unpack_tensor)
from quant import q8_0

log = logging.getLogger("tensorlan.worker")
OPS = {pb.ATTENTION: "attention", pb.FFN: "ffn", pb.LOGITS: "logits"}
MAX_SLOTS = 256              # KV cache slots (sequences decoded together) per session


class Uploaded:
    """A received shard: config, shard and tensors, shared by the sessions that open it."""

    def __init__(self, cfg: LlamaConfig, shard: Shard, tensors: dict):
        self.cfg, self.shard, self.tensors = cfg, shard, tensors
        self.sessions = 0        # open sessions using it; idle uploads may be dropped


class Worker(rpc.WorkerServicer):
    def __init__(self, data_port: int, threads: int, cache: TensorCache):
        self.id = uuid.uuid4().hex[:8]
        self.cache = cache
        # between steps the step channel polls its socket for a few ms (wakes ~120 us sooner),
        # unless a CPU quota caps this host: there polling spends the quota, and the next step
        # waits for the next CFS period (measured: 0.25-core worker 23 -> 15 tok/s)
        self.quota, self.cfs = cpu_quota(), cfs_quota()
        self.spin = 0.0 if self.quota else 0.005
        self.speed = q8_0.measure_speed(self.quota)
        warm_up()
        self.data_port, self.threads = data_port, threads
        self.uploads: dict[str, Uploaded] = {}
        self.lock = threading.Lock()

    # -- gRPC ------------------------------------------------------------------------------
    def Hello(self, request, context):
        return pb.HelloReply(protocol_version=PROTOCOL_VERSION, worker_id=self.id,
                             cores=len(os.sched_getaffinity(0)), threads=self.threads,
                             memory_bytes=available_memory()[0], speed_gb_s=self.speed,
                             data_port=self.data_port, cfs_quota_us=self.cfs[0] if self.cfs else 0,
                             cfs_period_us=self.cfs[1] if self.cfs else 0)

    def Ping(self, request, context):
        return pb.PingReply(payload=request.payload)

    def Have(self, request, context):
        return pb.HaveReply(have=[self.cache.has(d) for d in request.sha256])

    def Upload(self, request_iterator, context):
        """header, then per tensor: TensorInfo (+ its bytes unless cached). Every tensor is
        checked against its checksum and the shard is checked complete before it is accepted."""
        try:
            first = next(request_iterator, None)
            if first is None or first.WhichOneof("part") != "header":
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, "an upload starts with a header")
            h = first.header
            room, source = available_memory()
            if h.total_bytes > room:  # make room: drop idle shards (they stay in the disk cache)
                self.drop_idle(keep=0)
                room, source = available_memory()
            if h.total_bytes > room:
                context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                              f"the shard needs {h.total_bytes / 1e9:.2f} GB, this worker has "
                              f"{room / 1e9:.2f} GB ({source})")
            cfg = LlamaConfig.from_dict(json.loads(h.config_json), "uploaded config")
            shard = Shard((h.head_begin, h.head_end), (h.unit_begin, h.unit_end), (h.row_begin, h.row_end))
            tensors, received, cached, announced = {}, 0, 0, 0
            info, buf, filled = None, None, 0
            for chunk in request_iterator:
                part = chunk.WhichOneof("part")
                if part == "header":
                    context.abort(grpc.StatusCode.INVALID_ARGUMENT, "a second header in one upload")
                if part == "tensor":
                    if buf is not None:
                        context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                      f"tensor {info.name}: {filled} of {buf.nbytes} bytes before the next")
                    info = chunk.tensor
                    nbytes = tensor_nbytes(info.dtype, info.shape)
                    announced += nbytes
                    if announced > h.total_bytes:
                        context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                      f"tensors beyond the {h.total_bytes} bytes the header announced")
                    if info.cached:
                        data = self.cache.get(info.sha256, nbytes)
                        if data is None:
                            context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                          f"tensor {info.name} ({info.sha256.hex()[:16]}) is not cached here")
                        tensors[info.name] = unpack_tensor(info, data, verify=False)
                        cached += nbytes
                    else:
                        # numpy buffers, not bytearrays: numpy advises transparent huge pages
                        # for large arrays, which measured here made matvecs ~10% faster
                        buf, filled = np.empty(nbytes, np.uint8), 0
                    continue
                data = memoryview(chunk.data)
                if buf is None or filled + len(data) > buf.nbytes:
                    context.abort(grpc.StatusCode.INVALID_ARGUMENT, "more data than the tensor announced")
                buf[filled:filled + len(data)] = np.frombuffer(data, np.uint8)
                filled += len(data)
                received += len(data)
                if filled == buf.nbytes:
                    tensors[info.name] = unpack_tensor(info, buf)  # checks the sha256
                    self.cache.put(info.sha256, buf)
                    buf = None
            if buf is not None:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"upload ended inside tensor {info.name}")
            SliceSet.from_tensors(cfg, shard, tensors, 1, "f32")  # every tensor the shard needs?
        except (UserError, WireError, KeyError, ValueError, json.JSONDecodeError) as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"bad upload: {e}")
        digest = hashlib.sha256(h.SerializeToString())
        for name in sorted(tensors):
            digest.update(name.encode())
        sid = digest.hexdigest()[:16]
        with self.lock:
            self.uploads.pop(sid, None)
            self.uploads[sid] = Uploaded(cfg, shard, tensors)  # newest last
        self.drop_idle(keep=2)
        log.info("upload %s: heads %s units %s rows %s, %.1f MB received, %.1f MB from the cache",
                 sid, shard.heads, shard.units, shard.rows, received / 1e6, cached / 1e6)
        return pb.UploadReply(slice_set_id=sid, bytes_received=received)

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
        """One request of a session -> its reply; errors become an error reply, never a crash."""
        reply = pb.StepReply(seq=req.seq)
        try:
            if req.op == pb.PING:  # echo: the client times the channel with a step's bytes
                reply.y = req.x
                return reply
            if req.op == pb.OPEN:
                self.close(state)
                state["slices"], state["upload"] = self.open(req)
                state["wire"] = req.wire or "f32"
            elif state.get("slices") is None:
                raise StepError(grpc.StatusCode.FAILED_PRECONDITION, "no OPEN before steps")
            else:
                t = time.perf_counter()
                y = self.step(state["slices"], req, state["wire"])
                reply.y = encode(y, "f32" if req.op == pb.LOGITS else state["wire"])
                reply.compute_us = int((time.perf_counter() - t) * 1e6)
                state["steps"] = state.get("steps", 0) + 1
                state["compute_us"] = state.get("compute_us", 0) + reply.compute_us
        except StepError as e:
            reply.error_code, reply.error = e.code.value[0], e.message
        return reply

    def close(self, state: dict) -> None:
        """The end of a session (or a second OPEN in it): its shard is no longer in use by it."""
        up = state.pop("upload", None)
        if up is not None:
            with self.lock:
                up.sessions -= 1

    def Session(self, request_iterator, context):
        q8_0.set_threads(self.threads)
        state = {}
        try:
            for req in request_iterator:
                yield self.handle(state, req)
        finally:
            self.close(state)

    def serve_steps(self, conn: socket.socket, addr) -> None:
        q8_0.set_threads(self.threads)  # Numba's thread count is per calling thread
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        frames = FrameReader(conn, spin=self.spin)
        state, t0, c0 = {}, time.perf_counter(), time.thread_time()
        log.info("session %s:%d started", *addr[:2])
        try:
            while True:
                req, _ = frames.read(pb.StepRequest)
                if req is None:
                    break
                send_frame(conn, self.handle(state, req))
        except (WireError, OSError) as e:
            log.info("session %s:%d: %s", *addr[:2], e)
        finally:
            conn.close()
            self.close(state)
            log.info("session %s:%d closed after %d steps, %.1f s (%.2f s of CPU; computing %.2f s); "
                     "worker peak RSS %.2f GB", *addr[:2], state.get("steps", 0), time.perf_counter() - t0,
                     time.thread_time() - c0, state.get("compute_us", 0) / 1e6,
                     resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9)

    def open(self, req) -> tuple[SliceSet, Uploaded]:
        with self.lock:
            up = self.uploads.get(req.slice_set_id)
        if up is None:
            raise StepError(grpc.StatusCode.NOT_FOUND, f"unknown slice set {req.slice_set_id!r}: upload it first")
        slots = req.slots or 1
        if (req.kv_dtype not in KV_DTYPES or not 0 < req.ctx <= up.cfg.max_seq_len
                or req.wire not in ("", *WIRES) or slots > MAX_SLOTS):
            raise StepError(grpc.StatusCode.INVALID_ARGUMENT,
                            f"ctx {req.ctx} / kv_dtype {req.kv_dtype!r} / wire {req.wire!r} / slots "
                            f"{slots}: need 0 < ctx <= {up.cfg.max_seq_len}, kv_dtype one of "
                            f"{sorted(KV_DTYPES)}, wire one of {WIRES}, slots <= {MAX_SLOTS}")
        kv = (shard_nbytes(up.cfg, up.shard, "f32", req.ctx, req.kv_dtype, slots)
              - shard_nbytes(up.cfg, up.shard, "f32", 0, req.kv_dtype))
        room, source = available_memory()
        if kv > room:
            raise StepError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                            f"KV caches for {slots} x {req.ctx} positions need {kv / 1e9:.2f} GB, this "
                            f"worker has {room / 1e9:.2f} GB ({source}): lower --ctx")
        with self.lock:
            up.sessions += 1
        return SliceSet.from_tensors(up.cfg, up.shard, up.tensors, req.ctx, req.kv_dtype, slots), up

    @staticmethod
    def step(slices: SliceSet, req, wire: str) -> np.ndarray:
        op = OPS.get(req.op)
        if op is None:
            raise StepError(grpc.StatusCode.INVALID_ARGUMENT, f"unknown op {req.op}")
        D = slices.classifier.shape[1]
        try:
            x = decode(req.x, req.tokens, D, request_wire(wire))
        except WireError as e:
            raise StepError(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        if x.shape[1] != D or req.layer >= len(slices.ffn):
            raise StepError(grpc.StatusCode.INVALID_ARGUMENT,
                            f"step {op} layer {req.layer} x {list(x.shape)}: expected [T, {D}], "
                            f"layer < {len(slices.ffn)}")
        y = slices.run(op, req.layer, x, Worker.segments(slices, req))
        return np.zeros(x.shape, np.float64) if y is None else y


    @staticmethod
    def segments(slices: SliceSet, req) -> list[tuple[int, int, int]]:
        """The request's rows as segments (slot, p0, n), checked against the session's caches."""
        segs = list(zip(req.seg_slot, req.seg_pos, req.seg_len)) or [(0, req.pos, req.tokens)]
        a = next((a for a in slices.attn if a is not None), None)
        slots, ctx = (a.cache_k.shape[0], a.cache_k.shape[2]) if a else (MAX_SLOTS, 1 << 30)
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
    w = lambda r, c: q8_0.quantize(rng.standard_normal((r, c)).astype(np.float32))  # noqa: E731
    d = cfg.head_dim
    tensors = {"layers.0.wqkv": w(4 * d, 64), "layers.0.wo": w(64, 2 * d), "layers.0.wgu": w(256, 64),
               "layers.0.wdown": w(64, 128), "classifier": w(64, 64)}
    shard = Shard((0, 2), (0, 128), (0, 64))
    for kv in KV_DTYPES:
        slices = SliceSet.from_tensors(cfg, shard, tensors, 40, kv, slots=2)
        for T in (1, 2, 33):  # one token, a batch, a prompt (the SGEMM path)
            x = rng.standard_normal((T, 64)).astype(np.float32)
            for op in ("attention", "ffn", "logits"):
                slices.run(op, 0, x, [(0, 0, T)])
    for wire in WIRES:
        decode(encode(np.ones((1, 64), np.float32), wire), 1, 64, wire)


class StepError(Exception):
    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code, self.message = code, message


def serve(port: int, host: str = "127.0.0.1", data_port: int | None = None, threads: int | None = None,
          cache_dir: Path | None = None, cache_bytes: int = 20 << 30):
    """Run until SIGINT / SIGTERM. cache_dir=None keeps received tensors in memory only."""
    if threads:
        q8_0.set_threads(threads)
    data_port = data_port or port + 1
    lsock = socket.create_server((host, data_port), reuse_port=False)
    try:
        cache = TensorCache(cache_dir, cache_bytes)
    except OSError as e:
        raise UserError(f"--cache-dir {cache_dir}: {e.strerror}; choose a writable directory or --no-cache")
    worker = Worker(data_port, q8_0.nb.get_num_threads(), cache)
    server = grpc.server(futures.ThreadPoolExecutor(8), options=[
        ("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)])
    rpc.add_WorkerServicer_to_server(worker, server)
    if not server.add_insecure_port(f"{host}:{port}"):
        raise UserError(f"cannot listen on {host}:{port}: the port is taken or the address is wrong")
    server.start()
    stop = threading.Event()

    def accept():
        while not stop.is_set():
            try:
                conn, addr = lsock.accept()
            except OSError:
                return
            threading.Thread(target=worker.serve_steps, args=(conn, addr), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    log.info("worker %s serving on %s:%d (steps on %d), %d threads%s, %.1f GB/s, cache %s", worker.id,
             host, port, data_port, worker.threads,
             f" (CPU quota {worker.quota:.3g} cores: no polling)" if worker.quota else "", worker.speed,
             f"{cache_dir} ({cache.disk_bytes() / 1e9:.2f} of {cache_bytes / 1e9:.0f} GB)" if cache_dir else "off")
    stop.wait()
    lsock.close()
    server.stop(1).wait()
    log.info("worker %s stopped", worker.id)
