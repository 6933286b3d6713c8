"""Write a deterministic random-weight LLaMA model in the Hugging Face layout.

    python -m bench.make_model SHAPE_CONFIG OUT_DIR [--layers N] [--seed 0]
                               [--dtype f16|bf16|f32] [--shard-gb X]

The model is meant for benchmarks and tests of shapes and speed: the weights
are noise, so the text it generates is noise too.

Weights
    Every matrix is normal(0, 0.02); the RMSNorm weights (input_layernorm,
    post_attention_layernorm, model.norm) are all ones.  Each tensor has its
    own random stream, so the output does not depend on the order in which
    tensors are generated, and any tensor can be reproduced on its own::

        rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
        w = rng.standard_normal(shape, dtype=np.float32) * np.float32(0.02)
        w.astype(np.float16)            # f16: IEEE round-to-nearest-even
        # bf16: top 16 bits of the float32, round-to-nearest-even
        # f32: stored as is

    (see :func:`reference_tensor`).  Large tensors are generated in row chunks
    of float32 and written with ``pwrite`` at their final offset, several
    tensors in parallel, so memory stays small (a few MB per thread) whatever
    the model size, and the files are byte-identical for the same arguments
    whatever the thread count.

Files (exactly the Hugging Face layout)
    config.json, generation_config.json, tokenizer.model (the Llama 2
    SentencePiece model), tokenizer_config.json, and either
    ``model.safetensors`` or, with --shard-gb, ``model-0000K-of-0000N.safetensors``
    plus ``model.safetensors.index.json``.  Shards are filled greedily in model
    order like ``transformers`` does (a shard is closed when the next tensor
    would push it past the limit; as in transformers, if everything fits in one
    shard you get a single ``model.safetensors`` and no index).
    ``tensorlan_random.json`` records the arguments and is written last: when
    OUT_DIR already holds a complete model made with the same arguments, the
    command does nothing (so benchmark scripts can call it unconditionally).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import threading
import time
import zlib
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = [
    "make_model",
    "MakeModelError",
    "TensorSpec",
    "tensor_specs",
    "tensor_rng",
    "reference_tensor",
    "f32_to_bf16_bits",
    "f32_to_f16_bits",
    "DEFAULT_TOKENIZER",
    "MARKER_NAME",
]

DEFAULT_TOKENIZER = Path(
    os.environ.get("TENSORLAN_TOKENIZER", "/work/shared/models/llama2-tokenizer/tokenizer.model")
)
MARKER_NAME = "tensorlan_random.json"
FORMAT_VERSION = 1
INIT_STD = 0.02
GB = 10**9  # Hugging Face's "5GB" means 5 * 10**9 bytes

# float32 elements generated per step; module-level so tests can make it tiny.
_CHUNK_ELEMS = 1 << 20

# name -> (safetensors dtype, bytes per element, config.json torch_dtype)
_DTYPES = {
    "f16": ("F16", 2, "float16"),
    "bf16": ("BF16", 2, "bfloat16"),
    "f32": ("F32", 4, "float32"),
}
_DTYPE_ALIASES = {
    "f16": "f16", "fp16": "f16", "float16": "f16", "half": "f16",
    "bf16": "bf16", "bfloat16": "bf16",
    "f32": "f32", "fp32": "f32", "float32": "f32", "float": "f32",
}
_ONE_BITS = {"f16": 0x3C00, "bf16": 0x3F80, "f32": 0x3F800000}

_TOKENIZER_CONFIG = {
    "tokenizer_class": "LlamaTokenizer",
    "add_bos_token": True,
    "add_eos_token": False,
    "bos_token": "<s>",
    "eos_token": "</s>",
    "unk_token": "<unk>",
}


class MakeModelError(Exception):
    """A user-facing error (bad arguments, unreadable config, unwritable dir)."""


# --------------------------------------------------------------------------- #
# Tensor list                                                                 #
# --------------------------------------------------------------------------- #

@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    kind: str  # "normal" or "ones"

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


def _dims(cfg: dict) -> dict:
    try:
        V = int(cfg["vocab_size"])
        D = int(cfg["hidden_size"])
        F = int(cfg["intermediate_size"])
        L = int(cfg["num_hidden_layers"])
        Hq = int(cfg["num_attention_heads"])
    except KeyError as e:
        raise MakeModelError(f"shape config has no {e.args[0]!r}") from None
    except (TypeError, ValueError) as e:
        raise MakeModelError(f"shape config has a non-integer size: {e}") from None
    Hkv = int(cfg.get("num_key_value_heads") or Hq)
    if min(V, D, F, L, Hq, Hkv) < 1:
        raise MakeModelError("shape config sizes must all be >= 1")
    hd = cfg.get("head_dim")
    if hd is None:
        if D % Hq:
            raise MakeModelError(f"hidden_size {D} is not divisible by num_attention_heads {Hq}")
        hd = D // Hq
    hd = int(hd)
    if Hq % Hkv:
        raise MakeModelError(f"num_attention_heads {Hq} is not a multiple of num_key_value_heads {Hkv}")
    return dict(V=V, D=D, F=F, L=L, Hq=Hq, Hkv=Hkv, hd=hd,
                tie=bool(cfg.get("tie_word_embeddings", False)))


def tensor_specs(cfg: dict) -> list[TensorSpec]:
    """All tensors of a LlamaForCausalLM with config ``cfg``, in HF state-dict order."""
    d = _dims(cfg)
    V, D, F, Hq, Hkv, hd = d["V"], d["D"], d["F"], d["Hq"], d["Hkv"], d["hd"]
    specs = [TensorSpec("model.embed_tokens.weight", (V, D), "normal")]
    for i in range(d["L"]):
        p = f"model.layers.{i}."
        specs += [
            TensorSpec(p + "self_attn.q_proj.weight", (Hq * hd, D), "normal"),
            TensorSpec(p + "self_attn.k_proj.weight", (Hkv * hd, D), "normal"),
            TensorSpec(p + "self_attn.v_proj.weight", (Hkv * hd, D), "normal"),
            TensorSpec(p + "self_attn.o_proj.weight", (D, Hq * hd), "normal"),
            TensorSpec(p + "mlp.gate_proj.weight", (F, D), "normal"),
            TensorSpec(p + "mlp.up_proj.weight", (F, D), "normal"),
            TensorSpec(p + "mlp.down_proj.weight", (D, F), "normal"),
            TensorSpec(p + "input_layernorm.weight", (D,), "ones"),
            TensorSpec(p + "post_attention_layernorm.weight", (D,), "ones"),
        ]
    specs.append(TensorSpec("model.norm.weight", (D,), "ones"))
    if not d["tie"]:
        specs.append(TensorSpec("lm_head.weight", (V, D), "normal"))
    return specs


# --------------------------------------------------------------------------- #
# Values                                                                      #
# --------------------------------------------------------------------------- #

def tensor_rng(seed: int, name: str) -> np.random.Generator:
    """The random stream of tensor ``name``: independent of every other tensor."""
    return np.random.default_rng([int(seed), zlib.crc32(name.encode("utf-8"))])


def reference_tensor(name: str, shape, seed: int = 0, kind: str = "normal") -> np.ndarray:
    """The float32 values of one tensor, computed in one go (for tests / checks)."""
    if kind == "ones":
        return np.ones(shape, dtype=np.float32)
    x = tensor_rng(seed, name).standard_normal(tuple(shape), dtype=np.float32)
    x *= np.float32(INIT_STD)
    return x


def f32_to_bf16_bits(x: np.ndarray, out: np.ndarray | None = None,
                     tmp: np.ndarray | None = None) -> np.ndarray:
    """bfloat16 bit patterns (uint16) of float32 ``x``: round-to-nearest-even
    on the top 16 bits; NaNs stay (quiet) NaNs.  ``out``/``tmp`` (uint16 /
    uint32, same size) avoid allocations."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    if out is None:
        out = np.empty(u.shape, np.uint16)
    if tmp is None:
        tmp = np.empty(u.shape, np.uint32)
    np.right_shift(u, 16, out=tmp)
    np.bitwise_and(tmp, 1, out=tmp)        # lsb of the kept half (ties -> even)
    tmp += np.uint32(0x7FFF)
    tmp += u                               # cannot wrap for non-NaN inputs
    tmp >>= np.uint32(16)
    np.copyto(out, tmp, casting="unsafe")
    nan = (u & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000)
    if nan.any():
        out[nan] = (u[nan] >> np.uint32(16)).astype(np.uint16) | np.uint16(0x0040)
    return out


