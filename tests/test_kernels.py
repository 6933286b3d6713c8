"""client/kernels.py's attention against a float64 numpy reference written from the maths
(rotate-half RoPE, causal softmax(q k / sqrt(d)) v, grouped KV heads), and its determinism."""
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT
from reference import _rotate_half, bf16_round_ref
from client import kernels

NQ, NKV, D, CTX = 8, 2, 64, 160


def inputs(seed=0):
    """Two sequences in two KV slots: slot 0 a 100-token prompt then one token, slot 1 a
    70-token prompt then a 3-token run; float32 qkv rows and RoPE tables."""
    rng = np.random.default_rng(seed)
    theta = 10000.0 ** (-np.arange(0, D, 2) / D)
    ang = np.arange(CTX)[:, None] * theta[None, :]
    cos, sin = np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)
    steps = [(np.arange(100), np.zeros(100, np.int64)), (np.arange(70), np.ones(70, np.int64)),
             (np.array([100, 70, 71, 72]), np.array([0, 1, 1, 1]))]
    qkv = [rng.standard_normal((len(p), (NQ + 2 * NKV) * D)).astype(np.float32) for p, _ in steps]
    return steps, qkv, cos, sin


def run(kv_dtype, seed=0):
    steps, qkv, cos, sin = inputs(seed)
    dt = {"f32": np.float32, "bf16": np.uint16}[kv_dtype]
    kc, vc = np.zeros((2, NKV, D, CTX), dt), np.zeros((2, NKV, CTX, D), dt)
    kv_of_q = np.arange(NQ) // (NQ // NKV)
    return [kernels.attention(x, p, s, cos, sin, kc, vc, kv_of_q, NQ) for x, (p, s) in zip(qkv, steps)]


def reference(kv_dtype, seed=0):
    steps, qkv, cos, sin = inputs(seed)
    store = bf16_round_ref if kv_dtype == "bf16" else (lambda a: a)
    K, V = {}, {}  # (slot, kv head) -> {pos: vector} float64
    outs = []
    for x, (pos, slot) in zip(qkv, steps):
        x = x.astype(np.float64).reshape(len(pos), NQ + 2 * NKV, D)
        c = np.concatenate([cos[pos], cos[pos]], 1).astype(np.float64)[:, None, :]
        s = np.concatenate([sin[pos], sin[pos]], 1).astype(np.float64)[:, None, :]
        rot = x * c + _rotate_half(x) * s
        for t, (p, b) in enumerate(zip(pos, slot)):
            for j in range(NKV):
                K.setdefault((b, j), {})[p] = store(rot[t, NQ + j].astype(np.float32)).astype(np.float64)
                V.setdefault((b, j), {})[p] = store(x[t, NQ + NKV + j].astype(np.float32)).astype(np.float64)
        o = np.zeros((len(pos), NQ, D))
        for t, (p, b) in enumerate(zip(pos, slot)):
            for h in range(NQ):
                j = h // (NQ // NKV)
                keys = np.stack([K[b, j][i] for i in range(p + 1)])
                vals = np.stack([V[b, j][i] for i in range(p + 1)])
                z = keys @ rot[t, h] / np.sqrt(D)
                w = np.exp(z - z.max())
                o[t, h] = (w / w.sum()) @ vals
        outs.append(o.reshape(len(pos), NQ * D))
    return outs


@pytest.mark.parametrize("kv_dtype", ["f32", "bf16"])
def test_attention_matches_float64_reference(kv_dtype):
    for got, want in zip(run(kv_dtype), reference(kv_dtype)):
        assert np.abs(got - want).max() <= 2e-5 * np.abs(want).max()


def test_exp_within_two_half_ulps_over_its_range():
    x = np.concatenate([np.linspace(-87, 88, 350001), [-1e-30, 0.0, 1e-30]]).astype(np.float32)
    y = x.copy()
    kernels._exp(y)
    want = np.exp(x.astype(np.float64))
    assert np.all(np.abs(y - want) <= 2 * 2.0 ** -24 * want)
    y = np.array([-100, -1e30, -np.inf], np.float32)
    kernels._exp(y)
    assert np.all((y > 0) & (y < 2e-38))  # clamped far below anything a softmax keeps
    y = np.array([89, 1e30, np.inf], np.float32)
    kernels._exp(y)
    assert np.all(np.isfinite(y) & (y > 1e38))  # clamped: finite, so g / (1 + e) stays a number


def test_swiglu_matches_float64_reference():
    rng = np.random.default_rng(3)
    F = 1000
    gu = (rng.standard_normal((3, 2 * F)) * 6).astype(np.float32)
    gu[0, :4] = [-200.0, -90.0, 90.0, 0.0]   # past the exp's clamps both ways, and zero
    g, u = gu[:, :F].astype(np.float64), gu[:, F:].astype(np.float64)
    want = g / (1.0 + np.exp(-g)) * u
    got = kernels.swiglu(gu, F)
    assert got.dtype == np.float32 and got.shape == (3, F)
    assert np.all(np.abs(got - want) <= 1e-6 * np.abs(want) + 1e-30)


def test_attention_bits_do_not_depend_on_how_numba_built_it(tmp_path):
    """A fresh compile (empty Numba cache, in a subprocess) gives this process's bits exactly:
    with fast-math reassociation a cached and a freshly compiled kernel differed, and nodes
    that must agree to the bit (the f64 wire) did not."""
    code = ("import sys, numpy as np; sys.path[:0] = ['tests', '.']; import test_kernels as t; "
            f"np.save({str(tmp_path / 'o.npy')!r}, np.concatenate(t.run('f32')))")
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / "numba"))
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, check=True, timeout=300)
    assert np.array_equal(np.load(tmp_path / "o.npy"), np.concatenate(run("f32")))
