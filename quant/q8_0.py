"""Q8_0 as llama.cpp defines it, and the Numba kernels that multiply by it.

A Q8_0 matrix W[rows, cols] is cut along each row into blocks of 32 weights. Each block keeps one
fp16 scale d = amax/127 and 32 int8 quants q = round(x/d) (llama.cpp's quantize_row_q8_0_ref:
q = roundf(x * (1/d)), round half away from zero). Rows whose length is not a multiple of 32 are
zero-padded. Quants and scales live in two separate contiguous arrays:

    q: int8   [rows, cols_padded]         d: uint16 [rows, cols_padded // 32]  (fp16 bit patterns)

Kernels (all parallel over output rows, thread count = numba.set_num_threads):
    matvec(W, x)   x [cols]     -> [rows]       one token: memory-bound, streams W once
    matmul(W, X)   X [T, cols]  -> [T, rows]    a batch: small T streams W once with T accumulators
                                                (on VNNI CPUs each row bit for bit matvec's), large
                                                T dequantizes row tiles into f32 BLAS (GEMM)

How the dot product is done (measured on this 2-core Zen 4, TinyLlama FFN shape 5632x2048, see
bench/kernels.py): a flat loop over the row reading the block scale per element, acc += q[i] *
ds[i >> 5] * x[i], vectorizes to 16-wide FMAs and streams ~18-20 GB/s on one core and ~28-33 GB/s
on two (the memory bandwidth). The same maths as a loop over blocks with an inner 32-element
reduction ran at 1.2 GB/s, and llama.cpp's way (activations quantized to int8, int8 x int8 dots
per block) at 2.2 GB/s blocked / 6.9 GB/s flat: LLVM does not turn either into VNNI code. So the batch
kernels dequantize-and-FMA. The fp16 scales of a row are converted once into a small f32 buffer
(Numba has no float16 type: an LLVM intrinsic does fpext half->float).

That float loop costs ~20 vector instructions per 64 weights: one core tops out at ~17-20 GB/s,
short of its bandwidth. On CPUs with AVX-512 VNNI the one-token kernel therefore does what
llama.cpp does, written as LLVM IR in a Numba intrinsic (`_vnni_rows`): the activation vector is
quantized to Q8_0 once, and each 64 weights cost one vpdpbusd (int8 x int8 -> int32), one
convert and one FMA with the two blocks' combined scales: ~23 GB/s on one core. Activations in
int8 add ~0.5% relative error to a product, as in llama.cpp. Elsewhere the float loop runs.
Up to 31 tokens share that kernel (`_matmul_vnni`, one pass over W): a token's arithmetic is
the same whatever it is batched with, so continuous batching does not change any sequence's
output. Four tokens per pass keep the vector pipes busy; from ~4 tokens on the kernel is
compute-bound (~1.1 ns per token and 64 weights on one core, see bench/kernels.py).
"""
from __future__ import annotations

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


def nbytes(rows: int, cols: int, fmt: str = "q8_0") -> int:
    """Bytes of a [rows, cols] weight held as Q8_0 (int8 quants of the padded row, then one fp16
    scale per block of 32) or as f32."""
    return rows * padded(cols) // QK * (QK + 2) if fmt == "q8_0" else rows * cols * 4


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


@njit(parallel=True, **_JIT)  # no fastmath: amax/127 and 1/d must be IEEE-exact
def _quantize_rows(src, kind, q, d):
    rows, cols = src.shape
    nblk = q.shape[1] // QK
    for r in prange(rows):
        for b in range(nblk):
            c0 = b * QK
            c1 = min(c0 + QK, cols)
            amax = np.float32(0.0)
            for c in range(c0, c1):
                amax = max(amax, abs(_load(src, r, c, kind)))
            dd = amax / np.float32(127.0)
            idd = np.float32(1.0) / dd if dd != np.float32(0.0) else np.float32(0.0)
            d[r, b] = f32_to_f16_bits(dd)
            for c in range(c0, c0 + QK):
                if c < c1:
                    v = _load(src, r, c, kind) * idd          # float32 multiply, as in C
                    a = np.floor(np.float64(abs(v)) + 0.5)   # roundf: half away from zero (exact in f64)
                    q[r, c] = np.int8(a if v >= 0 else -a)
                else:
                    q[r, c] = 0


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
    _quantize_rows(src, kind, out.q, out.d)
    return out


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


