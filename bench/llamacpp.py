"""llama.cpp on the same model and machine, measured in the same run as our engine.

This machine's memory bandwidth drifts by +-15% over minutes, so a fixed llama.cpp figure is no
yardstick: measure it next to ours. Three steps, each done once and then reused:

1. Build. llama-cpp-python (pinned, built from its sdist's vendored llama.cpp with cmake and
   -DGGML_NATIVE=ON) and gguf go into their own venv, bench/.llamacpp-venv (git-ignored): they are
   no dependency of the project. The first call builds it (a few minutes on 2 cores; the time is
   reported and kept in the venv's tensorlan-build.json).
2. Convert. A Hugging Face LLaMA folder (config.json, *.safetensors in f32/f16/bf16,
   tokenizer.model) becomes MODEL_DIR/model-q8_0.gguf (bench/out/gguf/NAME-q8_0.gguf for a
   read-only or shared folder), written tensor by tensor with gguf's GGUFWriter, as llama.cpp's
   convert_hf_to_gguf.py would: Q and K un-permuted from HF's rotate-half order to llama.cpp's
   interleaved pairs, 2-D weights in Q8_0 (rows whose length is not a multiple of 32 stay F32:
   llama.cpp's Q8_0 needs whole blocks), norms in F32, the SentencePiece vocabulary with scores
   and token types. A tied classifier without lm_head.weight is left out, and llama.cpp then
   uses token_embd for it. The Q8_0 blocks are byte-identical to quant/q8_0.py's (checked on
   TinyLlama's token_embd and ffn_down). Checked end to end on the trained stories260K:
   `--generate "Once upon a time" -n 40` gives "Once upon a time, there was a little girl named
   Lily. She loved to play outside in the park. One day, she saw a big, red ball." (without the
   un-permutation it derails after "a little girl").
3. Measure, in a subprocess of that venv: generation tok/s after a short prompt (greedy,
   `gen_tokens` single-token decodes) at each thread count, and prompt tok/s for a
   `prompt_tokens` prompt in one batch at the most threads; llama.cpp's own timings
   (llama_perf_context: decode time only), median of `reps` runs after a warm-up.

    .venv/bin/python -m bench.llamacpp MODEL_DIR [--threads 1,2] [--gen-tokens 64]
                                       [--prompt-tokens 512] [--reps 3] [--json]
    .venv/bin/python -m bench.llamacpp MODEL_DIR --generate "Once upon a time" [-n 40]

From Python: ``measure(model_dir) -> {"gen_1t": .., "gen_2t": .., "prompt_2t": .., ...}``.
This file runs in both venvs: at the top it imports only the standard library, and the code
after ``# --- inside the llama.cpp venv`` runs there (``python bench/llamacpp.py --inner JSON``).
"""
from __future__ import annotations

import json
import os
import shutil
import statistics
import struct
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VENV = ROOT / "bench" / ".llamacpp-venv"
VENV_PY = VENV / "bin" / "python"
PACKAGES = ["llama-cpp-python==0.3.36", "gguf==0.19.0", "sentencepiece==0.2.3"]
CMAKE_ARGS = "-DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF"
STAMP = VENV / "tensorlan-build.json"
GGUF_NAME = "model-q8_0.gguf"


class BenchError(Exception):
    """A failure the CLI reports on one line (exit 2)."""


# ---------------------------------------------------------------------------------------------
# build
# ---------------------------------------------------------------------------------------------
def _venv_ok() -> bool:
    if not (VENV_PY.exists() and STAMP.exists()):
        return False
    r = subprocess.run([str(VENV_PY), "-c", "import llama_cpp, gguf, sentencepiece"],
                       capture_output=True)
    return r.returncode == 0


