"""The step channel's hot loop, compiled: a session's attention and FFN steps without Python.

Worker.serve_session hands the connection's socket and its read buffer to `Loop.run` while it
holds the session. The compiled loop waits for bytes (poll, then recv) and takes every frame
that is a plain step: a StepRequest of fields seq, op (ATTENTION or FFN), layer, pos, tokens, x
and the segments only, whose x is q8_0 bytes of the right size, within the session's caches and
the worker's reply limit. It runs it through the same compiled block as SliceSet.run_wire
(kernels.attention_step_wire / ffn_step_wire) and sends the StepReply (seq, y, compute_us) that
Worker.handle would have sent. It returns to Python for anything else, with that frame still
buffered: any other frame (OPEN, LOGITS, PING, a token, x not finite, a malformed one: Python
parses it and answers as always), an idle socket (IDLE_MS without a byte: Python then blocks in
recv without holding the session, so that it can expire), a closed socket, or a frame larger
than the buffer. Its libc calls and varints: proto/native.py.

Measured on four 0.25-core hosts, 1,801 steps each: a session's CPU 0.91 s with the step path in
Python (FrameReader, parse, Worker.handle / step, SliceSet.run_wire, frame, send_frame), 0.54-0.63
s with this loop, ~505 -> ~300-345 us a step. That part is what every host pays whatever its
share, so it is what held four hosts back against one (README, "An emulated LAN").

The parser reads only within the frame: every varint and length is checked against its end
before use; whatever it does not recognise goes to Python, which holds the protocol's rules.
"""
from __future__ import annotations

import numpy as np
from numba import njit
from numba.typed import List

from client import kernels
from proto import tensorlan_pb2 as pb
from proto.native import (POLLIN, c_recv, get_len, now_us, poll_until, put_len, put_varint, send_all,
                          thread_cpu_us, varint)
from quant import q8_0

IDLE_MS = 50                      # no byte for this long: back to Python, which blocks
FRAME, IDLE, CLOSED, BROKEN, FULL = 0, 1, 2, 3, 4   # why run() returned
ATTENTION, FFN = pb.ATTENTION, pb.FFN

_JIT = dict(cache=True, nogil=True)


