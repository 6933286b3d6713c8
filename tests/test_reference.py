"""Checks of the float64 reference itself (tests/reference.py)."""

import json
import math
import os
import shutil
import struct
import subprocess
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))
from reference import (  # noqa: E402
    bf16_round_ref,
    load_hf_llama_f64,
    q8_0_dequantize_ref,
    q8_0_quantize_ref,
    q8_0_roundtrip_ref,
    reference_logits,
    reference_perplexity,
    rope_inv_freq,
)

STORIES = "/work/shared/models/stories260K"
EXPECTED_STORY = ("Once upon a time, there was a little girl named Lily. She loved to play "
                  "outside in the park. One day, she saw a big, red ball.")


def _f32(bits):
    return np.array(bits, dtype=np.uint32).view(np.float32)


# --------------------------------------------------------------------------------------
# (a) the real trained model
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stories():
    if not os.path.isdir(STORIES):
        pytest.skip("stories260K not available")
    return load_hf_llama_f64(STORIES)


@pytest.fixture(scope="module")
def sp():
    spm = pytest.importorskip("sentencepiece")
    return spm.SentencePieceProcessor(model_file=os.path.join(STORIES, "tokenizer.model"))


def _greedy(model, ids, n, transform=None):
    ids = list(ids)
    for _ in range(n):
        ids.append(int(np.argmax(reference_logits(model, ids, transform)[-1])))
    return ids


def test_stories_greedy_text(stories, sp):
    cfg, _ = stories
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]) == (8, 4, 8)
    prompt = [1] + sp.encode("Once upon a time")
    # The README's sentence ends after 40 generated tokens (30 stop at "One day,").
    ids = _greedy(stories, prompt, 40)
    assert sp.decode(ids) == EXPECTED_STORY
    assert sp.decode(ids[: len(prompt) + 30]) == EXPECTED_STORY[: EXPECTED_STORY.index("One day,") + 8]


def test_stories_causal_prefix_consistency(stories):
    ids = [1, 403, 407, 261, 378, 29, 35, 50, 90, 7]
    full = reference_logits(stories, ids)
    for t in (1, 4, 9):
        np.testing.assert_allclose(reference_logits(stories, ids[:t]), full[:t], rtol=0, atol=1e-12)


def test_stories_perplexity(stories, sp):
    ids = sp.encode(EXPECTED_STORY)
    ids = [1] + ids
    logits = reference_logits(stories, ids)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    manual = math.exp(-np.mean([logp[t, ids[t + 1]] for t in range(len(ids) - 1)]))
    ppl = reference_perplexity(stories, ids)
    assert ppl == pytest.approx(manual, rel=1e-12)
    assert ppl < 1.5                     # the model's own greedy text is very likely
    shuffled = list(np.random.default_rng(0).permutation(ids[1:]))
    assert reference_perplexity(stories, [1] + shuffled) > 20 * ppl


def test_weight_transform_applied_to_matrices_only(stories):
    cfg, _ = stories
    calls = []

    def tf(w):
        calls.append(w.shape)
        return q8_0_roundtrip_ref(w)

    ids = [1, 403, 407, 261, 378]
    a = reference_logits(stories, ids)
    b = reference_logits(stories, ids, tf)
    # 7 projections per layer + the (tied) output matrix; never norms or embedding lookup.
    assert len(calls) == 7 * cfg["num_hidden_layers"] + 1
    assert all(len(s) == 2 for s in calls)
    assert not np.array_equal(a, b)
    assert np.max(np.abs(a - b)) < 0.05 * np.max(np.abs(a))


# --------------------------------------------------------------------------------------
# (b) Q8_0
# --------------------------------------------------------------------------------------


def test_q8_0_all_zeros():
    q, d = q8_0_quantize_ref(np.zeros((3, 64), np.float32))
    assert q.dtype == np.int8 and d.dtype == np.float16
    assert q.shape == (3, 64) and d.shape == (3, 2)
    assert not q.any() and not d.astype(np.float32).any()
    assert not q8_0_dequantize_ref(q, d, 64).any()


def test_q8_0_negative_amax():
    x = np.linspace(-0.5, 0.25, 32, dtype=np.float32)[None]   # amax = |-0.5|
    q, d = q8_0_quantize_ref(x)
    assert q[0, 0] == -127 and q[0].max() < 127
    assert d[0, 0] == np.float16(np.float32(0.5) / np.float32(127))


