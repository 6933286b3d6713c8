"""Write a deterministic random-weight LLaMA model in the Hugging Face layout.

    python -m bench.make_model SHAPE_CONFIG OUT_DIR [--layers N] [--seed 0]
                               [--dtype f16|bf16|f32] [--shard-gb X]

Noise weights for benchmarks and shape tests (see :func:`reference_tensor`), generated in chunks
and pwritten at their offsets, several tensors at once: memory stays small, and the same
arguments give byte-identical files. The marker tensorlan_random.json records the arguments and
is completed last; a complete model with the same arguments is not rewritten.
:func:`write_safetensors` writes given arrays through the same writer.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import sys
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor, as_completed
from itertools import accumulate
from pathlib import Path
from typing import Callable, Iterable, NamedTuple

import click
import numpy as np
from numba import njit

from client.config import LlamaConfig
from client.errors import UserError
from client.progress import Progress
from client.tokenizer import Tokenizer
from quant import q8_0

DEFAULT_TOKENIZER = Path(os.environ.get("TENSORLAN_TOKENIZER",
                                        "/work/shared/models/llama2-tokenizer/tokenizer.model"))
MARKER_NAME = "tensorlan_random.json"
INDEX_NAME = "model.safetensors.index.json"
FORMAT_VERSION = 1
INIT_STD = 0.02
GB = 10**9  # Hugging Face's "5GB" means 5 * 10**9 bytes
_THREADS = min(len(os.sched_getaffinity(0)), 16)  # default number of worker threads
_CHUNK_ELEMS = 1 << 20  # float32 values generated and converted per step (tests make it tiny)

# name -> (safetensors dtype, bytes per element, config.json torch_dtype)
_DTYPES = {"f16": ("F16", 2, "float16"), "bf16": ("BF16", 2, "bfloat16"),
           "f32": ("F32", 4, "float32")}
_TOKENIZER_CONFIG = {"tokenizer_class": "LlamaTokenizer", "add_bos_token": True,
                     "add_eos_token": False, "bos_token": "<s>", "eos_token": "</s>",
                     "unk_token": "<unk>"}


class MakeModelError(UserError):
    """A bad argument, unreadable shape config or unwritable directory."""


# --- the tensors and their values -----------------------------------------------------------
class TensorSpec(NamedTuple):
    name: str
    shape: tuple[int, ...]
    kind: str  # "normal" or "ones"


def tensor_specs(cfg: dict, path="config.json") -> list[TensorSpec]:
    """All tensors of a LlamaForCausalLM with config ``cfg`` (checked as the engine checks it,
    errors name ``path``), in HF state-dict order."""
    c = LlamaConfig.from_dict(cfg, path)
    V, D, F, L, Hq, Hkv, hd = (c.vocab_size, c.dim, c.ffn_dim, c.n_layers, c.n_heads,
                               c.n_kv_heads, c.head_dim)
    layer = [("self_attn.q_proj", (Hq * hd, D)), ("self_attn.k_proj", (Hkv * hd, D)),
             ("self_attn.v_proj", (Hkv * hd, D)), ("self_attn.o_proj", (D, Hq * hd)),
             ("mlp.gate_proj", (F, D)), ("mlp.up_proj", (F, D)), ("mlp.down_proj", (D, F)),
             ("input_layernorm", (D,)), ("post_attention_layernorm", (D,))]
    specs = [TensorSpec("model.embed_tokens.weight", (V, D), "normal")]
    specs += [TensorSpec(f"model.layers.{i}.{name}.weight", shape,
                         "normal" if len(shape) == 2 else "ones")
              for i in range(L) for name, shape in layer]
    specs.append(TensorSpec("model.norm.weight", (D,), "ones"))
    if not c.tie_embeddings:
        specs.append(TensorSpec("lm_head.weight", (V, D), "normal"))
    return specs


def tensor_rng(seed: int, name: str) -> np.random.Generator:
    """The random stream of tensor ``name``: independent of every other tensor."""
    return np.random.default_rng([int(seed), zlib.crc32(name.encode("utf-8"))])


def reference_tensor(name: str, shape, seed: int = 0, kind: str = "normal") -> np.ndarray:
    """The float32 values of one tensor, computed in one go (for tests and checks)."""
    if kind == "ones":
        return np.ones(shape, dtype=np.float32)
    x = tensor_rng(seed, name).standard_normal(tuple(shape), dtype=np.float32)
    return x * np.float32(INIT_STD)


def _random_chunks(spec: TensorSpec, seed: int) -> Iterable[np.ndarray]:
    """The values of ``spec`` in float32 chunks (successive draws continue one random stream, so
    the values do not depend on the chunk size)."""
    n = math.prod(spec.shape)
    buf = np.ones(min(n, _CHUNK_ELEMS), np.float32)
    rng = tensor_rng(seed, spec.name) if spec.kind == "normal" else None
    for start in range(0, n, len(buf)):
        x = buf[:n - start]
        if rng is not None:
            rng.standard_normal(out=x, dtype=np.float32)
            x *= np.float32(INIT_STD)
        yield x


def _array_chunks(a: np.ndarray) -> Iterable[np.ndarray]:
    flat = np.ascontiguousarray(a, np.float32).reshape(-1)
    for start in range(0, flat.size, _CHUNK_ELEMS):
        yield flat[start:start + _CHUNK_ELEMS]


# --- float32 -> f16 / bf16 bits, round to nearest even (weights are finite: no NaN care) -----
@njit(nogil=True, cache=True)
def _to_f16(x, out):
    for i in range(x.size):
        out[i] = q8_0.f32_to_f16_bits(x[i])


@njit(nogil=True, cache=True)
def _to_bf16(x, out):
    for i in range(x.size):
        out[i] = q8_0.f32_to_bf16_bits(x[i])


def encode(x: np.ndarray, dtype: str, out: np.ndarray | None = None) -> np.ndarray:
    """``x`` as stored in ``dtype``: float32 for "f32", else uint16 bit patterns (into ``out``)."""
    x = np.ascontiguousarray(x, np.float32)
    if dtype == "f32":
        return x
    out = np.empty(x.shape, np.uint16) if out is None else out
    (_to_f16 if dtype == "f16" else _to_bf16)(x.reshape(-1), out.reshape(-1))
    return out


# --- the safetensors writer -----------------------------------------------------------------
def _shard_groups(sizes: dict[str, int], shard_bytes: int | None) -> list[list[str]]:
    """Tensor names per file: in order, a file is closed when the next tensor would overflow it."""
    groups, size = [[]], 0
    for name, n in sizes.items():
        if shard_bytes is not None and groups[-1] and size + n > shard_bytes:
            groups, size = groups + [[]], 0
        groups[-1].append(name)
        size += n
    return groups


def _start_file(fd: int, names: list[str], shapes: dict, sizes: dict, dtype: str) -> list[tuple]:
    """Write the safetensors header (JSON padded to 8 bytes) for tensors ``names`` and size the
    file; returns the (fd, offset, name) jobs that fill in its data."""
    ends = list(accumulate(sizes[name] for name in names))
    header = {"__metadata__": {"format": "pt"}}
    for name, end in zip(names, ends):
        header[name] = {"dtype": _DTYPES[dtype][0], "shape": list(shapes[name]),
                        "data_offsets": [end - sizes[name], end]}
    js = json.dumps(header, separators=(",", ":")).encode("utf-8")
    js += b" " * (-len(js) % 8)
    _pwrite_all(fd, len(js).to_bytes(8, "little") + js, 0)
    os.ftruncate(fd, 8 + len(js) + sum(sizes[name] for name in names))
    return [(fd, 8 + len(js) + end - sizes[name], name) for name, end in zip(names, ends)]


def _pwrite_all(fd: int, buf, offset: int) -> None:
    mv = memoryview(buf).cast("B")
    while mv:
        n = os.pwrite(fd, mv, offset)
        mv, offset = mv[n:], offset + n


def _write_tensor(job: tuple, chunks: Callable, dtype: str, stop: threading.Event,
                  report: Callable[[int], None]) -> None:
    """Write the (fd, offset, name) job chunk by chunk, reporting the bytes written."""
    fd, offset, name = job
    out = np.empty(_CHUNK_ELEMS, np.uint16) if dtype != "f32" else None
    for x in chunks(name):
        if stop.is_set():
            return
        data = encode(x, dtype, None if out is None else out[:x.size])
        _pwrite_all(fd, data, offset)
        offset += data.nbytes
        report(data.nbytes)


def _run_jobs(jobs: list[tuple], chunks: Callable, dtype: str, threads: int,
              progress: Progress) -> None:
    """Write the (fd, offset, name) jobs on ``threads`` threads; the first error stops them all."""
    stop, lock, done = threading.Event(), threading.Lock(), 0

    def report(n: int) -> None:
        nonlocal done
        with lock:
            done += n
            progress.update(done)

    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="make_model") as ex:
        futures = [ex.submit(_write_tensor, job, chunks, dtype, stop, report) for job in jobs]
        try:
            for f in as_completed(futures):
                f.result()
        except BaseException:
            stop.set()  # running jobs stop at their next chunk, the others do not start
            ex.shutdown(cancel_futures=True)
            raise
    progress.close()


def _write_weights(out_dir: Path, shapes: dict[str, tuple], chunks: Callable[[str], Iterable],
                   dtype: str, shard_bytes: int | None, threads: int,
                   verbose: bool = False) -> list[Path]:
    """Write tensors ``shapes`` (name -> shape, in file order) with the float32 values of
    ``chunks(name)`` as safetensors file(s) in ``out_dir``; returns the files (the index last)."""
    sizes = {name: math.prod(shape) * _DTYPES[dtype][1] for name, shape in shapes.items()}
    groups = _shard_groups(sizes, shard_bytes)
    n = len(groups)
    paths = [out_dir / (f"model-{i:05d}-of-{n:05d}.safetensors" if n > 1 else "model.safetensors")
             for i in range(1, n + 1)]
    fds, jobs = [], []
    progress = Progress(sum(sizes.values()), "make_model", " MB", 1e6)
    progress.enabled &= verbose
    try:
        for path, names in zip(paths, groups):
            fds.append(os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644))
            jobs += _start_file(fds[-1], names, shapes, sizes, dtype)
        jobs.sort(key=lambda job: -sizes[job[2]])  # biggest first balances the threads
        _run_jobs(jobs, chunks, dtype, threads, progress)
    finally:
        for fd in fds:
            os.close(fd)
    if n > 1:
        weight_map = {name: p.name for p, names in zip(paths, groups) for name in names}
        paths.append(out_dir / INDEX_NAME)
        _write_json(paths[-1], {"metadata": {"total_size": sum(sizes.values())},
                                "weight_map": weight_map}, sort_keys=True)
    return paths


def write_safetensors(out_dir, tensors: dict[str, np.ndarray], dtype: str = "f16",
                      shard_bytes: int | None = None) -> list[Path]:
    """Write ``tensors`` (name -> float32 array, in file order) rounded to ``dtype``, as
    ``model.safetensors`` or as HF-style shards of at most ``shard_bytes`` bytes with
    ``model.safetensors.index.json``. Returns the files written (the index last)."""
    shapes = {name: tuple(a.shape) for name, a in tensors.items()}
    return _write_weights(Path(out_dir), shapes, lambda name: _array_chunks(tensors[name]),
                          dtype, shard_bytes, _THREADS)


# --- make_model -----------------------------------------------------------------------------
def _write_json(path: Path, obj, **kw) -> None:
    path.write_text(json.dumps(obj, indent=2, **kw) + "\n")


def _load_shape(path: Path) -> dict:
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise MakeModelError(f"shape config not found: {path}") from None
    except (OSError, ValueError) as e:  # ValueError: not JSON
        why = getattr(e, "strerror", None) or e
        raise MakeModelError(f"cannot read shape config {path}: {why}") from None
    if not isinstance(cfg, dict):
        raise MakeModelError(f"shape config {path} is not a JSON object")
    return cfg


def _model_args(config_path, n_layers, seed, dtype, shard_bytes, tokenizer, threads) -> dict:
    """The checked arguments of make_model, as recorded in (and compared with) the marker."""
    for what, v, low in (("--layers", n_layers, 1), ("seed", seed, 0),
                         ("shard size", shard_bytes, 1), ("threads", threads, 1)):
        if v is not None and (type(v) is not int or v < low):
            raise MakeModelError(f"{what} must be an integer >= {low}, got {v!r}")
    if dtype not in _DTYPES:
        raise MakeModelError(f"unknown dtype {dtype!r} (use f16, bf16 or f32)")
    cfg = _load_shape(Path(config_path))
    if n_layers is not None:
        cfg["num_hidden_layers"] = n_layers
    cfg["torch_dtype"] = _DTYPES[dtype][2]
    tensor_specs(cfg, config_path)  # checks the shape
    if tokenizer is not None and not Path(tokenizer).is_file():
        raise MakeModelError(f"tokenizer not found: {tokenizer}")
    tokenizer = None if tokenizer is None else str(Path(tokenizer).absolute())
    return json.loads(json.dumps({
        "format_version": FORMAT_VERSION, "config": cfg, "n_layers": int(cfg["num_hidden_layers"]),
        "seed": seed, "dtype": dtype, "shard_bytes": shard_bytes, "tokenizer": tokenizer}))


def _size_if_up_to_date(out_dir: Path, args: dict) -> int | None:
    """The model's size if its marker is complete, with these arguments, and all the files have
    their recorded sizes; else None."""
    try:
        m = json.loads((out_dir / MARKER_NAME).read_text())
        files = m["files"] if m["complete"] and m["args"] == args else {}
        ok = files and all((out_dir / n).stat().st_size == size for n, size in files.items())
    except (OSError, ValueError, LookupError, TypeError, AttributeError):
        return None
    return sum(files.values()) if ok else None


def _weight_files(out_dir: Path) -> list[Path]:
    pats = ("model.safetensors", "model-*-of-*.safetensors", INDEX_NAME,
            "pytorch_model*.bin", "pytorch_model.bin.index.json")
    return sorted({p for pat in pats for p in out_dir.glob(pat)})


def _prepare_dir(out_dir: Path, force: bool) -> None:
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise MakeModelError(f"cannot create output directory {out_dir}: {e.strerror}") from None
    foreign = [] if force or (out_dir / MARKER_NAME).exists() else _weight_files(out_dir)
    if foreign:
        raise MakeModelError(f"{out_dir} already contains {foreign[0].name} not made by make_model;"
                             f" refusing to overwrite (use another directory or --force)")


def _write_model(out_dir: Path, args: dict, threads: int, verbose: bool) -> list[str]:
    """Write everything, the marker first (incomplete: marks the directory as ours and proves
    it writable) and last (complete). Returns the names of the weight files."""
    cfg, tok = args["config"], args["tokenizer"]
    specs = {s.name: s for s in tensor_specs(cfg)}
    marker = {"generator": "bench.make_model", "complete": False, "args": args}
    _write_json(out_dir / MARKER_NAME, marker)
    for p in _weight_files(out_dir):
        p.unlink()
    weights = [p.name for p in _write_weights(
        out_dir, {name: s.shape for name, s in specs.items()},
        lambda name: _random_chunks(specs[name], args["seed"]),
        args["dtype"], args["shard_bytes"], threads, verbose)]
    shards = [n for n in weights if n != INDEX_NAME]
    _write_json(out_dir / "config.json", cfg)
    ids = ("bos_token_id", "eos_token_id", "pad_token_id")
    _write_json(out_dir / "generation_config.json",
                {"_from_model_config": True, **{k: cfg[k] for k in ids if cfg.get(k) is not None}})
    names = shards + ["config.json", "generation_config.json"] + weights[len(shards):]
    if tok is not None:
        shutil.copyfile(tok, out_dir / "tokenizer.model")  # not copy(): the source is read-only
        _write_json(out_dir / "tokenizer_config.json", _TOKENIZER_CONFIG)
        names += ["tokenizer.model", "tokenizer_config.json"]
    files = {n: (out_dir / n).stat().st_size for n in names}
    total = sum(math.prod(s.shape) for s in specs.values()) * _DTYPES[args["dtype"]][1]
    _write_json(out_dir / MARKER_NAME,
                {**marker, "complete": True, "files": files, "total_size": total})
    return shards


def make_model(config_path, out_dir, n_layers: int | None = None, seed: int = 0,
               dtype: str = "f16", shard_bytes: int | None = None, *,
               tokenizer=DEFAULT_TOKENIZER, threads: int | None = None,
               force: bool = False, verbose: bool = True) -> Path:
    """Write a random-weight LLaMA model (HF layout) with the shape in ``config_path``.

    n_layers overrides num_hidden_layers; dtype is f16, bf16 or f32; shard_bytes None gives one
    model.safetensors, else HF shards of at most that many bytes; tokenizer is copied as
    tokenizer.model (None: no tokenizer); the output does not depend on threads. Does nothing if
    out_dir already holds this model, unless force (which also overwrites weights not made
    here). Returns the absolute out_dir; raises UserError (MakeModelError for bad arguments)."""
    t0 = time.perf_counter()
    out_dir = Path(out_dir).absolute()
    args = _model_args(config_path, n_layers, seed, dtype, shard_bytes, tokenizer, threads)
    threads = threads or _THREADS
    say = (lambda msg: print(msg, file=sys.stderr, flush=True)) if verbose else (lambda msg: None)
    n = args["n_layers"]
    what = f"{n} layer{'s' if n > 1 else ''}, {args['dtype']}, seed {args['seed']}"
    _prepare_dir(out_dir, force)
    if not force and (size := _size_if_up_to_date(out_dir, args)) is not None:
        say(f"make_model: {out_dir} already holds this model ({what}, {size / 1e6:,.1f} MB); "
            f"skipping (--force to regenerate)")
        return out_dir
    say(f"make_model: writing {len(tensor_specs(args['config']))} tensors ({what}) to {out_dir}")
    try:
        shards = _write_model(out_dir, args, threads, verbose)
    except OSError as e:
        raise MakeModelError(f"cannot write {e.filename or out_dir}: {e.strerror or e}") from None
    vocab = args["config"]["vocab_size"]
    if args["tokenizer"] and (tok_vocab := Tokenizer(out_dir).vocab_size) != vocab:
        say(f"make_model: note: vocab_size {vocab} does not match the {tok_vocab}-token "
            f"tokenizer; this model is for shape/speed tests only")
    el = time.perf_counter() - t0
    size = sum((out_dir / name).stat().st_size for name in shards)
    say(f"make_model: wrote {size / 1e6:,.1f} MB in {len(shards)} file(s) in {el:.1f} s "
        f"({size / max(el, 1e-9) / 1e6:.0f} MB/s, {threads} threads) -> {out_dir}")
    return out_dir


# --- CLI ------------------------------------------------------------------------------------
_EPILOG = """\b
Tensor NAME is normal(0, 0.02) drawn from
  numpy.random.default_rng([SEED, zlib.crc32(NAME)]).standard_normal(shape, float32) * 0.02
