"""Remote nodes: a worker holding one shard of the model, driven over its step channel.

    RemoteNode(addr).hello()        gRPC: protocol version, resources, measured speed
    .upload(slices, config_json)    gRPC stream: the shard's tensors, chunked and checksummed
    .open(ctx, kv_dtype)            TCP step channel: one session, its own KV caches
    .start(op, layer, x, pos)       send one StepRequest (returns at once) ...
    .wait()                         ... and read its StepReply: the partial sum

Every call is timed: `calls` keeps one record per step for matmul_perf.csv and the profile.
"""
from __future__ import annotations

import socket
import time
from dataclasses import dataclass

import grpc
import numpy as np

from client.errors import UserError
from client.progress import Progress
from proto import tensorlan_pb2 as pb
from proto import tensorlan_pb2_grpc as rpc
from proto.wire import (PROTOCOL_VERSION, REPLY_DTYPE, FrameReader, WireError, from_bytes, pack_tensor,
                        send_frame, to_bytes)

OPS = {"attention": pb.ATTENTION, "ffn": pb.FFN, "logits": pb.LOGITS}
CHUNK = 1 << 20
_STATUS = {c.value[0]: c.name for c in grpc.StatusCode}
HELLO_TIMEOUT = 10.0


def parse_workers(spec: str) -> list[tuple[str, float | None]]:
    """'host:port[*weight],...' -> [(host:port, weight or None)]."""
    out = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        addr, _, w = item.partition("*")
        host, _, port = addr.rpartition(":")
        if not host or not port.isdigit():
            raise UserError(f"--workers {item!r}: expected host:port[*weight], e.g. 10.0.0.2:7000*2")
        try:
            weight = float(w) if w else None
        except ValueError:
            raise UserError(f"--workers {item!r}: weight {w!r} is not a number")
        if weight is not None and weight <= 0:
            raise UserError(f"--workers {item!r}: the weight must be positive")
        out.append((addr, weight))
    return out


def load_cluster_file(path) -> list[tuple[str, float | None]]:
    """A TOML cluster file: [[worker]] address = "host:port", weight = 2 (optional)."""
    import tomllib
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
        return [(w["address"], w.get("weight")) for w in data.get("worker", [])]
    except (OSError, tomllib.TOMLDecodeError, KeyError, TypeError) as e:
        raise UserError(f"{path}: not a cluster file ({e}); expected [[worker]] tables with "
                        "address = \"host:port\" and an optional weight")


@dataclass
class Call:
    token: int
    layer: int
    op: str
    rows: int
    sent: int
    received: int
    compute_us: int
    rtt_us: int


class RemoteNode:
    def __init__(self, addr: str, weight: float | None = None):
        self.addr, self.weight = addr, weight
        self.host = addr.rpartition(":")[0].strip("[]")
        self.channel = grpc.insecure_channel(addr, options=[
            ("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)])
        self.stub = rpc.WorkerStub(self.channel)
        self.sock = self.frames = None
        self.seq = 0
        self.token = 0           # set by the model: which forward pass the calls belong to
        self.calls: list[Call] = []
        self._pending = None

    def hello(self) -> pb.HelloReply:
        try:
            h = self.stub.Hello(pb.HelloRequest(protocol_version=PROTOCOL_VERSION, client="tensorlan"),
                                timeout=HELLO_TIMEOUT)
        except grpc.RpcError as e:
            raise UserError(f"worker {self.addr} is unreachable ({e.code().name}): start it with "
                            f"`bin/worker PORT` there, or fix --workers")
        if h.protocol_version != PROTOCOL_VERSION:
            raise UserError(f"worker {self.addr} speaks protocol {h.protocol_version}, this client "
                            f"{PROTOCOL_VERSION}: run the same tensorlan version on both")
        self.info = h
        return h

    def upload(self, slices, config_json: str, label: str = "") -> None:
        entries = [pack_tensor(n, w) for n, w in slices.tensors().items()]
        sh = slices.shard
        header = pb.UploadHeader(config_json=config_json, head_begin=sh.heads[0], head_end=sh.heads[1],
                                 unit_begin=sh.units[0], unit_end=sh.units[1], row_begin=sh.rows[0],
                                 row_end=sh.rows[1], tensors=[e[0] for e in entries])
        total = sum(e[0].nbytes for e in entries)
        bar = Progress(total, f"upload {label or self.addr}", " MB", 1e6)

        def chunks():
            yield pb.UploadChunk(header=header)
            sent = 0
            for _, parts in entries:
                for p in parts:
                    for i in range(0, len(p), CHUNK):
                        yield pb.UploadChunk(data=p[i:i + CHUNK])
                        sent += min(CHUNK, len(p) - i)
                        bar.update(sent)

        try:
            reply = self.stub.Upload(chunks())
        except grpc.RpcError as e:
            raise UserError(f"worker {self.addr} refused the upload: {e.details()}")
        bar.close()
        self.slice_set_id = reply.slice_set_id
        self.shard = slices.shard

    def open(self, ctx: int, kv_dtype: str) -> None:
        try:
            self.sock = socket.create_connection((self.host, self.info.data_port), timeout=HELLO_TIMEOUT)
        except OSError as e:
            raise UserError(f"worker {self.addr}: step channel port {self.info.data_port} "
                            f"unreachable ({e.strerror or e}); open it in the firewall")
        self.sock.settimeout(None)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.frames = FrameReader(self.sock)
        self._request(pb.StepRequest(op=pb.OPEN, slice_set_id=self.slice_set_id, ctx=ctx,
                                     kv_dtype=kv_dtype))
        self._reply()

    def _request(self, req) -> int:
        self.seq += 1
        req.seq = self.seq
        return send_frame(self.sock, req)

    def _reply(self):
        try:
            rep, n = self.frames.read(pb.StepReply)
        except (WireError, OSError) as e:
            raise UserError(f"worker {self.addr}: step channel broke ({e})")
        if rep is None:
            raise UserError(f"worker {self.addr} closed the step channel")
        if rep.error_code:
            raise UserError(f"worker {self.addr}: {_STATUS.get(rep.error_code, rep.error_code)}: {rep.error}")
        return rep, n

    def start(self, op: str, layer: int, x: np.ndarray, pos: int) -> None:
        t = time.perf_counter()
        sent = self._request(pb.StepRequest(op=OPS[op], layer=layer, pos=pos, tokens=x.shape[0],
                                            x=to_bytes(x)))
        self._pending = (op, layer, x.shape[0], sent, t)

    def wait(self) -> np.ndarray:
        op, layer, T, sent, t = self._pending
        rep, received = self._reply()
        rtt = int((time.perf_counter() - t) * 1e6)
        try:
            y = from_bytes(rep.y, T, REPLY_DTYPE[op])
        except WireError as e:
            raise UserError(f"worker {self.addr}: malformed reply ({e})")
        self.calls.append(Call(self.token, layer, op, y.shape[1], sent, received, rep.compute_us, rtt))
        return y

    def ping(self, nbytes: int, n: int = 20) -> float:
        """Median round trip in microseconds of a gRPC ping carrying nbytes."""
        payload = bytes(nbytes)
        ts = []
        for _ in range(n):
            t = time.perf_counter()
            self.stub.Ping(pb.PingRequest(payload=payload), timeout=HELLO_TIMEOUT)
            ts.append(time.perf_counter() - t)
        return float(np.median(ts) * 1e6)

    def close(self) -> None:
        if self.sock:
            self.sock.close()
        self.channel.close()