def dequantize(w: Q8Tensor, rows: slice = slice(None), out: np.ndarray | None = None) -> np.ndarray:
    """Q8_0 rows -> float32 [n, cols] (exact: int8 * fp16 fits f32)."""
    q, d = w.q[rows], w.d[rows]
    if out is None:
        out = np.empty((q.shape[0], w.cols), np.float32)
    _dequantize_rows(q, d, out)
    return out


def row_range(w: Q8Tensor, r0: int, r1: int) -> Q8Tensor:
    """Rows [r0, r1) as a view."""
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
# AVX-512 VNNI: activations in Q8_0, int8 x int8 dot products, one kernel for 1 to 31 tokens
# ---------------------------------------------------------------------------------------------
_i8, _i32, _f32 = ir.IntType(8), ir.IntType(32), ir.FloatType()
_V64I8, _V16I32, _V2F = ir.VectorType(_i8, 64), ir.VectorType(_i32, 16), ir.VectorType(_f32, 2)


def _vnni_rows(n):
    """An intrinsic f(q, XQ, SC, t0, n64, zero) -> n sums, one per token t = t0 .. t0 + n - 1 of
    XQ [T, C] int8 with block scales SC [T, C/32] f32:

        sum over chunks k < n64 of 64 weights: cvt(vpdpbusd(q[k] ^ 0x80, XQ[t, k])) * SC[t, 2k | 2k+1]

    q ^ 0x80 = q + 128 as unsigned bytes (vpdpbusd multiplies unsigned by signed), so each block's
    dot comes out too large by 128 * sum(xq_b): the caller subtracts that. Lanes 0-7 of a chunk
    belong to its first block (scale SC[t, 2k]), lanes 8-15 to the second (SC[t, 2k+1]). Sums in
    the type of `zero`: float32, or float64 (then int32 dots -> double, scales widened).

    Every operation is strict IEEE (llvm.fma per chunk, then a fixed tree over the 16 lanes), no
    fast-math flags: LLVM may not reorder a token's sum, so it is the same bits for any n and
    whatever code surrounds the call (with fast flags, the same source compiled into two kernels
    summed differently). The n tokens' chains interleave, sharing one load and flip of q per
    chunk: one chain alone is bound by the FMA's latency, not by its throughput."""
    @intrinsic
    def vnni_rows(typingctx, q, XQ, SC, t0, n64, zero):
        wide = zero == types.float64
        sig = types.UniTuple(zero, n)(q, XQ, SC, types.int64, types.int64, zero)

        def codegen(context, builder, signature, args):
            i64 = ir.IntType(64)

            def rows(i, ty):  # pointers to rows t0 .. t0 + n - 1 of a 2-D array
                a = context.make_array(signature.args[i])(context, builder, args[i])
                base, stride = builder.ptrtoint(a.data, i64), builder.extract_value(a.strides, 0)
                return [builder.inttoptr(builder.add(base, builder.mul(
                    builder.add(args[3], ir.Constant(i64, j)), stride)), ty.as_pointer())
                    for j in range(n)]
            qp = builder.bitcast(context.make_array(signature.args[0])(context, builder, args[0]).data,
                                 _V64I8.as_pointer())
            xps, sps, nk = rows(1, _V64I8), rows(2, _V2F), args[4]
            ft = ir.DoubleType() if wide else _f32
            vt = ir.VectorType(ft, 16)
            fn = lambda name, ret, *a: builder.module.globals.get(name) or ir.Function(  # noqa: E731
                builder.module, ir.FunctionType(ret, list(a)), name)
            dp = fn("llvm.x86.avx512.vpdpbusd.512", _V16I32, _V16I32, _V16I32, _V16I32)
            fma = fn(f"llvm.fma.v16f{'64' if wide else '32'}", vt, vt, vt, vt)
            flip = ir.Constant(_V64I8, [ir.Constant(_i8, -128)] * 64)
            zero_i = ir.Constant(_V16I32, [ir.Constant(_i32, 0)] * 16)
            zero_f = ir.Constant(vt, [ir.Constant(ft, 0.0)] * 16)
            halves = ir.Constant(_V16I32, [ir.Constant(_i32, 0)] * 8 + [ir.Constant(_i32, 1)] * 8)
            pre = builder.basic_block
            loop, done = builder.append_basic_block("vnni.loop"), builder.append_basic_block("vnni.done")
            builder.cbranch(builder.icmp_signed(">", nk, ir.Constant(nk.type, 0)), loop, done)
            builder.position_at_end(loop)
            k, accs = builder.phi(nk.type), [builder.phi(vt) for _ in range(n)]
            k.add_incoming(ir.Constant(nk.type, 0), pre)
            qu = builder.bitcast(builder.xor(builder.load(builder.gep(qp, [k]), align=1), flip), _V16I32)
            nxt = []
            for acc, xp, sp in zip(accs, xps, sps):
                xv = builder.bitcast(builder.load(builder.gep(xp, [k]), align=1), _V16I32)
                dot = builder.sitofp(builder.call(dp, [zero_i, qu, xv]), vt)
                s2 = builder.load(builder.gep(sp, [k]), align=4)
                s16 = builder.shuffle_vector(s2, s2, halves)
                if wide:
                    s16 = builder.fpext(s16, vt)
                nxt.append(builder.call(fma, [dot, s16, acc]))
            k2 = builder.add(k, ir.Constant(nk.type, 1))
            k.add_incoming(k2, loop)
            for acc, a2 in zip(accs, nxt):
                acc.add_incoming(zero_f, pre)
                acc.add_incoming(a2, loop)
            builder.cbranch(builder.icmp_signed("<", k2, nk), loop, done)
            builder.position_at_end(done)
            res = [builder.phi(vt) for _ in range(n)]
            for r, a2 in zip(res, nxt):
                r.add_incoming(zero_f, pre)
                r.add_incoming(a2, loop)
            # lanes 0-7 + 8-15, then 0-3 + 4-7, 0-1 + 2-3, 0 + 1. The "contract" flag changes
            # nothing here (no multiply feeds these adds) but keeps Numba's fastmath rewrite,
            # which flags every flagless float op "fast", off them.
            strict = ["contract"]
            totals = []
            for v in res:
                for w in (8, 4, 2):
                    lo = builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(_i32, w), list(range(w))))
                    hi = builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(_i32, w), list(range(w, 2 * w))))
                    v = builder.fadd(lo, hi, flags=strict)
                totals.append(builder.fadd(builder.extract_element(v, ir.Constant(_i32, 0)),
                                           builder.extract_element(v, ir.Constant(_i32, 1)), flags=strict))
            return context.make_tuple(builder, signature.return_type, totals)

        return sig, codegen

    return vnni_rows


