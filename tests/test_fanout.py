"""The client's compiled fan-out (client/fanout.py) over socket pairs: the requests it sends are
the bytes RemoteNode.start sends, the partial sums it reads are the sum of what RemoteNode.wait
decodes, and every reply it does not take reaches RemoteNode's Python with its bytes."""
import socket

import numpy as np
import pytest

from client.cluster import NodeLost, RemoteNode
from client.errors import UserError
from client.fanout import Fanout
from proto import tensorlan_pb2 as pb
from proto.wire import FrameReader, decode, encode, frame

D = 100  # not a multiple of 32: q8_0 rows carry padded blocks


def node(wire: str, x_wire: str = "q8_0"):
    """A RemoteNode whose step channel is one end of a socket pair -> (node, the other end)."""
    a, b = socket.socketpair()
    n = RemoteNode("127.0.0.1:1")
    n.sock, n.frames, n.wire, n.x_wire = a, FrameReader(a), wire, x_wire
    n.step_timeout = 5.0
    return n, b


def read_frames(sock, count):
    r = FrameReader(sock, spin=0.0)
    return [r.read_raw() for _ in range(count)]


@pytest.mark.parametrize("x_wire", ["q8_0", "f32"])
def test_requests_are_the_bytes_python_sends(x_wire):
    rng = np.random.default_rng(1)
    fn, fo = zip(*(node("f32", x_wire) for _ in range(3)))
    pn, po = zip(*(node("f32", x_wire) for _ in range(3)))
    fan = Fanout.of(list(fn))
    for k, (n, m) in enumerate(zip(fn, pn)):
        n.seq = m.seq = [0, 126, 70000][k]      # seq varints of 1, 2 and 3 bytes
    fan = Fanout.of(list(fn))                   # (which counts on from the nodes' seq)
    cases = [("attention", 0, [(0, 0, 1)]), ("ffn", 3, [(0, 300, 1)]), ("attention", 21, [(0, 0, 5)]),
             ("attention", 2, [(1, 7, 2), (0, 200, 1), (3, 0, 1)]), ("ffn", 1, [(0, 5, 1), (1, 0, 1)]),
             ("ffn", 0, [(2, 100000, 1)])]
    for op, layer, segs in cases:
        x = rng.standard_normal((sum(s[2] for s in segs), D)).astype(np.float32)
        fan.send(op, layer, x, segs)
        for m in pn:
            m.start(op, layer, x, segs, encode(x, x_wire))
        for a, b, m in zip(fo, po, pn):
            got, want = read_frames(a, 1)[0], read_frames(b, 1)[0]
            assert got == want, (op, layer, segs)
            assert pb.StepRequest.FromString(got).seq == m.seq


def reply(seq, y, wire, **extra):
    return frame(pb.StepReply(seq=seq, y=encode(y, wire), compute_us=1234 + seq, **extra))


def request_seqs(others):
    """The seq of the request each node's far end received."""
    return [pb.StepRequest.FromString(read_frames(o, 1)[0]).seq for o in others]


@pytest.mark.parametrize("wire", ["q8_0", "f32", "f64"])
def test_partial_sums_are_the_sum_of_the_decoded_replies(wire):
    rng = np.random.default_rng(2)
    nodes, others = zip(*(node(wire) for _ in range(3)))
    fan = Fanout.of(list(nodes))
    for T in (1, 4, 1):
        x = rng.standard_normal((T, D)).astype(np.float32)
        fan.send("ffn", 5, x, [(0, 10, T)])
        requests = [read_frames(o, 1)[0] for o in others]
        seqs = [pb.StepRequest.FromString(r).seq for r in requests]
        ys = [rng.standard_normal((T, D)) * 3 for _ in nodes]
        want = np.zeros((T, D))
        for o, seq, y in zip(others, seqs, ys):
            o.sendall(reply(seq, y, wire))
            want += decode(encode(y, wire), T, D, wire).astype(np.float64)  # as RemoteNode.wait reads it
        got = fan.wait()
        assert got.dtype == np.float64 and got.shape == (T, D)
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
        for n, seq, y, r in zip(nodes, seqs, ys, requests):
            c = n.calls[-1]
            assert (c.layer, c.op, c.rows, c.sent) == (5, "ffn", D, len(r) + 4)
            assert c.compute_us == 1234 + seq and c.received == len(reply(seq, y, wire))


