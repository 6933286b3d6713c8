"""Q8_0 as llama.cpp defines it, and the Numba kernels that multiply by it.

A Q8_0 matrix W[rows, cols] is cut along each row into blocks of 32 weights. Each block keeps one
fp16 scale d = amax/127 and 32 int8 quants q = round(x/d) (llama.cpp's quantize_row_q8_0_ref:
q = roundf(x * (1/d)), round half away from zero). Rows whose length is not a multiple of 32 are
zero-padded. Quants and scales live in two separate contiguous arrays:

    q: int8   [rows, cols_padded]         d: uint16 [rows, cols_padded // 32]  (fp16 bit patterns)

Kernels (all parallel over output rows, thread count = numba.set_num_threads):
    matvec(W, x)   x [cols]     -> [rows]       one token: memory-bound, streams W once
    matmul(W, X)   X [T, cols]  -> [T, rows]    a batch (decoding sequences, a prompt): on VNNI
                                                CPUs W is read once for all T, each row bit for
                                                bit matvec's; elsewhere small T streams W with four
                                                accumulators, large T dequantizes row tiles into
                                                f32 BLAS (GEMM)

How the dot product is done (measured on this 2-core Zen 4, TinyLlama FFN shape 5632x2048, see
bench/kernels.py): a flat loop over the row reading the block scale per element, acc += q[i] *
ds[i >> 5] * x[i], vectorizes to 16-wide FMAs and streams ~18-20 GB/s on one core and ~28-33 GB/s
on two (the memory bandwidth). The same maths as a loop over blocks with an inner 32-element
reduction ran at 1.2 GB/s, and llama.cpp's way (activations quantized to int8, int8 x int8 dots
per block) at 2.2 GB/s blocked / 6.9 GB/s flat: LLVM does not turn either into VNNI code. So the batch
kernels dequantize-and-FMA. The fp16 scales of a row are converted once into a small f32 buffer
(Numba has no float16 type: an LLVM intrinsic does fpext half->float).

That float loop costs ~20 vector instructions per 64 weights: one core tops out at ~17-20 GB/s,
short of its bandwidth. On CPUs with AVX-512 VNNI every kernel therefore does llama.cpp's
arithmetic, written as LLVM IR in a Numba intrinsic (`_tile16`): the activations are quantized
to Q8_0 once per call, and vpdpbusd (int8 x int8 -> int32) gives exact integer block dots, each
then converted and multiplied-added with the block's two scales. Activations in int8 add ~0.5%
relative error to a product, as in llama.cpp. Sixteen weight rows share a vector, one row per
lane: a node's weights are repacked once (tiles(), Q8Tiles) so that each block of 16 rows is 8
vectors ready to multiply, and each token's activation bytes are broadcast, so a block costs 8
vpdpbusd per token with no horizontal sums, and the block loop runs for 1 to 8 tokens at once
over one read of W. A row's arithmetic is the same whatever it is batched with: continuous
batching changes no sequence's output. Measured with 2 threads on a TinyLlama layer
(bench/kernels.py), before the repacking below: one token as fast as the row-at-a-time kernel
before it (memory-bound), 8 tokens 2.7x faster, a 512-token prompt ~2x faster than f32 SGEMM
(65.7 vs 135 ms on the FFN's gate+up). The packed layout (against
transposing each block in registers) made one token on one core ~15% faster (28 GB/s, the
core's streaming bandwidth) and 8 tokens ~5% faster.
"""
from __future__ import annotations

import mmap
import threading
from dataclasses import dataclass

import numba as nb
import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic
from threadpoolctl import threadpool_limits

QK = 32  # weights per block

_JIT = dict(cache=True, nogil=True)


# ---------------------------------------------------------------------------------------------
# scalar bit conversions (LLVM intrinsics: exact IEEE conversions, vectorizable)
# ---------------------------------------------------------------------------------------------
@intrinsic
def f16_bits_to_f32(typingctx, h):
    """uint16 fp16 bit pattern -> float32 (exact)."""
    sig = types.float32(types.uint16)

    def codegen(context, builder, signature, args):
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())

    return sig, codegen