_vnni_rows1, _vnni_rows2, _vnni_rows3, _vnni_rows4 = (_vnni_rows(n) for n in (1, 2, 3, 4))


@njit(parallel=True, fastmath=True, **_JIT)
def _matmul_vnni(q, d, XQ, SX, CX, out, zero):
    # q [R, C] (C % 64 == 0), XQ [T, C] int8 activations with block scales SX [T, C/32] and
    # CX[t, b] = -128 * sum(XQ[t]_b) * SX[t, b] (the unsigned-offset correction) -> out [T, R],
    # summed in the type of `zero`. matvec is T = 1 of this same compiled code, and a token's
    # arithmetic does not depend on T or on its place in the batch: the per-token scales and
    # correction come from one loop whatever t, and _vnni_rows is strict. Rows outer, tokens
    # inner: q[r] comes from RAM once and from L1 for the other tokens.
    R, C = q.shape
    T = XQ.shape[0]
    nblk = d.shape[1]
    ntask = (R + _ROWS_PER_TASK - 1) // _ROWS_PER_TASK
    for k in prange(ntask):
        ds = np.empty(nblk, np.float32)        # the row's scales w_b
        SC = np.empty((T, nblk), np.float32)   # w_b * sx_b per token
        corr = np.full(T, zero)
        for r in range(k * _ROWS_PER_TASK, min(R, (k + 1) * _ROWS_PER_TASK)):
            _row_scales(d[r], ds)
            qr = q[r]
            for t in range(T):
                sx, cx, sc = SX[t], CX[t], SC[t]
                c = zero
                for b in range(nblk):
                    sc[b] = ds[b] * sx[b]
                    c += ds[b] * cx[b]
                corr[t] = c
            # four tokens per pass over the row keep the vector pipes busy (one alone waits on
            # its FMA's latency); the rest as three, two or one
            for t in range(0, T - 3, 4):
                s = _vnni_rows4(qr, XQ, SC, t, C // 64, zero)
                out[t, r] = s[0] + corr[t]
                out[t + 1, r] = s[1] + corr[t + 1]
                out[t + 2, r] = s[2] + corr[t + 2]
                out[t + 3, r] = s[3] + corr[t + 3]
            t = T - T % 4
            if T % 4 == 3:
                s = _vnni_rows3(qr, XQ, SC, t, C // 64, zero)
                out[t, r] = s[0] + corr[t]
                out[t + 1, r] = s[1] + corr[t + 1]
                out[t + 2, r] = s[2] + corr[t + 2]
            elif T % 4 == 2:
                s = _vnni_rows2(qr, XQ, SC, t, C // 64, zero)
                out[t, r] = s[0] + corr[t]
                out[t + 1, r] = s[1] + corr[t + 1]
            elif T % 4 == 1:
                out[t, r] = _vnni_rows1(qr, XQ, SC, t, C // 64, zero)[0] + corr[t]


@njit(**_JIT)
def _q8_activations(X):
    # X [T, C] f32 (C % 32 == 0) -> int8 quants XQ [T, C], block scales SX [T, C/32] and
    # corrections CX [T, C/32], each row quantized on its own (llama.cpp's quantize_row_q8_0):
    # one dispatch per call (the Python quantize() wrapper plus a second call cost ~6 us)
    T, C = X.shape
    nblk = C // QK
    XQ = np.empty((T, C), np.int8)
    XD = np.empty((T, nblk), np.uint16)
    _quantize_rows(X, SRC_F32, XQ, XD)
    SX = np.empty((T, nblk), np.float32)
    CX = np.empty((T, nblk), np.float32)
    for t in range(T):
        for b in range(nblk):
            SX[t, b] = f16_bits_to_f32(XD[t, b])
            s = np.int32(0)
            for j in range(b * QK, b * QK + QK):
                s += np.int32(XQ[t, j])
            CX[t, b] = np.float32(-128.0) * np.float32(s) * SX[t, b]
    return XQ, SX, CX


def _host_has_vnni() -> bool:
    import os
    from llvmlite import binding as llvm
    if os.environ.get("TENSORLAN_KERNEL", "").lower() == "float":
        return False
    return bool(llvm.get_host_cpu_features().get("avx512vnni"))


VNNI = _host_has_vnni()


_GEMM_MIN_T = 32    # from this batch size on, dequantized tiles through SGEMM win (bench/kernels.py)
_GEMM_TILE = 256    # weight rows dequantized per SGEMM call

# The prompt is compute-bound: tiles of W are dequantized to f32 and multiplied by SGEMM, called
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


def _vnni_products(w: Q8Tensor, Xp: np.ndarray, out: np.ndarray, zero) -> None:
    """Xp [T, cols_padded] f32 -> out [T, rows] with Q8_0 activations; each row of out is the
    same whatever T (see _matmul_vnni)."""
    XQ, SX, CX = _q8_activations(Xp)
    if w.q.shape[1] % 64 == 0:
        _matmul_vnni(w.q, w.d, XQ, SX, CX, out, zero)
    else:  # an odd number of blocks: each token's int8 activations through the float loop
        for t in range(Xp.shape[0]):   # (one pass over W per token: only tiny models cut so)
            _matvec(w.q, w.d, XQ[t] * np.repeat(SX[t], QK), out[t], zero)


def matvec(w: Q8Tensor, x: np.ndarray, vnni: bool | None = None, acc64: bool = False) -> np.ndarray:
    """W[rows, cols] @ x[cols] -> [rows] (int8 activations on VNNI CPUs). acc64: sum in float64
    and return float64 (see matmul)."""
    zero = np.float64(0.0) if acc64 else np.float32(0.0)
    out = np.empty(w.q.shape[0], zero.dtype)
    x = _pad_cols(x, w.q.shape[1])
    if not (VNNI if vnni is None else vnni):
        _matvec(w.q, w.d, x, out, zero)
    else:
        _vnni_products(w, x[None, :], out[None, :], zero)
    return out


def matmul(w, X: np.ndarray, acc64: bool = False) -> np.ndarray:
    """X[T, cols] @ W[rows, cols]^T -> [T, rows]. W is a Q8Tensor or a float32 array.

    acc64=True sums in float64 and returns float64: for the column-sliced matrices (Wo, Wdown),
    whose slices' partial sums the caller adds. Each element's product is the same whatever
    the slicing; summed in float64, the totals agree to ~1e-16 and round to the same float32,
    so the output does not depend on how the model was cut across nodes.

    Batch invariance: on VNNI CPUs, for T < _GEMM_MIN_T (32), row t of the result is bit for bit
    matvec(w, X[t]), whatever the other rows are (continuous batching: a sequence decodes the
    same alone or batched). From T = 32 on (prompts) the rows go through SGEMM with float32
    activations, and without VNNI T in 2..31 through the 4-token float kernel: close to matvec,
    not equal."""
    T = X.shape[0]
    if not isinstance(w, Q8Tensor):
        if acc64:
            return X.astype(np.float64) @ w.T.astype(np.float64)
        return np.ascontiguousarray(X, dtype=np.float32) @ w.T
    if T == 1:
        return matvec(w, X[0], acc64=acc64)[None, :]
    zero = np.float64(0.0) if acc64 else np.float32(0.0)
    Xp = _pad_cols(X, w.q.shape[1])
    R = w.q.shape[0]
    out = np.empty((T, R), zero.dtype)
    if T >= _GEMM_MIN_T:
        _gemm(w.q, w.d, Xp.astype(zero.dtype), out)
        return out
    if VNNI:  # every row read once from RAM, T tokens' int8 dots on it
        _vnni_products(w, Xp, out, zero)
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

def measure_speed(cpu_quota: float | None = None) -> float:
    """GB/s of the one-token kernel streaming 3 x 34 MB (three times a 32 MB L3), the best of 9
    sweeps (~0.5 s): a node's speed for balancing. The best, not the median: a neighbour busy for
    part of the probe (a noisy CI host once made a 0.5-core node measure 0.28x its idle
    neighbour instead of 0.5x) only slows some sweeps. Under a CPU quota (cores, from the cgroup),
    wall time depends on where each short sweep falls in the quota's period, so the speed is
    taken from the CPU time instead: bytes per CPU-second x the cores the quota allows."""
    import time
    w0 = quantize(np.linspace(-1, 1, 8192 * 4096, dtype=np.float32).reshape(8192, 4096))
    ws = [w0] + [Q8Tensor(w0.q.copy(), w0.d.copy(), w0.cols) for _ in range(2)]
    x = np.ones(4096, np.float32)
    matvec(ws[0], x)
    ts = []
    clock = time.process_time if cpu_quota else time.perf_counter
    for _ in range(9):
        t = clock()
        for w in ws:
            matvec(w, x)
        ts.append(clock() - t)
    gb = sum(w.nbytes for w in ws) / 1e9
    if cpu_quota:  # CPU-seconds of all threads: per thread, times the cores the quota allows
        threads = nb.get_num_threads()
        return gb / min(ts) * min(1.0, cpu_quota / threads) * threads
    return gb / min(ts)