def _f32_to_f16_bits_numpy(u32: np.ndarray, out: np.ndarray) -> None:
    np.copyto(out.view(np.float16), u32.view(np.float32), casting="unsafe")


def _make_f16_kernel():
    """A numba kernel equal to numpy's float32 -> float16 cast (round-to-nearest-
    even, subnormals, inf; NaN -> 0x7E00 | sign) that runs ~5x faster than
    ``astype(np.float16)`` on CPUs where numpy has no SIMD path for it."""
    try:
        import numba
    except Exception:  # pragma: no cover - numba is a project dependency
        return None

    def f16_bits(u, out):  # pragma: no cover - compiled
        for i in range(u.size):
            x = u[i]
            sign = (x >> 16) & 0x8000
            a = x & 0x7FFFFFFF
            if a >= 0x47800000:                    # |x| >= 65536 (after rounding: inf) / nan
                o = 0x7E00 if a > 0x7F800000 else 0x7C00
            elif a < 0x38800000:                   # |x| < 2**-14: f16 subnormal or zero
                e = a >> 23
                if e < 102:                        # |x| < 2**-25: rounds to zero
                    o = 0
                else:
                    m = (a & 0x7FFFFF) | 0x800000
                    sh = 126 - e
                    o = m >> sh
                    rem = m & ((1 << sh) - 1)
                    half = 1 << (sh - 1)
                    if rem > half or (rem == half and (o & 1)):
                        o += 1
            else:                                  # normal: rebias + round-to-nearest-even
                o = ((a + 0xC8000FFF + ((a >> 13) & 1)) >> 13) & 0xFFFF
            out[i] = o | sign

    for cache in (True, False):  # caching needs a writable __pycache__
        try:
            return numba.njit(nogil=True, cache=cache, boundscheck=False)(f16_bits)
        except Exception:
            pass
    return None