@intrinsic
def f32_to_f16_bits(typingctx, x):
    """float32 -> fp16 (round to nearest even, as GGML_FP32_TO_FP16) -> uint16 bit pattern."""
    sig = types.uint16(types.float32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(builder.fptrunc(args[0], ir.HalfType()), ir.IntType(16))

    return sig, codegen


@intrinsic
def u32_bits_to_f32(typingctx, u):
    sig = types.float32(types.uint32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return sig, codegen


@intrinsic
def f32_to_u32_bits(typingctx, x):
    sig = types.uint32(types.float32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return sig, codegen


@njit(inline="always")
def bf16_bits_to_f32(b):
    return u32_bits_to_f32(np.uint32(b) << np.uint32(16))


@njit(inline="always")
def f32_to_bf16_bits(x):
    """float32 -> bfloat16, round to nearest even (NaN not special-cased: never in our data)."""
    u = f32_to_u32_bits(x)
    return np.uint16((u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16))


@njit(**_JIT)
def to_bf16(x):
    """float32 array -> bfloat16 bit patterns (uint16), round to nearest even."""
    flat = x.ravel()
    out = np.empty(flat.size, np.uint16)
    for i in range(flat.size):
        out[i] = f32_to_bf16_bits(flat[i])
    return out.reshape(x.shape)


@njit(**_JIT)
def from_bf16(b):
    """bfloat16 bit patterns (uint16) -> float32 (exact)."""
    flat = b.ravel()
    out = np.empty(flat.size, np.float32)
    for i in range(flat.size):
        out[i] = bf16_bits_to_f32(flat[i])
    return out.reshape(b.shape)


# ---------------------------------------------------------------------------------------------
# the tensor
# ---------------------------------------------------------------------------------------------
@dataclass
class Q8Tensor:
    q: np.ndarray  # int8   [rows, cols_padded]
    d: np.ndarray  # uint16 [rows, cols_padded // 32], fp16 bits
    cols: int      # logical number of columns (cols_padded - cols zero columns were added)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.q.shape[0], self.cols)

    @property
    def nbytes(self) -> int:
        return self.q.nbytes + self.d.nbytes

    @property
    def params(self) -> int:
        return self.q.shape[0] * self.cols


def padded(cols: int) -> int:
    return (cols + QK - 1) // QK * QK


def nbytes(rows: int, cols: int, fmt: str = "q8_0", held: bool = False) -> int:
    """Bytes of a [rows, cols] weight as Q8_0 (int8 quants of the padded row, then one fp16
    scale per block of 32) or as f32. held: as this host's kernels hold it (on VNNI CPUs rows
    padded to a multiple of 16, see Q8Tiles), not as uploads and caches carry it."""
    if fmt != "q8_0":
        return rows * cols * 4
    if held and VNNI:
        rows = -(-rows // _GROUP) * _GROUP
    return rows * padded(cols) // QK * (QK + 2)


# ---------------------------------------------------------------------------------------------
# quantize: f32 / f16 / bf16 rows -> Q8_0 (bit-exact with llama.cpp's quantize_row_q8_0_ref)
# ---------------------------------------------------------------------------------------------
SRC_F32, SRC_F16, SRC_BF16 = 0, 1, 2
_SRC_KIND = {np.dtype(np.float32): SRC_F32, np.dtype(np.float16): SRC_F16}


@njit(inline="always")
def _load(src, r, c, kind):
    if kind == SRC_F32:
        return np.float32(src[r, c])
    if kind == SRC_F16:
        return f16_bits_to_f32(np.uint16(src[r, c]))
    return bf16_bits_to_f32(np.uint16(src[r, c]))


@njit(inline="always")  # no fastmath: amax/127 and 1/d must be IEEE-exact
def _scale(amax):
    # a block's largest |x| -> its scale d = amax/127 as fp16 bits, and 1/d (0 for a zero block)
    dd = amax / np.float32(127.0)
    return f32_to_f16_bits(dd), np.float32(1.0) / dd if dd != np.float32(0.0) else np.float32(0.0)


@njit(inline="always")
def _round_away(v):
    # roundf(v), half away from zero, as int32; exact in float32, since a - floor(a) is
    a = abs(v)
    t = np.floor(a)
    k = np.int32(t + (np.float32(1.0) if a - t >= np.float32(0.5) else np.float32(0.0)))
    return k if v >= 0 else -k


@njit(inline="always")
def _quantize_row(src, kind, q, d, r):
    # row r of src -> q[r], d[r]: llama.cpp's quantize_row_q8_0 (x * (1/d), float32, as in C)
    cols = src.shape[1]
    for b in range(q.shape[1] // QK):
        c0 = b * QK
        amax = np.float32(0.0)
        if c0 + QK <= cols:  # a whole block: loops of 32 that LLVM vectorizes (a 4096 x 4096
                             # f16 matrix on one thread: 44 -> 14 ms)
            for c in range(c0, c0 + QK):
                amax = max(amax, abs(_load(src, r, c, kind)))
            d[r, b], idd = _scale(amax)
            for c in range(c0, c0 + QK):
                q[r, c] = np.int8(_round_away(_load(src, r, c, kind) * idd))
            continue
        for c in range(c0, cols):  # the last, partial block: zeros past the last column
            amax = max(amax, abs(_load(src, r, c, kind)))
        d[r, b], idd = _scale(amax)
        for c in range(c0, c0 + QK):
            q[r, c] = np.int8(_round_away(_load(src, r, c, kind) * idd)) if c < cols else 0


@njit(parallel=True, **_JIT)
def _quantize_rows(src, kind, q, d):
    for r in prange(src.shape[0]):
        _quantize_row(src, kind, q, d, r)


@njit(**_JIT)
def _quantize_few(src, kind, q, d):
    # a few rows (activations): a parallel launch would cost more than the work (~3 us)
    for r in range(src.shape[0]):
        _quantize_row(src, kind, q, d, r)


def quantize(w: np.ndarray, src_dtype: str | None = None, out: Q8Tensor | None = None) -> Q8Tensor:
    """Quantize a 2-D array (float32, float16, or bf16 given as uint16 with src_dtype='bf16'),
    into `out` when given (e.g. rows of a bigger preallocated tensor)."""
    if w.ndim != 2:
        raise ValueError(f"Q8_0 quantizes matrices, got shape {w.shape}")
    if src_dtype == "bf16":
        kind, src = SRC_BF16, w.view(np.uint16)
    elif w.dtype == np.float16:
        kind, src = SRC_F16, w.view(np.uint16)
    elif w.dtype == np.float32:
        kind, src = SRC_F32, w
    else:
        kind, src = SRC_F32, w.astype(np.float32)
    rows, cols = w.shape
    if out is None:
        out = empty(rows, cols)
    assert out.q.shape == (rows, padded(cols)) and out.cols == cols
    (_quantize_rows if rows > 16 else _quantize_few)(src, kind, out.q, out.d)
    return out


@njit(inline="always")
def wire_views(buf, T, nblk):
    # the bytes of a Q8Tensor [T, nblk * 32] as the q8_0 wire carries it (uint8) -> its quants
    # [T, nblk * 32] int8, then its fp16 scales [T, nblk] (views)
    nq = T * nblk * QK
    return buf[:nq].view(np.int8).reshape((T, nblk * QK)), buf[nq:].view(np.uint16).reshape((T, nblk))


@njit(**_JIT)
def _pack_activations(X, buf):
    # X [T, C] f32 (or f64, each value rounded to f32) -> buf: the Q8Tensor's bytes (the q8_0
    # wire), written in place (~2 us for a 2048-vector; quantize() and the views around it cost ~6)
    T = X.shape[0]
    q, d = wire_views(buf, T, (X.shape[1] + QK - 1) // QK)
    for t in range(T):
        _quantize_row(X, SRC_F32, q, d, t)


def quantize_bytes(X: np.ndarray) -> np.ndarray:
    """Activations [T, C] -> the bytes (uint8) of their Q8Tensor, quants then scales, as the
    q8_0 wire carries them: the same bits as quantize(X). float64 rows (partial sums) are read
    as they are, each value rounded to float32 on load: the bits of quantize(X.astype(float32))
    without the copy."""
    if X.dtype != np.float64 or not X.flags.c_contiguous:
        X = np.ascontiguousarray(X, np.float32)
    nq = X.shape[0] * padded(X.shape[1])
    buf = np.empty(nq + nq // 16, np.uint8)
    _pack_activations(X, buf)
    return buf


@njit(**_JIT)
def finite_scales(d):
    # no fp16 scale of infinity or NaN (exponent bits all ones): activations given quantized
    for v in d.ravel():
        if (v & 0x7C00) == 0x7C00:
            return False
    return True


def empty(rows: int, cols: int) -> Q8Tensor:
    return Q8Tensor(np.empty((rows, padded(cols)), np.int8),
                    np.empty((rows, padded(cols) // QK), np.uint16), cols)


@njit(inline="always")
def _row_scales(dr, ds):
    # fp16 scales of one row -> f32 buffer. Reading f16 per element inside the hot loop makes LLVM
    # gather halves one by one (4x slower); a converted row of scales vectorizes as d[i >> 5].
    for b in range(dr.shape[0]):
        ds[b] = f16_bits_to_f32(dr[b])


@njit(fastmath=True, **_JIT)
def _dequantize_rows(q, d, out):
    # serial: runs inside one GEMM task per tile
    rows, cols = out.shape
    for r in range(rows):
        ds = np.empty(d.shape[1], np.float32)
        _row_scales(d[r], ds)
        qr = q[r]
        orow = out[r]
        for c in range(cols):
            orow[c] = np.float32(qr[c]) * ds[c >> 5]


def dequantize(w, rows: slice = slice(None), out: np.ndarray | None = None) -> np.ndarray:
    """Q8_0 rows (of a Q8Tensor or Q8Tiles) -> float32 [n, cols] (exact: int8 * fp16 fits f32)."""
    if isinstance(w, Q8Tiles):  # (the embedding lookup of tied weights: rows is the token ids)
        w, rows = untiled(w, np.arange(w.rows)[rows] if isinstance(rows, slice) else rows), slice(None)
    q, d = w.q[rows], w.d[rows]
    if out is None:
        out = np.empty((q.shape[0], w.cols), np.float32)
    _dequantize_rows(q, d, out)
    return out


def row_range(w, r0: int, r1: int):
    """Rows [r0, r1) of a Q8Tensor, or of a Q8Tiles (r0, r1 multiples of 16), as a view."""
    if isinstance(w, Q8Tiles):
        return Q8Tiles(w.q[r0 // _GROUP:r1 // _GROUP], w.d[r0 // _GROUP:r1 // _GROUP], r1 - r0, w.cols)
    return Q8Tensor(w.q[r0:r1], w.d[r0:r1], w.cols)


# ---------------------------------------------------------------------------------------------
# kernels
# ---------------------------------------------------------------------------------------------
_ROWS_PER_TASK = 16  # rows handed to a thread at once: fewer, larger tasks beat one row per task


@njit(parallel=True, fastmath=True, **_JIT)
def _matvec(q, d, x, out, zero):
    # q [R, C] int8, d [R, C/32] fp16 bits, x [C] f32 (zero-padded to C) -> out [R], summed in
    # the type of `zero` (float32, or float64 for results that must not depend on the slicing)
    R, C = q.shape
    nblk = d.shape[1]
    ntask = (R + _ROWS_PER_TASK - 1) // _ROWS_PER_TASK
    for t in prange(ntask):
        ds = np.empty(nblk, np.float32)
        for r in range(t * _ROWS_PER_TASK, min(R, (t + 1) * _ROWS_PER_TASK)):
            _row_scales(d[r], ds)
            qr = q[r]
            acc = zero
            for i in range(C):
                acc += np.float32(qr[i]) * ds[i >> 5] * x[i]
            out[r] = acc


@njit(parallel=True, fastmath=True, **_JIT)
def _matmul4(q, d, X, out, zero):
    # X [4, C] f32 -> out [4, R]: four tokens share one pass over W (four FMAs per dequantized
    # weight). Storing the dequantized row in a buffer instead is 3x slower: LLVM does not
    # vectorize that store loop. Four keeps X (4 x C floats) in L1 for C up to 2048.
    R, C = q.shape
    nblk = d.shape[1]
    x0, x1, x2, x3 = X[0], X[1], X[2], X[3]
    ntask = (R + _ROWS_PER_TASK - 1) // _ROWS_PER_TASK
    for t in prange(ntask):
        ds = np.empty(nblk, np.float32)
        for r in range(t * _ROWS_PER_TASK, min(R, (t + 1) * _ROWS_PER_TASK)):
            _row_scales(d[r], ds)
            qr = q[r]
            a0 = zero
            a1 = zero
            a2 = zero
            a3 = zero
            for i in range(C):
                wi = np.float32(qr[i]) * ds[i >> 5]
                a0 += wi * x0[i]
                a1 += wi * x1[i]
                a2 += wi * x2[i]
                a3 += wi * x3[i]
            out[0, r] = a0
            out[1, r] = a1
            out[2, r] = a2
            out[3, r] = a3


# ---------------------------------------------------------------------------------------------
# AVX-512 VNNI: activations in Q8_0, int8 x int8 block dots, 16 weight rows per vector
# ---------------------------------------------------------------------------------------------
_i32, _f32 = ir.IntType(32), ir.FloatType()
_V16I32, _V16F = ir.VectorType(_i32, 16), ir.VectorType(_f32, 16)
_AHEAD = 64           # vectors (of 64 bytes) read ahead of the one in use: 8 blocks, 4 KB
_GROUP = 16           # weight rows per vector lane set (one zmm of int32 / float32)


@dataclass
class Q8Tiles:
    """A Q8Tensor repacked once for the VNNI kernel (tiles()): rows in groups of 16, and per
    group and block of 32 columns 512 contiguous bytes, vector k (64 bytes) holding bytes
    4k .. 4k+3 of the block of each of the 16 rows (one row per int32 lane), stored as
    q + 128 (unsigned, as vpdpbusd takes them). The kernel then loads a block ready to multiply:
    no shuffles, one sequential stream per group."""
    q: np.ndarray  # uint8  [groups, nblk * 512]
    d: np.ndarray  # uint16 [groups, nblk, 16], fp16 bits (rows past the last: 0)
    rows: int
    cols: int

    @property
    def shape(self) -> tuple[int, int]:
        return (self.rows, self.cols)

    @property
    def nbytes(self) -> int:
        return self.q.nbytes + self.d.nbytes

    @property
    def params(self) -> int:
        return self.rows * self.cols


@njit(parallel=True, **_JIT)
def _pack_tiles(q, d, tq, td):
    R, C = q.shape
    nblk = C // QK
    for g in prange(tq.shape[0]):
        for lane in range(_GROUP):
            r = g * _GROUP + lane
            for b in range(nblk):
                td[g, b, lane] = d[r, b] if r < R else 0
                for c in range(QK):
                    v = np.uint8((np.int32(q[r, b * QK + c]) if r < R else 0) + 128)
                    tq[g, b * 512 + (c // 4) * 64 + lane * 4 + c % 4] = v


class Arena:
    """Memory for weights loaded together (a SliceSet's build, a worker's upload), in transparent
    huge pages whatever their size.

    Weights stream through the kernels once per token, and from 4 KB pages one core reads them
    slower: a quarter-host's layer (Wqkv 1.4 MB, Wo 1.1 MB, Wgu 5.8 MB, Wdown 2.9 MB) at 23.0
    GB/s with NumPy's own memory, 24.6 from huge pages (one core, interleaved sweeps). NumPy asks
    for huge pages only for arrays of 4 MB and more, and this kernel gives them only where asked
    (`madvise` mode), so a slice under 4 MB (a worker's attention matrices, a two-node client's)
    sat in 4 KB pages. Here held weights are placed one after another in mappings of CHUNK
    bytes (2 MB aligned, advised whole): nothing is committed beyond what is written but the
    last huge page of a chunk. One arena per load, dropped after it: a chunk is unmapped when no
    array in it is left, so weights dropped later (a re-plan, a rejected upload) free their
    memory. (One arena for the process kept its chunk being filled alive, and the space of every
    weight dropped from it with it: a worker taking upload after upload grew ~9 MB over the fuzz
    test's second half.) Where the kernel offers no huge pages it is plain memory.

    Not on a host near its memory limit (client.host.room_for_huge_pages): with huge pages for
    every weight of 2 MB and more, the Llama-2-7B shape on four 2.5 GB hosts ran 2.65-3.26 tok/s
    against 3.67-4.95 without (4 runs each); with this arena for every node, 2.47 in one run. The
    cause was not found, and that bench spreads widely (the same day, with NumPy's memory 4.04
    and 4.21; with this arena where room allows, which leaves those hosts out, 2.92, 3.28 and
    4.93), so a host short of memory keeps NumPy's memory (huge pages from 4 MB only)."""

    HUGE, CHUNK = 2 << 20, 64 << 20

    def __init__(self):
        self.free = np.empty(0, np.uint8)   # the rest of the chunk being filled
        self.lock = threading.Lock()        # (a worker takes uploads on several threads)

    def empty(self, shape: tuple) -> np.ndarray:
        n = int(np.prod(shape))
        with self.lock:
            if n > len(self.free):
                size = max(self.CHUNK, -(-n // self.HUGE) * self.HUGE)
                m = mmap.mmap(-1, size + self.HUGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
                raw = np.frombuffer(m, np.uint8)
                off = -raw.ctypes.data % self.HUGE
                try:
                    m.madvise(mmap.MADV_HUGEPAGE, off, size)
                except (AttributeError, OSError):  # no transparent huge pages here
                    pass
                self.free = raw[off:off + size]
            out, self.free = self.free[:n], self.free[-(-n // 64) * 64:]  # 64-byte aligned
        return out.reshape(shape)


def tiles(w: Q8Tensor, arena: Arena | None = None) -> Q8Tiles:
    """w repacked for the VNNI kernel (see Q8Tiles); the same size, rows padded to 16. arena: in
    its huge pages (weights held for long, a node's slices); else NumPy's memory."""
    R, Cp = w.q.shape
    G = (R + _GROUP - 1) // _GROUP
    tq = arena.empty((G, Cp // QK * 512)) if arena is not None else np.empty((G, Cp // QK * 512), np.uint8)
    td = np.empty((G, Cp // QK, _GROUP), np.uint16)
    _pack_tiles(w.q, w.d, tq, td)
    return Q8Tiles(tq, td, R, w.cols)


@njit(parallel=True, **_JIT)
def _unpack_tiles(tq, td, rows, q, d):
    # rows [n] of a Q8Tiles back into row-major q [n, C] int8, d [n, C/32]: what _pack_tiles did, undone
    nblk = td.shape[1]
    for i in prange(rows.shape[0]):
        g, lane = rows[i] // _GROUP, rows[i] % _GROUP
        for b in range(nblk):
            d[i, b] = td[g, b, lane]
            for c in range(QK):
                q[i, b * QK + c] = np.int8(np.int32(tq[g, b * 512 + (c // 4) * 64 + lane * 4 + c % 4]) - 128)


def untiled(w: Q8Tiles, rows: np.ndarray | None = None) -> Q8Tensor:
    """Rows of w (default all) as a row-major Q8Tensor: for the embedding lookup of tied
    weights and for uploads, which carry the row-major form."""
    rows = np.arange(w.rows) if rows is None else np.asarray(rows, np.int64)
    nblk = w.d.shape[1]
    q, d = np.empty((len(rows), nblk * QK), np.int8), np.empty((len(rows), nblk), np.uint16)
    _unpack_tiles(w.q, w.d, rows, q, d)
    return Q8Tensor(q, d, w.cols)


def _tile16(n):
    """An intrinsic f(tq, td, XQ, XC, XS, OUT, g, t0, zero) -> 0: the dot products of the 16 rows
    of group g of a Q8Tiles with tokens t0 .. t0 + n - 1, into OUT[i, 0:16] for i < n (type of
    `zero`; OUT's last axis contiguous, e.g. a view of the output at the group's first row).

    Per block b: the 8 vectors of the block (see Q8Tiles), then per token 8 vpdpbusd with that
    token's 4 activation bytes broadcast (signed) give the 16 rows' exact int32 block dots at
    once. The weights went in as q + 128, so each dot would be too large by 128 * sum(xq_b):
    the chain of 8 starts from XC[t, b] = -128 * sum(xq_b) instead of 0 (one chain: the n
    tokens' chains overlap; measured as fast as two). Then, strictly (no fast flags, llvm.fma):

        acc[t, row] = fma(float(dot[t, row, b]), d[b, row] * XS[t, b], acc[t, row])   b = 0, 1, ...

    d * XS is exact in float32 (two fp16 values), the dot an exact integer, so a row's result
    depends only on its own row and token: not on n, t0 or the other rows."""
    @intrinsic
    def tile(typingctx, tq, td, XQ, XC, XS, OUT, g, t0, zero):
        wide = zero == types.float64
        sig = types.int64(tq, td, XQ, XC, XS, OUT, types.int64, types.int64, zero)

        def codegen(context, builder, signature, args):
            i64 = ir.IntType(64)
            c64 = lambda v: ir.Constant(i64, v)  # noqa: E731
            qa, ha, xa, ca, sa, oa = (context.make_array(signature.args[i])(context, builder, args[i])
                                      for i in range(6))
            g, t0 = args[6], args[7]
            nblk = builder.extract_value(ha.shape, 1)
            fn = lambda name, ret, *a: builder.module.globals.get(name) or ir.Function(  # noqa: E731
                builder.module, ir.FunctionType(ret, list(a)), name)
            ft = ir.DoubleType() if wide else _f32
            vt = ir.VectorType(ft, 16)
            dp = fn("llvm.x86.avx512.vpdpbusd.512", _V16I32, _V16I32, _V16I32, _V16I32)
            fma = fn(f"llvm.fma.v16f{'64' if wide else '32'}", vt, vt, vt, vt)
            i8p = ir.IntType(8).as_pointer()
            prefetch = fn("llvm.prefetch.p0i8", ir.VoidType(), i8p, _i32, _i32, _i32)
            hint = [ir.Constant(_i32, 0), ir.Constant(_i32, 2), ir.Constant(_i32, 1)]  # read, L2, data
            zero_f = ir.Constant(vt, [ir.Constant(ft, 0.0)] * 16)

            def addr(a, row):  # byte address of a row of an array (first axis)
                return builder.add(builder.ptrtoint(a.data, i64),
                                   builder.mul(row, builder.extract_value(a.strides, 0)))

            def rows(a, first, count, ty):
                return [builder.inttoptr(addr(a, builder.add(first, c64(k))), ty.as_pointer())
                        for k in range(count)]

            def splat(v):
                vec = builder.insert_element(ir.Constant(ir.VectorType(v.type, 16), ir.Undefined), v,
                                             ir.Constant(_i32, 0))
                return builder.shuffle_vector(vec, vec, ir.Constant(_V16I32, [0] * 16))

            qp = builder.inttoptr(addr(qa, g), _V16I32.as_pointer())            # 8 vectors per block
            hp = builder.inttoptr(addr(ha, g), ir.VectorType(ir.HalfType(), 16).as_pointer())
            xrows, crows = rows(xa, t0, n, _i32), rows(ca, t0, n, _i32)
            srows = rows(sa, t0, n, _f32)
            pre = builder.basic_block
            loop, done = builder.append_basic_block("tile.loop"), builder.append_basic_block("tile.done")
            builder.cbranch(builder.icmp_signed(">", nblk, c64(0)), loop, done)
            builder.position_at_end(loop)
            b = builder.phi(i64)
            b.add_incoming(c64(0), pre)
            accs = [builder.phi(vt) for _ in range(n)]
            # the block's 8 vectors, and a prefetch of the lines 4 KB on (past a group's end:
            # the next group's, harmless past the array's): ~15% faster on one core. Into L2
            # (prefetcht1), not L1: with 8 tokens, lines prefetched into L1 made TinyLlama's
            # gate+up 1.3-1.8x slower than one token (the tokens' activations evicted, or L1's
            # miss buffers full); into L2, 8 tokens cost what 1 does (bench/kernels.py)
            vec = lambda k: builder.gep(qp, [builder.add(builder.mul(b, c64(8)), c64(k))])  # noqa: E731
            for k in range(8):
                builder.call(prefetch, [builder.bitcast(vec(k + _AHEAD), i8p), *hint])
            W = [builder.load(vec(k), align=1) for k in range(8)]
            ds = builder.fpext(builder.load(builder.gep(hp, [b]), align=2), _V16F)
            off = builder.mul(b, c64(8))                       # block b's first int32 in a token's row
            nxt = []
            for i in range(n):
                xs = [splat(builder.load(builder.gep(xrows[i], [builder.add(off, c64(j))]))) for j in range(8)]
                a = splat(builder.load(builder.gep(crows[i], [b])))  # starts at -128 * sum(xq_b)
                for j in range(8):                                  # one chain: tokens overlap
                    a = builder.call(dp, [a, W[j], xs[j]])
                dot = a
                # "contract": keeps Numba's fastmath rewrite (which flags every flagless float
                # op "fast") off; nothing here can contract (the multiply feeds llvm.fma)
                s = builder.fmul(ds, splat(builder.load(builder.gep(srows[i], [b]))), flags=["contract"])
                f = builder.sitofp(dot, vt)
                if wide:
                    s = builder.fpext(s, vt)
                nxt.append(builder.call(fma, [f, s, accs[i]]))
            b2 = builder.add(b, c64(1))
            b.add_incoming(b2, loop)
            for acc, a2 in zip(accs, nxt):
                acc.add_incoming(zero_f, pre)
                acc.add_incoming(a2, loop)
            builder.cbranch(builder.icmp_signed("<", b2, nblk), loop, done)
            builder.position_at_end(done)
            res = [builder.phi(vt) for _ in range(n)]
            for r, a2 in zip(res, nxt):
                r.add_incoming(zero_f, pre)
                r.add_incoming(a2, loop)
            for i, r in enumerate(res):
                builder.store(r, builder.inttoptr(addr(oa, c64(i)), vt.as_pointer()),
                              align=8 if wide else 4)  # rows of out: element-aligned only
            return c64(0)

        return sig, codegen

    return tile


_tile1, _tile2, _tile4, _tile8 = (_tile16(n) for n in (1, 2, 4, 8))


@njit(inline="always")
def _group_into(tq, td, XQ, XC, XS, dst, g, zero):
    # the 16 rows of group g for every token t into dst[t, 0:16]; tokens in passes of 8, then 4,
    # 2, 1 (in float64 too: its 8 accumulators take 16 of the 32 vector registers, and one pass
    # of 8 took 0.81-0.94x the time of two passes of 4 over TinyLlama's Wdown, three runs)
    T = XQ.shape[0]
    t = 0
    while t < T:
        left = T - t
        if left >= 8:
            _tile8(tq, td, XQ, XC, XS, dst[t:], g, t, zero)
            t += 8
        elif left >= 4:
            _tile4(tq, td, XQ, XC, XS, dst[t:], g, t, zero)
            t += 4
        elif left >= 2:
            _tile2(tq, td, XQ, XC, XS, dst[t:], g, t, zero)
            t += 2
        else:
            _tile1(tq, td, XQ, XC, XS, dst[t:], g, t, zero)
            t += 1


@njit(parallel=True, **_JIT)
def _matmul_tiles(tq, td, rows, XQ, XC, XS, out, zero):
    # tq, td: a Q8Tiles of `rows` rows; XQ [T, C] int8 activations with block scales XS [T, C/32]
    # and XC = -128 * block sums (see _tile16) -> out [T, rows], in the type of `zero`. One task
    # per group of 16 rows, whose sums go straight into out (a buffer and a copy per group cost
    # ~36 ns a group, ~1 ms of CPU a TinyLlama token); the last group, if short, through a buffer.
    T = XQ.shape[0]
    for g in prange(tq.shape[0]):
        r0 = g * _GROUP
        if rows - r0 >= _GROUP:
            _group_into(tq, td, XQ, XC, XS, out[:, r0:], g, zero)
        else:
            buf = np.empty((T, _GROUP), out.dtype)
            _group_into(tq, td, XQ, XC, XS, buf, g, zero)
            out[:, r0:] = buf[:, :rows - r0]


@njit(**_JIT)
def _q8_given(q, d):
    # activations quantized already (q [T, C] int8, d [T, C/32] fp16 bits: a q8_0 request's
    # Q8Tensor, or _q8_activations' own) -> the block sums XC and scales XS the kernel takes
    # beside q
    T, nblk = d.shape
    XS = np.empty((T, nblk), np.float32)
    XC = np.empty((T, nblk), np.int32)
    for t in range(T):
        for b in range(nblk):
            XS[t, b] = f16_bits_to_f32(d[t, b])
            s = np.int32(0)
            for c in range(b * QK, b * QK + QK):
                s += np.int32(q[t, c])
            XC[t, b] = np.int32(-128) * s
    return XC, XS


@njit(**_JIT)
def _q8_activations(X):
    # X [T, C] f32 (C % 32 == 0) -> int8 quants XQ [T, C], -128 * block sums XC [T, C/32] (int32)
    # and block scales XS [T, C/32], each row quantized on its own (llama.cpp's
    # quantize_row_q8_0), in one dispatch (the Python quantize() wrapper and a second call
    # cost ~6 us; this ~3 us for a 2048-vector)
    T, C = X.shape
    XQ = np.empty((T, C), np.int8)
    XD = np.empty((T, C // QK), np.uint16)
    for t in range(T):
        _quantize_row(X, SRC_F32, XQ, XD, t)
    XC, XS = _q8_given(XQ, XD)
    return XQ, XC, XS


def _host_has_vnni() -> bool:
    import os
    from llvmlite import binding as llvm
    if os.environ.get("TENSORLAN_KERNEL", "").lower() == "float":
        return False
    return bool(llvm.get_host_cpu_features().get("avx512vnni"))


VNNI = _host_has_vnni()


_GEMM_MIN_T = 32    # without VNNI, from this batch size on dequantized tiles through SGEMM win
_GEMM_TILE = 256    # weight rows dequantized per SGEMM call

# Without VNNI the prompt is compute-bound: tiles of W are dequantized to f32 and multiplied by SGEMM, called
# from inside Numba's parallel loop (np.dot goes to SciPy's BLAS), single-threaded per tile. All
# parallel work thus runs on Numba's one OpenMP pool: a second pool (OpenBLAS's own threads, or a
# Python thread pool around BLAS) busy-waiting next to it slowed both 3-10x on 2 cores.
import scipy.linalg.cython_blas  # noqa: E402,F401  (loads the BLAS that Numba's np.dot calls)

threadpool_limits(1, user_api="blas")


def max_threads() -> int:
    return nb.config.NUMBA_NUM_THREADS


def set_threads(n: int) -> None:
    """Threads for every kernel (Numba's parallel loops)."""
    nb.set_num_threads(n)


@njit(parallel=True, fastmath=True, **_JIT)
def _gemm(q, d, X, out):
    # X [T, C] f32 -> out [T, R]; one task per tile of _GEMM_TILE weight rows
    R, C = q.shape
    for t in prange((R + _GEMM_TILE - 1) // _GEMM_TILE):
        r0 = t * _GEMM_TILE
        r1 = min(R, r0 + _GEMM_TILE)
        tile = np.empty((r1 - r0, C), X.dtype)
        _dequantize_rows(q[r0:r1], d[r0:r1], tile)
        out[:, r0:r1] = np.dot(X, tile.T)


def _pad_cols(X: np.ndarray, cols_padded: int) -> np.ndarray:
    if X.shape[-1] == cols_padded:
        return np.ascontiguousarray(X, dtype=np.float32)
    P = np.zeros(X.shape[:-1] + (cols_padded,), np.float32)
    P[..., : X.shape[-1]] = X
    return P


def vnni_activations(X) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Activations as the VNNI kernel takes them, (XQ, XC, XS) of _tile16: a Q8Tensor's own
    blocks, or f32 [T, C] (C % 32 == 0) quantized row by row."""
    if isinstance(X, Q8Tensor):
        return (X.q, *_q8_given(X.q, X.d))
    return _q8_activations(X)


def _vnni_products(w: Q8Tiles, X, out: np.ndarray, zero) -> None:
    """X [T, cols_padded] f32, or a Q8Tensor of activations -> out [T, rows] with Q8_0
    activations; each row of out is the same whatever T and whatever the other rows (see
    _tile16), and the same whether X came quantized or as the floats it was quantized from."""
    XQ, XC, XS = vnni_activations(X)
    _matmul_tiles(w.q, w.d, w.rows, XQ, XC, XS, out, zero)


def runnable(w, arena: Arena | None = None):
    """A weight in the form this host's kernels run: Q8_0 repacked into tiles on VNNI CPUs
    (done once, when a node's slices are built), anything else as it is. arena: the tiles in
    its huge pages (client.host.room_for_huge_pages says when)."""
    return tiles(w, arena) if VNNI and isinstance(w, Q8Tensor) else w


def matvec(w, x: np.ndarray, vnni: bool | None = None, acc64: bool = False) -> np.ndarray:
    """W[rows, cols] @ x[cols] -> [rows] (int8 activations on VNNI CPUs; a Q8Tensor is repacked
    into tiles for the call: hold runnable(w) to pay that once). acc64: sum in float64 and
    return float64 (see matmul)."""
    zero = np.float64(0.0) if acc64 else np.float32(0.0)
    rows, cp = (w.rows, w.d.shape[1] * QK) if isinstance(w, Q8Tiles) else w.q.shape
    out = np.empty(rows, zero.dtype)
    x = _pad_cols(x, cp)
    if isinstance(w, Q8Tensor) and not (VNNI if vnni is None else vnni):
        _matvec(w.q, w.d, x, out, zero)
    else:
        _vnni_products(w if isinstance(w, Q8Tiles) else tiles(w), x[None, :], out[None, :], zero)
    return out


def matmul(w, X: np.ndarray, acc64: bool = False) -> np.ndarray:
    """X[T, cols] @ W[rows, cols]^T -> [T, rows]. W is a Q8Tiles (VNNI CPUs), a Q8Tensor or a
    float32 array; X float32, or a Q8Tensor of activations quantized already (a q8_0 request:
    on VNNI CPUs its int8 rows go to the kernel as they are, the same bits the kernel would
    make of the floats; elsewhere it is dequantized).

    acc64=True sums in float64 and returns float64: for the column-sliced matrices (Wo, Wdown),
    whose slices' partial sums the caller adds. Each element's product is the same whatever
    the slicing; summed in float64, the totals agree to ~1e-16 and round to the same float32,
    so the output does not depend on how the model was cut across nodes.

    Batch invariance: on VNNI CPUs row t of the result is bit for bit matvec(w, X[t]), whatever
    T and the other rows are (continuous batching: a sequence decodes the same alone or
    batched, and a prompt's rows are what decoding them one by one would give). Without VNNI,
    T in 2..31 goes through the 4-token float kernel and T >= 32 through SGEMM with float32
    activations: close to matvec, not equal."""
    T = X.shape[0]
    if isinstance(X, Q8Tensor):  # activations quantized already (a q8_0 request)
        if VNNI and isinstance(w, (Q8Tensor, Q8Tiles)) and X.q.shape[1] == w.d.shape[1] * QK:
            w = w if isinstance(w, Q8Tiles) else tiles(w)
            out = np.empty((T, w.rows), np.float64 if acc64 else np.float32)
            _vnni_products(w, X, out, np.float64(0.0) if acc64 else np.float32(0.0))
            return out
        X = dequantize(X)  # float kernels: the activations as the floats they stand for
    if not isinstance(w, (Q8Tensor, Q8Tiles)):
        if acc64:
            return X.astype(np.float64) @ w.T.astype(np.float64)
        return np.ascontiguousarray(X, dtype=np.float32) @ w.T
    if T == 1:
        return matvec(w, X[0], acc64=acc64)[None, :]
    zero = np.float64(0.0) if acc64 else np.float32(0.0)
    if isinstance(w, Q8Tiles) or VNNI:  # every row read once from RAM, T tokens' int8 dots on it
        w = w if isinstance(w, Q8Tiles) else tiles(w)   # (faster than SGEMM at any T: 2x at T =
        out = np.empty((T, w.rows), zero.dtype)          # 512, bench/kernels.py)
        _vnni_products(w, _pad_cols(X, w.d.shape[1] * QK), out, zero)
        return out
    Xp = _pad_cols(X, w.q.shape[1])
    R = w.q.shape[0]
    out = np.empty((T, R), zero.dtype)
    if T >= _GEMM_MIN_T:
        _gemm(w.q, w.d, Xp.astype(zero.dtype), out)
        return out
    X4 = np.zeros((4, Xp.shape[1]), np.float32)
    o4 = np.empty((4, R), zero.dtype)
    for k in range(0, T, 4):  # groups of four tokens, each group one pass over W
        n = min(4, T - k)
        X4[:n] = Xp[k:k + n]
        X4[n:] = 0.0
        _matmul4(w.q, w.d, X4, o4, zero)
        out[k:k + n] = o4[:n]
    return out


def _probe_weight(rows: int, cols: int):
    """A weight in the form this host's kernels run, its values all alike, made without
    quantizing anything (the kernels' speed does not depend on the values): ~10 ms for 34 MB,
    which keeps a probe short on a host capped at a fraction of a core."""
    scale = np.uint16(0x2000)  # fp16 bits of a small positive scale
    if VNNI:
        return Q8Tiles(np.full((rows // _GROUP, cols // QK * 512), 129, np.uint8),
                       np.full((rows // _GROUP, cols // QK, _GROUP), scale, np.uint16), rows, cols)
    return Q8Tensor(np.ones((rows, cols), np.int8), np.full((rows, cols // QK), scale, np.uint16), cols)


def measure_speed(cpu_quota: float | None = None) -> float:
    """GB/s of the one-token kernel over 48 matrices of 2 MB (3 x 34 MB: three times a 32 MB
    L3), each matrix timed on its own and kept at its best of 9 sweeps (~0.1 s): a node's speed for
    balancing. Per matrix, not per sweep: a 2 MB matrix takes ~70 us, so among its 9 runs there
    is one that nothing interrupted, neither a busy neighbour nor a CPU quota's throttling (a
    0.25-core host runs 1 ms in 4, shorter than a whole sweep: timed per sweep, four identical
    such hosts measured 4.2-6.6 GB/s, and the plan split the work 10:5 between two of them).
    Under a quota (cores, from the cgroup) the speed is what its threads do in the share of
    time the quota allows them."""
    import time
    big = [_probe_weight(8192, 4096) for _ in range(3)]  # in huge pages, as a worker's slices
    ws = [row_range(w, r, r + 512) for w in big for r in range(0, 8192, 512)]
    x = np.ones(4096, np.float32)
    best = np.full(len(ws), np.inf)
    for sweep in range(10):  # the first warms up (JIT dispatch, page faults)
        for i, w in enumerate(ws):
            t = time.perf_counter()
            matvec(w, x)
            if sweep:
                best[i] = min(best[i], time.perf_counter() - t)
    speed = sum(w.nbytes for w in ws) / 1e9 / best.sum()
    if cpu_quota:
        speed *= min(1.0, cpu_quota / nb.get_num_threads())
    return speed
