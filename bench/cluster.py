"""Two nodes against one: the TinyLlama-1.1B shape in Q8_0, the client plus one worker on
loopback, each pinned to one core (taskset), against the in-process engine on 2 threads.
Runs alternate (A, B, A, B, ...), since this machine drifts: its memory bandwidth flips between
states (in-process 29 and 39 tok/s minutes apart), so the ratio is the median of each pair's
(a run and the one right after it see the same state more often than two medians do).

    .venv/bin/python -m bench.cluster [--shape tinyllama-1.1b] [--tokens 64] [--reps 3]
"""
from __future__ import annotations

import json
import statistics
import subprocess
import sys

import click

from bench.engine import ROOT, SHAPES

CLIENT, WORKER = str(ROOT / "bin" / "client"), str(ROOT / "bin" / "worker")


def run_client(args: list[str]) -> dict:
    p = subprocess.run(args, capture_output=True, text=True, timeout=900)
    if p.returncode:
        raise SystemExit(f"error: {' '.join(args)} failed:\n{p.stderr[-2000:]}")
    out = json.loads(p.stdout)
    out["stderr"] = p.stderr
    return out


@click.command()
@click.option("--shape", default="tinyllama-1.1b", show_default=True)
@click.option("--tokens", default=64, show_default=True)
@click.option("--reps", default=3, show_default=True)
@click.option("--port", default=47310, show_default=True)
def main(shape, tokens, reps, port):
    """Client + 1 worker (1 core each) vs the in-process engine (2 threads)."""
    from bench.make_model import make_model
    sys.path.insert(0, str(ROOT / "tests"))
    from cluster_util import wait_ready

    model = ROOT / "models" / shape
    make_model(SHAPES / f"{shape}.json", model)
    worker = subprocess.Popen(["taskset", "-c", "1", WORKER, str(port), "--threads", "1"],
                              stderr=subprocess.DEVNULL)
    try:
        wait_ready(f"127.0.0.1:{port}")
        common = [str(model), "-i", "Hello world", "-n", str(tokens), "--json", "--ctx", "256"]
        alone, pair, rtts = [], [], []
        for _ in range(reps):
            alone.append(run_client([CLIENT, *common, "--threads", "2"])["gen_tok_s"])
            r = run_client(["taskset", "-c", "0", CLIENT, *common, "--threads", "1",
                            "--workers", f"127.0.0.1:{port}"])
            pair.append(r["gen_tok_s"])
            rtts += [line for line in r["stderr"].splitlines() if "avg round trip" in line]
            print(f"in-process 2 threads {alone[-1]:.2f} tok/s | client+worker 1 core each "
                  f"{pair[-1]:.2f} tok/s", flush=True)
    finally:
        worker.terminate()
        worker.wait()
    a, b = statistics.median(alone), statistics.median(pair)
    ratios = [y / x for x, y in zip(alone, pair)]
    r = statistics.median(ratios)
    print(f"\n{shape} Q8_0, {tokens} tokens, median of {reps}: in-process (2 threads) {a:.2f} tok/s, "
          f"client + 1 worker (1 core each) {b:.2f} tok/s: ratio {r:.2f}x (median of the runs' "
          f"pairs {', '.join(f'{x:.2f}' for x in ratios)}; ratio of the medians {b / a:.2f}x)")
    print(rtts[-1] if rtts else "")
    print(json.dumps({"in_process_tok_s": alone, "two_nodes_tok_s": pair, "pair_ratios": ratios,
                      "ratio": r, "ratio_of_medians": b / a}))


if __name__ == "__main__":
    main()
