"""Two nodes against one: the TinyLlama-1.1B shape in Q8_0, the client plus one worker on
loopback, each pinned to one core, against the in-process engine on 2 threads.

Both sides live in this one process, loaded once: the in-process model (2 threads, both cores)
and the client of the pair (1 thread, pinned to core 0; the worker is a `bin/worker` process
pinned to core 1). Short generations alternate between them in the order A B B A, so that each
pair of runs sees the same state of the machine: its memory bandwidth flips between a slow and
a fast state minutes apart (in-process 27 and 39 tok/s in one bench run), more than the effect
measured. The ratio is the median of the pairs' ratios. (The pair's partial sums cross the wire
in f32, the default, so on this random-weight model, whose logits nearly tie, its greedy tokens
may part from the in-process ones after a while; tests check identity with --wire f64.)

    .venv/bin/python -m bench.cluster [--shape tinyllama-1.1b] [--tokens 32] [--pairs 16] [--python-steps]

--python-steps adds a third run to each round: the same pair with its layer steps sent and read
by RemoteNode's Python (start / wait) instead of the compiled fan-out (client/fanout.py), and
prints the fan-out's speed against it.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys

import click

from bench.engine import ROOT, SHAPES

WORKER = str(ROOT / "bin" / "worker")


def pin(cpus: set[int]) -> None:
    """Every thread of this process (Numba's pool, gRPC's) onto `cpus`, as taskset would."""
    for tid in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(tid), cpus)
        except OSError:  # the thread ended meanwhile
            pass


@click.command()
@click.option("--shape", default="tinyllama-1.1b", show_default=True)
@click.option("--tokens", default=32, show_default=True, help="tokens per generation")
@click.option("--pairs", default=16, show_default=True, help="pairs of generations (A B, then B A)")
@click.option("--port", default=47310, show_default=True)
@click.option("--python-steps", is_flag=True,
              help="also run the pair with its steps through Python (no compiled fan-out), for the ratio")
def main(shape, tokens, pairs, port, python_steps):
    """Client + 1 worker (1 core each) vs the in-process engine (2 threads), interleaved."""
    from bench.make_model import make_model
    from client.generate import generate
    from client.model import Model
    from quant.q8_0 import set_threads
    sys.path.insert(0, str(ROOT / "tests"))
    from cluster_util import wait_ready

    if len(os.sched_getaffinity(0)) < 2:
        raise SystemExit("error: this bench needs 2 cores (it pins the worker to core 1)")
    model_dir = ROOT / "models" / shape
    make_model(SHAPES / f"{shape}.json", model_dir)
    worker = subprocess.Popen(["taskset", "-c", "1", WORKER, str(port), "--threads", "1"],
                              stderr=subprocess.DEVNULL)
    try:
        wait_ready(f"127.0.0.1:{port}")
        set_threads(2)
        alone = Model.load(model_dir, ctx=256)
        pin({0})
        set_threads(1)  # the pair's client plans with its speed on one core, as the CLI would
        pair = Model.load(model_dir, ctx=256, workers=[(f"127.0.0.1:{port}", None)])
        pin({0, 1})
        prompt = alone.tokenizer.encode("Hello world")

        fanout = pair.fanout

        def run(model, two_threads: bool, fan=None):
            pin({0, 1} if two_threads else {0})
            set_threads(2 if two_threads else 1)
            if model is pair:
                pair.fanout = fan
            return generate(model, prompt, tokens)

        run(alone, True), run(pair, False, fanout)  # warm both (first-call costs, page faults)
        a, b, c = [], [], []
        for i in range(pairs):
            order = [(alone, True, None, a), (pair, False, fanout, b)]
            if python_steps:
                order.append((pair, False, None, c))
            for model, two, fan, out in (order if i % 2 == 0 else order[::-1]):
                out.append(run(model, two, fan))
            py = f" | Python steps {c[-1].gen_tok_s:6.2f}" if python_steps else ""
            print(f"pair {i + 1:2d}: in-process 2 threads {a[-1].gen_tok_s:6.2f} tok/s | client + "
                  f"worker 1 core each {b[-1].gen_tok_s:6.2f} tok/s | {b[-1].gen_tok_s / a[-1].gen_tok_s:.3f}{py}",
                  flush=True)
        node = pair.remote[0]
        calls = node.calls[-pairs * tokens * (2 * pair.cfg.n_layers + 1):]
        compute = statistics.mean(c.compute_us for c in calls)
        rtt = statistics.mean(c.rtt_us for c in calls)
        shard = node.shard
    finally:
        worker.terminate()
        worker.wait()
    ratios = [y.gen_tok_s / x.gen_tok_s for x, y in zip(a, b)]
    ta, tb = (statistics.median(r.gen_tok_s for r in rs) for rs in (a, b))
    q = statistics.quantiles(ratios, n=4)
    print(f"\n{shape} Q8_0, {pairs} pairs of {tokens} tokens: in-process (2 threads) median {ta:.2f} "
          f"tok/s, client + 1 worker (1 core each) {tb:.2f} tok/s: ratio {statistics.median(ratios):.3f}x "
          f"(median of the pairs; quartiles {q[0]:.3f}-{q[2]:.3f})")
    print(f"worker holds heads {shard.heads}, ffn units {shard.units}, classifier rows {shard.rows}; "
          f"per call {rtt:.0f} us round trip = {compute:.0f} compute + {rtt - compute:.0f} beyond "
          "(the client's own share included)")
    if python_steps:
        own = [y.gen_tok_s / z.gen_tok_s for y, z in zip(b, c)]
        print(f"the pair with the compiled fan-out against its steps through Python: median "
              f"{statistics.median(own):.3f}x (Python steps {statistics.median(r.gen_tok_s for r in c):.2f} tok/s, "
              f"{statistics.median(z.gen_tok_s / x.gen_tok_s for x, z in zip(a, c)):.3f}x in-process)")
    print(json.dumps({"in_process_tok_s": [r.gen_tok_s for r in a],
                      "two_nodes_tok_s": [r.gen_tok_s for r in b], "pair_ratios": ratios,
                      "ratio": statistics.median(ratios)}))


if __name__ == "__main__":
    main()