_f16_kernel = None
_f16_kernel_lock = threading.Lock()


def _get_f16_kernel():
    global _f16_kernel
    with _f16_kernel_lock:
        if _f16_kernel is None:
            k = _make_f16_kernel()
            if k is not None:
                try:  # compile now (not in a worker thread) and check against numpy
                    probe = np.random.default_rng(0).integers(0, 0x47800000, 4096, dtype=np.uint32)
                    probe[:8] = [0, 0x3C000000, 0x33000000, 0x33000001, 0x38800000, 0x387FE000,
                                 0x477FEFFF, 0x3F801000]  # zero/tiny/ties/subnormal edge
                    probe[2048:] |= np.uint32(0x80000000)
                    got = np.empty(probe.size, np.uint16)
                    k(probe, got)
                    want = np.empty(probe.size, np.uint16)
                    _f32_to_f16_bits_numpy(probe, want)
                    if not np.array_equal(got, want):
                        k = None
                except Exception:
                    k = None
            _f16_kernel = k if k is not None else _f32_to_f16_bits_numpy
        return _f16_kernel


def f32_to_f16_bits(x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """float16 bit patterns (uint16) of float32 ``x``; same result as
    ``x.astype(np.float16)`` (up to NaN payloads), just faster."""
    u = np.ascontiguousarray(x, dtype=np.float32).reshape(-1).view(np.uint32)
    if out is None:
        out = np.empty(u.shape, np.uint16)
    _get_f16_kernel()(u, out.reshape(-1))
    return out.reshape(np.shape(x))


# --------------------------------------------------------------------------- #
# safetensors layout                                                          #
# --------------------------------------------------------------------------- #

@dataclass
class _Shard:
    filename: str
    specs: list[TensorSpec]
    header: bytes = b""     # 8-byte length + JSON + padding
    data_size: int = 0

    @property
    def file_size(self) -> int:
        return len(self.header) + self.data_size


def _header_bytes(specs: list[TensorSpec], st_dtype: str, itemsize: int) -> tuple[bytes, list[int]]:
    hdr: dict = {"__metadata__": {"format": "pt"}}
    offsets, off = [], 0
    for s in specs:
        n = s.numel * itemsize
        hdr[s.name] = {"dtype": st_dtype, "shape": list(s.shape), "data_offsets": [off, off + n]}
        offsets.append(off)
        off += n
    js = json.dumps(hdr, separators=(",", ":")).encode("utf-8")
    js += b" " * (-len(js) % 8)
    return len(js).to_bytes(8, "little") + js, offsets


def _plan(specs: list[TensorSpec], dtype: str, shard_bytes: int | None) -> list[_Shard]:
    st_dtype, itemsize, _ = _DTYPES[dtype]
    groups: list[list[TensorSpec]] = [[]]
    size = 0
    for s in specs:
        n = s.numel * itemsize
        if shard_bytes is not None and groups[-1] and size + n > shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(s)
        size += n
    if len(groups) == 1:
        names = ["model.safetensors"]
    else:
        names = [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))]
    shards = []
    for fname, group in zip(names, groups):
        sh = _Shard(fname, group)
        sh.header, _ = _header_bytes(group, st_dtype, itemsize)
        sh.data_size = sum(s.numel for s in group) * itemsize
        shards.append(sh)
    return shards


