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
import signal
import socket
import threading
import time
import uuid
from concurrent import futures

import grpc
import numpy as np

from client.config import LlamaConfig
from client.errors import UserError
from client.slices import KV_DTYPES, Shard, SliceSet
from proto import tensorlan_pb2 as pb
from proto import tensorlan_pb2_grpc as rpc
from proto.wire import (PROTOCOL_VERSION, REPLY_DTYPE, FrameReader, WireError, from_bytes, send_frame,
                        tensor_nbytes, to_bytes, unpack_tensor)
from quant import q8_0

log = logging.getLogger("tensorlan.worker")
OPS = {pb.ATTENTION: "attention", pb.FFN: "ffn", pb.LOGITS: "logits"}


def available_memory() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class Uploaded:
    """A received shard: config, shard and tensors, shared by the sessions that open it."""

    def __init__(self, cfg: LlamaConfig, shard: Shard, tensors: dict):
        self.cfg, self.shard, self.tensors = cfg, shard, tensors


class Worker(rpc.WorkerServicer):
    def __init__(self, data_port: int, threads: int):
        self.id = uuid.uuid4().hex[:8]
        self.data_port, self.threads = data_port, threads
        self.speed = q8_0.measure_speed()
        self.uploads: dict[str, Uploaded] = {}
        self.lock = threading.Lock()

    # -- gRPC ------------------------------------------------------------------------------
    def Hello(self, request, context):
        return pb.HelloReply(protocol_version=PROTOCOL_VERSION, worker_id=self.id,
                             cores=len(os.sched_getaffinity(0)), threads=self.threads,
                             memory_bytes=available_memory(), speed_gb_s=self.speed,
                             data_port=self.data_port)

    def Ping(self, request, context):
        return pb.PingReply(payload=request.payload)

    def Upload(self, request_iterator, context):
        try:
            first = next(request_iterator, None)
            if first is None or first.WhichOneof("part") != "header":
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, "an upload starts with a header")
            h = first.header
            cfg = LlamaConfig.from_dict(json.loads(h.config_json), "uploaded config")
            shard = Shard((h.head_begin, h.head_end), (h.unit_begin, h.unit_end), (h.row_begin, h.row_end))
            # numpy buffers, not bytearrays: numpy advises transparent huge pages for large
            # arrays, which measured here made the worker's matvecs ~10% faster
            sizes = [tensor_nbytes(t.dtype, t.shape) for t in h.tensors]
            bufs = [np.empty(n, np.uint8) for n in sizes]
            i, filled, total = 0, 0, 0
            for chunk in request_iterator:
                if chunk.WhichOneof("part") != "data":
                    context.abort(grpc.StatusCode.INVALID_ARGUMENT, "a second header in one upload")
                data = memoryview(chunk.data)
                total += len(data)
                while data:
                    if i >= len(bufs):
                        context.abort(grpc.StatusCode.INVALID_ARGUMENT, "more data than the header announced")
                    take = min(len(data), sizes[i] - filled)
                    bufs[i][filled:filled + take] = np.frombuffer(data[:take], np.uint8)
                    data, filled = data[take:], filled + take
                    if filled == sizes[i]:
                        i, filled = i + 1, 0
            if i < len(bufs):
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"upload ended at tensor {i} of {len(bufs)}")
            tensors = {t.name: unpack_tensor(t, b) for t, b in zip(h.tensors, bufs)}
            SliceSet.from_tensors(cfg, shard, tensors, 1, "f32")  # every tensor the shard needs?
        except (UserError, WireError, KeyError, ValueError, json.JSONDecodeError) as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"bad upload: {e}")
        sid = hashlib.sha256(h.SerializeToString()).hexdigest()[:16]
        with self.lock:
            self.uploads[sid] = Uploaded(cfg, shard, tensors)
        log.info("upload %s: heads %s units %s rows %s, %.1f MB", sid, shard.heads, shard.units,
                 shard.rows, total / 1e6)
        return pb.UploadReply(slice_set_id=sid, bytes_received=total)

    # -- sessions: the same steps over gRPC (Session) or the TCP step channel ---------------
    def handle(self, state: dict, req) -> pb.StepReply:
        """One request of a session -> its reply; errors become an error reply, never a crash."""
        reply = pb.StepReply(seq=req.seq)
        try:
            if req.op == pb.OPEN:
                state["slices"] = self.open(req)
            elif state.get("slices") is None:
                raise StepError(grpc.StatusCode.FAILED_PRECONDITION, "no OPEN before steps")
            else:
                t = time.perf_counter()
                reply.y = to_bytes(self.step(state["slices"], req), REPLY_DTYPE[OPS[req.op]])
                reply.compute_us = int((time.perf_counter() - t) * 1e6)
                state["steps"] = state.get("steps", 0) + 1
        except StepError as e:
            reply.error_code, reply.error = e.code.value[0], e.message
        return reply

    def Session(self, request_iterator, context):
        q8_0.set_threads(self.threads)
        state = {}
        for req in request_iterator:
            yield self.handle(state, req)

    def serve_steps(self, conn: socket.socket, addr) -> None:
        q8_0.set_threads(self.threads)  # Numba's thread count is per calling thread
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        frames = FrameReader(conn)
        state, t0 = {}, time.perf_counter()
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
            log.info("session %s:%d closed after %d steps, %.1f s", *addr[:2],
                     state.get("steps", 0), time.perf_counter() - t0)

    def open(self, req) -> SliceSet:
        with self.lock:
            up = self.uploads.get(req.slice_set_id)
        if up is None:
            raise StepError(grpc.StatusCode.NOT_FOUND, f"unknown slice set {req.slice_set_id!r}: upload it first")
        if req.kv_dtype not in KV_DTYPES or not 0 < req.ctx <= up.cfg.max_seq_len:
            raise StepError(grpc.StatusCode.INVALID_ARGUMENT,
                            f"ctx {req.ctx} / kv_dtype {req.kv_dtype!r}: need 0 < ctx <= "
                            f"{up.cfg.max_seq_len} and one of {sorted(KV_DTYPES)}")
        return SliceSet.from_tensors(up.cfg, up.shard, up.tensors, req.ctx, req.kv_dtype)

    @staticmethod
    def step(slices: SliceSet, req) -> np.ndarray:
        op = OPS.get(req.op)
        if op is None:
            raise StepError(grpc.StatusCode.INVALID_ARGUMENT, f"unknown op {req.op}")
        try:
            x = from_bytes(req.x, req.tokens)
        except WireError as e:
            raise StepError(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        D = slices.classifier.shape[1]
        ctx = next((a.cache_k.shape[1] for a in slices.attn if a is not None), 1 << 30)
        if x.shape[1] != D or req.layer >= len(slices.ffn) or req.pos + req.tokens > ctx:
            raise StepError(grpc.StatusCode.INVALID_ARGUMENT,
                            f"step {op} layer {req.layer} pos {req.pos} x {list(x.shape)}: expected "
                            f"[T, {D}], layer < {len(slices.ffn)}, pos + T <= {ctx}")
        y = slices.run(op, req.layer, x, req.pos)
        return np.zeros(x.shape, np.float64) if y is None else y


class StepError(Exception):
    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code, self.message = code, message


def serve(port: int, host: str = "127.0.0.1", data_port: int | None = None, threads: int | None = None):
    """Run until SIGINT / SIGTERM."""
    if threads:
        q8_0.set_threads(threads)
    data_port = data_port or port + 1
    lsock = socket.create_server((host, data_port), reuse_port=False)
    worker = Worker(data_port, q8_0.nb.get_num_threads())
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
    log.info("worker %s serving on %s:%d (steps on %d), %d threads, %.1f GB/s", worker.id, host,
             port, data_port, worker.threads, worker.speed)
    stop.wait()
    lsock.close()
    server.stop(1).wait()
    log.info("worker %s stopped", worker.id)