@njit(**_JIT)
def _step(fd, buf, p, n, ts, stats, count_cpu, D, ctx, slots, max_reply, out,
          wqkv_q, wqkv_d, wo_q, wo_d, kv_of_q, cache_k, cache_v, cos, sin, nq,
          wgu_q, wgu_d, wdown_q, wdown_d, nu):
    # the frame buf[p:p + n]: a plain step -> run, reply, 1; anything else -> 0 (Python's);
    # a reply that could not be sent -> -1. count_cpu: add this thread's CPU in the kernels to
    # stats[2] (two clock_gettime calls, ~0.5 us each: only where it is used, see
    # Worker.note_step_cpu)
    seq = np.uint64(0)
    op = layer = pos = T = np.uint64(0)
    xo, xl = -1, 0
    segs = [np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0, np.int64)]  # slot, pos, len
    seen = np.zeros(3, np.bool_)
    i, end = p, p + n
    while i < end:
        key, i = varint(buf, i, end)
        if i < 0:
            return 0
        f, wt = key >> np.uint64(3), key & np.uint64(7)
        if wt == 0:
            v, i = varint(buf, i, end)
            if i < 0:
                return 0
            if f == 1:
                seq = v
            elif f >= 2 and f <= 5 and v < np.uint64(1 << 31):
                if f == 2:
                    op = v
                elif f == 3:
                    layer = v
                elif f == 4:
                    pos = v
                else:
                    T = v
            else:
                return 0
        elif wt == 2 and f == 6:
            ln, i = varint(buf, i, end)
            if i < 0 or ln > np.uint64(end - i):  # (end > i here)
                return 0
            xo, xl, i = i, np.int64(ln), i + np.int64(ln)
        elif wt == 2 and f >= 13 and f <= 15:      # seg_slot, seg_pos, seg_len: packed, once each
            ln, i = varint(buf, i, end)
            k = np.int64(f) - 13
            if i < 0 or ln > np.uint64(end - i) or seen[k]:
                return 0
            stop = i + np.int64(ln)
            vals = np.empty(np.int64(ln), np.int64)
            c = 0
            while i < stop:
                v, i = varint(buf, i, stop)
                if i < 0 or v >= np.uint64(1 << 31):
                    return 0
                vals[c] = np.int64(v)
                c += 1
            segs[k], seen[k] = vals[:c], True
        else:
            return 0
    L = len(wqkv_q)
    T_, layer_ = np.int64(T), np.int64(layer)
    if (xo < 0 or T_ == 0 or layer_ >= L or (op != ATTENTION and op != FFN)
            or T_ * D * 8 > max_reply or xl != kernels.wire_nbytes(T_, D, kernels.OUT_Q8)):
        return 0
    # the rows' cache slots and positions, checked as Worker.segments does (attention only)
    posa, slot = np.empty(T_, np.int64), np.zeros(T_, np.int64)
    nseg = len(segs[0])
    if op == ATTENTION and (nseg or len(segs[1]) or len(segs[2])):
        if len(segs[1]) != nseg or len(segs[2]) != nseg:
            return 0
        r = 0
        for k in range(nseg):
            b, p0, m = segs[0][k], segs[1][k], segs[2][k]
            if b >= slots or m == 0 or p0 + m > ctx or r + m > T_:
                return 0
            for t in range(m):
                posa[r], slot[r] = p0 + t, b
                r += 1
        if r != T_:
            return 0
    elif op == ATTENTION:
        if np.int64(pos) + T_ > ctx:
            return 0
        for t in range(T_):
            posa[t] = np.int64(pos) + t
    t0, c0 = now_us(ts), thread_cpu_us(ts) if count_cpu else 0
    ny = kernels.wire_nbytes(T_, D, out)
    rb = np.empty(ny + 48, np.uint8)          # the reply frame: length, seq, y, compute_us
    y0 = 4 + 1 + 10 + 1 + 5                    # room for the header fields before y
    yb = rb[y0:y0 + ny]
    xb = buf[xo:xo + xl]
    if op == ATTENTION:
        l = layer_
        ok = kernels.attention_step_wire(xb, T_, wqkv_q[l], wqkv_d[l], nq[l, 1], wo_q[l], wo_d[l], D, posa,
                                         slot, cos, sin, cache_k[l], cache_v[l], kv_of_q[l], nq[l, 0], yb, out)
    else:
        l = layer_
        ok = kernels.ffn_step_wire(xb, T_, wgu_q[l], wgu_d[l], nu[l], wdown_q[l], wdown_d[l], D, yb, out)
    if not ok:
        return 0                               # x not finite: nothing computed; Python says so
    us, cpu = now_us(ts) - t0, thread_cpu_us(ts) - c0 if count_cpu else 0
    # header written backwards from y: 0x08 seq, 0x12 len(y); then 0x18 compute_us after y
    hdr = np.empty(20, np.uint8)
    h = 0
    hdr[h] = 0x08
    h = put_varint(hdr, h + 1, seq)
    hdr[h] = 0x12
    h = put_varint(hdr, h + 1, ny)
    start = y0 - h
    rb[start:y0] = hdr[:h]
    e = y0 + ny
    rb[e] = 0x18
    e = put_varint(rb, e + 1, us)
    body = e - start
    s4 = start - 4
    put_len(rb, s4, body)
    if not send_all(fd, rb[s4:e], e - s4):
        return -1
    stats[0] += 1
    stats[1] += us
    stats[2] += cpu
    return 1