# --------------------------------------------------------------------------- #
# Writing                                                                     #
# --------------------------------------------------------------------------- #

def _pwrite_all(fd: int, buf, offset: int) -> None:
    mv = memoryview(buf).cast("B")
    while mv:
        n = os.pwrite(fd, mv, offset)
        mv = mv[n:]
        offset += n


class _Progress:
    """A tiny stderr progress bar: bytes written / total, rate, ETA."""

    def __init__(self, total: int, enabled: bool):
        self.total = max(total, 1)
        self.done = 0
        self.enabled = enabled
        self.lock = threading.Lock()
        self.t0 = time.perf_counter()
        self.tty = enabled and sys.stderr.isatty()
        self.every = 0.1 if self.tty else 5.0
        self.last = self.t0

    def add(self, n: int) -> None:
        with self.lock:
            self.done += n

    def draw(self, final: bool = False) -> None:
        if not self.enabled:
            return
        now = time.perf_counter()
        if not final and now - self.last < self.every:
            return
        self.last = now
        done = self.done
        frac = min(done / self.total, 1.0)
        el = now - self.t0
        rate = done / el if el > 0 else 0.0
        eta = (self.total - done) / rate if rate > 0 and not final else 0.0
        width = 30
        fill = int(round(frac * width))
        line = (f"  [{'#' * fill}{'.' * (width - fill)}] {frac * 100:5.1f}%  "
                f"{_fmt_bytes(done)} / {_fmt_bytes(self.total)}  {rate / 1e6:6.0f} MB/s")
        line += f"  {el:5.1f}s" if final else f"  ETA {eta:4.0f}s"
        if self.tty:  # redraw in place
            sys.stderr.write("\r" + line + ("\n" if final else ""))
        else:         # a log file: one line every few seconds
            sys.stderr.write(line + "\n")
        sys.stderr.flush()


