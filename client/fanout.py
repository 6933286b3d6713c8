"""A layer step out to every worker and their partial sums back, compiled: the client's side of
the step channel (worker/steploop.py is the worker's).

Model.gather sends each block's activations to the remote nodes, computes its own share while
they work, then collects. Through RemoteNode.start / wait that is Python per node and step: a
StepRequest built and serialized, a send; a FrameReader's recv, a StepReply parsed, its y decoded
into an array, the arrays summed. Here it is two compiled calls per step, whatever the node
count (measured on one socket pair, a TinyLlama step: sending 7.8 -> 6.2 us, 2.4 of them
quantizing x; reading a reply already there 22.3 -> 13.8 us; on loopback most of what is left
is the TCP system calls, so the gain is small: 1.006x and 1.015x the Python steps in two
bench.cluster runs):

- `send`: the request's fields after seq (op, layer, pos or the segments, tokens, x) written once,
  the same bytes protobuf writes, and sent to each node behind its own length and seq;
- `wait`: every node's socket polled at once (spinning, then blocking up to each node's
  deadline), each StepReply parsed as it completes (fields seq, y and compute_us, nothing else)
  and its partial sum added from the wire (q8_0, f32 or f64) into one float64 [T, D] sum.

Anything else a node sends (an error reply, a field not listed, a frame larger than the buffer,
a closed or broken socket) goes back to Python with its bytes: they are put in that node's
FrameReader and RemoteNode.wait reads the reply as it always has (raising what it raises), and
then the others are collected. A node past its deadline: NodeLost, as RemoteNode._reply says.

`Fanout.of` takes nodes whose step channel is a plain socket (not TLS), whose session is open and
greeted, with one activations wire for all and partial sums in q8_0, f32 or f64; the logits
step (once a token, rows differing per node) stays with RemoteNode.start / wait.
"""
from __future__ import annotations

import numpy as np
from numba import njit

from client import kernels
from client.cluster import Call, NodeLost, RemoteNode
from proto import tensorlan_pb2 as pb
from proto.wire import encode
from proto.native import POLLIN, c_recv, get_len, now_us, poll_until, put_len, put_varint, send_all, varint
from quant.q8_0 import quantize_bytes

DONE, FRAME, FULL, CLOSED, BROKEN, LATE, INTR = 0, 1, 2, 3, 4, 5, 6   # what _wait returned (for node i)
OPS = {"attention": pb.ATTENTION, "ffn": pb.FFN}
HEAD = 16                          # room before the body for a frame's length and seq
NO_SEGS = np.zeros((3, 0), np.int64)

_JIT = dict(cache=True, nogil=True)


@njit(**_JIT)
def _put_packed(buf, e, key, vals):
    # a packed repeated uint32 field at buf[e:] -> the index after it
    n = 0
    for v in vals:
        n += 1 if v < 0x80 else (2 if v < 0x4000 else (3 if v < 0x200000 else (4 if v < 0x10000000 else 5)))
    buf[e] = key
    e = put_varint(buf, e + 1, n)
    for v in vals:
        e = put_varint(buf, e, v)
    return e


@njit(**_JIT)
def _send(fds, seqs, limits, sent, t_sent, deadlines, pending, got, buf, op, layer, pos, T, x, segs):
    # one StepRequest to each node: buf[HEAD:e] its fields after seq (in protobuf's order; zero
    # scalars left out as proto3 does), then per node its next seq and the length written just
    # before them; its reply is due limits[i] us after. -> the index of a node whose socket
    # failed, or -1
    e = HEAD
    buf[e] = 0x10
    e = put_varint(buf, e + 1, op)
    if layer:
        buf[e] = 0x18
        e = put_varint(buf, e + 1, layer)
    if pos:
        buf[e] = 0x20
        e = put_varint(buf, e + 1, pos)
    buf[e] = 0x28
    e = put_varint(buf, e + 1, T)
    buf[e] = 0x32
    e = put_varint(buf, e + 1, len(x))
    buf[e:e + len(x)] = x
    e += len(x)
    if segs.shape[1]:
        e = _put_packed(buf, e, 0x6A, segs[0])   # seg_slot = 13
        e = _put_packed(buf, e, 0x72, segs[1])   # seg_pos = 14
        e = _put_packed(buf, e, 0x7A, segs[2])   # seg_len = 15
    ts = np.zeros(2, np.int64)
    head = np.empty(HEAD, np.uint8)
    for i in range(len(fds)):
        seqs[i] += np.uint64(1)
        h = put_varint(head, 1, seqs[i])         # 0x08 seq
        s = HEAD - h - 4
        buf[s + 4] = 0x08
        buf[s + 5:HEAD] = head[1:h]
        put_len(buf, s, e - s - 4)
        t_sent[i] = now_us(ts)
        deadlines[i] = t_sent[i] + limits[i]
        pending[i] = True
        got[i, :] = 0
        if not send_all(fds[i], buf[s:e], e - s):
            return i
        sent[i] = e - s
    return -1


