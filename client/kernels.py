"""Numba kernels for the parts of a layer that are not matmuls: RMSNorm, RoPE + KV-cache append +
causal attention (one call per attention slice and step), SwiGLU; and, on VNNI CPUs, a whole
attention or FFN slice step in one call (attention_block, ffn_block), also from the bytes of the
q8_0 wire to those of the reply (attention_step_wire, ffn_step_wire: a worker's whole step). Shapes in comments:
T tokens this step, D model dim, nq / nkv query / key-value heads of the slice, d head dim."""
from __future__ import annotations

import numpy as np
from numba import njit, prange, types
from numba.extending import overload

from quant.q8_0 import (QK, _dequantize_rows, _matmul_tiles, _pack_activations, _q8_activations, _q8_given,
                        bf16_bits_to_f32, f32_to_bf16_bits, finite_scales, wire_views)

# fast-math without reassociation: sums keep their written order (see attention); numpy's error
# model: a division by zero gives inf or NaN, where Python's zero-division check kept every loop
# with a division scalar
_JIT = dict(cache=True, nogil=True, error_model="numpy", fastmath={"nsz", "arcp", "contract", "afn"})


@njit(**_JIT)
def rmsnorm(x, w, eps):
    # x [T, D] f32, w [D] -> x / sqrt(mean(x^2) + eps) * w
    T, D = x.shape
    out = np.empty_like(x)
    for t in range(T):
        ss = np.float32(0.0)
        for i in range(D):
            ss += x[t, i] * x[t, i]
        inv = np.float32(1.0) / np.sqrt(ss / np.float32(D) + np.float32(eps))
        for i in range(D):
            out[t, i] = x[t, i] * inv * w[i]
    return out


@njit(**_JIT)
def swiglu(gu, F):
    # gu [T, 2F] = [gate | up] -> silu(gate) * up = gate / (1 + exp(-gate)) * up  [T, F]
    T = gu.shape[0]
    out = np.empty((T, F), np.float32)
    e = np.empty(F, np.float32)
    for t in range(T):
        for i in range(F):
            e[i] = -gu[t, i]
        _exp(e)  # vectorized: with libm's expf per element and scalar divisions, 5x slower
        for i in range(F):
            out[t, i] = gu[t, i] / (np.float32(1.0) + e[i]) * gu[t, F + i]
    return out


# KV cache entries are float32 or bfloat16 (stored as uint16 bit patterns)
def _kv_get(x):
    pass


@overload(_kv_get, inline="always")
def _kv_get_impl(x):
    if x == types.uint16:
        return lambda x: bf16_bits_to_f32(x)
    return lambda x: x


def _kv_put(cache_dtype_probe, x):
    pass


@overload(_kv_put, inline="always")
def _kv_put_impl(cache_dtype_probe, x):
    if cache_dtype_probe == types.uint16:
        return lambda cache_dtype_probe, x: f32_to_bf16_bits(x)
    return lambda cache_dtype_probe, x: x


@njit(cache=True, nogil=True, fastmath=True)
def _max(x):
    # max over x: exact in any order, so fully fast-math (vectorized) is safe here
    m = x[0]
    for i in range(1, x.shape[0]):
        m = max(m, x[i])
    return m


@njit(**_JIT)
def _exp(x):
    """x <- exp(x) in place, in two elementwise loops that vectorize (a libm call per element
    cost a quarter of attention): x = k ln2 + r with |r| <= ln2/2, exp(r) by Cephes' expf
    polynomial (about 1 ulp), then k added to the exponent bits. x is clamped to [-87, 88]:
    below, exp(-87) ~ 1.6e-38 rather than smaller (softmax: nothing beside the max's 1; SwiGLU:
    g / (1 + 1.6e-38) = g); above, exp(88) ~ 1.7e38 rather than larger (SwiGLU: silu(g) for
    g <= -88 becomes g / 1.7e38, under 1e-30 for any |g| < 1e8, rather than about 0)."""
    k = np.empty(x.shape[0], np.int32)
    for i in range(x.shape[0]):
        v = min(max(x[i], np.float32(-87.0)), np.float32(88.0))
        kf = np.floor(v * np.float32(1.44269504) + np.float32(0.5))
        r = v - kf * np.float32(0.693359375) + kf * np.float32(2.12194440e-4)
        p = np.float32(1.9875691500e-4)
        p = p * r + np.float32(1.3981999507e-3)
        p = p * r + np.float32(8.3334519073e-3)
        p = p * r + np.float32(4.1665795894e-2)
        p = p * r + np.float32(1.6666665459e-1)
        p = p * r + np.float32(5.0000001201e-1)
        x[i] = p * r * r + r + np.float32(1.0)
        k[i] = np.int32(kf)
    bits = x.view(np.int32)
    for i in range(x.shape[0]):
        bits[i] += k[i] << 23


