"""Remote nodes: a worker holding one shard of the model, driven over its step channel.

    RemoteNode(addr).hello()        gRPC: protocol version, resources, measured speed
    .upload(slices, config_json)    gRPC stream: the shard's tensors, chunked and checksummed
    .open(ctx, kv_dtype)            TCP step channel: one session, its own KV caches
    .start(op, layer, x, pos)       send one StepRequest (returns at once) ...
    .wait()                         ... and read its StepReply: the partial sum

Every call is timed: `calls` keeps one record per step for matmul_perf.csv and the profile.
Every call has a deadline: a worker that dies, hangs or drops its connection raises NodeLost
within it, and the model re-plans without that worker (client/model.py, Model.recover).
RemoteNode(addr, token=T, tls=ClientTLS(...)) authenticates to a worker that requires a token
(metadata on every gRPC call; the first frame of the step channel) and speaks TLS on both
channels.
"""
from __future__ import annotations

import hashlib
import json
import os
import socket
import struct
import ssl
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np

from client.errors import UserError
from client.host import quota_share
from client.progress import Progress
from client.slices import Shard
from proto import tensorlan_pb2 as pb
from proto import tensorlan_pb2_grpc as rpc
from proto.security import ClientTLS, bearer
from proto.wire import (PROTOCOL_VERSION, FrameReader, WireError, decode, encode, pack_tensor,
                        request_wire, send_frame)

OPS = {"attention": pb.ATTENTION, "ffn": pb.FFN, "logits": pb.LOGITS}
CHUNK = 1 << 20
_STATUS = {c.value[0]: c.name for c in grpc.StatusCode}
LOST = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED)
HELLO_TIMEOUT = 10.0
STEP_TIMEOUT = 2.0       # a step's deadline beyond its expected compute (see RemoteNode.deadline)
UPLOAD_RATE = 2e6        # an upload's deadline: 30 s + its bytes at this rate (bytes/s)


class NodeLost(Exception):
    """A worker stopped answering: its connection broke or a call missed its deadline."""

    def __init__(self, node: "RemoteNode", why: str, alive: bool = False):
        super().__init__(f"worker {node.addr} {'ended our session' if alive else 'lost'} ({why})")
        self.node, self.why = node, why
        self.alive = alive  # only its session ended (it expired idle): the worker still serves


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


