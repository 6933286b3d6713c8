"""Serving benchmarks against `bin/client serve` (the OpenAI-compatible API), as the seeds ran them.

    python -m bench.serving MODEL_DIR maritalk --concurrency 1,2,4,8 --n-repeats 5 \\
        --prompt-size 550 --max-tokens 150            # MariTalk Local's benchmark
    python -m bench.serving MODEL_DIR jetstream --request-rate 2 --num-prompts 64
                                                      # JetStream's serving benchmark
    python -m bench.serving plot bench/out/maritalk-*.csv serving.png   # runs in one plot

Each run starts the server itself, in-process (`--threads`) or with `--workers K` loopback
workers (the client and each worker get an equal share of the cores), waits for /health, and
drives it over HTTP with streamed completions (`ignore_eos`, so every request generates exactly
its max_tokens, random-weight models included). Prompts are generated deterministically from
the model's own vocabulary. Output: a table on stdout, CSV / JSON (and, for maritalk, a PNG) in
--out.

maritalk: for each concurrency c, n-repeats rounds of c simultaneous requests. Per request:
  generated tok/s = completion tokens / request time; total tok/s = (prompt + completion) / time;
  mean, median and std over the requests; system tok/s = completion tokens of a round / the
  round's wall time (median over rounds). Rounds are interleaved across the levels and each
  level's speedup is the median of its per-round ratios to the first level (drift cancels).
jetstream: num-prompts requests (input and output lengths drawn around the given means) arrive
  as a Poisson process of the given rate (0 = all at once). Reported: request throughput,
  input and output tok/s, and mean / median / p99 time to first token (TTFT) and time per
  output token after the first (TPOT).
"""
from __future__ import annotations

import argparse
import csv
import http.client
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # cluster_util: free ports, waiting for a worker
from cluster_util import free_port, wait_ready  # noqa: E402


# ---------------------------------------------------------------------------------------------
# the server under test
# ---------------------------------------------------------------------------------------------
class Server:
    """`bin/client serve` (and its loopback workers), started and stopped with the benchmark."""

    def __init__(self, model_dir: Path, slots: int, ctx: int, workers: int, threads: int):
        self.procs, addrs = [], []
        cores = len(os.sched_getaffinity(0))
        per_node = max(1, cores // (workers + 1)) if workers else threads
        for _ in range(workers):
            port = free_port()
            self.procs.append(subprocess.Popen([str(ROOT / "bin/worker"), str(port), "--threads",
                                                str(per_node)], stderr=subprocess.DEVNULL))
            addrs.append(f"127.0.0.1:{port}")
        for a in addrs:  # each measures its speed and compiles its kernels first
            wait_ready(a, 300)
        self.port = free_port()
        cmd = [str(ROOT / "bin/client"), "serve", str(model_dir), "--port", str(self.port),
               "--slots", str(slots), "--ctx", str(ctx), "--threads", str(per_node),
               "--max-queue", "1024"]
        if addrs:  # equal shares: the bench compares concurrency levels, not plans
            cmd += ["--workers", ",".join(f"{a}*1" for a in addrs)]
        self.log = open(Path(os.environ.get("TMPDIR", "/tmp")) / f"serve-{self.port}.log", "w")
        self.procs.append(subprocess.Popen(cmd, stderr=self.log, stdout=self.log))
        self.url = f"http://127.0.0.1:{self.port}"
        t = time.time()
        while time.time() - t < 600:
            if self.procs[-1].poll() is not None:
                raise SystemExit(f"the server exited: see {self.log.name}")
            try:
                c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
                c.request("GET", "/health")
                if c.getresponse().status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.5)
        raise SystemExit(f"the server did not start in 600 s: see {self.log.name}")

    def stop(self) -> None:
        for p in reversed(self.procs):
            p.terminate()
        for p in self.procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()


def prompt_texts(model_dir: Path, sizes: list[int], seed: int = 0) -> list[str]:
    """Texts of about the given token counts: random words of the model's own vocabulary."""
    from client.tokenizer import Tokenizer
    tok = Tokenizer(model_dir)
    rng = np.random.default_rng(seed)
    words = [w for w in (tok.decode([i]).strip() for i in range(3, min(tok.vocab_size, 8000)))
             if w.isalpha() and len(w) > 2]
    out = []
    for n in sizes:
        text = " ".join(rng.choice(words, size=2 * n))
        ids = tok.encode(text)[1:n]  # BOS is added by the server: n tokens in all
        out.append(tok.decode(ids))
    return out