def test_q8_0_ties_round_half_away_from_zero():
    # amax = 127 -> d = 1 and id = 1 exactly, so x*id is exactly x.
    vals = [127, 0.5, -0.5, 1.5, -1.5, 2.5, -2.5, 126.5, -126.5, 3.49, -3.51]
    x = np.zeros((1, 32), np.float32)
    x[0, : len(vals)] = vals
    q, d = q8_0_quantize_ref(x)
    assert d[0, 0] == 1.0
    assert q[0, : len(vals)].tolist() == [127, 1, -1, 2, -2, 3, -3, 127, -127, 3, -4]


def test_q8_0_float32_arithmetic_order():
    # A block of near-tie values (k + 0.5) * d nudged by a few ulps.  Expected q and d are
    # the output of llama.cpp's quantize_row_q8_0_ref compiled with gcc.  This block gives
    # a different answer for each plausible mistake: dividing by d in float64, multiplying
    # by id in float64, exact x*127/amax, scaling by the fp16 d, banker's rounding, or
    # doing roundf's +0.5 in float32.
    bits = [0x3fb704fc, 0xbf428c5a, 0xbf3faa82, 0x3e92fdf4, 0xbf997a1b, 0xbf794f5b, 0x3f31414c,
            0x3ed2667c, 0xbfa67265, 0x3f22d818, 0x3f118d0a, 0x3df21ac1, 0xbf1d1467, 0xbf5f5ec8,
            0xbd21672c, 0xbf6ae626, 0x3f8df2bb, 0x3f8f63a8, 0xbf39e6d5, 0x3fb36ab0, 0xbdacee8b,
            0x3bb875e7, 0xbed2667e, 0x3f98092d, 0xbf62409f, 0xbf428c5b, 0xbd95dfcd, 0xbd95dfcc,
            0xbf68044d, 0x3f9dccde, 0x3f599b19, 0x3eef38ea]
    expected = [127, -68, -66, 25, -107, -87, 61, 37, -116, 57, 51, 11, -55, -78, -4, -82, 99,
                100, -65, 125, -8, 0, -37, 105, -79, -68, -7, -7, -81, 110, 76, 42]
    q, d = q8_0_quantize_ref(_f32(bits)[None])
    assert q[0].tolist() == expected
    assert int(d.view(np.uint16)[0, 0]) == 0x21C4


def test_q8_0_padding():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((5, 172)).astype(np.float32)
    q, d = q8_0_quantize_ref(x)
    assert q.shape == (5, 192) and d.shape == (5, 6)
    assert not q[:, 172:].any()
    # The last, partial block is quantized as if zero-padded.
    xp = np.zeros((5, 192), np.float32)
    xp[:, :172] = x
    q2, d2 = q8_0_quantize_ref(xp)
    assert np.array_equal(q, q2) and np.array_equal(d.view(np.uint16), d2.view(np.uint16))
    assert q8_0_dequantize_ref(q, d, 172).shape == (5, 172)


@pytest.mark.parametrize("scale", [1e-3, 0.02, 1.0, 300.0])
def test_q8_0_error_bound(scale):
    rng = np.random.default_rng(2)
    x = (rng.standard_normal((7, 100)) * scale).astype(np.float32)
    x[3, 40:] *= 50                                           # blocks of different scale
    q, d = q8_0_quantize_ref(x)
    deq = q8_0_dequantize_ref(q, d, 100)
    xp = np.zeros((7, 128), np.float32)
    xp[:, :100] = x
    d32 = np.abs(xp).reshape(7, 4, 32).max(-1) / np.float32(127)         # float32 d
    d32 = np.repeat(d32.astype(np.float64), 32, axis=1)[:, :100]
    d16 = np.repeat(d.astype(np.float64), 32, axis=1)[:, :100]
    # |x - q*d16| <= |x - q*d32| + |q|*|d32 - d16| <= d32/2 + 127*|d32 - d16| (+ float32 eps)
    bound = d32 / 2 + 127 * np.abs(d32 - d16) + 1e-6 * d32
    assert np.all(np.abs(x - deq) <= bound)
    assert np.abs(q).max() == 127


@pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler")
def test_q8_0_matches_compiled_c(tmp_path):
    # The loop of llama.cpp's quantize_row_q8_0_ref (ggml/src/ggml-quants.c), compiled here.
    src = r"""
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#define QK8_0 32
#define MAX(a, b) ((a) > (b) ? (a) : (b))
static uint16_t fp16(float f) { _Float16 h = (_Float16)f; uint16_t u; memcpy(&u, &h, 2); return u; }
int main(void) {
    float x[QK8_0];
    while (fread(x, sizeof(float), QK8_0, stdin) == QK8_0) {
        float amax = 0.0f;
        for (int j = 0; j < QK8_0; j++) amax = MAX(amax, fabsf(x[j]));
        const float d = amax / ((1 << 7) - 1);
        const float id = d ? 1.0f/d : 0.0f;
        uint16_t dh = fp16(d);
        int8_t qs[QK8_0];
        for (int j = 0; j < QK8_0; ++j) { const float x0 = x[j]*id; qs[j] = roundf(x0); }
        fwrite(&dh, 2, 1, stdout); fwrite(qs, 1, QK8_0, stdout);
    }
    return 0;
}
"""
    (tmp_path / "q8.c").write_text(src)
    exe = tmp_path / "q8"
    try:
        subprocess.run(["cc", "-O1", "-std=c11", "-ffp-contract=off", "-o", str(exe),
                        str(tmp_path / "q8.c"), "-lm"], check=True, capture_output=True)
    except subprocess.CalledProcessError as e:
        pytest.skip(f"C compiler cannot build the harness: {e.stderr[:200]!r}")
    rng = np.random.default_rng(3)
    parts = [rng.standard_normal(32 * 2000) * 10.0 ** rng.uniform(-8, 8, 32 * 2000)]
    ties = (rng.integers(-127, 127, 32 * 500) + 0.5)
    ties[::32] = 127
    parts.append(ties * 2.0 ** rng.integers(-10, 10))
    amax = rng.uniform(0.001, 2, 500).astype(np.float32).repeat(32)       # near-ties
    d = (amax / np.float32(127)).astype(np.float64)
    near = ((rng.integers(-126, 126, amax.size) + 0.5) * d).astype(np.float32)
    near = near.view(np.uint32) + rng.integers(-2, 3, near.size).astype(np.uint32)
    near = near.view(np.float32)
    near[::32] = amax[::32]
    parts.append(near)
    x = np.concatenate(parts).astype(np.float32)
    out = subprocess.run([str(exe)], input=x.tobytes(), capture_output=True, check=True).stdout
    blocks = np.frombuffer(out, dtype=np.dtype([("d", "<u2"), ("qs", "i1", 32)]))
    q, dd = q8_0_quantize_ref(x.reshape(-1, 32))
    assert np.array_equal(q, blocks["qs"])
    assert np.array_equal(dd.view(np.uint16)[:, 0], blocks["d"])


# --------------------------------------------------------------------------------------
# (c) bfloat16 rounding
# --------------------------------------------------------------------------------------


def test_bf16_ties_to_even_and_specials():
    cases = {
        0x3F808000: 0x3F800000,   # 1 + 2^-8: tie, keep even 0x3F80
        0x3F818000: 0x3F820000,   # tie between 0x3F81 (odd) and 0x3F82 -> 0x3F82
        0x3F808001: 0x3F810000,   # just above the tie
        0x3F807FFF: 0x3F800000,   # just below the tie
        0xBF818000: 0xBF820000,   # negative tie, same magnitude rule
        0x00008000: 0x00000000,   # subnormal tie to even 0
        0x00018000: 0x00020000,   # subnormal tie to even 2
        0x7F7F8000: 0x7F800000,   # tie between max bf16 (odd) and inf -> inf
        0x7F7F7FFF: 0x7F7F0000,   # below the tie: max finite bf16
        0x7F800000: 0x7F800000,   # +inf
        0xFF800000: 0xFF800000,   # -inf
        0x3F800000: 0x3F800000,   # exactly representable
    }
    got = bf16_round_ref(_f32(list(cases))).view(np.uint32)
    assert [hex(v) for v in got] == [hex(v) for v in cases.values()]
    nan = bf16_round_ref(_f32([0x7FC00001, 0x7F800001]))
    assert np.isnan(nan).all() and not (nan.view(np.uint32) & 0xFFFF).any()


def test_bf16_is_nearest():
    rng = np.random.default_rng(4)
    x = (rng.standard_normal(20000) * 10.0 ** rng.uniform(-5, 5, 20000)).astype(np.float32)
    r = bf16_round_ref(x)
    bits = x.view(np.uint32) & 0xFFFF0000
    lo = bits.view(np.float32).astype(np.float64)                        # truncation
    hi = (bits + 0x10000).astype(np.uint32).view(np.float32).astype(np.float64)
    err = np.abs(r.astype(np.float64) - x)
    assert np.all(err <= np.minimum(np.abs(x - lo), np.abs(x - hi)))


# --------------------------------------------------------------------------------------
# Loading: sharded, bf16
# --------------------------------------------------------------------------------------


def _write_safetensors(path, tensors):
    # tensors: name -> (dtype string, shape, raw bytes)
    header, off = {}, 0
    for name, (dt, shape, raw) in tensors.items():
        header[name] = {"dtype": dt, "shape": list(shape), "data_offsets": [off, off + len(raw)]}
        off += len(raw)
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h)
        for _, _, raw in tensors.values():
            f.write(raw)


