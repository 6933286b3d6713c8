"""config.json of the LLaMA family (Hugging Face LlamaForCausalLM), validated."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from client.errors import UserError


@dataclass(frozen=True)
class LlamaConfig:
    dim: int            # D, hidden_size
    ffn_dim: int        # F, intermediate_size
    n_layers: int
    n_heads: int        # Hq
    n_kv_heads: int     # Hkv
    head_dim: int       # d
    vocab_size: int
    max_seq_len: int
    rope_theta: float
    rope_scaling: dict | None
    norm_eps: float
    tie_embeddings: bool
    bos_id: int
    eos_ids: tuple[int, ...]

    @property
    def group(self) -> int:  # query heads per key/value head
        return self.n_heads // self.n_kv_heads

    @staticmethod
    def load(model_dir: Path) -> "LlamaConfig":
        if not Path(model_dir).is_dir():
            raise UserError(f"{model_dir}: no such model folder; give the path to a Hugging Face "
                            "model folder (config.json, model.safetensors, tokenizer.model)")
        path = Path(model_dir) / "config.json"
        if not path.is_file():
            raise UserError(f"{path}: no config.json; MODEL_DIR must be a Hugging Face model "
                            "folder (config.json, model.safetensors, tokenizer.model)")
        try:
            c = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UserError(f"{path}: not valid JSON ({e}); restore the file from the model's source")
        return LlamaConfig.from_dict(c, path)

    @staticmethod
    def from_dict(c: dict, path: Path | str = "config.json") -> "LlamaConfig":
        if not isinstance(c, dict):
            raise UserError(f"{path}: expected a JSON object")
        arch = c.get("architectures") or []
        mtype = c.get("model_type")
        if mtype != "llama" and "LlamaForCausalLM" not in arch:
            raise UserError(f"{path}: model_type={mtype!r}, architectures={arch!r}: not a LLaMA "
                            "model; tensorlan runs LlamaForCausalLM checkpoints only")
        act = c.get("hidden_act", "silu")
        if act != "silu":
            raise UserError(f"{path}: hidden_act={act!r}; only silu (SwiGLU) LLaMA models are supported")

        def need(key, kind=int, positive=True):
            v = c.get(key)
            if not isinstance(v, kind) or isinstance(v, bool) or (positive and v <= 0):
                raise UserError(f"{path}: {key}={v!r}, expected a positive {kind.__name__}")
            return v

        def number(v, key, kind=float, positive=False):
            if (isinstance(v, bool) or not isinstance(v, (int, float)) or v != v or abs(v) == float("inf")
                    or (kind is int and not isinstance(v, int)) or (positive and v <= 0)):
                what = "integer" if kind is int else "number"
                raise UserError(f"{path}: {key}={v!r}, expected "
                                + (f"a positive {what}" if positive else "an integer" if kind is int else "a number"))
            return kind(v)

        D, Hq = need("hidden_size"), need("num_attention_heads")
        Hkv = c.get("num_key_value_heads") or Hq
        hd = c.get("head_dim") or (D // Hq if D % Hq == 0 else None)
        if not isinstance(Hkv, int) or Hkv <= 0 or Hq % Hkv:
            raise UserError(f"{path}: num_key_value_heads={Hkv!r} must divide num_attention_heads={Hq}")
        if not isinstance(hd, int) or hd <= 0 or hd % 2:
            raise UserError(f"{path}: head_dim={hd!r} (hidden_size {D} / heads {Hq}) must be a "
                            "positive even integer")
        scaling = c.get("rope_scaling")
        if scaling is not None:
            if not isinstance(scaling, dict):
                raise UserError(f"{path}: rope_scaling={scaling!r}, expected an object or null")
            kind = scaling.get("rope_type", scaling.get("type"))
            if kind not in ("llama3", "default"):
                raise UserError(f"{path}: rope_scaling type {kind!r} is not supported (llama3 is)")
            if kind == "default":
                scaling = None
            else:  # rope_inv_freq divides by these
                v = {k: number(scaling.get(k, default), f"rope_scaling.{k}") for k, default in (
                    ("factor", None), ("original_max_position_embeddings", None),
                    ("low_freq_factor", 1.0), ("high_freq_factor", 4.0))}
                if min(v["factor"], v["original_max_position_embeddings"], v["low_freq_factor"]) <= 0 \
                        or v["high_freq_factor"] <= v["low_freq_factor"]:
                    raise UserError(f"{path}: rope_scaling={scaling!r}: factor, low_freq_factor and "
                                    "original_max_position_embeddings must be positive, "
                                    "high_freq_factor above low_freq_factor")
        eos = c.get("eos_token_id", 2)
        eos = tuple(eos) if isinstance(eos, list) else (eos,)
        for e in eos:
            number(e, "eos_token_id", int)
        return LlamaConfig(
            dim=D, ffn_dim=need("intermediate_size"), n_layers=need("num_hidden_layers"),
            n_heads=Hq, n_kv_heads=Hkv, head_dim=hd, vocab_size=need("vocab_size"),
            max_seq_len=need("max_position_embeddings"),
            rope_theta=number(c.get("rope_theta", 10000.0), "rope_theta", positive=True), rope_scaling=scaling,
            norm_eps=number(c.get("rms_norm_eps", 1e-5), "rms_norm_eps"),
            tie_embeddings=bool(c.get("tie_word_embeddings", False)),
            bos_id=number(c.get("bos_token_id", 1), "bos_token_id", int), eos_ids=eos)


def rope_inv_freq(cfg: LlamaConfig) -> np.ndarray:
    """theta^(-2i/d) for i < d/2, with Llama 3's frequency-dependent scaling when configured."""
    d = cfg.head_dim
    inv = cfg.rope_theta ** (-np.arange(0, d, 2, dtype=np.float64) / d)
    s = cfg.rope_scaling
    if s is None:
        return inv
    factor, lo, hi = float(s["factor"]), float(s.get("low_freq_factor", 1.0)), float(s.get("high_freq_factor", 4.0))
    old = float(s["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv
    smooth = (old / wavelen - lo) / (hi - lo)
    scaled = np.where(wavelen > old / lo, inv / factor, inv)                 # long waves: slowed
    mid = (wavelen >= old / hi) & (wavelen <= old / lo)
    return np.where(mid, (1 - smooth) * inv / factor + smooth * inv, scaled)  # between: blended


def rope_tables(cfg: LlamaConfig, positions: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin [positions (default max_seq_len), d/2] float32 of pos * inv_freq (computed in
    float64; row p is the same whatever the number of rows)."""
    n = cfg.max_seq_len if positions is None else positions
    ang = np.arange(n, dtype=np.float64)[:, None] * rope_inv_freq(cfg)[None, :]
    return np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)