def stream_completion(url: str, prompt: str, max_tokens: int) -> dict:
    """One streamed completion: times of the request, the first token and the end; usage."""
    body = {"model": "bench", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "stream": True, "ignore_eos": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    first = None
    usage, done = None, False
    host, port = url.removeprefix("http://").rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=3600)
    conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    r = conn.getresponse()
    if r.status != 200:
        return {"error": f"HTTP {r.status}: {r.read()[:200]!r}"}
    for raw in r:  # server-sent events, a line at a time
        line = raw.decode().strip()
        if not line.startswith("data: "):
            continue
        if line == "data: [DONE]":
            done = True
            break
        ev = json.loads(line[6:])
        if ev.get("choices") and ev["choices"][0].get("text"):
            first = first or time.perf_counter()
        usage = ev.get("usage") or usage
    conn.close()
    t1 = time.perf_counter()
    if not done or usage is None:
        return {"error": "stream ended without usage and [DONE]"}
    return {"start": t0, "first": first or t1, "end": t1, "prompt_tokens": usage["prompt_tokens"],
            "completion_tokens": usage["completion_tokens"]}


def run_concurrently(url: str, jobs: list[tuple[float, str, int]]) -> list[dict]:
    """jobs [(delay s, prompt, max_tokens)]: each sent from its own thread after its delay."""
    out = [None] * len(jobs)
    t0 = time.perf_counter()

    def one(i, delay, prompt, n):
        time.sleep(max(0.0, t0 + delay - time.perf_counter()))
        out[i] = stream_completion(url, prompt, n)

    threads = [threading.Thread(target=one, args=(i, *job)) for i, job in enumerate(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    errors = [r["error"] for r in out if "error" in r]
    if errors:
        raise SystemExit(f"{len(errors)} requests failed, e.g. {errors[0]}")
    return out


# ---------------------------------------------------------------------------------------------
# MariTalk Local's benchmark
# ---------------------------------------------------------------------------------------------
def maritalk(url: str, model_dir: Path, levels: list[int], repeats: int, prompt_size: int,
             max_tokens: int, label: str, out_dir: Path) -> list[dict]:
    """Rounds interleaved (round 1 of every level, then round 2, ...) so that the machine's
    drift falls on every level alike; a level's speedup is the median over rounds of its system
    tok/s over the first level's in the same round."""
    gen, total, system = ({c: [] for c in levels} for _ in range(3))
    for rep in range(repeats):
        for c in levels:
            prompts = prompt_texts(model_dir, [prompt_size] * c, seed=1000 * c + rep)
            t0 = time.perf_counter()
            res = run_concurrently(url, [(0.0, p, max_tokens) for p in prompts])
            wall = time.perf_counter() - t0
            for r in res:
                dt = r["end"] - r["start"]
                gen[c].append(r["completion_tokens"] / dt)
                total[c].append((r["prompt_tokens"] + r["completion_tokens"]) / dt)
            system[c].append(sum(r["completion_tokens"] for r in res) / wall)
            print(f"  [{label}] round {rep + 1}/{repeats} concurrency {c}: {system[c][-1]:.2f} tok/s "
                  f"in {wall:.1f} s", file=sys.stderr, flush=True)
    base = system[levels[0]]
    return [{"config": label, "concurrency": c, "requests": len(gen[c]),
             "gen_tok_s_mean": statistics.mean(gen[c]), "gen_tok_s_median": statistics.median(gen[c]),
             "gen_tok_s_std": statistics.pstdev(gen[c]), "total_tok_s_mean": statistics.mean(total[c]),
             "total_tok_s_median": statistics.median(total[c]),
             "total_tok_s_std": statistics.pstdev(total[c]),
             "system_tok_s": statistics.median(system[c]),
             "system_vs_c1": statistics.median([x / b for x, b in zip(system[c], base)])}
            for c in levels]


def plot_maritalk(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    for cfg in dict.fromkeys(r["config"] for r in rows):
        rs = [r for r in rows if r["config"] == cfg]
        c = [r["concurrency"] for r in rs]
        ax[0].plot(c, [r["system_tok_s"] for r in rs], "o-", label=cfg)
        ax[1].errorbar(c, [r["gen_tok_s_mean"] for r in rs], [r["gen_tok_s_std"] for r in rs],
                       fmt="o-", capsize=3, label=cfg)
    ax[0].set(xlabel="concurrent requests", ylabel="system tok/s (generated)", title="throughput")
    ax[1].set(xlabel="concurrent requests", ylabel="generated tok/s per request", title="per request")
    for a in ax:
        a.set_xscale("log", base=2)
        a.grid(alpha=0.3)
        a.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


# ---------------------------------------------------------------------------------------------
# JetStream's serving benchmark
# ---------------------------------------------------------------------------------------------
def jetstream(url: str, model_dir: Path, n: int, rate: float, input_len: int, output_len: int,
              seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    ins = np.clip(rng.normal(input_len, input_len / 4, n), 4, None).astype(int).tolist()
    outs = np.clip(rng.normal(output_len, output_len / 4, n), 2, None).astype(int).tolist()
    prompts = prompt_texts(model_dir, ins, seed)
    delays = np.cumsum(rng.exponential(1 / rate, n)) if rate > 0 else np.zeros(n)
    t0 = time.perf_counter()
    res = run_concurrently(url, list(zip(delays.tolist(), prompts, outs)))
    wall = time.perf_counter() - t0
    ttft = [1e3 * (r["first"] - r["start"]) for r in res]
    tpot = [1e3 * (r["end"] - r["first"]) / (r["completion_tokens"] - 1)
            for r in res if r["completion_tokens"] > 1]
    pct = lambda v, q: float(np.percentile(v, q))  # noqa: E731
    return {"requests": n, "request_rate": rate, "duration_s": wall,
            "request_throughput": n / wall,
            "input_tok_s": sum(r["prompt_tokens"] for r in res) / wall,
            "output_tok_s": sum(r["completion_tokens"] for r in res) / wall,
            "mean_ttft_ms": statistics.mean(ttft), "median_ttft_ms": pct(ttft, 50),
            "p99_ttft_ms": pct(ttft, 99), "mean_tpot_ms": statistics.mean(tpot),
            "median_tpot_ms": pct(tpot, 50), "p99_tpot_ms": pct(tpot, 99)}


def plot_csvs(paths: list[Path], png: Path) -> None:
    """`python -m bench.serving plot A.csv B.csv ... OUT.png`: several maritalk runs in one plot,
    labelled by configuration and prompt size."""
    rows = []
    for path in paths:
        with open(path) as f:
            for r in csv.DictReader(f):
                r = {k: (v if k == "config" else float(v)) for k, v in r.items()}
                r["config"] += ", prompt " + path.stem.rsplit("-p", 1)[-1]
                rows.append(r)
    plot_maritalk(rows, png, "MariTalk Local's benchmark: 150 tokens per request, ignore_eos")


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["plot"]:
        return plot_csvs([Path(x) for x in argv[1:-1]], Path(argv[-1]))
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir", type=Path)
    ap.add_argument("mode", choices=["maritalk", "jetstream"])
    ap.add_argument("--url", help="an already running server (default: start one)")
    ap.add_argument("--workers", type=int, default=0, help="loopback workers beside the client")
    ap.add_argument("--threads", type=int, default=2, help="client threads when in-process")
    ap.add_argument("--slots", type=int, default=8)
    ap.add_argument("--ctx", type=int, default=1024)
    ap.add_argument("--concurrency", default="1,2,4,8")
    ap.add_argument("--n-repeats", type=int, default=5)
    ap.add_argument("--prompt-size", type=int, default=550)
    ap.add_argument("--max-tokens", type=int, default=150)
    ap.add_argument("--num-prompts", type=int, default=64)
    ap.add_argument("--request-rate", type=float, default=0.0, help="requests/s (Poisson); 0 = all at once")
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "out")
    a = ap.parse_args(argv)
    if not (a.model_dir / "config.json").is_file():
        raise SystemExit(f"{a.model_dir}: no config.json (make a random model with "
                         "`python -m bench.make_model`)")
    a.out.mkdir(parents=True, exist_ok=True)
    label = f"{a.model_dir.name}, " + (f"client + {a.workers} worker(s)" if a.workers
                                       else f"in-process, {a.threads} threads")
    server = None if a.url else Server(a.model_dir, a.slots, a.ctx, a.workers, a.threads)
    url = a.url or server.url
    try:
        if a.mode == "maritalk":
            levels = [int(c) for c in a.concurrency.split(",")]
            rows = maritalk(url, a.model_dir, levels, a.n_repeats, a.prompt_size, a.max_tokens,
                            label, a.out)
            stem = a.out / f"maritalk-{a.model_dir.name}-{a.workers}w-p{a.prompt_size}"
            with open(f"{stem}.csv", "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=list(rows[0]))
                w.writeheader()
                w.writerows(rows)
            plot_maritalk(rows, Path(f"{stem}.png"), f"{label}: prompt {a.prompt_size}, "
                          f"{a.max_tokens} tokens, {a.n_repeats} rounds")
            print("| concurrency | generated tok/s per request (mean / median / std) | total tok/s per "
                  "request (mean / median / std) | system tok/s | vs 1 |\n|---|---|---|---|---|")
            for r in rows:
                print(f"| {r['concurrency']} | {r['gen_tok_s_mean']:.2f} / {r['gen_tok_s_median']:.2f} / "
                      f"{r['gen_tok_s_std']:.2f} | {r['total_tok_s_mean']:.2f} / "
                      f"{r['total_tok_s_median']:.2f} / {r['total_tok_s_std']:.2f} | "
                      f"{r['system_tok_s']:.2f} | {r['system_vs_c1']:.2f}x |")
            print(f"({label}; CSV and plot: {stem}.csv / .png)")
        else:
            res = jetstream(url, a.model_dir, a.num_prompts, a.request_rate, a.input_len, a.output_len)
            res["config"] = label
            path = a.out / f"jetstream-{a.model_dir.name}-{a.workers}w-r{a.request_rate:g}.json"
            path.write_text(json.dumps(res, indent=2))
            print(json.dumps(res, indent=2))
    finally:
        if server:
            server.stop()


if __name__ == "__main__":
    main()
