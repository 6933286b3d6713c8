"""Independent float64 numpy reference for tensorlan's tests.

Written from the published definitions only (llama.cpp's Q8_0 reference quantizer and
Hugging Face's LlamaForCausalLM); it deliberately imports nothing from client/, quant/ or
worker/, so that the optimized engine can be compared against it.
"""

from __future__ import annotations

import json
import math
import os
import struct

import numpy as np
from safetensors import safe_open

QK8_0 = 32


# --------------------------------------------------------------------------------------
# Q8_0 (llama.cpp)
# --------------------------------------------------------------------------------------
#
# Matched against llama.cpp, ggml/src/ggml-quants.c (ggml-org/llama.cpp):
#
#   // reference implementation for deterministic creation of model files
#   void quantize_row_q8_0_ref(const float * x, block_q8_0 * y, int64_t k) {
#       const int nb = k / QK8_0;
#       for (int i = 0; i < nb; i++) {
#           float amax = 0.0f; // absolute max
#           for (int j = 0; j < QK8_0; j++) {
#               const float v = x[i*QK8_0 + j];
#               amax = MAX(amax, fabsf(v));
#           }
#           const float d = amax / ((1 << 7) - 1);      // float32 division by 127
#           const float id = d ? 1.0f/d : 0.0f;          // float32 reciprocal
#           y[i].d = GGML_FP32_TO_FP16(d);               // round-to-nearest-even fp16
#           for (int j = 0; j < QK8_0; ++j) {
#               const float x0 = x[i*QK8_0 + j]*id;      // float32 product
#               y[i].qs[j] = roundf(x0);                 // half away from zero
#           }
#       }
#   }
#
#   dequantize_row_q8_0: y[i*qk + j] = x[i].qs[j]*GGML_FP16_TO_FP32(x[i].d);
#
# Note the quantizer multiplies by the float32 reciprocal `id`; it does not divide by d,
# and it uses the float32 d, not the fp16-rounded one.  This file reproduces that order.
# Rows are zero-padded to a multiple of 32 columns (the project's layout convention).


