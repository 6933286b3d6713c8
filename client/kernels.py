"""Numba kernels for the parts of a layer that are not matmuls: RMSNorm, RoPE + KV-cache append +
causal attention (one call per attention slice and step), SwiGLU. Shapes in comments:
T tokens this step, D model dim, nq / nkv query / key-value heads of the slice, d head dim."""
from __future__ import annotations

import numpy as np
from numba import njit, prange, types
from numba.extending import overload

from quant.q8_0 import bf16_bits_to_f32, f32_to_bf16_bits

_JIT = dict(cache=True, nogil=True, fastmath=True)


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
    # gu [T, 2F] = [gate | up] -> silu(gate) * up  [T, F]
    T = gu.shape[0]
    out = np.empty((T, F), np.float32)
    for t in range(T):
        for i in range(F):
            g = gu[t, i]
            out[t, i] = g / (np.float32(1.0) + np.exp(-g)) * gu[t, F + i]
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
    sequences, each a run of consecutive positions). RoPE q and k, write k, v into the caches
    kc, vc [slots, nkv, ctx, d], and return o [T, nq d] = softmax(q K^T / sqrt(d), causal) V per
    query head, over positions 0 .. pos[t] of its own slot; query head j reads cache head
    kv_of_q[j]."""
    T = qkv.shape[0]
    nkv, d = kc.shape[1], kc.shape[3]
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
                kc[b, j, p, e] = _kv_put(kc[0, 0, 0, 0], k[e])
                vc[b, j, p, e] = _kv_put(vc[0, 0, 0, 0], qkv[t, v0 + e])
    out = np.empty((T, nq * d), np.float32)
    scale = np.float32(1.0 / np.sqrt(d))
    for job in prange(T * nq):
        t, j = job // nq, job % nq
        kv, b = kv_of_q[j], slot[t]
        n = pos[t] + 1  # causal: positions 0 .. pos[t]
        qv = q[t, j]
        score = np.empty(n, np.float32)
        m = np.float32(-np.inf)
        for p in range(n):
            acc = np.float32(0.0)
            for e in range(d):
                acc += qv[e] * _kv_get(kc[b, kv, p, e])
            acc *= scale
            score[p] = acc
            m = max(m, acc)
        total = np.float32(0.0)
        for p in range(n):
            score[p] = np.exp(score[p] - m)
            total += score[p]
        o = np.zeros(d, np.float32)
        for p in range(n):
            w = score[p] / total
            for e in range(d):
                o[e] += w * _kv_get(vc[b, kv, p, e])
        out[t, j * d:(j + 1) * d] = o
    return out