@njit(**_JIT)
def _run(fd, buf, start, end, spin_us, max_frame, stats, D, ctx, slots, max_reply, out,
         wqkv_q, wqkv_d, wo_q, wo_d, kv_of_q, cache_k, cache_v, cos, sin, nq,
         wgu_q, wgu_d, wdown_q, wdown_d, nu):
    # -> (why, start, end): buf[start:end] the bytes received and not yet taken
    ts = np.zeros(2, np.int64)
    pfd = np.zeros(2, np.int32)
    while True:
        need = 4
        if end - start >= 4:
            n = get_len(buf, start)
            if n > max_frame:
                return FRAME, start, end
            need = 4 + n
            if end - start >= need:
                r = _step(fd, buf, start + 4, n, ts, stats, spin_us == 0, D, ctx, slots, max_reply, out, wqkv_q,
                          wqkv_d, wo_q, wo_d, kv_of_q, cache_k, cache_v, cos, sin, nq, wgu_q, wgu_d, wdown_q,
                          wdown_d, nu)
                if r == 0:
                    return FRAME, start, end
                if r < 0:
                    return BROKEN, start, end
                start += need
                if start == end:
                    start = end = 0
                continue
        if start + need > len(buf):            # no room after the held bytes
            if need > len(buf):
                return FULL, start, end
            held = end - start
            buf[:held] = buf[start:end].copy()
            start, end = 0, held
        # wait for bytes: poll without blocking for spin_us (giving the core away meanwhile),
        # then block up to IDLE_MS
        pfd[0] = fd
        pfd[1] = POLLIN
        t = now_us(ts)
        r = poll_until(pfd, 1, t + spin_us, t + spin_us + IDLE_MS * 1000, ts)
        if r <= 0:
            return IDLE, start, end            # (or EINTR: Python's recv will tell)
        k = c_recv(fd, buf.ctypes.data + end, len(buf) - end, 0)
        if k == 0:
            return CLOSED, start, end
        if k < 0:
            return IDLE, start, end            # Python's recv reports the error
        end += k


class Loop:
    """A session's slices as the compiled loop takes them, or None from `of` where it does not
    apply (weights not in VNNI tiles, activations not on the q8_0 wire, bf16 partial sums, a
    layer without this node's slice). A step without segments is slot 0's, as Worker.segments
    reads it; a batch's steps carry segments (packed, as protobuf writes them), checked the same
    way."""

    def __init__(self, slices, wire: str, max_message: int):
        a0 = slices.attn[0]
        self.D, self.ctx, self.slots = slices.classifier.shape[1], a0.cache_v.shape[2], a0.cache_v.shape[0]
        self.out = kernels.WIRE_OUT[wire]
        self.max_message, self.max_reply = max_message, max_message - 64
        self.stats = np.zeros(3, np.int64)    # steps, compute us, this thread's CPU us in them (not spinning)
        A, F = slices.attn, slices.ffn  # per layer, as typed lists (the caches: the session's own)
        self.args = (List([a.wqkv.q for a in A]), List([a.wqkv.d for a in A]), List([a.wo.q for a in A]),
                     List([a.wo.d for a in A]), List([a.kv_of_q for a in A]), List([a.cache_k for a in A]),
                     List([a.cache_v for a in A]), slices.rope[0], slices.rope[1],
                     np.array([[a.heads[1] - a.heads[0], a.wqkv.rows] for a in A], np.int64),
                     List([f.wgu.q for f in F]), List([f.wgu.d for f in F]), List([f.wdown.q for f in F]),
                     List([f.wdown.d for f in F]), np.array([f.units[1] - f.units[0] for f in F], np.int64))

    @staticmethod
    def of(slices, x_wire: str, wire: str, max_message: int) -> Loop | None:
        if x_wire != "q8_0" or wire not in kernels.WIRE_OUT or not q8_0.VNNI:
            return None
        if any(a is None for a in slices.attn) or any(f is None for f in slices.ffn):
            return None
        if not all(isinstance(w, q8_0.Q8Tiles) for a, f in zip(slices.attn, slices.ffn)
                   for w in (a.wqkv, a.wo, f.wgu, f.wdown)):
            return None
        return Loop(slices, wire, max_message)

    def run(self, fd: int, buf: np.ndarray, start: int, end: int, spin: float) -> tuple[int, int, int]:
        """Serve plain steps from fd until something needs Python -> (why, start, end)."""
        why, start, end = _run(fd, buf, start, end, int(spin * 1e6), self.max_message, self.stats, self.D,
                               self.ctx, self.slots, self.max_reply, self.out, *self.args)
        return why, start, end

    def take_stats(self) -> tuple[int, int, int]:
        steps, us, cpu = (int(v) for v in self.stats)
        self.stats[:] = 0
        return steps, us, cpu