@njit(**_JIT)
def _rope(v, cos, sin):
    # rotate-half RoPE in place on one head vector v [d]: pairs (i, i + d/2)
    h = v.shape[0] // 2
    for i in range(h):
        a, b = v[i], v[i + h]
        v[i] = a * cos[i] - b * sin[i]
        v[i + h] = b * cos[i] + a * sin[i]


@njit(parallel=True, **_JIT)
def attention(qkv, pos, slot, cos, sin, kc, vc, kv_of_q, nq):
    """qkv [T, (nq + 2 nkv) d] = this slice's q heads, then its k heads, then its v heads; row t is
    the token at position pos[t] of the sequence in KV slot slot[t] (a batch may hold several
    sequences, each a run of consecutive positions). RoPE q and k, write k into kc [slots, nkv,
    d, ctx] (keys stored transposed) and v into vc [slots, nkv, ctx, d], and return o [T, nq d] =
    softmax(q K^T / sqrt(d), causal) V per query head, over positions 0 .. pos[t] of its own
    slot; query head j reads cache head kv_of_q[j].

    Every sum runs in the order written (_JIT allows no reassociation): the scores are d
    multiply-adds over a run of positions, the softmax total and V mix are summed position by
    position, so the same inputs give the same bits on every node and however Numba built the
    code (fast-math reassociation made a freshly compiled kernel and a cached one differ)."""
    T = qkv.shape[0]
    nkv, d = vc.shape[1], vc.shape[3]
    q = np.empty((T, nq, d), np.float32)
    for t in range(T):
        c, s, p, b = cos[pos[t]], sin[pos[t]], pos[t], slot[t]
        for j in range(nq):
            q[t, j] = qkv[t, j * d:(j + 1) * d]
            _rope(q[t, j], c, s)
        for j in range(nkv):
            k = qkv[t, (nq + j) * d:(nq + j + 1) * d].copy()
            _rope(k, c, s)
            v0 = (nq + nkv + j) * d
            for e in range(d):
                kc[b, j, e, p] = _kv_put(kc[0, 0, 0, 0], k[e])
                vc[b, j, p, e] = _kv_put(vc[0, 0, 0, 0], qkv[t, v0 + e])
    out = np.empty((T, nq * d), np.float32)
    scale = np.float32(1.0 / np.sqrt(d))
    for job in prange(T * nq):
        t, j = job // nq, job % nq
        kv, b = kv_of_q[j], slot[t]
        n = pos[t] + 1  # causal: positions 0 .. pos[t]
        score = np.zeros(n, np.float32)
        for e in range(d):  # score [n] += q[e] * K[e, :n]: independent lanes, vectorized
            qe, ke = q[t, j, e], kc[b, kv, e]
            for p in range(n):
                score[p] += qe * _kv_get(ke[p])
        m = _max(score)
        for p in range(n):
            score[p] = (score[p] - m) * scale
        _exp(score)
        total = np.float32(0.0)
        for p in range(n):
            total += score[p]
        o = np.zeros(d, np.float32)
        for p in range(n):  # o [d] += w_p V[p, :]
            w, vp = score[p] / total, vc[b, kv, p]
            for e in range(d):
                o[e] += w * _kv_get(vp[e])
        out[t, j * d:(j + 1) * d] = o
    return out


# ---------------------------------------------------------------------------------------------
# A slice's whole step in one compiled call (VNNI weights, quant.q8_0.Q8Tiles): the same kernels
# in the same order as AttentionSlice.forward / FFNSlice.forward compose them through
# quant.q8_0.matmul, hence the same bits, without going back to Python between them. On a
# worker capped at a quarter of a core, the Python between the kernels of a step (matmul's
# dispatch, two activation quantizations, the attention call) took ~60 of its ~500 us.
# Activations come in as the kernel takes them: XQ [T, Cp] int8, XC, XS (q8_0.vnni_activations).
# ---------------------------------------------------------------------------------------------
@njit(**_JIT)
def _pad_blocks(x, n, width):
    # x [T, n k] as k groups of n values -> [T, k width], each group zero-padded to `width`
    # (x itself when n == width): heads of a head_dim that is not a multiple of 32 (see
    # slices._load_wo), or an FFN slice's units up to whole blocks
    if n == width:
        return x
    T, k = x.shape[0], x.shape[1] // n
    out = np.zeros((T, k * width), np.float32)
    for t in range(T):
        for j in range(k):
            out[t, j * width:j * width + n] = x[t, j * n:(j + 1) * n]
    return out