def cache_root() -> Path:
    """$TENSORLAN_CACHE, else $XDG_CACHE_HOME/tensorlan, else ~/.cache/tensorlan: the client's
    upload manifests and (worker/cache.py) a worker's received slices."""
    return Path(os.environ.get("TENSORLAN_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "tensorlan"))


def _model_key(folder: str, ckpt, config_json: str, fmt: str, what: str) -> Path:
    # cache_root()/folder/<hash of the checkpoint's files (path, size, modification time), the
    # config, the format, `what` and the protocol>.json
    h = hashlib.sha256(f"{PROTOCOL_VERSION} {fmt} {what} {config_json}".encode())
    for f in ckpt.files:
        st = f.path.stat()
        h.update(f"{f.path.resolve()} {st.st_size} {st.st_mtime_ns}".encode())
    return cache_root() / folder / f"{h.hexdigest()[:32]}.json"


def manifest_key(ckpt, config_json: str, fmt: str) -> Path:
    """Where the manifest of a model's uploads in a format is kept (see read_manifest)."""
    return _model_key("manifests", ckpt, config_json, fmt, "slices")


def plan_key(ckpt, config_json: str, fmt: str, local: bool, addrs: list[str]) -> Path:
    """Where the plan last placed on these workers (in this order, with or without this
    process) for this model and format is kept."""
    return _model_key("plans", ckpt, config_json, fmt, f"local={local} {' '.join(addrs)}")


def read_plan(path: Path) -> tuple[list | None, bool]:
    """(the shards of a plan kept by write_plan, whether its CPU-capped workers had reported what
    a step costs them), or (None, False)."""
    try:
        kept = json.loads(path.read_text())
        return ([Shard(*(tuple(map(int, r)) for r in sh)) for sh in kept["shards"]],
                kept["steps_known"] is True)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None, False


def write_plan(path: Path, shards: list, steps_known: bool) -> None:
    _write_json(path, {"shards": [[list(sh.heads), list(sh.units), list(sh.rows)] for sh in shards],
                       "steps_known": steps_known})


MANIFEST_ENTRIES = 20_000   # slices remembered per model and format (~200 plans' worth), oldest dropped
_manifest_lock = threading.Lock()  # uploads to several workers at once add to one manifest


def read_manifest(path: Path) -> dict:
    """The TensorInfos (name, dtype, shape, bytes, sha256) of this model's slices sent before, by
    slice (see slices.slice_key), whatever plan they were part of; {} if none."""
    try:
        return {k: pb.TensorInfo(name=t["name"], dtype=t["dtype"], shape=t["shape"], nbytes=t["nbytes"],
                                 sha256=bytes.fromhex(t["sha256"]))
                for k, t in json.loads(path.read_text()).items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}


def add_to_manifest(path: Path, infos: dict) -> None:
    """Merge {slice key: TensorInfo} into the manifest at path (the newest last, at most
    MANIFEST_ENTRIES kept)."""
    with _manifest_lock:
        merged = read_manifest(path)
        for k, t in infos.items():
            merged.pop(k, None)
            merged[k] = t
        _write_json(path, {k: {"name": t.name, "dtype": t.dtype, "shape": list(t.shape),
                               "nbytes": t.nbytes, "sha256": t.sha256.hex()}
                           for k, t in list(merged.items())[-MANIFEST_ENTRIES:]})


def _write_json(path: Path, obj) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(obj))
        os.replace(tmp, path)
    except OSError:
        pass  # not kept: the next load uploads (or plans) again


def activations_wire(wire: str, fmt: str, info: pb.HelloReply) -> str:
    """How a step's activations travel to a worker: as --wire has it (f32 for f64), except
    that a worker whose kernels quantize activations to Q8_0 (VNNI CPUs: HelloReply
    q8_activations) gets them in q8_0 when the weights are Q8_0: the same int8 blocks its
    kernels would make of the floats, in a quarter of the bytes, with no work of its own."""
    if wire == "q8_0" or (fmt == "q8_0" and info.q8_activations):
        return "q8_0"
    return request_wire(wire)


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
    def __init__(self, addr: str, weight: float | None = None, token: str | None = None,
                 tls: ClientTLS | None = None):
        """`token`: the worker's shared secret (sent with every call); `tls`: the CA (and client
        certificate) for a worker that uses TLS."""
        self.addr, self.weight = addr, weight
        self.host = addr.rpartition(":")[0].strip("[]")
        self.secret, self.tls, self.metadata = token, tls, bearer(token)
        options = [("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)]
        self.channel = (grpc.secure_channel(addr, tls.grpc_credentials(), options) if tls
                        else grpc.insecure_channel(addr, options=options))
        self.stub = rpc.WorkerStub(self.channel)
        self.sock = self.frames = None
        self._greet = False      # the next frame opens a step-channel connection: it carries the token
        self.seq = 0
        self.token = 0           # set by the model: which forward pass the calls belong to
        self.calls: list[Call] = []
        self._pending = None
        self.fixed_ms = None     # what its step round trips cost per token, if the plan measured it
        self.busy_ms = None      # under a CPU quota: what its steps cost it per token when kept busy
        self.token_seconds = 0.0 # its expected compute for one token through its shard (deadlines)
        self.step_timeout = STEP_TIMEOUT
        self._timeout = None
        self._step_cost = {}     # nbytes -> measured step_cost (kept across re-plans)

    def hello(self, timeout: float = HELLO_TIMEOUT, measure: bool = False) -> pb.HelloReply:
        """The handshake; measure: the worker measures its speed again first (~0.1 s of its CPU,
        a few seconds at most on a host capped at a fraction of a core), so that the workers a
        plan weighs against each other measured at about the same time, not each at its start:
        this machine's memory bandwidth drifts by a third over minutes, and two identical 0.25-core
        hosts started one after the other measured 6.6 and 4.6 GB/s."""
        req = pb.HelloRequest(protocol_version=PROTOCOL_VERSION, client="tensorlan", measure_speed=measure)
        try:
            h = self.stub.Hello(req, timeout=timeout + (20 if measure else 0), metadata=self.metadata)
        except grpc.RpcError as e:
            raise self._hello_failed(e) from None
        if h.protocol_version != PROTOCOL_VERSION:
            raise UserError(f"worker {self.addr} speaks protocol {h.protocol_version}, this client "
                            f"{PROTOCOL_VERSION}: run the same tensorlan version on both")
        self.info = h
        return h

    def _hello_failed(self, e: grpc.RpcError) -> UserError:
        """One line for a handshake that failed: the token, TLS on one side only, or no worker."""
        code, details = e.code(), " ".join((e.details() or "").split())
        details = details.removeprefix("failed to connect to all addresses; last error: ")[:300]
        if code == grpc.StatusCode.UNAUTHENTICATED:
            return UserError(f"worker {self.addr} refused this client: {details}")
        if code == grpc.StatusCode.UNAVAILABLE and self._accepts_tcp():  # something listens there
            if self.tls:
                return UserError(f"worker {self.addr}: TLS handshake failed ({details}): both sides need "
                                 f"TLS, or neither; --tls-ca must have signed the worker's certificate, "
                                 f"which must name {self.host}; a worker with --tls-client-ca also needs "
                                 "this client's --tls-cert and --tls-key")
            return UserError(f"worker {self.addr} accepts connections but does not answer plaintext gRPC "
                             f"({details}): if it uses TLS, give --tls-ca (both sides need TLS, or neither)")
        return UserError(f"worker {self.addr} is unreachable ({code.name}): start it with "
                         f"`bin/worker PORT` there, or fix --workers")

    def _accepts_tcp(self) -> bool:
        port = int(self.addr.rpartition(":")[2])
        try:
            socket.create_connection((self.host, port), timeout=HELLO_TIMEOUT).close()
            return True
        except OSError:
            return False

    def upload(self, shard, loaders, config_json: str, total: int, manifest=None, bar=None) -> list:
        """Send this worker its shard: `loaders` [(name, load)] in order (see slices.shard_tensors),
        quantized one at a time as the stream goes. `manifest`: per loader, the TensorInfo of
        the same slice of the same model sent before (to any worker, in any plan) or None; those
        the worker still holds go as hashes only, and are not even quantized here. `bar`: a
        Progress shared with other uploads (else one of its own). Returns the TensorInfos sent."""
        have = [False] * len(loaders)
        known = [i for i, t in enumerate(manifest or []) if t is not None]
        if known:
            try:
                held = self.stub.Have(pb.HaveRequest(sha256=[manifest[i].sha256 for i in known]),
                                      timeout=HELLO_TIMEOUT, metadata=self.metadata).have
                for i, h in zip(known, held):
                    have[i] = h
            except grpc.RpcError:
                pass
        header = pb.UploadHeader(config_json=config_json, head_begin=shard.heads[0],
                                 head_end=shard.heads[1], unit_begin=shard.units[0],
                                 unit_end=shard.units[1], row_begin=shard.rows[0], row_end=shard.rows[1],
                                 total_bytes=total)
        own = bar is None
        bar = Progress(total, f"upload {self.addr}", " MB", 1e6) if own else bar
        infos, moved = [], [0]  # moved: what this attempt put on the bar

        def advance(n):
            moved[0] += n
            bar.add(n)

        def chunks():
            yield pb.UploadChunk(header=header)
            for i, (name, load) in enumerate(loaders):
                if have[i]:
                    info = pb.TensorInfo()
                    info.CopyFrom(manifest[i])
                    info.cached = True
                    infos.append(manifest[i])
                    yield pb.UploadChunk(tensor=info)
                    advance(info.nbytes)
                    continue
                info, parts = pack_tensor(name, load())
                infos.append(info)
                yield pb.UploadChunk(tensor=info)
                for p in parts:
                    for k in range(0, len(p), CHUNK):
                        yield pb.UploadChunk(data=bytes(p[k:k + CHUNK]))
                        advance(min(CHUNK, len(p) - k))

        try:
            reply = self.stub.Upload(chunks(), timeout=30 + total / UPLOAD_RATE, metadata=self.metadata)
        except grpc.RpcError as e:
            if own:
                bar.close()
            if e.code() == grpc.StatusCode.FAILED_PRECONDITION and any(have):  # evicted meanwhile
                if not own:
                    bar.add(-moved[0])  # a shared bar: the retry counts its bytes again
                return self.upload(shard, loaders, config_json, total, bar=None if own else bar)
            if e.code() in LOST:
                raise NodeLost(self, f"upload: {e.code().name}")
            raise UserError(f"worker {self.addr} refused the upload: {e.details()}")
        if own:
            bar.close()
        self.slice_set_id, self.shard = reply.slice_set_id, shard
        self.uploaded_bytes = reply.bytes_received
        return infos

    @property
    def quota(self) -> float | None:
        """The fraction of its threads' time its CPU quota lets it run (host.quota_share), None if
        it may run all of it."""
        return quota_share(self.info.cfs_quota_us, self.info.cfs_period_us, self.info.threads)

    def connect(self) -> None:
        """Open the step channel (HelloReply.data_port on the same host)."""
        if self.sock:
            return
        try:
            sock = socket.create_connection((self.host, self.info.data_port), timeout=HELLO_TIMEOUT)
        except OSError as e:
            if not self._accepts_tcp():  # its gRPC port is gone too: it died since the handshake
                raise NodeLost(self, f"step channel: {e.strerror or e}")
            raise UserError(f"worker {self.addr}: step channel port {self.info.data_port} "
                            f"unreachable ({e.strerror or e}); open it in the firewall")
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.tls:
            try:
                sock = self.tls.wrap(sock, self.host)
            except (ssl.SSLError, OSError) as e:
                sock.close()
                raise UserError(f"worker {self.addr}: TLS handshake on the step channel (port "
                                f"{self.info.data_port}) failed ({e}): both sides need TLS, or neither")
        self.sock = sock
        self.sock.settimeout(None)  # blocking, with deadlines from SO_RCVTIMEO (see deadline)
        self._timeout = None
        self.frames = FrameReader(self.sock, spin=0.0) if self.tls else FrameReader(self.sock)
        self._greet = True

    def step_cost(self, nbytes: int, n: int = 30) -> tuple[float, float, float]:
        """What each layer step costs beyond compute, in seconds, from PINGs on the step channel
        carrying a step's nbytes each way: (beyond, client, busy).

        client: the client's own CPU for the step (sending it, reading the reply), which it
        spends whatever share this node has; beyond: what the node adds while the client
        computes its own share: the single ping's median round trip (network, relay, the node
        waking up) less the client's part of it, plus how much a pipelined burst of pings takes
        per ping beyond the client's part. The burst keeps the node busy as real steps do, so
        that on a slow node the CPU the step path takes (syscalls, the kernel's network stack,
        Python) shows at the node's own pace; an uncapped node on loopback keeps up with the
        client (beyond ~0). busy: per ping, a burst kept going for at least four periods of the
        node's CPU quota, if it has one (else the burst above): what a step costs a node that
        its steps keep busy, throttled waits included. The plan weighs them against the compute
        the node would take over (client.model.time_balanced)."""
        self.connect()
        if nbytes in self._step_cost:  # measured before (a re-plan after a worker loss)
            return self._step_cost[nbytes]
        ping = pb.StepRequest(op=pb.PING, x=bytes(nbytes))
        single = []
        for _ in range(n):
            t = time.perf_counter()
            self._request(ping)
            self._reply()
            single.append(time.perf_counter() - t)
        spin, self.frames.spin = self.frames.spin, 0.0  # block, so that waiting takes no CPU
        c = time.thread_time()
        for _ in range(n):
            self._request(ping)
            self._reply()
        client = (time.thread_time() - c) / n
        self.frames.spin = spin
        burst = self._burst(ping, n, 0.0)
        beyond = max(0.0, float(np.median(single)) - client) + max(0.0, burst - client)
        busy = self._burst(ping, n, 4 * self.info.cfs_period_us * 1e-6) if self.quota else burst
        self._step_cost[nbytes] = (beyond, client, busy)
        return beyond, client, busy

    def _burst(self, ping, n: int, seconds: float) -> float:
        """Seconds per ping of n pings sent ahead of their replies (well inside the sockets'
        buffers), and, for `seconds`, one more sent as each reply comes."""
        t = time.perf_counter()
        sent = got = 0
        while True:
            while sent - got < n and (sent < n or time.perf_counter() - t < seconds):
                self._request(ping)
                sent += 1
            if got == sent:
                break
            self._reply()
            got += 1
        return (time.perf_counter() - t) / got

    def open(self, ctx: int, kv_dtype: str, wire: str = "f32", slots: int = 1, fmt: str = "q8_0") -> None:
        """A session on the step channel: fresh KV caches for `slots` sequences of ctx positions;
        partial sums come back in `wire`, activations go in activations_wire."""
        self.connect()
        x_wire = activations_wire(wire, fmt, self.info)
        self._request(pb.StepRequest(op=pb.OPEN, slice_set_id=self.slice_set_id, ctx=ctx,
                                     kv_dtype=kv_dtype, wire=wire, x_wire=x_wire, slots=slots))
        self.wire, self.x_wire = wire, x_wire
        self._reply()

    def deadline(self, tokens: int) -> float:
        """Seconds a step of `tokens` rows may take before the worker counts as lost: the fixed
        step_timeout plus four times its expected compute for them (a whole token's shard per
        row, more than any one step needs)."""
        return self.step_timeout + 4 * tokens * self.token_seconds

    def _set_timeout(self, seconds: float) -> None:
        """The kernel's receive and send timeouts on the step channel (SO_RCVTIMEO/SO_SNDTIMEO):
        a blocked read or write fails after `seconds`, while the socket stays blocking for
        Python, so FrameReader's non-blocking polls still return at once."""
        if seconds != self._timeout:
            tv = struct.pack("ll", int(seconds), int(seconds % 1 * 1e6))
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tv)
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tv)
            self._timeout = seconds

    def _request(self, req) -> int:
        self.seq += 1
        req.seq = self.seq
        self._set_timeout(self.deadline(max(1, req.tokens)))
        if self._greet:  # the worker checks the token on a connection's first frame
            req.token, self._greet = self.secret or "", False
        try:
            return send_frame(self.sock, req)
        except OSError as e:  # it died, or closed the channel (its session expired, it stopped)
            raise NodeLost(self, f"send: {e.strerror or type(e).__name__}")

    def _reply(self):
        try:
            rep, n = self.frames.read(pb.StepReply)
        except BlockingIOError:
            raise NodeLost(self, f"no reply within {self._timeout:.1f} s")
        except (WireError, OSError) as e:
            raise NodeLost(self, f"step channel broke: {e}")
        if rep is None:
            raise NodeLost(self, "it closed the step channel")
        if rep.error_code == grpc.StatusCode.CANCELLED.value[0]:  # idle past its --session-timeout
            raise NodeLost(self, rep.error, alive=True)
        if rep.error_code:
            raise UserError(f"worker {self.addr}: {_STATUS.get(rep.error_code, rep.error_code)}: {rep.error}")
        return rep, n

    def start(self, op: str, layer: int, x: np.ndarray, segs, payload: bytes | None = None) -> None:
        """Send one step: x [T, D] whose rows segs [(slot, p0, n)] place (see slices.rows_of),
        already encoded for the wire in `payload` when the same activations go to several
        workers (encoded once)."""
        t = time.monotonic()
        if payload is None:
            payload = encode(x, self.x_wire)
        req = pb.StepRequest(op=OPS[op], layer=layer, tokens=x.shape[0], x=payload)
        if len(segs) == 1 and segs[0][0] == 0:
            req.pos = segs[0][1]
        else:
            req.seg_slot[:], req.seg_pos[:], req.seg_len[:] = zip(*segs)
        sent = self._request(req)
        self._pending = (op, layer, x.shape, sent, t)

    def wait(self) -> np.ndarray:
        op, layer, (T, D), sent, t = self._pending
        rep, received = self._reply()
        rtt = int((time.monotonic() - t) * 1e6)
        try:
            if op == "logits":
                y = decode(rep.y, T, self.shard.rows[1] - self.shard.rows[0], "f32")
            else:
                y = decode(rep.y, T, D, self.wire)
        except WireError as e:
            raise UserError(f"worker {self.addr}: malformed reply ({e})")
        self.calls.append(Call(self.token, layer, op, y.shape[1], sent, received, rep.compute_us, rtt))
        return y

    def wait_handed(self, data: bytes, op: str, layer: int, shape: tuple, sent: int, t: float) -> np.ndarray:
        """wait() for a step that client/fanout.py sent (`sent` bytes, at monotonic time t) and
        whose reply it did not take: `data`, the bytes it read of it, go to the frame reader."""
        self.frames.hand(data)
        self._pending = (op, layer, shape, sent, t)
        return self.wait()

    def ping(self, nbytes: int, n: int = 20) -> float:
        """Median round trip in microseconds of a gRPC ping carrying nbytes."""
        payload = bytes(nbytes)
        ts = []
        for _ in range(n):
            t = time.perf_counter()
            try:
                self.stub.Ping(pb.PingRequest(payload=payload), timeout=HELLO_TIMEOUT,
                               metadata=self.metadata)
            except grpc.RpcError as e:
                if e.code() in LOST:
                    raise NodeLost(self, f"ping: {e.code().name}")
                raise UserError(f"worker {self.addr} refused a ping: {e.details()}")
            ts.append(time.perf_counter() - t)
        return float(np.median(ts) * 1e6)

    def disconnect(self) -> None:
        """Close the step channel: the worker ends the session and frees its KV caches."""
        if self.sock:
            self.sock.close()
        self.sock = self.frames = self._pending = None

    def close(self) -> None:
        self.disconnect()
        self.channel.close()
