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
lane: a block's 16 x 32 bytes are transposed in registers, and each token's activation bytes
are broadcast, so a block costs 8 vpdpbusd per token with no horizontal sums, and the block
loop runs for 1 to 8 tokens at once over one read of W. A row's arithmetic is the same whatever
it is batched with: continuous batching changes no sequence's output. Measured with 2 threads
on a TinyLlama layer (bench/kernels.py): one token as fast as the row-at-a-time kernel before
it (memory-bound), 8 tokens 2.7x faster, a 512-token prompt ~2x faster than f32 SGEMM.
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
# AVX-512 VNNI: activations in Q8_0, int8 x int8 block dots, 16 weight rows per vector
# ---------------------------------------------------------------------------------------------
_i16, _i32, _f32 = ir.IntType(16), ir.IntType(32), ir.FloatType()
_V8I32, _V16I32, _V16F = ir.VectorType(_i32, 8), ir.VectorType(_i32, 16), ir.VectorType(_f32, 16)
_GROUP = 16           # weight rows per vector lane set (one zmm of int32 / float32)
_PREFETCH_LINES = 8   # cache lines of the next group fetched per block: 16 rows x 32 bytes


def _tile16(n):
    """An intrinsic f(q, d, XQ, XC, XS, DS, OUT, r0, t0, fill, zero) -> 0: the dot products of
    weight rows r0 .. r0 + 15 with tokens t0 .. t0 + n - 1, into OUT [n, 16] (type of `zero`).

    Per block b of 32 columns, the 16 rows' 32 bytes are loaded and transposed in registers
    (three butterfly stages of two-source shuffles), so that vector j holds bytes 4j..4j+3 of
    the block of every row, one row per int32 lane. Then, per token, 8 vpdpbusd with that
    token's 4 activation bytes broadcast (the memory operand, signed) give the 16 rows' exact
    int32 block dots at once: the weights go in as q ^ 0x80 = q + 128 unsigned, so each dot is
    too large by 128 * sum(xq_b) = XC[t, b], subtracted as an integer. Then, strictly (no fast
    flags, llvm.fma):

        acc[t, row] = fma(float(dot[t, row, b]), DS[b, row] * XS[t, b], acc[t, row])   b = 0, 1, ...

    DS[b, row] * XS[t, b] is exact in float32 (two fp16 values), and the dot an exact integer,
    so a row's result depends only on its own row and token: not on n, t0 or the other rows.
    With `fill`, the call first writes DS [nblk, 16] (the rows' fp16 scales as float32,
    transposed 16 blocks at a time; blocks past the last multiple of 16: the caller's).

    While it works through a group it prefetches the next one (its 16 rows are contiguous, and
    16 rows read side by side, 32 bytes at a time, starve the hardware prefetcher: 14 GB/s
    instead of 29 on one core)."""
    @intrinsic
    def tile(typingctx, q, d, XQ, XC, XS, DS, OUT, r0, t0, fill, zero):
        wide = zero == types.float64
        sig = types.int64(q, d, XQ, XC, XS, DS, OUT, types.int64, types.int64, types.int64, zero)

        def codegen(context, builder, signature, args):
            i64, i8p = ir.IntType(64), ir.IntType(8).as_pointer()
            c64 = lambda v: ir.Constant(i64, v)  # noqa: E731
            qa, ha, xa, ca, sa, da, oa = (context.make_array(signature.args[i])(context, builder, args[i])
                                          for i in range(7))
            r0, t0, fill = args[7], args[8], args[9]
            nblk = builder.extract_value(da.shape, 0)
            fn = lambda name, ret, *a: builder.module.globals.get(name) or ir.Function(  # noqa: E731
                builder.module, ir.FunctionType(ret, list(a)), name)
            ft = ir.DoubleType() if wide else _f32
            vt = ir.VectorType(ft, 16)
            dp = fn("llvm.x86.avx512.vpdpbusd.512", _V16I32, _V16I32, _V16I32, _V16I32)
            fma = fn(f"llvm.fma.v16f{'64' if wide else '32'}", vt, vt, vt, vt)
            prefetch = fn("llvm.prefetch.p0i8", ir.VoidType(), i8p, _i32, _i32, _i32)
            zero_i = ir.Constant(_V16I32, [ir.Constant(_i32, 0)] * 16)
            zero_f = ir.Constant(vt, [ir.Constant(ft, 0.0)] * 16)
            flip = ir.Constant(_V16I32, [ir.Constant(_i32, 0x80808080 - (1 << 32))] * 16)

            def addr(a, row):  # byte address of a row of a 2-D array
                return builder.add(builder.ptrtoint(a.data, i64),
                                   builder.mul(row, builder.extract_value(a.strides, 0)))

            def rows(a, first, count, ty):
                return [builder.inttoptr(addr(a, builder.add(first, c64(k))), ty.as_pointer())
                        for k in range(count)]

            def splat(v):
                vec = builder.insert_element(ir.Constant(ir.VectorType(v.type, 16), ir.Undefined), v,
                                             ir.Constant(_i32, 0))
                return builder.shuffle_vector(vec, vec, ir.Constant(_V16I32, [0] * 16))

            def butterflies(vs, bits, width):
                """Swap off-diagonal sub-blocks of the matrix whose rows are vs (lane i, column
                i % width), at each scale in bits: after all of log2(width), a transpose."""
                for bit in bits:
                    out = list(vs)
                    for k0 in [k for k in range(len(vs)) if not k & bit]:
                        k1 = k0 | bit
                        m0 = [i if not (i % width) & bit else 16 + (i ^ bit) for i in range(16)]
                        m1 = [16 + i if (i % width) & bit else (i ^ bit) for i in range(16)]
                        out[k0] = builder.shuffle_vector(vs[k0], vs[k1], ir.Constant(_V16I32, m0))
                        out[k1] = builder.shuffle_vector(vs[k0], vs[k1], ir.Constant(_V16I32, m1))
                    vs = out
                return vs

            dsp = builder.bitcast(da.data, _V16F.as_pointer())

            # DS: 16 rows x 16 fp16 scales -> float32, transposed, per 16 blocks
            hrows = rows(ha, r0, 16, ir.VectorType(_i16, 16))
            nch = builder.sdiv(nblk, c64(16))
            entry = builder.basic_block
            sloop, sdone = builder.append_basic_block("scales.loop"), builder.append_basic_block("scales.done")
            builder.cbranch(builder.and_(builder.icmp_signed(">", nch, c64(0)),
                                         builder.icmp_signed("!=", fill, c64(0))), sloop, sdone)
            builder.position_at_end(sloop)
            ch = builder.phi(i64)
            ch.add_incoming(c64(0), entry)
            S = [builder.fpext(builder.bitcast(builder.load(builder.gep(h, [ch]), align=2),
                                               ir.VectorType(ir.HalfType(), 16)), _V16F) for h in hrows]
            for j, v in enumerate(butterflies(S, (1, 2, 4, 8), 16)):
                builder.store(v, builder.gep(dsp, [builder.add(builder.mul(ch, c64(16)), c64(j))]), align=4)
            ch2 = builder.add(ch, c64(1))
            ch.add_incoming(ch2, sloop)
            builder.cbranch(builder.icmp_signed("<", ch2, nch), sloop, sdone)
            builder.position_at_end(sdone)

            # the blocks
            qrows = rows(qa, r0, 16, _i32)                    # in units of 4 bytes
            xrows, crows = rows(xa, t0, n, _i32), rows(ca, t0, n, _i32)
            srows = rows(sa, t0, n, _f32)
            q_next, h_next = addr(qa, builder.add(r0, c64(16))), addr(ha, builder.add(r0, c64(16)))
            q_share = builder.sdiv(builder.mul(builder.extract_value(qa.strides, 0), c64(16)), nblk)
            h_share = builder.sdiv(builder.mul(builder.extract_value(ha.strides, 0), c64(16)), nblk)
            pre = builder.basic_block
            loop, done = builder.append_basic_block("tile.loop"), builder.append_basic_block("tile.done")
            builder.cbranch(builder.icmp_signed(">", nblk, c64(0)), loop, done)
            builder.position_at_end(loop)
            b = builder.phi(i64)
            b.add_incoming(c64(0), pre)
            accs = [builder.phi(vt) for _ in range(n)]
            hint = [ir.Constant(_i32, 0), ir.Constant(_i32, 2), ir.Constant(_i32, 1)]  # read, to L2, data
            at = builder.add(q_next, builder.mul(b, q_share))
            for i in range(_PREFETCH_LINES):
                builder.call(prefetch, [builder.inttoptr(builder.add(at, c64(64 * i)), i8p), *hint])
            builder.call(prefetch, [builder.inttoptr(builder.add(h_next, builder.mul(b, h_share)), i8p), *hint])
            off = builder.mul(b, c64(8))                       # block b's first int32 in a row
            V = []
            for k in range(8):  # vector k: rows k (lanes 0-7) and k + 8 (lanes 8-15)
                lo, hi = (builder.load(builder.bitcast(builder.gep(qrows[r], [off]), _V8I32.as_pointer()), align=1)
                          for r in (k, k + 8))
                V.append(builder.shuffle_vector(lo, hi, ir.Constant(_V16I32, list(range(16)))))
            W = [builder.xor(v, flip) for v in butterflies(V, (1, 2, 4), 8)]   # W[j]: bytes 4j.. of each row
            ds = builder.load(builder.gep(dsp, [b]), align=4)
            nxt = []
            for i in range(n):
                xs = [splat(builder.load(builder.gep(xrows[i], [builder.add(off, c64(j))]))) for j in range(8)]
                a0 = builder.call(dp, [zero_i, W[0], xs[0]])  # two chains: half the latency
                a1 = builder.call(dp, [zero_i, W[1], xs[1]])
                for j in range(2, 8, 2):
                    a0 = builder.call(dp, [a0, W[j], xs[j]])
                    a1 = builder.call(dp, [a1, W[j + 1], xs[j + 1]])
                dot = builder.sub(builder.add(a0, a1), splat(builder.load(builder.gep(crows[i], [b]))))
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
                builder.store(r, builder.inttoptr(addr(oa, c64(i)), vt.as_pointer()), align=8)
            return c64(0)

        return sig, codegen

    return tile


