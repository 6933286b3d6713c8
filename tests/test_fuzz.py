"""Fuzz a live worker: over 10,000 malformed requests (random bytes; valid messages with bits
flipped, cut short, extended; fields set to wrong shapes, sizes, dtypes, ops, slice ids and huge
numbers; stream messages out of order; frames with huge length headers, cut short, or abandoned
mid-frame) through real gRPC (every RPC, raw bytes) and the step channel, with a seeded RNG.

Every gRPC call must end with OK or a status the worker gives on purpose, never UNKNOWN or
INTERNAL (a worker bug), nor a timeout (a hang); every step-channel reply must parse and carry an
error code or a result, or the connection must close. A session opened before the fuzz must go
on giving the in-process tokens throughout, a fresh client must get them afterwards, and the
worker's resident memory must stay bounded and stop growing."""
import json
import random
import socket
import struct
import threading
import time
from collections import Counter

import grpc
import numpy as np
import pytest

from cluster_util import Workers
from conftest import STORIES
from client.checkpoint import Checkpoint
from client.generate import generate
from client.model import Model
from client.slices import Shard, shard_nbytes, shard_tensors
from proto import tensorlan_pb2 as pb
from proto import tensorlan_pb2_grpc as rpc
from proto.wire import FrameReader, encode, pack_tensor

pytestmark = pytest.mark.slow

SEED = 20261122
TOKEN = "fuzz-token-0123456789"
RIGHT = (("authorization", f"Bearer {TOKEN}"),)
MAX_MB = 2
ALLOWED = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.UNAUTHENTICATED,
           grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.FAILED_PRECONDITION,
           grpc.StatusCode.NOT_FOUND}
ALLOWED_STEP = {0} | {c.value[0] for c in ALLOWED}
HUGE = [0, 1, 2, 3, 63, 64, 65, 255, 511, 512, 513, 1025, 1 << 16, 1 << 31, (1 << 32) - 1]
STATUS = {c.value[0]: c for c in grpc.StatusCode}


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


class Material:
    """Valid messages to mutate: the stories260K upload (header, tensors, chunks) and steps of
    an uploaded slice set."""

    def __init__(self, sid: str):
        cfg = Model.load(STORIES).cfg
        self.cfg, self.sid = cfg, sid
        shard = Shard.whole(cfg)
        self.config = json.loads((STORIES / "config.json").read_text())
        self.header = pb.UploadHeader(config_json=json.dumps(self.config), head_end=cfg.n_heads,
                                      unit_end=cfg.ffn_dim, row_end=cfg.vocab_size,
                                      total_bytes=shard_nbytes(cfg, shard))
        self.tensors = []
        for name, load in shard_tensors(Checkpoint(STORIES), cfg, shard):
            info, parts = pack_tensor(name, load())
            self.tensors.append((info, b"".join(bytes(p) for p in parts)))

    def upload(self) -> list:
        """The chunks of a whole valid upload."""
        out = [pb.UploadChunk(header=self.header)]
        for info, data in self.tensors:
            out.append(pb.UploadChunk(tensor=info))
            out += [pb.UploadChunk(data=data[k:k + 50_000]) for k in range(0, len(data), 50_000)]
        return out

    q8 = False   # the session's activations travel as q8_0 (a VNNI worker's compiled step loop
                 # takes its plain steps: worker/steploop.py), else as f32

    def step(self, rng: random.Random, op=None) -> pb.StepRequest:
        """A valid request of an open session (ctx 64; f32 activations and partials, or q8_0
        activations with f32 or q8_0 partials) or its OPEN."""
        op = rng.choice([pb.OPEN, pb.ATTENTION, pb.FFN, pb.LOGITS, pb.PING]) if op is None else op
        if op == pb.OPEN:
            return pb.StepRequest(seq=rng.randrange(1 << 20), op=pb.OPEN, slice_set_id=self.sid, ctx=64,
                                  kv_dtype=rng.choice(["bf16", "f32"]),
                                  wire=rng.choice(["f32", "q8_0"]) if self.q8 else "f32",
                                  x_wire="q8_0" if self.q8 else "")
        T = rng.choice([1, 1, 2, 5])
        x = np.asarray(np.random.default_rng(rng.randrange(1 << 30)).standard_normal((T, self.cfg.dim)),
                       np.float32)
        return pb.StepRequest(seq=rng.randrange(1 << 20), op=op, layer=rng.randrange(self.cfg.n_layers),
                              pos=rng.randrange(60), tokens=T, x=encode(x, "q8_0" if self.q8 else "f32"))


