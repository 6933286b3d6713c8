"""Engine benchmark: the TinyLlama-1.1B shape in Q8_0 on this machine.

Prints generation tok/s at 1 and 2 threads, prompt tok/s for a 512-token prompt, load time and
peak memory while loading from f16, and the memory bandwidth measured in the same run, with the
ratio of achieved bytes/s (Q8_0 weight bytes read per token x tok/s) to that bandwidth. With
--llamacpp (default), llama.cpp runs the same Q8_0 weights in the same run (bench/llamacpp.py
builds it once, ~6 min) and the figures are given as ratios to it: this machine's memory
bandwidth drifts by +-15% over minutes, so only same-run ratios compare.

    .venv/bin/python -m bench.engine [--shape tinyllama-1.1b] [--tokens 64] [--reps 3] [--no-llamacpp]
"""
from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import click
import numpy as np
from numba import njit, prange

ROOT = Path(__file__).resolve().parents[1]
SHAPES = ROOT.parent / "shared" / "models" / "shapes"

# llama.cpp (Q8_0, same shape, this machine) as the issue measured it: used with --no-llamacpp.
LLAMA_CPP_FIXED = {"gen_2t": 24.3, "gen_1t": 15.3, "prompt_2t": 86.0}


@njit(parallel=True, cache=True)
def _read_all(a):
    s = 0
    for i in prange(a.shape[0]):
        s += a[i]
    return s


def bandwidth(threads: int, nbytes: int = 1 << 30, reps: int = 5) -> float:
    """Read bandwidth in bytes/s: a parallel sum over an array far larger than the caches."""
    from quant.q8_0 import set_threads
    set_threads(threads)
    a = np.ones(nbytes // 8, np.int64)
    _read_all(a)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        _read_all(a)
        times.append(time.perf_counter() - t)
    return nbytes / statistics.median(times)


def weight_bytes_per_token(model) -> int:
    """Bytes of weights one token's forward pass reads: every slice matrix and the classifier."""
    rows = model.memory_table()
    return sum(b for kind, _, b, _ in rows if kind not in ("embedding", "norms") and
               not kind.startswith("kv cache")) + (
        model.embedding.nbytes if model.cfg.tie_embeddings else 0)


def measure_load(model_dir: Path) -> dict:
    """Load in a fresh process with a warm file cache (the second of two loads): seconds, peak
    RSS, the model's Q8_0 weight bytes, and the time to the first token of a short prompt."""
    code = ("import json,resource,sys,time; t=time.perf_counter(); from client.model import Model;"
            f"m=Model.load({str(model_dir)!r}); dt=time.perf_counter()-t;"
            "w=sum(b for k,_,b,_ in m.memory_table() if not k.startswith('kv cache'));"
            "m.forward([1, 15043, 3186], 0); ttft=time.perf_counter()-t;"
            "print(json.dumps({'seconds':dt,'peak_rss':resource.getrusage(resource.RUSAGE_SELF).ru_maxrss*1024,"
            "'weights':w,'first_token_seconds':ttft}))")
    for _ in range(2):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             cwd=ROOT, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def gen_speed(model, threads: int, tokens: int, reps: int) -> float:
    from client.generate import generate
    from quant.q8_0 import set_threads
    set_threads(threads)
    speeds = []
    for r in range(reps + 1):
        res = generate(model, [model.cfg.bos_id, 15043, 3186], tokens)
        if r:  # the first run warms up
            speeds.append(res.gen_tok_s)
    return statistics.median(speeds)


def prompt_speed(model, threads: int, n: int, reps: int) -> float:
    from quant.q8_0 import set_threads
    set_threads(threads)
    ids = list(np.random.default_rng(0).integers(3, model.cfg.vocab_size, n))
    times = []
    for r in range(reps + 1):
        t = time.perf_counter()
        model.forward(ids, 0)
        if r:
            times.append(time.perf_counter() - t)
    return n / statistics.median(times)


@click.command()
@click.option("--shape", default="tinyllama-1.1b", show_default=True,
              help="A config in ../shared/models/shapes/.")
@click.option("--tokens", default=64, show_default=True, help="Tokens generated per run.")
@click.option("--prompt", "prompt_len", default=512, show_default=True, help="Prompt length.")
@click.option("--reps", default=3, show_default=True, help="Runs per figure (median reported).")
@click.option("--llamacpp/--no-llamacpp", default=True, show_default=True,
              help="Measure llama.cpp on the same weights in the same run (else fixed figures).")
def main(shape, tokens, prompt_len, reps, llamacpp):
    """Engine speed against the memory bandwidth and llama.cpp, measured in the same run."""
    from bench.make_model import make_model
    from client.model import Model

    model_dir = ROOT / "models" / shape
    make_model(SHAPES / f"{shape}.json", model_dir)
    if llamacpp:
        from bench import llamacpp as lc
        ref = lc.measure(model_dir, gen_tokens=tokens, prompt_tokens=prompt_len, reps=reps)
        ref_name = "llama.cpp (this run)"
    else:
        ref, ref_name = LLAMA_CPP_FIXED, "llama.cpp (issue's figures)"
    load = measure_load(model_dir)
    model = Model.load(model_dir, ctx=max(prompt_len + 8, tokens + 8))
    wb = weight_bytes_per_token(model)
    rows = []
    for th in (1, 2):
        bw = bandwidth(th)
        g = gen_speed(model, th, tokens, reps)
        rows.append((th, bw, g))
    p2 = prompt_speed(model, 2, prompt_len, max(1, reps - 1))
    print(f"\n{shape}, Q8_0, weights read per token {wb / 1e9:.3f} GB")
    print(f"load: {load['seconds']:.2f} s (first token {load['first_token_seconds']:.2f} s after start), peak RSS {load['peak_rss'] / 2**30:.2f} GiB = "
          f"{load['peak_rss'] / load['weights']:.2f}x the Q8_0 weights ({load['weights'] / 2**30:.2f} GiB)")
    print(f"{'threads':>7} {'bandwidth':>10} {'gen tok/s':>9} {'achieved':>9} {'of bw':>6} "
          f"{'llama.cpp':>9} {'ratio':>6}")
    for th, bw, g in rows:
        r = ref[f"gen_{th}t"]
        print(f"{th:>7} {bw / 1e9:>7.1f} GB/s {g:>9.2f} {wb * g / 1e9:>6.1f} GB/s {wb * g / bw:>6.0%} "
              f"{r:>9.2f} {g / r:>5.2f}x")
    print(f"prompt {prompt_len} tokens, 2 threads: {p2:.1f} tok/s, {ref_name} {ref['prompt_2t']:.1f}: "
          f"{p2 / ref['prompt_2t']:.2f}x")
    print(json.dumps({"shape": shape, "weight_bytes_per_token": wb, "load": load,
                      "gen": {str(th): {"bandwidth": bw, "tok_s": g} for th, bw, g in rows},
                      "prompt_tok_s_2t": p2, "reference": ref_name,
                      "llama_cpp": {k: ref[k] for k in ("gen_1t", "gen_2t", "prompt_2t")}}))


if __name__ == "__main__":
    main()