def _fmt_bytes(n: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"


class _Writer:
    def __init__(self, dtype: str, seed: int, progress: _Progress, stop: threading.Event):
        self.dtype = dtype
        self.seed = seed
        self.progress = progress
        self.stop = stop
        self.itemsize = _DTYPES[dtype][1]
        self.local = threading.local()
        self.f16 = _get_f16_kernel() if dtype == "f16" else None

    def _buffers(self):
        b = getattr(self.local, "bufs", None)
        if b is None:
            n = _CHUNK_ELEMS
            f32 = np.empty(n, np.float32)
            tmp = np.empty(n, np.uint32) if self.dtype == "bf16" else None
            out = np.empty(n, np.uint16) if self.itemsize == 2 else None
            b = self.local.bufs = (f32, tmp, out)
        return b

    def write(self, fd: int, offset: int, spec: TensorSpec) -> None:
        f32, tmp, out = self._buffers()
        numel = spec.numel
        if spec.kind == "ones":
            pattern = np.full(min(numel, len(f32)), _ONE_BITS[self.dtype],
                              dtype=np.uint16 if self.itemsize == 2 else np.uint32)
            done = 0
            while done < numel:
                n = min(len(pattern), numel - done)
                _pwrite_all(fd, pattern[:n], offset + done * self.itemsize)
                done += n
                self.progress.add(n * self.itemsize)
            return
        rng = tensor_rng(self.seed, spec.name)
        scale = np.float32(INIT_STD)
        # Row chunks: whole rows per step when a row fits in the buffer.  The
        # values do not depend on the step: consecutive standard_normal calls
        # continue one stream exactly as a single big call would.
        cols = spec.shape[-1]
        step = (len(f32) // cols) * cols if cols <= len(f32) else len(f32)
        done = 0
        while done < numel:
            if self.stop.is_set():
                return
            n = min(step, numel - done)
            x = f32[:n]
            rng.standard_normal(out=x, dtype=np.float32)
            np.multiply(x, scale, out=x)
            if self.dtype == "f32":
                data = x
            elif self.dtype == "f16":
                data = out[:n]
                self.f16(x.view(np.uint32), data)
            else:
                data = f32_to_bf16_bits(x, out=out[:n], tmp=tmp[:n])
            _pwrite_all(fd, data, offset + done * self.itemsize)
            done += n
            self.progress.add(n * self.itemsize)


# --------------------------------------------------------------------------- #
# Directory handling                                                          #
# --------------------------------------------------------------------------- #

def _weight_files(out_dir: Path) -> list[Path]:
    pats = ("model.safetensors", "model-*-of-*.safetensors", "model.safetensors.index.json",
            "model*.safetensors.partial", "pytorch_model*.bin", "pytorch_model.bin.index.json")
    found = set()
    for p in pats:
        found.update(out_dir.glob(p))
    return sorted(found)


def _read_marker(out_dir: Path) -> dict | None:
    try:
        with open(out_dir / MARKER_NAME) as f:
            m = json.load(f)
        return m if isinstance(m, dict) else {}
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}


def _up_to_date(out_dir: Path, args: dict) -> bool:
    m = _read_marker(out_dir)
    if not m or not m.get("complete") or m.get("args") != args:
        return False
    files = m.get("files")
    if not isinstance(files, dict) or not files:
        return False
    for name, size in files.items():
        try:
            if (out_dir / name).stat().st_size != size:
                return False
        except OSError:
            return False
    return True


def _write_json(path: Path, obj, **kw) -> None:
    tmp = path.with_name(path.name + ".partial")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, **kw)
        f.write("\n")
    os.replace(tmp, path)


def _default_threads() -> int:
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover
        n = os.cpu_count() or 1
    return max(1, min(n, 16))


# --------------------------------------------------------------------------- #
# Entry point                                                                 #
# --------------------------------------------------------------------------- #