# -- mutations --------------------------------------------------------------------------------
def mutate_bytes(rng: random.Random, data: bytes) -> bytes:
    """Bits flipped, cut short, extended, spliced, or replaced by random bytes."""
    how = rng.randrange(5)
    b = bytearray(data)
    if how == 0 and b:
        for _ in range(rng.randint(1, 8)):
            i = rng.randrange(len(b))
            b[i] ^= 1 << rng.randrange(8)
    elif how == 1:
        del b[rng.randrange(len(b) + 1):]
    elif how == 2:
        b += rng.randbytes(rng.choice([1, 5, 100, 3000]))
    elif how == 3 and b:
        i = rng.randrange(len(b))
        b[i:i + rng.randint(1, 16)] = rng.randbytes(rng.randint(0, 16))
    else:
        b = bytearray(random_bytes(rng))
    return bytes(b)


def random_bytes(rng: random.Random) -> bytes:
    n = rng.choice([0, 1, 2, 7, 30, 200, 2000, 20_000, (MAX_MB << 20) + 10])
    return rng.randbytes(n)


def mutate_step(rng: random.Random, m: Material) -> pb.StepRequest:
    """A valid request with one to three fields set to something wrong."""
    req = m.step(rng)
    for _ in range(rng.randint(1, 3)):
        field = rng.choice(["op", "layer", "pos", "tokens", "x", "slice_set_id", "ctx", "kv_dtype",
                            "wire", "x_wire", "token", "seq"])
        if field == "op":
            req.op = rng.choice([-1, 5, 9, 1 << 20, pb.OPEN, pb.ATTENTION, pb.FFN, pb.LOGITS, pb.PING])
        elif field in ("layer", "pos", "tokens", "ctx"):
            setattr(req, field, rng.choice(HUGE + [rng.randrange(1 << 32)]))
        elif field == "x":
            req.x = rng.randbytes(rng.choice([0, 1, 255, 256, 257, 512, 1024, 4096, 100_000]))
        elif field == "slice_set_id":
            req.slice_set_id = rng.choice(["", "nope", m.sid[:-1], m.sid + "0", "\u00e9" * 40])
        elif field in ("kv_dtype", "wire", "x_wire"):
            setattr(req, field, rng.choice(["", "f16", "bf16", "f32", "f64", "q8_0", "int4", "x" * 300]))
        elif field == "token":
            req.token = rng.choice(["", TOKEN, "wrong", TOKEN + "x"])
        else:
            req.seq = rng.randrange(1 << 64)
    return req


def mutate_header(rng: random.Random, m: Material) -> pb.UploadHeader:
    h = pb.UploadHeader()
    h.CopyFrom(m.header)
    field = rng.choice(["config", "config", "range", "range", "total"])
    if field == "config":
        c = dict(m.config)
        key = rng.choice(list(c) + ["rope_scaling", "head_dim"])
        c[key] = rng.choice([None, -1, 0, 1, 3, 7, 1 << 31, 1e300, "x", [], {}, [1, 2], True,
                             {"rope_type": "llama3", "factor": 0}, {"rope_type": "llama3"}])
        if rng.random() < 0.2:
            del c[key]
        h.config_json = json.dumps(c) if rng.random() < 0.8 else mutate_bytes(rng, json.dumps(c).encode()).decode(
            "utf-8", "replace")
    elif field == "range":
        name = rng.choice(["head_begin", "head_end", "unit_begin", "unit_end", "row_begin", "row_end"])
        setattr(h, name, rng.choice(HUGE))
    else:
        h.total_bytes = rng.choice([0, 1, m.header.total_bytes - 1, m.header.total_bytes + 1, 1 << 40,
                                    (1 << 64) - 1])
    return h


def mutate_info(rng: random.Random, m: Material, info: pb.TensorInfo) -> pb.TensorInfo:
    out = pb.TensorInfo()
    out.CopyFrom(info)
    field = rng.choice(["name", "dtype", "shape", "nbytes", "sha256", "cached"])
    if field == "name":
        out.name = rng.choice([t.name for t, _ in m.tensors] + ["", "layers.99.wqkv", "x" * 1000])
    elif field == "dtype":
        out.dtype = rng.choice(["", "f16", "int8", "f32", "q8_0", "q4"])
    elif field == "shape":
        del out.shape[:]
        out.shape.extend(rng.choice(HUGE + [1 << 40, (1 << 64) - 1]) for _ in range(rng.choice([0, 1, 2, 2, 3])))
    elif field == "nbytes":
        out.nbytes = rng.choice([0, info.nbytes - 1, info.nbytes + 1, 1 << 40])
    elif field == "sha256":
        out.sha256 = rng.randbytes(rng.choice([0, 31, 32, 33, 100_000]))
    else:
        out.cached = not out.cached
    return out