@njit(**_JIT)
def _parse(buf, n, seq, T, D, out, acc):
    # the StepReply buf[4:4 + n]: seq, y of [T, D] in wire `out` and compute_us only -> its
    # compute_us, y added into acc; -1 for anything else (Python reads it)
    i, end = 4, 4 + n
    yo, us, got = -1, np.uint64(0), np.uint64(0)
    while i < end:
        key, i = varint(buf, i, end)
        if i < 0:
            return -1
        if key == 0x08 or key == 0x18:
            v, i = varint(buf, i, end)
            if i < 0:
                return -1
            if key == 0x08:
                got = v
            else:
                us = v
        elif key == 0x12:
            ln, i = varint(buf, i, end)
            if i < 0 or ln > np.uint64(end - i) or np.int64(ln) != kernels.wire_nbytes(T, D, out):
                return -1
            yo, i = i, i + np.int64(ln)
        else:
            return -1
    if yo < 0 or got != seq:
        return -1
    kernels.add_from_wire(buf[yo:yo + kernels.wire_nbytes(T, D, out)], T, D, out, acc)
    return np.int64(us)


@njit(**_JIT)
def _wait(fds, bufs, ends, pending, seqs, deadlines, spin_us, T, D, outs, acc, got):
    # every pending node's reply, summed into acc; got[i] = (bytes, compute_us, µs at arrival)
    # -> (DONE, -1), or (why, i) for node i, whose bytes are bufs[i, :ends[i]]
    ts = np.zeros(2, np.int64)
    pfd = np.zeros((len(fds), 2), np.int32)
    idx = np.zeros(len(fds), np.int64)
    cap = bufs.shape[1]
    t_spin = now_us(ts) + spin_us
    while True:
        m = 0
        for i in range(len(fds)):
            if not pending[i]:
                continue
            if ends[i] >= 4:                     # a whole frame held? parse it
                n = get_len(bufs[i], 0)
                if n + 4 > cap:
                    return FULL, i
                if ends[i] >= n + 4:
                    if ends[i] > n + 4:          # more than one reply: not a step's
                        return FRAME, i
                    us = _parse(bufs[i], n, seqs[i], T, D, outs[i], acc)
                    if us < 0:
                        return FRAME, i
                    got[i, 0], got[i, 1], got[i, 2] = n + 4, us, now_us(ts)
                    pending[i], ends[i] = False, 0
                    continue
            pfd[m, 0], pfd[m, 1], idx[m] = fds[i], POLLIN, i
            m += 1
        if m == 0:
            return DONE, -1
        # wait for bytes: spinning until t_spin, then blocking until the first deadline of the
        # nodes waited on
        first = deadlines[idx[0]]
        for k in range(m):
            first = min(first, deadlines[idx[k]])
        r = poll_until(pfd, m, t_spin, first, ts)
        if r == 0:
            for k in range(m):
                if now_us(ts) >= deadlines[idx[k]]:
                    return LATE, idx[k]
            continue
        if r < 0:
            return INTR, -1                      # a signal: Python runs its handler (Ctrl-C), then waits on
        for k in range(m):
            if pfd[k, 1] >> 16:                  # revents (the high half of the 32-bit word)
                i = idx[k]
                got_n = c_recv(fds[i], bufs[i].ctypes.data + ends[i], cap - ends[i], 0)
                if got_n == 0:
                    return CLOSED, i
                if got_n < 0:
                    return BROKEN, i
                ends[i] += got_n