def make_model(config_path, out_dir, n_layers: int | None = None, seed: int = 0,
               dtype: str = "f16", shard_bytes: int | None = None, *,
               tokenizer=DEFAULT_TOKENIZER, threads: int | None = None,
               force: bool = False, verbose: bool = True) -> Path:
    """Write a random-weight LLaMA model (HF layout) for the shape in ``config_path``.

    n_layers     overrides num_hidden_layers (None: keep the config's).
    seed         base seed; tensor ``name`` uses default_rng([seed, crc32(name)]).
    dtype        "f16" (default), "bf16" or "f32" (aliases like "float16" accepted).
    shard_bytes  None: one model.safetensors; else HF-style shards of at most this
                 many bytes (a bigger single tensor gets a shard of its own).
    tokenizer    SentencePiece model to copy as tokenizer.model (None: don't).
    threads      worker threads (default: usable CPUs, at most 16); the output
                 does not depend on it.
    force        regenerate even if OUT_DIR is up to date, and overwrite weight
                 files that were not made by this tool.
    verbose      progress bar and messages on stderr.

    Returns the absolute output directory.  Raises MakeModelError on bad input
    or I/O errors.  Skips all work if OUT_DIR already holds a complete model
    made with the same arguments (recorded in tensorlan_random.json).
    """
    def say(msg: str) -> None:
        if verbose:
            print(msg, file=sys.stderr, flush=True)

    t0 = time.perf_counter()
    config_path = Path(config_path)
    out_dir = Path(out_dir).absolute()

    # ---- arguments ---------------------------------------------------------
    key = _DTYPE_ALIASES.get(str(dtype).lower())
    if key is None:
        raise MakeModelError(f"unknown dtype {dtype!r} (use f16, bf16 or f32)")
    dtype = key
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise MakeModelError(f"seed must be a non-negative integer, got {seed!r}")
    seed = int(seed)
    if n_layers is not None:
        if isinstance(n_layers, bool) or not isinstance(n_layers, (int, np.integer)) or n_layers < 1:
            raise MakeModelError(f"--layers must be a positive integer, got {n_layers!r}")
        n_layers = int(n_layers)
    if shard_bytes is not None:
        if not isinstance(shard_bytes, (int, np.integer)) or shard_bytes < 1:
            raise MakeModelError(f"shard size must be a positive number of bytes, got {shard_bytes!r}")
        shard_bytes = int(shard_bytes)
    if threads is None:
        threads = _default_threads()
    if threads < 1:
        raise MakeModelError(f"threads must be >= 1, got {threads}")
    tok_path = Path(tokenizer) if tokenizer is not None else None
    if tok_path is not None and not tok_path.is_file():
        raise MakeModelError(f"tokenizer not found: {tok_path}")

    # ---- shape config ------------------------------------------------------
    try:
        with open(config_path, encoding="utf-8") as f:
            cfg = json.load(f)
    except FileNotFoundError:
        raise MakeModelError(f"shape config not found: {config_path}") from None
    except IsADirectoryError:
        raise MakeModelError(f"shape config is a directory: {config_path}") from None
    except OSError as e:
        raise MakeModelError(f"cannot read shape config {config_path}: {e.strerror}") from None
    except ValueError as e:
        raise MakeModelError(f"shape config {config_path} is not valid JSON: {e}") from None
    if not isinstance(cfg, dict):
        raise MakeModelError(f"shape config {config_path} is not a JSON object")
    cfg = dict(cfg)
    if n_layers is not None:
        cfg["num_hidden_layers"] = n_layers
    cfg["torch_dtype"] = _DTYPES[dtype][2]
    specs = tensor_specs(cfg)  # validates the shape
    n_layers = int(cfg["num_hidden_layers"])

    args = {
        "format_version": FORMAT_VERSION,
        "config": cfg,
        "n_layers": n_layers,
        "seed": seed,
        "dtype": dtype,
        "shard_bytes": shard_bytes,
        "tokenizer": str(tok_path.absolute()) if tok_path is not None else None,
    }
    args = json.loads(json.dumps(args))  # normalise for comparison with the marker

    # ---- output directory --------------------------------------------------
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise MakeModelError(f"output path exists and is not a directory: {out_dir}") from None
    except OSError as e:
        raise MakeModelError(f"cannot create output directory {out_dir}: {e.strerror}") from None

    if not force and _up_to_date(out_dir, args):
        size = sum((out_dir / n).stat().st_size for n in _read_marker(out_dir)["files"])
        say(f"make_model: {out_dir} already holds this model "
            f"({n_layers} layer{'s' if n_layers > 1 else ''}, {dtype}, seed {seed}, "
            f"{_fmt_bytes(size)}); skipping "
            f"(--force to regenerate)")
        return out_dir

    if _read_marker(out_dir) is None and not force:
        foreign = _weight_files(out_dir)
        if foreign:
            raise MakeModelError(
                f"{out_dir} already contains {foreign[0].name} not made by make_model; "
                f"refusing to overwrite (use another directory or --force)")

    shards = _plan(specs, dtype, shard_bytes)
    total_data = sum(sh.data_size for sh in shards)
    total_file = sum(sh.file_size for sh in shards)

    vocab_note = None
    if tok_path is not None:
        try:
            import sentencepiece as spm
            tok_vocab = spm.SentencePieceProcessor(model_file=str(tok_path)).vocab_size()
        except Exception:
            tok_vocab = None
        if tok_vocab is not None and tok_vocab != int(cfg["vocab_size"]):
            vocab_note = (f"make_model: note: vocab_size {cfg['vocab_size']} does not match the "
                          f"{tok_vocab}-token tokenizer; this model is for shape/speed tests only")

    fds: list[int] = []
    partials: list[Path] = []
    stop = threading.Event()
    try:
        # An incomplete marker first: it marks the directory as ours (so an
        # interrupted run can be redone) and proves that it is writable.
        _write_json(out_dir / MARKER_NAME, {"generator": "bench.make_model", "complete": False,
                                            "args": args})
        for p in _weight_files(out_dir):
            p.unlink()
        say(f"make_model: writing {len(specs)} tensors ({n_layers} layer{'s' if n_layers > 1 else ''}, "
            f"{dtype}, seed {seed}, "
            f"{_fmt_bytes(total_file)} in {len(shards)} file{'s' if len(shards) > 1 else ''}) "
            f"to {out_dir}")
        if vocab_note:
            say(vocab_note)

        jobs = []  # (numel, fd, offset, spec)
        for sh in shards:
            part = out_dir / (sh.filename + ".partial")
            fd = os.open(part, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
            fds.append(fd)
            partials.append(part)
            _pwrite_all(fd, sh.header, 0)
            os.ftruncate(fd, sh.file_size)
            off = len(sh.header)
            for s in sh.specs:
                jobs.append((s.numel, fd, off, s))
                off += s.numel * _DTYPES[dtype][1]
        jobs.sort(key=lambda j: -j[0])  # biggest first: balances the threads

        progress = _Progress(total_data, verbose)
        writer = _Writer(dtype, seed, progress, stop)
        with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="make_model") as ex:
            futs = [ex.submit(writer.write, fd, off, s) for _, fd, off, s in jobs]
            try:
                pending = set(futs)
                while pending:
                    finished, pending = wait(pending, timeout=0.1, return_when=FIRST_EXCEPTION)
                    for fu in finished:
                        fu.result()  # re-raise a worker's error
                    progress.draw()
            except BaseException:
                stop.set()
                for fu in futs:
                    fu.cancel()
                raise
        progress.draw(final=True)

        for fd in fds:
            os.close(fd)
        fds.clear()
        for sh, part in zip(shards, partials):
            os.replace(part, out_dir / sh.filename)
        partials.clear()

        if len(shards) > 1:
            index = {"metadata": {"total_size": total_data},
                     "weight_map": {s.name: sh.filename for sh in shards for s in sh.specs}}
            _write_json(out_dir / "model.safetensors.index.json", index, sort_keys=True)
        _write_json(out_dir / "config.json", cfg)
        gen = {"_from_model_config": True}
        for k in ("bos_token_id", "eos_token_id", "pad_token_id"):
            if cfg.get(k) is not None:
                gen[k] = cfg[k]
        _write_json(out_dir / "generation_config.json", gen)
        if tok_path is not None:
            shutil.copyfile(tok_path, out_dir / "tokenizer.model")  # not copy(): source is read-only
            _write_json(out_dir / "tokenizer_config.json", _TOKENIZER_CONFIG)

        names = [sh.filename for sh in shards] + ["config.json", "generation_config.json"]
        if len(shards) > 1:
            names.append("model.safetensors.index.json")
        if tok_path is not None:
            names += ["tokenizer.model", "tokenizer_config.json"]
        files = {n: (out_dir / n).stat().st_size for n in names}
        _write_json(out_dir / MARKER_NAME, {"generator": "bench.make_model", "complete": True,
                                            "args": args, "files": files,
                                            "total_size": total_data})
    except OSError as e:
        where = e.filename or out_dir
        raise MakeModelError(f"cannot write {where}: {e.strerror or e}") from None
    finally:
        stop.set()
        for fd in fds:
            try:
                os.close(fd)
            except OSError:
                pass
        for part in partials:
            try:
                part.unlink()
            except OSError:
                pass

    el = time.perf_counter() - t0
    say(f"make_model: wrote {_fmt_bytes(total_file)} ({len(specs)} tensors, {len(shards)} "
        f"file{'s' if len(shards) > 1 else ''}) in {el:.1f} s "
        f"({total_file / max(el, 1e-9) / 1e6:.0f} MB/s, {threads} threads) -> {out_dir}")
    return out_dir