def upload_stream(rng: random.Random, m: Material) -> list[bytes]:
    """A valid upload (or its start), then malformed: a field changed, a message mutated or
    dropped, two swapped, one repeated, random bytes."""
    chunks = m.upload()
    if rng.random() < 0.7:
        chunks = chunks[:rng.randint(1, 8)]
    how = rng.randrange(6)
    i = rng.randrange(len(chunks))
    if how == 0:
        chunks[0] = pb.UploadChunk(header=mutate_header(rng, m))
    elif how == 1:
        infos = [k for k, c in enumerate(chunks) if c.WhichOneof("part") == "tensor"] or [0]
        k = rng.choice(infos)
        if chunks[k].WhichOneof("part") == "tensor":
            chunks[k] = pb.UploadChunk(tensor=mutate_info(rng, m, chunks[k].tensor))
    elif how == 2 and len(chunks) > 1:
        j = rng.randrange(len(chunks))
        chunks[i], chunks[j] = chunks[j], chunks[i]
    elif how == 3:
        chunks.insert(i, chunks[rng.randrange(len(chunks))])
    elif how == 4 and len(chunks) > 1:
        del chunks[i]
    raw = [c.SerializeToString() for c in chunks]
    if how == 5 or rng.random() < 0.3:
        k = rng.randrange(len(raw))
        raw[k] = mutate_bytes(rng, raw[k])
    return raw


def closing(rep: pb.StepReply) -> bool:
    """Is this the worker's last reply on a connection? (A refused token, a frame over the
    limit, no free session; a first frame that does not parse.)"""
    return (rep.error_code == grpc.StatusCode.UNAUTHENTICATED.value[0] or "exceeds the limit" in rep.error
            or "--max-sessions" in rep.error)


def expect_close(frames: FrameReader) -> None:
    """The worker closes the connection next (a reset if it left bytes of ours unread)."""
    try:
        assert frames.read(pb.StepReply) == (None, 0)
    except ConnectionResetError:
        pass


