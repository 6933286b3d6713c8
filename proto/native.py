"""The step channel's frames in compiled code, for both ends (worker/steploop.py, client/fanout.py):
libc's socket calls and clock as Numba external functions, and protobuf's varints.

libc's functions are linked by name like any C symbol, so code that calls them can be cached;
pointers travel as 64-bit integers (the same register on x86-64 and aarch64). Linux: its poll,
recv and send flags."""
from __future__ import annotations

import numpy as np
from numba import njit, types

_i32, _i64, _u64 = types.int32, types.int64, types.uint64
c_recv = types.ExternalFunction("recv", _i64(_i32, _u64, _u64, _i32))
c_send = types.ExternalFunction("send", _i64(_i32, _u64, _u64, _i32))
c_poll = types.ExternalFunction("poll", _i32(_u64, _u64, _i32))
c_clock = types.ExternalFunction("clock_gettime", _i32(_i32, _u64))
c_yield = types.ExternalFunction("sched_yield", _i32())

MSG_NOSIGNAL = 0x4000
CLOCK_MONOTONIC = 1
CLOCK_THREAD_CPUTIME_ID = 3
POLLIN = 1

_JIT = dict(cache=True, nogil=True)


@njit(**_JIT)
def now_us(ts):
    # the monotonic clock in microseconds (ts: int64[2], a timespec to write into)
    c_clock(CLOCK_MONOTONIC, ts.ctypes.data)
    return ts[0] * 1000000 + ts[1] // 1000


@njit(**_JIT)
def thread_cpu_us(ts):
    # the calling thread's CPU time in microseconds (as now_us)
    c_clock(CLOCK_THREAD_CPUTIME_ID, ts.ctypes.data)
    return ts[0] * 1000000 + ts[1] // 1000


@njit(**_JIT)
def poll_until(pfd, m, spin_until, deadline, ts):
    # poll's result for the m pollfds at pfd (int32 [m, 2]: fd, then events | revents << 16):
    # polled without blocking until spin_until (monotonic us), giving the core away between
    # polls, then blocking until deadline (whole ms, rounded up); 0 if nothing came by then
    r = c_poll(pfd.ctypes.data, m, 0)
    while r == 0 and now_us(ts) < spin_until:
        c_yield()
        r = c_poll(pfd.ctypes.data, m, 0)
    if r == 0:
        r = c_poll(pfd.ctypes.data, m, np.int32(min(max(0, (deadline - now_us(ts) + 999) // 1000), 1 << 30)))
    return r


@njit(**_JIT)
def varint(buf, i, end):
    # a protobuf varint at buf[i:end] -> (value, index after it); index -1 if it runs past end
    # or over 10 bytes
    v = np.uint64(0)
    shift = np.uint64(0)
    for k in range(10):
        if i >= end:
            return v, -1
        b = np.uint64(buf[i])
        i += 1
        v |= (b & np.uint64(0x7F)) << shift
        if b < 0x80:
            return v, i
        shift += np.uint64(7)
    return v, -1


@njit(**_JIT)
def put_varint(out, i, v):
    # v as a protobuf varint at out[i:] -> the index after it
    v = np.uint64(v)
    while v >= 0x80:
        out[i] = np.uint8((v & np.uint64(0x7F)) | np.uint64(0x80))
        v >>= np.uint64(7)
        i += 1
    out[i] = np.uint8(v)
    return i + 1


@njit(**_JIT)
def put_len(out, i, n):
    # a frame's length header (u32 little-endian) at out[i:i + 4]
    out[i] = n & 0xFF
    out[i + 1] = (n >> 8) & 0xFF
    out[i + 2] = (n >> 16) & 0xFF
    out[i + 3] = (n >> 24) & 0xFF


@njit(**_JIT)
def get_len(buf, i):
    # the frame length header at buf[i:i + 4]
    return int(buf[i]) | (int(buf[i + 1]) << 8) | (int(buf[i + 2]) << 16) | (int(buf[i + 3]) << 24)


@njit(**_JIT)
def send_all(fd, data, n):
    # data[:n] to fd (blocking; its SO_SNDTIMEO bounds it) -> False if the socket failed
    sent = 0
    while sent < n:
        k = c_send(fd, data.ctypes.data + sent, n - sent, MSG_NOSIGNAL)
        if k <= 0:
            return False
        sent += k
    return True
