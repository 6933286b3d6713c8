"""What crosses the network, besides the generated messages: the step channel's frames and the
packing of slice tensors for an upload."""
from __future__ import annotations

import hashlib
import socket
import struct
import time

import numpy as np

from proto import tensorlan_pb2 as pb
from quant.q8_0 import Q8Tensor, padded

PROTOCOL_VERSION = 2
MAX_FRAME = 256 << 20
_LEN = struct.Struct("<I")


class WireError(Exception):
    pass


def send_frame(sock: socket.socket, msg) -> int:
    data = msg.SerializeToString()
    sock.sendall(_LEN.pack(len(data)) + data)
    return len(data) + 4


class FrameReader:
    """Reads length-prefixed messages from a socket, polling it for up to `spin` seconds before
    blocking. Measured here: a blocking read that waits across a 1.5 ms compute gap adds ~146 us
    (the idle core's wake-up), polling ~29 us; a layer step waits about that long on every round
    trip. Past `spin` it blocks, so an idle node does not burn its CPU."""

    def __init__(self, sock: socket.socket, spin: float = 0.005):
        self.sock, self.spin = sock, spin

    def _read(self, n: int) -> bytes | None:
        buf = bytearray(n)
        view, got, t0 = memoryview(buf), 0, time.perf_counter()
        while got < n:
            try:
                k = self.sock.recv_into(view[got:], n - got, socket.MSG_DONTWAIT)
            except BlockingIOError:
                if time.perf_counter() - t0 < self.spin:
                    continue
                k = self.sock.recv_into(view[got:], n - got)
            if k == 0:
                if got == 0:
                    return None
                raise WireError("connection closed mid-frame")
            got += k
        return bytes(buf)

    def read(self, cls):
        """One message, or (None, 0) at a clean end of stream."""
        head = self._read(4)
        if head is None:
            return None, 0
        (n,) = _LEN.unpack(head)
        if n > MAX_FRAME:
            raise WireError(f"frame of {n} bytes exceeds the limit of {MAX_FRAME}")
        data = self._read(n) if n else b""
        if data is None:
            raise WireError("truncated frame")
        msg = cls()
        try:
            msg.ParseFromString(data)
        except Exception as e:  # protobuf's DecodeError
            raise WireError(f"malformed message: {e}")
        return msg, n + 4


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
    if dtype == "q8_0":
        return rows * padded(cols) + rows * padded(cols) // 32 * 2
    return rows * cols * 4


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


# activations go out as float32 [T, D]; partial sums come back float64 (exact-ish, so the sum
# does not depend on the slicing), logits float32
REPLY_DTYPE = {"attention": np.float64, "ffn": np.float64, "logits": np.float32}


def to_bytes(a: np.ndarray, dtype=np.float32) -> bytes:
    return np.ascontiguousarray(a, dtype).tobytes()


def from_bytes(b: bytes, rows: int, dtype=np.float32) -> np.ndarray:
    if len(b) % np.dtype(dtype).itemsize:
        raise WireError(f"{len(b)} bytes is not a whole number of {np.dtype(dtype).name}")
    a = np.frombuffer(b, dtype)
    if rows <= 0 or a.size % rows:
        raise WireError(f"{a.size} floats do not split into {rows} rows")
    return a.reshape(rows, -1)