def ensure_llamacpp(log=print) -> dict:
    """Build llama.cpp into bench/.llamacpp-venv unless it is there. Returns {"build_seconds": s,
    "built_now": bool, ...}; raises BenchError when a tool is missing or the build fails."""
    if _venv_ok():
        return dict(json.loads(STAMP.read_text()), built_now=False)
    missing = [t for t in ("cmake", "gcc", "g++") if shutil.which(t) is None]
    if missing:
        raise BenchError(f"building llama.cpp needs {', '.join(missing)} on PATH "
                         f"(apt-get install cmake build-essential)")
    if not VENV_PY.exists():
        r = subprocess.run([sys.executable, "-m", "venv", str(VENV)], capture_output=True,
                           text=True)
        if r.returncode:
            raise BenchError(f"cannot create {VENV}: {(r.stderr.strip().splitlines() or [''])[-1]}")
    logf = VENV / "build.log"
    env = dict(os.environ, CMAKE_ARGS=CMAKE_ARGS, FORCE_CMAKE="1",
               CMAKE_BUILD_PARALLEL_LEVEL=str(os.cpu_count() or 2))
    log(f"building llama.cpp (llama-cpp-python from source, CMAKE_ARGS={CMAKE_ARGS!r}) into "
        f"{VENV}; log: {logf}")
    t = time.perf_counter()
    with open(logf, "w") as f:
        r = subprocess.run([str(VENV_PY), "-m", "pip", "install", "--no-cache-dir", "--verbose",
                            "--no-binary", "llama-cpp-python", *PACKAGES],
                           stdout=f, stderr=subprocess.STDOUT, env=env)
    dt = time.perf_counter() - t
    if r.returncode != 0:
        lines = [l.strip() for l in logf.read_text(errors="replace").splitlines()]
        errs = ([l for l in lines if "error:" in l] +  # the compiler's or cmake's first, else pip's
                [l for l in lines if l.startswith("ERROR")][-1:])
        raise BenchError(f"llama.cpp build failed after {dt:.0f} s (pip exit {r.returncode}), "
                         f"see {logf}" + (f": {errs[0][:200]}" if errs else ""))
    info = {"build_seconds": round(dt, 1), "packages": PACKAGES, "cmake_args": CMAKE_ARGS}
    STAMP.write_text(json.dumps(info))
    log(f"llama.cpp built in {dt:.0f} s")
    return dict(info, built_now=True)


def _inner(op: str, log=print, **kw):
    """Run `op` in the llama.cpp venv; returns its JSON result."""
    r = subprocess.run([str(VENV_PY), str(Path(__file__).resolve()), "--inner",
                        json.dumps(dict(kw, op=op))], stdout=subprocess.PIPE, text=True)
    lines = r.stdout.strip().splitlines()
    if r.returncode or not lines:
        raise BenchError(f"llama.cpp {op} failed (exit {r.returncode}); its error is above")
    for line in lines[:-1]:
        log(line)
    return json.loads(lines[-1])


# ---------------------------------------------------------------------------------------------
# the API (our venv)
# ---------------------------------------------------------------------------------------------
def check_model_dir(model_dir) -> Path:
    d = Path(model_dir)
    if not d.is_dir():
        raise BenchError(f"model folder not found: {d}")
    missing = [n for n in ("config.json", "tokenizer.model") if not (d / n).is_file()]
    if not any(d.glob("*.safetensors")):
        missing.append("*.safetensors")
    if missing:
        raise BenchError(f"{d} is no Hugging Face LLaMA folder: missing {', '.join(missing)}")
    return d


def gguf_path(model_dir) -> Path:
    """Where the GGUF of MODEL_DIR goes: next to the model, as model-q8_0.gguf, unless the folder
    is read-only or in the shared tree (../shared), which we don't write to: then
    bench/out/gguf/NAME-q8_0.gguf (git-ignored)."""
    d = Path(model_dir).resolve()
    shared = (ROOT.parent / "shared").resolve()
    if d.stat().st_mode & 0o222 == 0 or d == shared or shared in d.parents:
        return ROOT / "bench" / "out" / "gguf" / f"{d.name}-q8_0.gguf"
    return d / GGUF_NAME