then rounded to DTYPE (round-to-nearest-even); the RMSNorm weights are ones.
The output directory path is printed on stdout; messages go to stderr.
Exit status 2 on bad arguments or I/O errors."""


@click.command(epilog=_EPILOG, context_settings={"help_option_names": ["-h", "--help"],
                                                 "max_content_width": 100})
@click.argument("shape_config", metavar="SHAPE_CONFIG")
@click.argument("out_dir", metavar="OUT_DIR")
@click.option("--layers", type=click.IntRange(min=1), metavar="N",
              help="Number of transformer layers (overrides num_hidden_layers).")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True,
              metavar="INT", help="Base random seed.")
@click.option("--dtype", default="f16", show_default=True, metavar="f16|bf16|f32",
              help="Weight dtype (config.json torch_dtype follows it).")
@click.option("--shard-gb", type=float, metavar="X",
              help="Split weights into HF shards of at most X GB (10^9 bytes), with "
                   "model.safetensors.index.json. Default: one model.safetensors.")
@click.option("--threads", type=click.IntRange(min=1), metavar="N",
              help="Worker threads (default: all usable CPUs). Output does not depend on it.")
@click.option("--force", is_flag=True, help="Regenerate even if OUT_DIR already holds this model.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar or messages.")
def cli(shape_config, out_dir, layers, seed, dtype, shard_gb, threads, force, quiet):
    """Write a random-weight LLaMA model (HF layout) with the shape of SHAPE_CONFIG (e.g.
    /work/shared/models/shapes/tinyllama-1.1b.json) into OUT_DIR, unless it is already there."""
    if shard_gb is not None and not 0 < shard_gb < math.inf:
        raise MakeModelError(f"--shard-gb must be a positive number, got {shard_gb}")
    shard_bytes = None if shard_gb is None else max(1, int(shard_gb * GB))
    click.echo(make_model(shape_config, out_dir, n_layers=layers, seed=seed, dtype=dtype,
                          shard_bytes=shard_bytes, threads=threads, force=force,
                          verbose=not quiet))


def main(argv=None) -> int:
    try:
        return cli.main(args=argv, prog_name="python -m bench.make_model",
                        standalone_mode=False) or 0
    except (UserError, click.ClickException) as e:
        msg = f"{e.format_message()} (see --help)" if isinstance(e, click.ClickException) else e
        print(f"make_model: error: {msg}".replace("\n", " "), file=sys.stderr)
        return 2
    except (KeyboardInterrupt, click.exceptions.Abort):
        print("\nmake_model: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