class Fuzzer:
    def __init__(self, addr: str, data_port: int, m: Material, rng: random.Random):
        self.m, self.rng, self.data_port = m, rng, data_port
        self.channel = grpc.insecure_channel(addr, options=[("grpc.max_receive_message_length", 64 << 20),
                                                            ("grpc.max_send_message_length", 64 << 20)])
        self.sent, self.statuses, self.step_codes = 0, Counter(), Counter()

    def metadata(self):
        r = self.rng.random()
        return RIGHT if r < 0.95 else None if r < 0.975 else (("authorization", "Bearer wrong"),)

    def status(self, call) -> None:
        """Run one gRPC call; record its status; fail on one the worker should never give."""
        try:
            call()
            code = grpc.StatusCode.OK
        except grpc.RpcError as e:
            code = e.code()
            assert code in ALLOWED, f"{code}: {e.details()}"
        self.statuses[code.name] += 1

    def unary(self) -> None:
        name, valid = self.rng.choice([
            ("Hello", pb.HelloRequest(protocol_version=3, client="fuzz")),
            ("Have", pb.HaveRequest(sha256=[t.sha256 for t, _ in self.m.tensors[:3]])),
            ("Ping", pb.PingRequest(payload=b"p" * 100))])
        raw = mutate_bytes(self.rng, valid.SerializeToString())
        if name == "Have" and self.rng.random() < 0.3:
            raw = pb.HaveRequest(sha256=[self.rng.randbytes(self.rng.choice([0, 31, 32, 5000]))
                                         for _ in range(self.rng.randint(1, 50))]).SerializeToString()
        self.sent += 1
        self.status(lambda: self.channel.unary_unary(f"/tensorlan.Worker/{name}")(
            raw, timeout=10, metadata=self.metadata()))

    def _counted(self, raws):
        for r in raws:
            self.sent += 1
            yield r

    def upload(self) -> None:
        """A malformed upload; or, one time in ten, a valid one the client abandons midway."""
        if self.rng.random() < 0.1:
            return self.abandoned_upload()
        raws = upload_stream(self.rng, self.m)
        self.status(lambda: self.channel.stream_unary("/tensorlan.Worker/Upload")(
            self._counted(raws), timeout=10, metadata=self.metadata()))

    def abandoned_upload(self) -> None:
        chunks = [c.SerializeToString() for c in self.m.upload()]
        cut = self.rng.randrange(1, len(chunks))
        sent, release = threading.Event(), threading.Event()

        def gone():
            yield from self._counted(chunks[:cut])
            sent.set()
            release.wait(10)

        call = self.channel.stream_unary("/tensorlan.Worker/Upload").future(gone(), timeout=10, metadata=RIGHT)
        assert sent.wait(10)
        time.sleep(0.005)   # the worker reads them, then the client is gone
        call.cancel()
        release.set()
        assert call.cancelled()
        self.statuses["CANCELLED (by the client)"] += 1

    def settled_room(self, stub) -> int:
        """What the worker offers for new shards once idle uploads are dropped (an upload too
        large for it makes it drop them) and only the kept session is open."""
        with pytest.raises(grpc.RpcError):
            stub.Upload(iter([pb.UploadChunk(header=pb.UploadHeader(total_bytes=1 << 62))]), timeout=10,
                        metadata=RIGHT)
        for _ in range(100):
            h = stub.Hello(pb.HelloRequest(), timeout=10, metadata=RIGHT)
            if h.sessions == 1:
                return h.memory_bytes
            time.sleep(0.1)
        raise AssertionError(f"{h.sessions} sessions open after the fuzz")

    def session(self) -> None:
        """A gRPC Session stream: an OPEN, then valid and mutated requests."""
        reqs = [self.m.step(self.rng, pb.OPEN).SerializeToString()]
        for _ in range(self.rng.randint(3, 20)):
            r = self.rng.random()
            raw = (self.m.step(self.rng) if r < 0.3 else mutate_step(self.rng, self.m)).SerializeToString()
            reqs.append(mutate_bytes(self.rng, raw) if r > 0.9 else raw)

        def run():
            for raw in self.channel.stream_stream("/tensorlan.Worker/Session")(
                    self._counted(reqs), timeout=10, metadata=self.metadata()):
                rep = pb.StepReply.FromString(raw)
                assert rep.error_code in ALLOWED_STEP, rep.error
                self.step_codes[STATUS[rep.error_code].name] += 1
        self.status(run)

    def steps(self) -> None:
        """A step-channel connection: a first frame (usually with the token), then valid and
        malformed frames, each answered by a reply that parses; then a clean close, or a huge
        length header, a frame cut short, or a disconnect mid-frame."""
        s = socket.create_connection(("127.0.0.1", self.data_port), timeout=10)
        frames = FrameReader(s, spin=0)
        self.m.q8 = self.rng.random() < 0.5
        try:
            first = self.m.step(self.rng, pb.OPEN if self.rng.random() < 0.8 else pb.PING)
            first.token = TOKEN if self.rng.random() < 0.93 else self.rng.choice(["", "wrong"])
            if not self.ask(s, frames, first.SerializeToString(), closes=first.token != TOKEN):
                return
            for _ in range(self.rng.randint(5, 25)):
                r = self.rng.random()
                if r < 0.25:
                    raw = self.m.step(self.rng).SerializeToString()
                elif r < 0.7:
                    raw = mutate_step(self.rng, self.m).SerializeToString()
                else:
                    raw = mutate_bytes(self.rng, mutate_step(self.rng, self.m).SerializeToString())
                if not self.ask(s, frames, raw, closes=len(raw) > MAX_MB << 20):
                    return
            self.end(s, frames)
        finally:
            s.close()

    def ask(self, s, frames, raw: bytes, closes: bool) -> bool:
        """Send one frame and read its reply; True if the connection stays open."""
        self.sent += 1
        # over the limit, the worker answers from the header and closes: the rest would meet a reset
        s.sendall(struct.pack("<I", len(raw)) + raw[:65536 if len(raw) > MAX_MB << 20 else None])
        rep, _ = frames.read(pb.StepReply)
        if rep is None:   # closed: only after a reply that said why
            raise AssertionError("the worker closed a connection without a reply")
        assert rep.error_code in ALLOWED_STEP, rep.error
        self.step_codes[STATUS[rep.error_code].name] += 1
        if closes or closing(rep):
            expect_close(frames)
            return False
        return True

    def end(self, s, frames) -> None:
        how = self.rng.randrange(4)
        if how == 0:   # a huge length header: refused, closed
            self.sent += 1
            s.sendall(struct.pack("<I", self.rng.choice([(MAX_MB << 20) + 1, 0xFFFFFFFF])))
            rep, _ = frames.read(pb.StepReply)
            assert rep.error_code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0], rep.error
            self.step_codes["RESOURCE_EXHAUSTED"] += 1
            expect_close(frames)
        elif how == 1:  # a frame cut short, then the client's end of the stream: closed, no reply
            self.sent += 1
            raw = self.m.step(self.rng).SerializeToString()
            s.sendall(struct.pack("<I", len(raw)) + raw[:self.rng.randrange(len(raw))])
            s.shutdown(socket.SHUT_WR)
            expect_close(frames)
        elif how == 2:  # gone mid-frame
            self.sent += 1
            s.sendall(struct.pack("<I", 1000) + b"\0" * self.rng.randrange(1000))