def convert(model_dir, log=print) -> Path:
    """The model's Q8_0 GGUF (see gguf_path), written unless present and newer than the model's
    files. Builds llama.cpp first if needed."""
    d = check_model_dir(model_dir)
    out = gguf_path(d)
    sources = [*d.glob("*.safetensors"), d / "config.json", d / "tokenizer.model"]
    if out.exists() and out.stat().st_mtime >= max(f.stat().st_mtime for f in sources):
        return out
    ensure_llamacpp(log)
    out.parent.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    _inner("convert", log, model_dir=str(d.resolve()), out=str(out))
    log(f"converted {d} -> {out} in {time.perf_counter() - t:.0f} s")
    return out


def measure(model_dir, threads=(1, 2), gen_tokens=64, prompt_tokens=512, reps=3) -> dict:
    """llama.cpp's speeds on MODEL_DIR in Q8_0, this machine, now (medians of `reps` runs).

    Returns {"gen_<T>t": tok/s for each T in threads, "prompt_<max T>t": tok/s, "gen": {T: [runs]},
    "prompt": [runs], "build_seconds", "built_now", "gguf", "threads", "gen_tokens",
    "prompt_tokens", "reps"}."""
    d = check_model_dir(model_dir)
    build = ensure_llamacpp()
    gguf = convert(d)
    res = _inner("measure", gguf=str(gguf), threads=list(threads), gen_tokens=gen_tokens,
                 prompt_tokens=prompt_tokens, reps=reps)
    out = {f"gen_{t}t": statistics.median(res["gen"][str(t)]) for t in threads}
    out[f"prompt_{max(threads)}t"] = statistics.median(res["prompt"])
    out.update(res, build_seconds=build["build_seconds"], built_now=build["built_now"],
               gguf=str(gguf), threads=list(threads), gen_tokens=gen_tokens,
               prompt_tokens=prompt_tokens, reps=reps)
    return out


def generate(model_dir, prompt: str, n_tokens: int = 40) -> str:
    """Greedy text from llama.cpp on MODEL_DIR's Q8_0 GGUF: the prompt and up to n_tokens more."""
    gguf = convert(model_dir)
    return _inner("generate", gguf=str(gguf), prompt=prompt, n_tokens=n_tokens)["text"]


def main(argv=None):
    import click

    @click.command()
    @click.argument("model_dir", type=click.Path(path_type=Path))
    @click.option("--threads", default="1,2", show_default=True, help="Thread counts for generation.")
    @click.option("--gen-tokens", default=64, show_default=True, help="Tokens generated per run.")
    @click.option("--prompt-tokens", default=512, show_default=True, help="Prompt length.")
    @click.option("--reps", default=3, show_default=True, help="Runs per figure (median reported).")
    @click.option("--json", "as_json", is_flag=True, help="Print the result dict as JSON too.")
    @click.option("--generate", "gen_prompt", default=None,
                  help="Instead: print llama.cpp's greedy continuation of this prompt.")
    @click.option("-n", "n_tokens", default=40, show_default=True, help="Tokens for --generate.")
    def cli(model_dir, threads, gen_tokens, prompt_tokens, reps, as_json, gen_prompt, n_tokens):
        """llama.cpp (Q8_0, built here with native flags) on a Hugging Face LLaMA folder."""
        try:
            if gen_prompt is not None:
                print(generate(model_dir, gen_prompt, n_tokens))
                return
            ths = tuple(int(t) for t in threads.split(","))
            r = measure(model_dir, ths, gen_tokens, prompt_tokens, reps)
        except BenchError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(2)
        built = "built now" if r["built_now"] else "built earlier"
        print(f"\nllama.cpp (llama-cpp-python {PACKAGES[0].split('==')[1]}, {built} in "
              f"{r['build_seconds']:.0f} s), {Path(r['gguf']).relative_to(Path(r['gguf']).parents[1])}")
        for t in ths:
            runs = ", ".join(f"{x:.2f}" for x in r["gen"][str(t)])
            print(f"generation, {t} thread{'s' * (t > 1)}: {r[f'gen_{t}t']:.2f} tok/s "
                  f"({gen_tokens} tokens; runs {runs})")
        tp = max(ths)
        runs = ", ".join(f"{x:.1f}" for x in r["prompt"])
        print(f"prompt {prompt_tokens} tokens, {tp} thread{'s' * (tp > 1)}: "
              f"{r[f'prompt_{tp}t']:.1f} tok/s (runs {runs})")
        if as_json:
            print(json.dumps(r))

    cli.main(args=argv, prog_name="python -m bench.llamacpp", standalone_mode=True)