class Fanout:
    """The compiled step for a set of remote nodes (see the module docstring). Built by the model
    after each plan; `of` returns None where it does not apply."""

    def __init__(self, nodes: list[RemoteNode]):
        self.nodes = nodes
        self.fds = np.array([n.sock.fileno() for n in nodes], np.int32)
        self.outs = np.array([kernels.WIRE_OUT[n.wire] for n in nodes], np.int64)
        self.x_wire, self.spin_us = nodes[0].x_wire, int(nodes[0].frames.spin * 1e6)
        N = len(nodes)
        # per node: the last seq sent (a count of its own from the node's: replies carry it
        # back), the request's bytes, when it went and when its reply is due (monotonic us), how
        # long it may take (us, for T rows), whether it is awaited, bytes / compute_us / arrival
        self.seqs = np.array([n.seq for n in nodes], np.uint64)
        self.sent, self.t_sent, self.deadlines = (np.zeros(N, np.int64) for _ in range(3))
        self.limits, self.T = np.zeros(N, np.int64), 0
        self.pending, self.got = np.zeros(N, np.bool_), np.zeros((N, 3), np.int64)
        self.ends = np.zeros(N, np.int64)        # bytes held per node in bufs
        self.out = np.zeros(HEAD + 4096, np.uint8)  # the request frame
        self.bufs = np.zeros((N, 4096), np.uint8)
        self.step = None
        self.usable = True

    def _rows(self, T: int, D: int) -> None:
        """Deadlines and reply buffers for steps of T rows."""
        self.limits[:] = [int(n.deadline(T) * 1e6) for n in self.nodes]
        cap = kernels.wire_nbytes(T, D, kernels.OUT_F64) + 64
        if cap > self.bufs.shape[1]:
            self.bufs = np.zeros((len(self.nodes), cap), np.uint8)
        self.T = T

    @staticmethod
    def of(nodes: list) -> Fanout | None:
        if not nodes or len({n.x_wire for n in nodes}) > 1:
            return None
        for n in nodes:
            if (n.tls or n.sock is None or n._greet or n.wire not in kernels.WIRE_OUT
                    or n.frames.end != n.frames.start):
                return None
        return Fanout(nodes)

    def send(self, op: str, layer: int, x: np.ndarray, segs) -> None:
        """Step (op, layer) to every node: x [T, D] whose rows segs [(slot, p0, n)] place, as
        RemoteNode.start sends it (x on the nodes' activations wire)."""
        T, D = x.shape
        payload = (quantize_bytes(x) if self.x_wire == "q8_0"
                   else np.frombuffer(encode(x, self.x_wire), np.uint8))
        if len(segs) == 1 and segs[0][0] == 0:
            pos, seg = segs[0][1], NO_SEGS
        else:
            pos, seg = 0, np.array(segs, np.int64).T.copy()
        if T != self.T:
            self._rows(T, D)
        need = HEAD + 64 + payload.nbytes + 15 * seg.shape[1]   # (a packed segment: 3 varints of <= 5)
        if need > len(self.out):
            self.out = np.zeros(2 * need, np.uint8)
        self.step = (op, layer, T, D)
        bad = _send(self.fds, self.seqs, self.limits, self.sent, self.t_sent, self.deadlines, self.pending,
                    self.got, self.out, OPS[op], layer, pos, T, payload, seg)
        if bad >= 0:
            raise NodeLost(self.nodes[bad], "send: the step channel failed")

    def wait(self) -> np.ndarray:
        """The nodes' partial sums for the step sent, added: [T, D] float64."""
        op, layer, T, D = self.step
        acc = np.zeros((T, D))
        while True:
            why, i = _wait(self.fds, self.bufs, self.ends, self.pending, self.seqs, self.deadlines,
                           self.spin_us, T, D, self.outs, acc, self.got)
            if why == DONE:
                break
            if why == INTR:
                continue
            n = self.nodes[i]
            if why == LATE:
                raise NodeLost(n, f"no reply within {self.limits[i] / 1e6:.1f} s")
            acc += n.wait_handed(self.bufs[i, :self.ends[i]].tobytes(), op, layer, (T, D), int(self.sent[i]),
                                 self.t_sent[i] / 1e6)
            self.ends[i], self.pending[i] = 0, False
            self.usable = n.frames.end == n.frames.start  # (more than a reply held: Python's from now)
        for i, n in enumerate(self.nodes):
            if self.got[i, 0]:
                n.calls.append(Call(n.token, layer, op, D, int(self.sent[i]), int(self.got[i, 0]),
                                    int(self.got[i, 1]), int(self.got[i, 2] - self.t_sent[i])))
        return acc