def test_fuzz_worker_stays_correct_and_bounded():
    t0 = time.monotonic()
    w = Workers(1, extra=["--token", TOKEN, "--max-message-mb", str(MAX_MB), "--max-sessions", "8",
                          "--session-timeout", "60", "--max-memory", "0.2", "--no-cache"])
    try:
        one = Model.load(STORIES)
        ids = one.tokenizer.encode("Once upon a time")
        want = generate(one, ids, 8).new_ids
        # a session opened before the fuzz, checked all along
        kept = Model.load(STORIES, workers=[(w.addrs[0], 1.0)], local=False, token=TOKEN)
        assert generate(kept, ids, 8).new_ids == want
        node = kept.remote[0]
        fz = Fuzzer(w.addrs[0], node.info.data_port, Material(node.slice_set_id), random.Random(SEED))
        kinds = [fz.unary] * 6 + [fz.upload] * 2 + [fz.session] + [fz.steps] * 2
        for _ in range(40):   # warm up every path before measuring memory
            for kind in (fz.steps, fz.session, fz.upload, fz.unary):
                kind()
        stub = rpc.WorkerStub(fz.channel)
        room = fz.settled_room(stub)
        pid = w.procs[0].pid
        rss, warm, n_calls = [_rss_mb(pid)], fz.sent, 0
        while fz.sent - warm < 10_000:
            fz.rng.choice(kinds)()
            n_calls += 1
            if n_calls % 400 == 0:
                assert generate(kept, ids, 8).new_ids == want      # the other session goes on
                rss.append(_rss_mb(pid))
        rss.append(_rss_mb(pid))
        # every refused, failed or abandoned upload and every closed session gave back its memory
        assert fz.settled_room(stub) == room
        fresh = Model.load(STORIES, workers=[(w.addrs[0], 1.0)], local=False, token=TOKEN)
        assert generate(fresh, ids, 8).new_ids == want
        assert generate(kept, ids, 8).new_ids == want
        elapsed = time.monotonic() - t0
        half = len(rss) // 2
        print(f"\nfuzz: {fz.sent - warm} requests (+{warm} warming up) in {n_calls} calls and "
              f"connections, {elapsed:.1f} s in all; gRPC "
              f"statuses {dict(fz.statuses)}; step replies {dict(fz.step_codes)}; worker RSS "
              f"{rss[0]:.1f} -> {rss[half]:.1f} -> {rss[-1]:.1f} MB")
        assert fz.sent - warm >= 10_000
        assert rss[-1] - rss[0] < 150, rss
        first, second = rss[half] - rss[0], rss[-1] - rss[half]
        assert second < max(8.0, first / 2), rss   # levelled off, not still climbing
        for code in ("INVALID_ARGUMENT", "UNAUTHENTICATED", "RESOURCE_EXHAUSTED", "OK"):
            assert fz.statuses[code] > 0 and fz.step_codes[code] > 0, code
        assert fz.step_codes["OK"] > 2000     # many reached the kernels, and were computed
    finally:
        logs = w.stop()
        if "Traceback" in logs[0]:
            print(logs[0][logs[0].index("Traceback") - 200:][:6000])
    assert "Traceback" not in logs[0] and "worker error" not in logs[0], logs[0][-3000:]