# ---------------------------------------------------------------------------------------------
# --- inside the llama.cpp venv: conversion (gguf, sentencepiece, numpy) ----------------------
# ---------------------------------------------------------------------------------------------
_ST_DTYPES = {"F32": "<f4", "F16": "<f2", "BF16": "<u2"}


def _safetensors_index(model_dir: Path) -> dict:
    """name -> (file, dtype, shape, offset) over all *.safetensors files of the folder."""
    index = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        with open(f, "rb") as fh:
            n = struct.unpack("<Q", fh.read(8))[0]
            header = json.loads(fh.read(n))
        for name, info in header.items():
            if name == "__metadata__":
                continue
            if info["dtype"] not in _ST_DTYPES:
                raise ValueError(f"{f.name}: {name} has dtype {info['dtype']}")
            index[name] = (f, info["dtype"], tuple(info["shape"]), 8 + n + info["data_offsets"][0])
    return index


def _load_f32(entry):
    import numpy as np
    f, dtype, shape, offset = entry
    a = np.memmap(f, dtype=_ST_DTYPES[dtype], mode="r", offset=offset, shape=shape)
    if dtype == "BF16":
        return (a.astype(np.uint32) << 16).view(np.float32)
    return np.asarray(a, dtype=np.float32)


def _unpermute(w, n_head: int):
    """HF's q/k rows (per head: all first halves, then all second halves, for rotate-half RoPE)
    back to llama.cpp's interleaved pairs; LlamaModel.permute in convert_hf_to_gguf.py."""
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