def q8_0_quantize_ref(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float32 [rows, cols] -> (q int8 [rows, cols_padded], d float16 [rows, cols_padded/32])."""
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError("q8_0_quantize_ref expects a 2-D array")
    rows, cols = x.shape
    ncols = -(-cols // QK8_0) * QK8_0
    xp = np.zeros((rows, ncols), dtype=np.float32)
    xp[:, :cols] = x
    blocks = xp.reshape(rows, ncols // QK8_0, QK8_0)

    # errstate: fp16(d) is inf when amax > 127*65504 (as in C); a block with amax < ~1e-36
    # overflows id to inf (C behaviour is undefined there).  Neither occurs in real weights.
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
        amax = np.max(np.abs(blocks), axis=2)                  # float32, exact
        d = (amax / np.float32(127)).astype(np.float32)         # float32 division
        id_ = np.where(d != 0, np.float32(1) / d, np.float32(0)).astype(np.float32)
        x0 = (blocks * id_[:, :, None]).astype(np.float32)      # float32 product
        # roundf: round half away from zero.  |x0| + 0.5 is exact in float64 (x0 is
        # float32), so floor() there is the exact C result (a float32 add can round up).
        x0 = x0.astype(np.float64)
        q = (np.sign(x0) * np.floor(np.abs(x0) + 0.5)).astype(np.int8).reshape(rows, ncols)
        d16 = d.astype(np.float16)                              # float32 -> fp16, RNE
    return q, d16


def q8_0_dequantize_ref(q: np.ndarray, d: np.ndarray, cols: int) -> np.ndarray:
    """(q int8 [rows, ncols_padded], d fp16 [rows, nblocks]) -> float64 [rows, cols].

    q*d is exact in float32 as well (8-bit x 11-bit significands), so this equals
    llama.cpp's float32 dequantization exactly."""
    q = np.asarray(q)
    rows, ncols = q.shape
    scale = np.repeat(np.asarray(d).astype(np.float64), QK8_0, axis=1)
    return (q.astype(np.float64) * scale)[:, :cols]


def q8_0_roundtrip_ref(w: np.ndarray) -> np.ndarray:
    """Convenience weight_transform: W -> dequant(quant(float32(W))) as float64."""
    w32 = np.asarray(w, dtype=np.float32)
    q, d = q8_0_quantize_ref(w32)
    return q8_0_dequantize_ref(q, d, w32.shape[1])


# --------------------------------------------------------------------------------------
# bfloat16
# --------------------------------------------------------------------------------------


def bf16_round_ref(x) -> np.ndarray:
    """float32 -> bfloat16 (round to nearest, ties to even) -> float32, on the bit pattern.

    bf16 is the top 16 bits of a float32.  Adding 0x7FFF plus the lowest kept bit and
    truncating rounds to nearest with ties to the even kept value; overflow correctly
    carries into the exponent (to inf).  NaNs stay NaN (quiet bit forced)."""
    x = np.asarray(x, dtype=np.float32)
    bits = x.view(np.uint32).astype(np.uint64)
    lsb = (bits >> 16) & 1
    rounded = ((bits + 0x7FFF + lsb) & 0xFFFF0000).astype(np.uint32)
    nan = np.isnan(x)
    rounded = np.where(nan, (bits.astype(np.uint32) | 0x00400000) & 0xFFFF0000, rounded)
    return rounded.astype(np.uint32).view(np.float32)


# --------------------------------------------------------------------------------------
# Loading a Hugging Face LLaMA directory
# --------------------------------------------------------------------------------------


def _read_safetensors_f64(path: str) -> dict[str, np.ndarray]:
    # File layout: u64 little-endian header length N, N bytes of JSON header, then data;
    # header entries {"dtype", "shape", "data_offsets": [begin, end]} relative to the data.
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    base = 8 + n
    out: dict[str, np.ndarray] = {}
    with safe_open(path, framework="np") as sf:
        for name, info in header.items():
            if name == "__metadata__":
                continue
            if info["dtype"] == "BF16":
                # numpy has no bfloat16: bf16 bits are the high half of a float32.
                begin, end = info["data_offsets"]
                raw = np.fromfile(path, dtype="<u2", count=(end - begin) // 2,
                                  offset=base + begin)
                arr = (raw.astype(np.uint32) << 16).view(np.float32)
                out[name] = arr.reshape(info["shape"]).astype(np.float64)
            else:
                out[name] = np.asarray(sf.get_tensor(name)).astype(np.float64)
    return out


def load_hf_llama_f64(model_dir: str) -> tuple[dict, dict[str, np.ndarray]]:
    """Return (config dict, {tensor name: float64 array}) for an HF LLaMA directory."""
    model_dir = os.fspath(model_dir)
    with open(os.path.join(model_dir, "config.json")) as f:
        config = json.load(f)
    index = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    weights: dict[str, np.ndarray] = {}
    for fn in files:
        weights.update(_read_safetensors_f64(os.path.join(model_dir, fn)))
    return config, weights


# --------------------------------------------------------------------------------------
# RoPE frequencies (HF modeling_rope_utils)
# --------------------------------------------------------------------------------------


def _rope_scaling(config: dict):
    rs = config.get("rope_scaling") or config.get("rope_parameters")
    if not rs:
        return None
    rope_type = rs.get("rope_type", rs.get("type", "default"))
    if rope_type == "default":
        return None
    if rope_type != "llama3":
        raise NotImplementedError(f"rope_type {rope_type!r} not supported by the reference")
    return rs


def rope_inv_freq(head_dim: int, theta: float, rope_scaling: dict | None = None) -> np.ndarray:
    """float64 inverse frequencies [head_dim // 2].

    Default: inv_freq[i] = theta ** (-(2i) / head_dim).
    llama3 (HF _compute_llama3_parameters, transformers/modeling_rope_utils.py):
        low_freq_wavelen  = old_context_len / low_freq_factor
        high_freq_wavelen = old_context_len / high_freq_factor
        wavelen = 2*pi / inv_freq
        inv_freq_llama = where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
        smoothed = (1 - smooth) * inv_freq_llama / factor + smooth * inv_freq_llama
        is_medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
        inv_freq_llama = where(is_medium, smoothed, inv_freq_llama)
    (attention_factor stays 1.0 for both types.)
    """
    inv_freq = 1.0 / (float(theta) ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    if rope_scaling is None:
        return inv_freq
    factor = float(rope_scaling["factor"])
    low = float(rope_scaling["low_freq_factor"])
    high = float(rope_scaling["high_freq_factor"])
    old_ctx = float(rope_scaling["original_max_position_embeddings"])
    low_freq_wavelen = old_ctx / low
    high_freq_wavelen = old_ctx / high
    wavelen = 2 * math.pi / inv_freq
    inv_llama = np.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_ctx / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * inv_llama / factor + smooth * inv_llama
    is_medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
    return np.where(is_medium, smoothed, inv_llama)


def _head_dim(config: dict) -> int:
    return config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]


def config_inv_freq(config: dict) -> np.ndarray:
    return rope_inv_freq(_head_dim(config), config.get("rope_theta", 10000.0),
                         _rope_scaling(config))


# --------------------------------------------------------------------------------------
# Forward pass (HF LlamaForCausalLM, float64)
# --------------------------------------------------------------------------------------


def _rms_norm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def _rotate_half(x: np.ndarray) -> np.ndarray:
    half = x.shape[-1] // 2
    return np.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def _silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


def reference_logits(model_dir_or_loaded, token_ids, weight_transform=None) -> np.ndarray:
    """Logits float64 [T, vocab] for tokens at positions 0..T-1 (causal).

    model_dir_or_loaded: a model directory, or the (config, weights) pair returned by
    load_hf_llama_f64.  weight_transform(W) -> W' is applied to every 2-D projection matrix
    (q/k/v/o, gate/up/down) and to the output (lm_head) matrix -- also when that matrix is
    the tied embedding -- but never to norms or to the embedding lookup."""
    if isinstance(model_dir_or_loaded, (tuple, list)):
        cfg, W = model_dir_or_loaded
    else:
        cfg, W = load_hf_llama_f64(model_dir_or_loaded)
    tf = weight_transform if weight_transform is not None else (lambda m: m)

    def linear(h, name):
        y = h @ np.asarray(tf(W[name + ".weight"]), dtype=np.float64).T
        bias = W.get(name + ".bias")
        return y if bias is None else y + bias

    tok = np.asarray(token_ids, dtype=np.int64).reshape(-1)
    T = tok.shape[0]
    nh = cfg["num_attention_heads"]
    nkv = cfg.get("num_key_value_heads") or nh
    hd = _head_dim(cfg)
    eps = cfg.get("rms_norm_eps", 1e-6)
    group = nh // nkv

    # RoPE tables: angle = pos * inv_freq, duplicated to length hd (HF: cat((freqs, freqs))).
    ang = np.arange(T, dtype=np.float64)[:, None] * config_inv_freq(cfg)[None, :]
    ang = np.concatenate([ang, ang], axis=-1)                  # [T, hd]
    cos, sin = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
    causal = np.triu(np.full((T, T), -np.inf), k=1)            # [t, s]: s > t masked

    x = W["model.embed_tokens.weight"][tok]                    # [T, hidden]
    for layer in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        h = _rms_norm(x, W[p + "input_layernorm.weight"], eps)
        q = linear(h, p + "self_attn.q_proj").reshape(T, nh, hd)
        k = linear(h, p + "self_attn.k_proj").reshape(T, nkv, hd)
        v = linear(h, p + "self_attn.v_proj").reshape(T, nkv, hd)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        # GQA: query head j reads kv head j // group (np.repeat gives k0,k0,..,k1,k1,..).
        k = np.repeat(k, group, axis=1)
        v = np.repeat(v, group, axis=1)
        scores = np.einsum("thd,shd->hts", q, k) / math.sqrt(hd) + causal
        scores -= scores.max(axis=-1, keepdims=True)
        probs = np.exp(scores)
        probs /= probs.sum(axis=-1, keepdims=True)
        attn = np.einsum("hts,shd->thd", probs, v).reshape(T, nh * hd)
        x = x + linear(attn, p + "self_attn.o_proj")

        h = _rms_norm(x, W[p + "post_attention_layernorm.weight"], eps)
        ff = _silu(linear(h, p + "mlp.gate_proj")) * linear(h, p + "mlp.up_proj")
        x = x + linear(ff, p + "mlp.down_proj")

    x = _rms_norm(x, W["model.norm.weight"], eps)
    if cfg.get("tie_word_embeddings", False) or "lm_head.weight" not in W:
        out = W["model.embed_tokens.weight"]
    else:
        out = W["lm_head.weight"]
    return x @ np.asarray(tf(out), dtype=np.float64).T


def reference_perplexity(model_dir, token_ids, weight_transform=None) -> float:
    """exp(mean NLL of tokens[1:] given their prefixes), float64."""
    tok = np.asarray(token_ids, dtype=np.int64).reshape(-1)
    logits = reference_logits(model_dir, tok, weight_transform)[:-1]
    m = logits.max(axis=-1, keepdims=True)
    logp = logits - m - np.log(np.exp(logits - m).sum(axis=-1, keepdims=True))
    nll = -logp[np.arange(tok.shape[0] - 1), tok[1:]]
    return float(np.exp(nll.mean()))