# --------------------------------------------------------------------------- #
# CLI                                                                         #
# --------------------------------------------------------------------------- #

def _build_cli():
    import click

    @click.command(
        context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
        epilog="""\b
Examples:
  python -m bench.make_model /work/shared/models/shapes/tinyllama-1.1b.json models/tinyllama-1.1b
  python -m bench.make_model /work/shared/models/shapes/llama2-7b.json /tmp/l7b --layers 2
  python -m bench.make_model shapes/llama3-8b.json models/llama3-8b --dtype bf16 --shard-gb 5

\b
Tensor NAME is normal(0, 0.02) drawn from
  numpy.random.default_rng([SEED, zlib.crc32(NAME)]).standard_normal(shape, float32) * 0.02
then rounded to DTYPE (round-to-nearest-even); the RMSNorm weights are ones.
The output directory path is printed on stdout; messages go to stderr.
Exit status 2 on bad arguments or I/O errors.""",
    )
    @click.argument("shape_config", metavar="SHAPE_CONFIG")
    @click.argument("out_dir", metavar="OUT_DIR")
    @click.option("--layers", "layers", default=None, metavar="N", type=str,
                  help="Number of transformer layers (overrides num_hidden_layers). "
                       "Default: the config's.")
    @click.option("--seed", default="0", show_default=True, metavar="INT", type=str,
                  help="Base random seed.")
    @click.option("--dtype", default="f16", show_default=True, metavar="f16|bf16|f32", type=str,
                  help="Weight dtype (config.json torch_dtype follows it).")
    @click.option("--shard-gb", "shard_gb", default=None, metavar="X", type=str,
                  help="Split weights into HF shards of at most X GB (10^9 bytes), with "
                       "model.safetensors.index.json. Default: one model.safetensors.")
    @click.option("--threads", default=None, metavar="N", type=str,
                  help="Worker threads (default: all usable CPUs). Output does not depend on it.")
    @click.option("--force", is_flag=True,
                  help="Regenerate even if OUT_DIR already holds this model.")
    @click.option("-q", "--quiet", is_flag=True, help="No progress bar or messages.")
    def cli(shape_config, out_dir, layers, seed, dtype, shard_gb, threads, force, quiet):
        """Write a deterministic random-weight LLaMA model (Hugging Face layout:
        config.json, safetensors weights, tokenizer) with the shape of
        SHAPE_CONFIG (e.g. /work/shared/models/shapes/tinyllama-1.1b.json) into
        OUT_DIR. Same arguments give byte-identical files; if OUT_DIR already
        holds a complete model made with the same arguments, nothing is done."""
        def as_int(name, v):
            try:
                return int(v, 10)
            except ValueError:
                raise MakeModelError(f"{name} must be an integer, got {v!r}") from None

        n_layers = as_int("--layers", layers) if layers is not None else None
        if n_layers is not None and n_layers < 1:
            raise MakeModelError(f"--layers must be >= 1, got {n_layers}")
        seed_i = as_int("--seed", seed)
        shard_bytes = None
        if shard_gb is not None:
            try:
                gb = float(shard_gb)
            except ValueError:
                raise MakeModelError(f"--shard-gb must be a number, got {shard_gb!r}") from None
            if not gb > 0 or gb == float("inf"):
                raise MakeModelError(f"--shard-gb must be > 0, got {shard_gb}")
            shard_bytes = max(1, int(gb * GB))
        n_threads = as_int("--threads", threads) if threads is not None else None
        path = make_model(shape_config, out_dir, n_layers=n_layers, seed=seed_i, dtype=dtype,
                          shard_bytes=shard_bytes, threads=n_threads, force=force,
                          verbose=not quiet)
        click.echo(str(path))

    return cli


def main(argv=None) -> int:
    import click

    cli = _build_cli()
    try:
        rv = cli.main(args=argv, prog_name="python -m bench.make_model", standalone_mode=False)
    except MakeModelError as e:
        print(f"make_model: error: {e}", file=sys.stderr)
        return 2
    except click.exceptions.Exit as e:
        return e.exit_code
    except click.ClickException as e:
        msg = e.format_message().replace("\n", " ")
        print(f"make_model: error: {msg} (see --help)", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, click.exceptions.Abort):
        print("\nmake_model: interrupted", file=sys.stderr)
        return 130
    return rv if isinstance(rv, int) else 0


if __name__ == "__main__":
    sys.exit(main())