_HF_TO_GGUF = {
    "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def _gguf_name(hf: str) -> str | None:
    if hf == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf == "model.norm.weight":
        return "output_norm.weight"
    if hf == "lm_head.weight":
        return "output.weight"
    if hf.endswith("rotary_emb.inv_freq"):
        return None
    parts = hf.split(".")
    if parts[:2] == ["model", "layers"] and parts[-1] == "weight":
        sub = ".".join(parts[3:-1])
        if sub in _HF_TO_GGUF:
            return f"blk.{int(parts[2])}.{_HF_TO_GGUF[sub]}.weight"
    raise ValueError(f"unexpected tensor {hf}")


def _vocab(tokenizer_model: Path, vocab_size: int):
    import gguf
    from sentencepiece import SentencePieceProcessor
    sp = SentencePieceProcessor(model_file=str(tokenizer_model))
    tokens, scores, types = [], [], []
    for i in range(sp.vocab_size()):
        tokens.append(sp.id_to_piece(i).encode("utf-8"))
        scores.append(sp.get_score(i))
        types.append(gguf.TokenType.UNKNOWN if sp.is_unknown(i) else
                     gguf.TokenType.CONTROL if sp.is_control(i) else
                     gguf.TokenType.UNUSED if sp.is_unused(i) else
                     gguf.TokenType.BYTE if sp.is_byte(i) else gguf.TokenType.NORMAL)
    if vocab_size < len(tokens):
        raise ValueError(f"config vocab_size {vocab_size} < tokenizer's {len(tokens)}")
    for i in range(len(tokens), vocab_size):  # as convert_hf_to_gguf.py pads
        tokens.append(f"[PAD{i}]".encode())
        scores.append(-1000.0)
        types.append(gguf.TokenType.UNUSED)
    return sp, tokens, scores, types


def convert_inside(model_dir: str, out: str) -> dict:
    import gguf
    import numpy as np
    from gguf import GGMLQuantizationType as QT

    d = Path(model_dir)
    cfg = json.loads((d / "config.json").read_text())
    n_head = cfg["num_attention_heads"]
    n_kv = cfg.get("num_key_value_heads", n_head)
    hidden = cfg["hidden_size"]
    head_dim = cfg.get("head_dim") or hidden // n_head
    index = _safetensors_index(d)

    # the tensors, in llama.cpp's order, with their GGUF types
    plan = []  # (gguf name, hf name, shape, qtype)
    for hf, entry in index.items():
        name = _gguf_name(hf)
        if name is None:
            continue
        shape = entry[2]
        q8 = len(shape) == 2 and shape[1] % 32 == 0
        plan.append((name, hf, shape, QT.Q8_0 if q8 else QT.F32))

    def order(p):
        n = p[0]
        if n.startswith("blk."):
            return (1, int(n.split(".")[1]), n)
        return ({"token_embd.weight": 0, "output_norm.weight": 2, "output.weight": 3}[n], 0, n)
    plan.sort(key=order)
    names = {p[0] for p in plan}
    if "output.weight" not in names and not cfg.get("tie_word_embeddings", False):
        raise ValueError("no lm_head.weight and tie_word_embeddings is false")

    tmp = Path(out + ".part")
    w = gguf.GGUFWriter(str(tmp), "llama")
    w.add_name(d.name)
    w.add_context_length(cfg.get("max_position_embeddings", 2048))
    w.add_embedding_length(hidden)
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_rope_dimension_count(head_dim)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    if head_dim != hidden // n_head:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    w.add_layer_norm_rms_eps(cfg.get("rms_norm_eps", 1e-5))
    w.add_rope_freq_base(cfg.get("rope_theta", 10000.0))
    w.add_vocab_size(cfg["vocab_size"])
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
    sp, tokens, scores, types = _vocab(d / "tokenizer.model", cfg["vocab_size"])
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(cfg.get("bos_token_id", sp.bos_id()))
    w.add_eos_token_id(cfg.get("eos_token_id", sp.eos_id()))
    if sp.unk_id() >= 0:
        w.add_unk_token_id(sp.unk_id())
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)

    for name, hf, shape, qt in plan:
        if qt == QT.Q8_0:
            nbytes = shape[0] * (shape[1] // 32) * 34
            w.add_tensor_info(name, (shape[0], shape[1] // 32 * 34), np.dtype(np.uint8), nbytes,
                              raw_dtype=qt)
        else:
            w.add_tensor_info(name, shape, np.dtype(np.float32), int(np.prod(shape)) * 4,
                              raw_dtype=qt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()

    counts = {"Q8_0": 0, "F32": 0}
    for name, hf, shape, qt in plan:  # one tensor in memory at a time
        a = _load_f32(index[hf])
        if name.endswith("attn_q.weight"):
            a = _unpermute(a, n_head)
        elif name.endswith("attn_k.weight"):
            a = _unpermute(a, n_kv)
        if qt == QT.Q8_0:
            q = np.empty((shape[0], shape[1] // 32 * 34), np.uint8)
            step = max(1, (1 << 24) // shape[1])  # quantize 16M weights at a time
            for r in range(0, shape[0], step):
                q[r:r + step] = gguf.quants.quantize(np.ascontiguousarray(a[r:r + step]), qt)
            a = q
        counts[qt.name] += 1
        w.write_tensor_data(np.ascontiguousarray(a))
        del a
    w.close()
    tmp.replace(out)
    return {"out": out, "tensors": counts, "bytes": Path(out).stat().st_size}


# ---------------------------------------------------------------------------------------------
# --- inside the llama.cpp venv: running it (llama_cpp, numpy) --------------------------------
# ---------------------------------------------------------------------------------------------
def _load_llama(gguf_path: str, n_ctx: int, threads: int):
    from llama_cpp import Llama
    return Llama(model_path=gguf_path, n_ctx=n_ctx, n_batch=512, n_ubatch=512, n_threads=threads,
                 n_threads_batch=threads, verbose=False)


def _argmax_last(llm) -> int:
    """Greedy next token from the logits of the last decode (llm.scores is filled only with
    logits_all, which would make llama.cpp compute every prompt position's logits)."""
    import llama_cpp
    import numpy as np
    logits = llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1)
    return int(np.argmax(np.ctypeslib.as_array(logits, shape=(llm.n_vocab(),))))


def _greedy(llm, prompt_ids, n):
    """Eval the prompt, then n greedy single-token decodes; returns the generated ids."""
    llm.reset()
    llm.eval(prompt_ids)
    out = []
    for _ in range(n):
        out.append(_argmax_last(llm))
        llm.eval(out[-1:])
    return out


def _perf(llm):
    """llama.cpp's own timings. It books a decode's time when it next synchronizes (reading
    logits, or the next decode), so synchronize first: else the last decode is missing."""
    import llama_cpp
    llama_cpp.llama_synchronize(llm._ctx.ctx)
    return llama_cpp.llama_perf_context(llm._ctx.ctx)


def _perf_reset(llm):
    import llama_cpp
    llama_cpp.llama_synchronize(llm._ctx.ctx)  # book pending work before the reset, not after
    llama_cpp.llama_perf_context_reset(llm._ctx.ctx)


def measure_inside(gguf: str, threads, gen_tokens, prompt_tokens, reps) -> dict:
    import llama_cpp
    import numpy as np

    llm = _load_llama(gguf, n_ctx=max(prompt_tokens, gen_tokens + 16) + 16, threads=max(threads))
    ctx = llm._ctx.ctx
    res = {"gen": {}, "gen_wall": {}, "prompt": [], "prompt_wall": []}
    short = llm.tokenize(b"Hello world", add_bos=True)
    for t in threads:
        llama_cpp.llama_set_n_threads(ctx, t, t)
        res["gen"][str(t)], res["gen_wall"][str(t)] = [], []
        for r in range(reps + 1):  # the first run warms up
            llm.reset()
            llm.eval(short)
            _perf_reset(llm)
            t0 = time.perf_counter()
            for _ in range(gen_tokens):
                llm.eval([_argmax_last(llm)])
            p = _perf(llm)
            wall = time.perf_counter() - t0
            if p.n_eval != gen_tokens:  # (it reports counts of 0 as 1)
                raise RuntimeError(f"llama_perf_context counted {p.n_eval} decodes, not {gen_tokens}")
            if r:
                res["gen"][str(t)].append(p.n_eval / (p.t_eval_ms / 1e3))
                res["gen_wall"][str(t)].append(gen_tokens / wall)
    tp = max(threads)
    llama_cpp.llama_set_n_threads(ctx, tp, tp)
    ids = [int(i) for i in np.random.default_rng(0).integers(3, llm.n_vocab(), prompt_tokens)]
    for r in range(reps + 1):
        llm.reset()
        _perf_reset(llm)
        t0 = time.perf_counter()
        llm.eval(ids)
        p = _perf(llm)
        wall = time.perf_counter() - t0
        if p.n_p_eval != prompt_tokens:
            raise RuntimeError(f"llama_perf_context counted {p.n_p_eval} prompt tokens, "
                               f"not {prompt_tokens}")
        if r:
            res["prompt"].append(p.n_p_eval / (p.t_p_eval_ms / 1e3))
            res["prompt_wall"].append(prompt_tokens / wall)
    return res


def generate_inside(gguf: str, prompt: str, n_tokens: int) -> dict:
    llm = _load_llama(gguf, n_ctx=512, threads=1)
    ids = llm.tokenize(prompt.encode(), add_bos=True)
    out = []
    for tok in _greedy(llm, ids, n_tokens):
        if tok == llm.token_eos():
            break
        out.append(tok)
    text = prompt + llm.detokenize(out, prev_tokens=ids).decode("utf-8", errors="replace")
    return {"text": text, "prompt_ids": ids, "ids": out}


def _inner_main(spec: str):
    args = json.loads(spec)
    op = args.pop("op")
    fn = {"convert": convert_inside, "measure": measure_inside, "generate": generate_inside}[op]
    print(json.dumps(fn(**args)))


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--inner":
        _inner_main(sys.argv[2])
    else:
        main()