def test_load_sharded_bf16_matches_rounded_model(tmp_path, stories):
    cfg, W = stories
    shards = [{}, {}]
    rounded = {}
    for i, (name, w) in enumerate(sorted(W.items())):
        r = bf16_round_ref(w.astype(np.float32))
        rounded[name] = r.astype(np.float64)
        if "norm" in name:          # keep some tensors F32 to mix dtypes
            shards[i % 2][name] = ("F32", r.shape, r.astype("<f4").tobytes())
        else:
            raw = (r.view(np.uint32) >> 16).astype("<u2").tobytes()
            shards[i % 2][name] = ("BF16", r.shape, raw)
    weight_map = {}
    for k, shard in enumerate(shards):
        fn = f"model-{k + 1:05d}-of-00002.safetensors"
        _write_safetensors(tmp_path / fn, shard)
        weight_map.update({n: fn for n in shard})
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (tmp_path / "config.json").write_text(json.dumps(cfg))

    cfg2, W2 = load_hf_llama_f64(tmp_path)
    assert cfg2 == cfg and set(W2) == set(W)
    for name in W:
        assert W2[name].dtype == np.float64
        assert np.array_equal(W2[name], rounded[name]), name
    ids = [1, 403, 407, 261, 378]
    np.testing.assert_array_equal(reference_logits(str(tmp_path), ids),
                                  reference_logits((cfg, rounded), ids))


# --------------------------------------------------------------------------------------
# (d) Llama 3 RoPE scaling
# --------------------------------------------------------------------------------------


def test_llama3_rope_scaling_frequencies():
    # Llama-3.1-8B: head_dim 128, theta 500000, factor 8, low 1, high 4, original 8192.
    # By hand: inv_i = 500000^(-2i/128) = 500000^(-i/64), wavelen_i = 2*pi/inv_i.
    #   high_freq_wavelen = 8192/4 = 2048, low_freq_wavelen = 8192/1 = 8192.
    #   wavelen_i < 2048  <=> i < 64*ln(2048/2pi)/ln(500000) = 64*5.78674/13.12236 = 28.22
    #       -> i = 0..28 unchanged (i=28: wavelen 1956.5)
    #   wavelen_i > 8192  <=> i > 64*ln(8192/2pi)/ln(500000) = 64*7.17303/13.12236 = 34.98
    #       -> i = 35..63 divided by 8 (i=35: wavelen 8218.7)
    #   i = 29..34: smooth s = (8192/wavelen - 1)/3, inv' = inv*((1-s)/8 + s).
    #   i = 32: inv = 1/sqrt(500000) = 1.414214e-3, wavelen = 2pi*707.1068 = 4442.883,
    #           s = (1.843847 - 1)/3 = 0.281282, ratio = 0.718718/8 + 0.281282 = 0.371122,
    #           inv' = 5.24846e-4.
    #   i = 29: inv = 500000^(-29/64) = 2.616099e-3, wavelen = 2401.738,
    #           s = (3.410862 - 1)/3 = 0.803621, ratio = 0.196379/8 + 0.803621 = 0.828168.
    rs = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    base = rope_inv_freq(128, 500000.0)
    scaled = rope_inv_freq(128, 500000.0, rs)
    assert scaled.shape == (64,)
    assert base[0] == 1.0 and base[32] == pytest.approx(1.414214e-3, rel=1e-6)
    np.testing.assert_array_equal(scaled[:29], base[:29])
    np.testing.assert_allclose(scaled[35:], base[35:] / 8, rtol=1e-15)
    assert scaled[32] == pytest.approx(5.24846e-4, rel=2e-6)
    assert scaled[29] / base[29] == pytest.approx(0.828168, rel=2e-6)
    assert scaled[29] == pytest.approx(2.616099e-3 * 0.828168, rel=2e-6)
    # Smooth and monotone across both boundaries.
    assert np.all(np.diff(scaled) < 0)
    ratio = scaled / base
    assert np.all((ratio[29:35] < 1) & (ratio[29:35] > 0.125))


def test_llama3_rope_scaling_used_in_forward(stories):
    # original_max_position_embeddings = 4 makes every stories260K wavelength (2*pi/inv:
    # 6.3 .. 6283) longer than low_freq_wavelen = 4, so all frequencies are divided by 8:
    # the scaling must reach the forward pass.
    cfg, W = stories
    cfg3 = dict(cfg, rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                   "high_freq_factor": 4.0,
                                   "original_max_position_embeddings": 4})
    ids = [1, 403, 407, 261, 378, 29]
    a = reference_logits((cfg, W), ids)
    b = reference_logits((cfg3, W), ids)
    np.testing.assert_array_equal(a[0], b[0])        # position 0: no rotation either way
    assert not np.allclose(a[1:], b[1:])