@njit(**_JIT)
def attention_block(XQ, XC, XS, wqkv_q, wqkv_d, nqkv, wo_q, wo_d, D, pos, slot, cos, sin, kc, vc,
                    kv_of_q, nq):
    # qkv = X Wqkv^T [T, nqkv]; o = attention(...) [T, nq d]; partial = o Wo^T [T, D] float64
    T = XQ.shape[0]
    qkv = np.empty((T, nqkv), np.float32)
    _matmul_tiles(wqkv_q, wqkv_d, nqkv, XQ, XC, XS, qkv, np.float32(0.0))
    o = attention(qkv, pos, slot, cos, sin, kc, vc, kv_of_q, nq)
    d = vc.shape[3]
    OQ, OC, OS = _q8_activations(_pad_blocks(o, d, wo_d.shape[1] * QK // nq))
    out = np.empty((T, D), np.float64)
    _matmul_tiles(wo_q, wo_d, D, OQ, OC, OS, out, np.float64(0.0))
    return out


@njit(**_JIT)
def ffn_block(XQ, XC, XS, wgu_q, wgu_d, nu, wdown_q, wdown_d, D):
    # h = silu(X Wgate^T) * (X Wup^T) [T, nu]; partial = h Wdown^T [T, D] float64
    T = XQ.shape[0]
    gu = np.empty((T, 2 * nu), np.float32)
    _matmul_tiles(wgu_q, wgu_d, 2 * nu, XQ, XC, XS, gu, np.float32(0.0))
    h = swiglu(gu, nu)
    HQ, HC, HS = _q8_activations(_pad_blocks(h, nu, wdown_d.shape[1] * QK))
    out = np.empty((T, D), np.float64)
    _matmul_tiles(wdown_q, wdown_d, D, HQ, HC, HS, out, np.float64(0.0))
    return out


# A worker's step whose activations came on the q8_0 wire, from the request's bytes to the reply's:
# x [T, D] arrives as Q8_0 blocks, goes into the block as they are (the kernels quantize
# activations to Q8_0 anyway), and the float64 partial leaves in the session's wire, `out`:
# OUT_Q8 (quant.q8_0.quantize_bytes' bits), OUT_F32 (rounded, as numpy's astype) or OUT_F64.
# False, with nothing computed, if a scale of x is infinite or NaN. One compiled call instead
# of the Python between decode, block and encode: ~10 us of a step on a hot core, more on a
# CPU-capped host whose caches the kernels and other processes have swept.
OUT_Q8, OUT_F32, OUT_F64 = 0, 1, 2
WIRE_OUT = {"q8_0": OUT_Q8, "f32": OUT_F32, "f64": OUT_F64}  # the partial sums' wires they write


@njit(**_JIT)
def wire_nbytes(T, D, out):
    # bytes of [T, D] in wire `out` (q8_0: whole blocks of 32 values, 34 bytes each)
    if out == OUT_Q8:
        return T * ((D + QK - 1) // QK) * (QK + 2)
    return T * D * (4 if out == OUT_F32 else 8)


@njit(inline="always")
def _to_wire(y, yb, out):
    # y [T, D] float64 -> yb (uint8): its bytes in wire `out`
    if out == OUT_Q8:
        _pack_activations(y, yb)
        return
    if out == OUT_F32:
        yb.view(np.float32)[:] = y.ravel()   # (rounded to nearest, as astype)
    else:
        yb.view(np.float64)[:] = y.ravel()


@njit(**_JIT)
def add_from_wire(yb, T, D, out, acc):
    # acc [T, D] float64 += the partial sum whose bytes yb (uint8) are in wire `out` (the
    # inverse of _to_wire: q8_0 values are int8 * fp16 scale, exact in float32, as dequantize)
    if out == OUT_Q8:
        q, d = wire_views(yb, T, (D + QK - 1) // QK)
        y = np.empty((T, D), np.float32)
        _dequantize_rows(q, d, y)
        acc += y
    elif out == OUT_F32:
        acc += yb.view(np.float32).reshape((T, D))
    else:
        acc += yb.view(np.float64).reshape((T, D))


@njit(**_JIT)
def attention_step_wire(xb, T, wqkv_q, wqkv_d, nqkv, wo_q, wo_d, D, pos, slot, cos, sin, kc, vc,
                        kv_of_q, nq, yb, out):
    XQ, XD = wire_views(xb, T, wqkv_d.shape[1])
    if not finite_scales(XD):
        return False
    XC, XS = _q8_given(XQ, XD)
    _to_wire(attention_block(XQ, XC, XS, wqkv_q, wqkv_d, nqkv, wo_q, wo_d, D, pos, slot, cos, sin,
                             kc, vc, kv_of_q, nq), yb, out)
    return True


@njit(**_JIT)
def ffn_step_wire(xb, T, wgu_q, wgu_d, nu, wdown_q, wdown_d, D, yb, out):
    XQ, XD = wire_views(xb, T, wgu_d.shape[1])
    if not finite_scales(XD):
        return False
    XC, XS = _q8_given(XQ, XD)
    _to_wire(ffn_block(XQ, XC, XS, wgu_q, wgu_d, nu, wdown_q, wdown_d, D), yb, out)
    return True
