"""The worker's compiled step loop (worker/steploop.py) over a socket pair: its replies are the
bytes of the Python path's, and every frame it does not take is left, whole, for Python."""
import socket

import numpy as np
import pytest

from conftest import STORIES
from client.checkpoint import Checkpoint
from client.config import LlamaConfig
from client.model import plan_shards
from client.slices import SliceSet
from proto import tensorlan_pb2 as pb
from proto.wire import FrameReader, decode_q8, encode, frame
from quant import q8_0 as Q
from worker.steploop import CLOSED, FRAME, FULL, IDLE, Loop

pytestmark = pytest.mark.skipif(not Q.VNNI, reason="the compiled step loop runs VNNI tiles only (no AVX-512 VNNI)")


def pair(shard, wire):
    cfg = LlamaConfig.load(STORIES)
    ckpt = Checkpoint(STORIES)
    a, b = (SliceSet.build(ckpt, cfg, shard, "q8_0", "bf16", 64, slots=2) for _ in range(2))
    return cfg, a, b, Loop.of(a, "q8_0", wire, 1 << 20)


def serve(loop, frames: list[bytes], buf_size=1 << 16, close=True):
    """Send the frames, run the loop on the other end -> (why, the bytes it left, replies)."""
    s, t = socket.socketpair()
    with s, t:
        s.sendall(b"".join(frames))
        if close:
            s.shutdown(socket.SHUT_WR)
        buf = np.zeros(buf_size, np.uint8)
        why, start, end = loop.run(t.fileno(), buf, 0, 0, 0.0)
        t.shutdown(socket.SHUT_WR)
        reader, replies = FrameReader(s, spin=0.0), []
        while True:
            rep, _ = reader.read(pb.StepReply)
            if rep is None:
                return why, bytes(buf[start:end]), replies
            replies.append(rep)


@pytest.mark.parametrize("wire", ["q8_0", "f32", "f64"])
def test_loop_replies_equal_the_python_path(wire):
    cfg = LlamaConfig.load(STORIES)
    for shard in plan_shards(cfg, [3, 1, 1])[:2]:   # padded heads; FFN units not a multiple of 32
        cfg, _, b, loop = pair(shard, wire)
        assert loop is not None
        rng, frames, expected = np.random.default_rng(5), [], []
        # slot 0: a prompt of 6, then a token; slot 1: a prompt of 3; then both as one batch
        for segs in ([(0, 0, 6)], [(0, 6, 1)], [(1, 0, 3)], [(0, 7, 1), (1, 3, 1)], [(1, 4, 2), (0, 8, 1)]):
            T = sum(m for _, _, m in segs)
            for layer in range(cfg.n_layers):
                for op in (pb.ATTENTION, pb.FFN):
                    xb = encode(rng.standard_normal((T, cfg.dim)).astype(np.float32), "q8_0")
                    seq = len(frames) + 1000
                    req = pb.StepRequest(seq=seq, op=op, layer=layer, tokens=T, x=xb)
                    if segs[0][0] == 0 and len(segs) == 1:
                        req.pos = segs[0][1]
                    else:
                        req.seg_slot[:], req.seg_pos[:], req.seg_len[:] = zip(*segs)
                    frames.append(frame(req))
                    name = "attention" if op == pb.ATTENTION else "ffn"
                    y = b.run(name, layer, decode_q8(xb, T, cfg.dim), segs)
                    expected.append((seq, encode(y, wire)))
        why, left, replies = serve(loop, frames)
        assert why == CLOSED and left == b""
        assert [(r.seq, r.y) for r in replies] == expected
        assert all(r.error_code == 0 for r in replies)
        steps, us, cpu = loop.take_stats()
        assert steps == len(frames) and us >= 0
        assert 0 < cpu <= us + 2 * steps  # this thread's CPU in the kernels: within their wall time


def test_loop_leaves_other_frames_to_python():
    cfg = LlamaConfig.load(STORIES)
    cfg, _, _, loop = pair(plan_shards(cfg, [1, 1])[0], "f32")
    D = cfg.dim
    x1 = encode(np.ones((1, D), np.float32), "q8_0")
    ok = frame(pb.StepRequest(seq=1, op=pb.FFN, layer=0, tokens=1, x=x1))
    inf = bytearray(x1)
    inf[-2:] = np.array([0x7C00], np.uint16).tobytes()      # a scale of infinity
    others = [
        pb.StepRequest(seq=2, op=pb.LOGITS, tokens=1, x=x1),                    # not a layer step
        pb.StepRequest(seq=2, op=pb.PING, x=x1),
        pb.StepRequest(seq=2, op=pb.FFN, layer=0, tokens=1, x=x1, token="t"),  # a field it does not take
        pb.StepRequest(seq=2, op=pb.ATTENTION, layer=0, tokens=1, x=x1, seg_len=[1]),  # segments: 1 of 3
        pb.StepRequest(seq=2, op=pb.ATTENTION, layer=0, tokens=2, x=x1 + x1, seg_slot=[0], seg_pos=[0],
                       seg_len=[1]),                                            # rows: 1 of 2
        pb.StepRequest(seq=2, op=pb.ATTENTION, layer=0, tokens=1, x=x1, seg_slot=[2], seg_pos=[0],
                       seg_len=[1]),                                            # slot 2 of 2
        pb.StepRequest(seq=2, op=pb.ATTENTION, layer=0, tokens=1, x=x1, seg_slot=[0], seg_pos=[0],
                       seg_len=[0]),                                            # an empty segment
        pb.StepRequest(seq=2, op=pb.FFN, layer=cfg.n_layers, tokens=1, x=x1),  # layer out of range
        pb.StepRequest(seq=2, op=pb.FFN, layer=0, tokens=2, x=x1),             # x of the wrong size
        pb.StepRequest(seq=2, op=pb.FFN, layer=0, tokens=0, x=b""),
        pb.StepRequest(seq=2, op=pb.ATTENTION, layer=0, pos=64, tokens=1, x=x1),  # past the caches
        pb.StepRequest(seq=2, op=pb.FFN, layer=0, tokens=1, x=bytes(inf)),     # not finite
    ]
    raw = [frame(m) for m in others] + [
        b"\x05\x00\x00\x00\x08\xff\xff\xff\xff",           # a varint that runs past the frame
        b"\x03\x00\x00\x00\x32\x05\x01",                   # x longer than the frame
        b"\x02\x00\x00\x00\x0f\x01",                       # wire type 7
        b"\x04\x00\x00\x00\x6a\x02\x01\x80",               # seg_slot: a varint cut by its field
        b"\x06\x00\x00\x00\x6a\x01\x00\x6a\x01\x00",       # seg_slot twice (Python concatenates)
    ]
    for r in raw:
        why, left, replies = serve(loop, [ok, r, ok])
        assert why == FRAME and left == r + ok            # the step before it answered, it left whole
        assert [rep.seq for rep in replies] == [1]
    # a frame cut short waits for its bytes: idle, nothing taken
    why, left, replies = serve(loop, [ok, ok[:9]], close=False)
    assert why == IDLE and left == ok[:9] and [rep.seq for rep in replies] == [1]
    # a frame larger than the buffer: back to Python, which grows it
    why, left, replies = serve(loop, [ok], buf_size=len(ok) - 1)
    assert why == FULL and left == ok[:-1] and replies == []
