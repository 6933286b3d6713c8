"""What crosses the network, besides the generated messages: the step channel's frames and the
packing of slice tensors for an upload."""
from __future__ import annotations

import hashlib
import os
import socket
import struct
import time

import numpy as np

from proto import tensorlan_pb2 as pb
from quant.q8_0 import (Q8Tensor, dequantize, finite_scales, from_bf16, nbytes, padded, quantize_bytes,
                        to_bf16)

PROTOCOL_VERSION = 3             # 3: a worker may require a token (HelloReply.sessions, StepRequest.token)
MAX_FRAME = 256 << 20
GROW = 64 << 10                  # a reader's first buffer; it doubles while a larger frame arrives
_LEN = struct.Struct("<I")


class WireError(Exception):
    pass


class FrameTooLarge(WireError):
    """A frame header announcing more than the reader's limit: nothing of it was read."""

    def __init__(self, n: int, limit: int):
        super().__init__(f"frame of {n} bytes exceeds the limit of {limit}")
        self.n, self.limit = n, limit


def frame(msg) -> bytes:
    """A message as the step channel carries it: its length (u32 little-endian), then it."""
    data = msg.SerializeToString()
    return _LEN.pack(len(data)) + data


def send_frame(sock: socket.socket, msg) -> int:
    data = frame(msg)
    sock.sendall(data)
    return len(data)


class FrameReader:
    """Reads length-prefixed messages from a socket, polling it for up to `spin` seconds before
    blocking. Measured here: a blocking read that waits across a 1.5 ms compute gap adds ~146 us
    (the idle core's wake-up), polling ~29 us; a layer step waits about that long on every round
    trip. Past `spin` it blocks, so an idle node does not burn its CPU; while polling it yields
    the core to anything else runnable (several processes on one machine: 4 polling workers on
    2 cores measured 2.2 tok/s). A worker under a CPU quota does not poll at all (server.py), nor
    does a TLS socket (spin=0: an SSL socket takes no MSG_DONTWAIT).

    Bytes arrive into one buffer, as many as the socket holds: a step's frame, header and body,
    usually takes one recv, not two (one system call less per step on each side), and frames
    sent back to back are taken from what is already there. The buffer grows as a frame's bytes
    arrive (doubling from GROW): a header announcing a large frame and then nothing costs
    nothing, however many connections send one."""

    def __init__(self, sock: socket.socket, spin: float = 0.005, max_frame: int = MAX_FRAME):
        self.sock, self.spin, self.max_frame = sock, spin, max_frame
        self.buf = bytearray(GROW)
        self.start = self.end = 0   # the bytes received and not yet returned: buf[start:end]

    def _recv(self, view: memoryview, t0: float) -> int:
        """One recv into `view`, polling until `spin` seconds after t0, then blocking."""
        while self.spin > 0:
            try:
                return self.sock.recv_into(view, len(view), socket.MSG_DONTWAIT)
            except BlockingIOError:
                if time.perf_counter() - t0 >= self.spin:
                    break
                os.sched_yield()  # give the core away if anything else wants it
        return self.sock.recv_into(view, len(view))

    def _fill(self, n: int, t0: float) -> bool:
        """Receive until n bytes are held; False if the peer closed first."""
        while self.end - self.start < n:
            if self.end == len(self.buf):  # no room after the held bytes
                if self.start:             # move them to the front
                    self.buf[:self.end - self.start] = self.buf[self.start:self.end]  # (copied)
                    self.start, self.end = 0, self.end - self.start
                if self.end == len(self.buf):  # still full: grow, doubling, up to n
                    self.buf += bytes(min(n, 2 * len(self.buf)) - len(self.buf))
            k = self._recv(memoryview(self.buf)[self.end:], t0)
            if k == 0:
                return False
            self.end += k
        return True

    def hand(self, data) -> None:
        """Bytes read from the socket by other code (client/fanout.py) into this empty reader, to
        be read as if it had received them."""
        assert self.start == self.end
        if len(data) > len(self.buf):
            self.buf = bytearray(len(data))
        self.buf[:len(data)] = data
        self.start, self.end = 0, len(data)

    def _take(self, n: int) -> bytes:
        data = bytes(memoryview(self.buf)[self.start:self.start + n])  # one copy, not two
        self.start += n
        if self.start == self.end:
            self.start = self.end = 0
        return data

    def read_raw(self) -> bytes | None:
        """One frame's bytes, or None at a clean end of stream."""
        t0 = time.perf_counter()
        if not self._fill(4, t0):
            if self.end > self.start:
                raise WireError("connection closed mid-frame")
            return None
        (n,) = _LEN.unpack_from(self.buf, self.start)
        if n > self.max_frame:
            raise FrameTooLarge(n, self.max_frame)
        if not self._fill(4 + n, t0):
            raise WireError("connection closed mid-frame")
        self.start += 4
        return self._take(n)

    def read(self, cls):
        """One message, or (None, 0) at a clean end of stream."""
        data = self.read_raw()
        if data is None:
            return None, 0
        return parse(cls, data), len(data) + 4


def parse(cls, data: bytes):
    """A protobuf message of class `cls` from bytes; WireError if they are not one."""
    msg = cls()
    try:
        msg.ParseFromString(data)
    except Exception as e:  # protobuf's DecodeError (and, from the C++ parser, others)
        raise WireError(f"malformed {cls.__name__}: {e}")
    return msg