def test_replies_it_does_not_take_reach_python(monkeypatch):
    rng = np.random.default_rng(3)
    nodes, others = zip(*(node("f32") for _ in range(3)))
    handed = []
    hand = FrameReader.hand
    monkeypatch.setattr(FrameReader, "hand", lambda self, data: (handed.append(self), hand(self, data)))
    fan = Fanout.of(list(nodes))
    x = rng.standard_normal((2, D)).astype(np.float32)
    ys = [rng.standard_normal((2, D)) for _ in nodes]
    want = sum(decode(encode(y, "f32"), 2, D, "f32").astype(np.float64) for y in ys)

    def step(replies):
        """One step whose replies are replies(the requests' seqs)."""
        fan.send("attention", 1, x, [(0, 0, 2)])
        for o, r in zip(others, replies(request_seqs(others))):
            o.sendall(r)
        return fan.wait()

    def odd(seqs):
        # fields in another order (taken), then a field this parser does not know (field 9,
        # which protobuf keeps as unknown) and a wrong seq (RemoteNode.wait does not check it):
        # Python's
        reordered = (pb.StepReply(compute_us=5, y=encode(ys[0], "f32")).SerializeToString()
                     + pb.StepReply(seq=seqs[0]).SerializeToString())
        unknown = pb.StepReply(seq=seqs[1], y=encode(ys[1], "f32")).SerializeToString() + b"\x48\x01"
        return [len(b).to_bytes(4, "little") + b for b in (reordered, unknown)] + [reply(seqs[2] + 1, ys[2], "f32")]

    np.testing.assert_allclose(step(odd), want, rtol=1e-12)
    assert handed == [nodes[1].frames, nodes[2].frames]
    assert fan.usable and [len(n.calls) for n in nodes] == [1, 1, 1]
    # an error reply larger than the fan-out's buffer: Python reads it whole and says what it is
    big = frame(pb.StepReply(seq=1, error_code=3, error="x" * 100_000))
    with pytest.raises(UserError, match="INVALID_ARGUMENT"):
        step(lambda seqs: [reply(seqs[0], ys[0], "f32"), big, reply(seqs[2], ys[2], "f32")])


def test_a_lost_node_is_named():
    nodes, others = zip(*(node("q8_0") for _ in range(2)))
    fan = Fanout.of(list(nodes))
    x = np.ones((1, D), np.float32)
    # closed mid-reply
    fan.send("ffn", 0, x, [(0, 0, 1)])
    seqs = request_seqs(others)
    others[0].sendall(reply(seqs[0], np.ones((1, D)), "q8_0"))
    others[1].sendall(reply(seqs[1], np.ones((1, D)), "q8_0")[:30])
    others[1].close()
    with pytest.raises(NodeLost) as e:
        fan.wait()
    assert e.value.node is nodes[1]
    # no reply by the deadline
    nodes, others = zip(*(node("q8_0") for _ in range(2)))
    nodes[1].step_timeout = 0.3
    fan = Fanout.of(list(nodes))
    fan.send("ffn", 0, x, [(0, 0, 1)])
    seqs = request_seqs(others)
    others[0].sendall(reply(seqs[0], np.ones((1, D)), "q8_0"))
    with pytest.raises(NodeLost, match="no reply within 0.3 s") as e:
        fan.wait()
    assert e.value.node is nodes[1]


def test_where_it_does_not_apply():
    assert Fanout.of([]) is None
    a, _ = node("f32", "q8_0")
    b, _ = node("f32", "f32")
    assert Fanout.of([a, b]) is None          # two activation wires
    c, _ = node("bf16")
    assert Fanout.of([c]) is None             # bf16 partial sums
    d, _ = node("f32")
    d._greet = True
    assert Fanout.of([d]) is None             # the first frame carries the token: Python's