_tile1, _tile2, _tile4, _tile8 = (_tile16(n) for n in (1, 2, 4, 8))


@njit(parallel=True, fastmath=True, **_JIT)
def _matmul_tiles(q, d, XQ, XC, XS, out, zero, most):
    # q [R, C] int8, d [R, C/32] fp16 bits; XQ [T, C] int8 activations with block scales
    # XS [T, C/32] and XC = 128 * block sums (see _tile16) -> out [T, R], in the type of `zero`.
    # One task per group of 16 rows (a last partial group runs on a zero-padded copy); tokens
    # in passes of `most` (8; 4 in float64, whose accumulators take twice the registers), then
    # 4, 2, 1.
    R, C = q.shape
    T = XQ.shape[0]
    nblk = d.shape[1]
    for g in prange((R + _GROUP - 1) // _GROUP):
        r0 = g * _GROUP
        rows = min(_GROUP, R - r0)
        DS = np.empty((nblk, _GROUP), np.float32)
        OUT = np.empty((8, _GROUP), out.dtype)
        if rows == _GROUP:
            qg, dg, rr = q, d, r0
        else:
            qg = np.zeros((_GROUP, C), np.int8)
            dg = np.zeros((_GROUP, nblk), np.uint16)
            for r in range(rows):
                qg[r] = q[r0 + r]
                dg[r] = d[r0 + r]
            rr = 0
        for b in range(nblk - nblk % 16, nblk):  # the scales the intrinsic does not transpose
            for r in range(_GROUP):
                DS[b, r] = f16_bits_to_f32(dg[rr + r, b])
        fill, t = 1, 0
        while t < T:
            left = T - t
            if left >= 8 and most == 8:
                _tile8(qg, dg, XQ, XC, XS, DS, OUT, rr, t, fill, zero)
                n = 8
            elif left >= 4:
                _tile4(qg, dg, XQ, XC, XS, DS, OUT, rr, t, fill, zero)
                n = 4
            elif left >= 2:
                _tile2(qg, dg, XQ, XC, XS, DS, OUT, rr, t, fill, zero)
                n = 2
            else:
                _tile1(qg, dg, XQ, XC, XS, DS, OUT, rr, t, fill, zero)
                n = 1
            for i in range(n):
                for r in range(rows):
                    out[t + i, r0 + r] = OUT[i, r]
            fill = 0
            t += n


@njit(**_JIT)
def _q8_activations(X):
    # X [T, C] f32 (C % 32 == 0) -> int8 quants XQ [T, C], 128 * block sums XC [T, C/32] (int32)
    # and block scales XS [T, C/32], each row quantized on its own (llama.cpp's
    # quantize_row_q8_0): one dispatch per call (the Python quantize() wrapper plus a second
    # call cost ~6 us)
    T, C = X.shape
    nblk = C // QK
    XQ = np.empty((T, C), np.int8)
    XD = np.empty((T, nblk), np.uint16)
    _quantize_rows(X, SRC_F32, XQ, XD)
    XS = np.empty((T, nblk), np.float32)
    XC = np.empty((T, nblk), np.int32)
    for t in range(T):
        for b in range(nblk):
            XS[t, b] = f16_bits_to_f32(XD[t, b])
            s = np.int32(0)
            for j in range(b * QK, b * QK + QK):
                s += np.int32(XQ[t, j])
            XC[t, b] = np.int32(128) * s
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


def _vnni_products(w: Q8Tensor, Xp: np.ndarray, out: np.ndarray, zero) -> None:
    """Xp [T, cols_padded] f32 -> out [T, rows] with Q8_0 activations; each row of out is the
    same whatever T and whatever the other rows (see _tile16)."""
    XQ, XC, XS = _q8_activations(Xp)
    _matmul_tiles(w.q, w.d, XQ, XC, XS, out, zero, 4 if out.dtype == np.float64 else 8)


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

    Batch invariance: on VNNI CPUs row t of the result is bit for bit matvec(w, X[t]), whatever
    T and the other rows are (continuous batching: a sequence decodes the same alone or
    batched, and a prompt's rows are what decoding them one by one would give). Without VNNI,
    T in 2..31 goes through the 4-token float kernel and T >= 32 through SGEMM with float32
    activations: close to matvec, not equal."""
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
    if VNNI:  # every row read once from RAM, T tokens' int8 dots on it (faster than SGEMM at
        _vnni_products(w, Xp, out, zero)  # any T: 2x at T = 512, bench/kernels.py)
        return out
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