def pack_tensor(name: str, w) -> tuple[pb.TensorInfo, list[memoryview]]:
    """Q8_0: quants then fp16 scales; f32: the array. Returns the tensor's description and its
    bytes (views, not copies)."""
    flat = lambda a: memoryview(np.ascontiguousarray(a).reshape(-1).view(np.uint8))  # noqa: E731
    if isinstance(w, Q8Tensor):
        parts, dtype, shape = [flat(w.q), flat(w.d)], "q8_0", w.shape
    else:
        parts, dtype, shape = [flat(np.asarray(w, np.float32))], "f32", w.shape
    h = hashlib.sha256()
    for p in parts:
        h.update(p)
    info = pb.TensorInfo(name=name, dtype=dtype, shape=list(shape),
                         nbytes=sum(len(p) for p in parts), sha256=h.digest())
    return info, parts


def tensor_nbytes(dtype: str, shape) -> int:
    rows, cols = shape
    return nbytes(rows, cols, "q8_0" if dtype == "q8_0" else "f32")


def unpack_tensor(info: pb.TensorInfo, data, verify: bool = True):
    """The tensor over `data` (no copy), after checking its size and (verify) its sha256."""
    if len(info.shape) != 2:
        raise WireError(f"tensor {info.name}: shape {list(info.shape)} is not 2-D")
    rows, cols = info.shape
    if len(data) != tensor_nbytes(info.dtype, info.shape):
        raise WireError(f"tensor {info.name}: {len(data)} bytes, expected "
                        f"{tensor_nbytes(info.dtype, info.shape)}")
    if verify and hashlib.sha256(data).digest() != info.sha256:
        raise WireError(f"tensor {info.name}: checksum mismatch")
    if info.dtype == "q8_0":
        nq = rows * padded(cols)
        q = np.frombuffer(data, np.int8, nq).reshape(rows, padded(cols))
        d = np.frombuffer(data, np.uint16, offset=nq).reshape(rows, padded(cols) // 32)
        return Q8Tensor(q, d, cols)
    if info.dtype == "f32":
        return np.frombuffer(data, np.float32).reshape(rows, cols)
    raise WireError(f"tensor {info.name}: unknown dtype {info.dtype!r}")


# Activations [T, D] and partial sums [T, D] cross the network in the session's wire format:
#   f64   partial sums exact: the output is the same bit for bit however the model is split
#   f32   (the default) half the bytes of f64 for the partials; a node's partial is rounded once
#   bf16  half again
#   q8_0  blocks of 32 as llama.cpp's Q8_0 (int8 + an fp16 scale): 34 bytes per 32 values, 3.8x
#         smaller than f32, as distributed-llama syncs; activations lose nothing that the VNNI
#         kernel's own Q8_0 rounding of them would not (see quant.q8_0.matvec)
# Requests carry activations in the same format (f32 for f64); logits always travel as f32.
WIRES = ("f64", "f32", "bf16", "q8_0")


def encode(a: np.ndarray, wire: str) -> bytes:
    """[T, n] floats -> bytes in `wire` format."""
    if wire == "q8_0":
        return quantize_bytes(a).tobytes()
    if wire == "bf16":
        return to_bf16(np.ascontiguousarray(a, np.float32)).tobytes()
    return np.ascontiguousarray(a, np.float64 if wire == "f64" else np.float32).tobytes()


def decode_q8(b: bytes, rows: int, cols: int) -> Q8Tensor:
    """q8_0 bytes -> the Q8Tensor [rows, cols] over them (no copy), checking the size."""
    per_row = padded(cols) // 32 * 34
    if rows <= 0 or len(b) != rows * per_row:
        raise WireError(f"{len(b)} bytes for [{rows}, {cols}] in q8_0: expected {rows * per_row}")
    nq = rows * padded(cols)
    return Q8Tensor(np.frombuffer(b, np.int8, nq).reshape(rows, padded(cols)),
                    np.frombuffer(b, np.uint16, offset=nq).reshape(rows, padded(cols) // 32), cols)


def finite(x) -> bool:
    """No NaN or infinity in activations: floats, or a Q8Tensor (its fp16 scales)."""
    if isinstance(x, Q8Tensor):
        return finite_scales(x.d)
    return bool(np.isfinite(x).all())


def decode(b: bytes, rows: int, cols: int, wire: str) -> np.ndarray:
    """bytes -> [rows, cols] float32 (float64 for f64), checking the size."""
    per_row = {"f64": cols * 8, "f32": cols * 4, "bf16": cols * 2,
               "q8_0": padded(cols) // 32 * 34}.get(wire)
    if per_row is None:
        raise WireError(f"unknown wire format {wire!r}; one of {', '.join(WIRES)}")
    if rows <= 0 or len(b) != rows * per_row:
        raise WireError(f"{len(b)} bytes for [{rows}, {cols}] in {wire}: expected {rows * per_row}")
    if wire == "q8_0":
        return dequantize(decode_q8(b, rows, cols))
    if wire == "bf16":
        return from_bf16(np.frombuffer(b, np.uint16).reshape(rows, cols))
    return np.frombuffer(b, np.float64 if wire == "f64" else np.float32).reshape(rows, cols)


def request_wire(wire: str) -> str:
    """Activations going out: f64 partial sums still send f32 activations (the kernels' input)."""
    return "f32" if wire == "f64" else wire
