"""Scaling across an emulated LAN (bench/lan.py, root only): the TinyLlama-1.1B shape in Q8_0 on
1 to 8 CPU-capped worker hosts, the client (--no-local) on an uncapped host of its own, links
capped at 1 gbit, a relay adding 0.1 ms each way.

    sudo .venv/bin/python -m bench.scaling [--tokens 32] [--reps 3] [--rate 1gbit] [--delay-ms 0.1]
                                           [--configs 0.25x1,0.25x2,...] [--model DIR]
                                           [--wire q8_0]

Configurations: hosts capped at 0.25 core for N = 1, 2, 4 (0.25x1 ...); at 0.125 core for N = 1,
2, 4, 8; one 0.5-core host with three 0.125-core ones, split by the client's default plan (mixed-
balanced: equal time per token from each worker's speed and step cost, see client/model.py
plan_costs and time_balanced; it may leave slow workers out) or equally (mixed-equal, `*1`
weights). Each prints generation tok/s, the speedup over N = 1 at the same cap, ms per token
split into compute (the slowest worker's compute per block, summed), wire (that block's slowest
round trip beyond it) and client/wait (the rest), bytes per token on the wire, the workers' peak
memory and the relay's own overhead (round trip through it at zero delay minus direct). Writes bench/out/scaling.csv and
bench/out/scaling.png (speedup against N per cap, ideal dashed; needs the `bench` extra).

The configurations compared with one another run together, in rounds (run_group): one cap's
clusters are all up at once and each round runs every one of them once, so that the machine's
drift falls on the baseline and the others alike; speedups are medians of the rounds' ratios.
Each configuration runs once before the rounds, uncounted (its upload; its workers' step cost).
"""
from __future__ import annotations

import contextlib
import csv
import json
import statistics
import tempfile
from collections import defaultdict
from pathlib import Path

import click

from bench.engine import ROOT, SHAPES
from bench.lan import Cluster, need_root

OUT = ROOT / "bench" / "out"
PROMPT = "Once upon a time"
MIXED = [0.5, 0.125, 0.125, 0.125]
# name -> (cores per worker host, --workers weights or None for the client's default plan)
CONFIGS = {
    **{f"0.25x{n}": ([0.25] * n, None) for n in (1, 2, 4)},
    **{f"0.125x{n}": ([0.125] * n, None) for n in (1, 2, 4, 8)},
    "mixed-balanced": (MIXED, None),
    "mixed-equal": (MIXED, [1] * len(MIXED)),
}
PERF_COLUMNS = ["token", "layer", "block", "worker", "bytes_sent", "bytes_received",
                "worker_compute_us", "round_trip_us"]


def split_token_time(perf_csv: Path, ms_per_token: float) -> dict:
    """ms per generated token in compute / wire / client+wait, and bytes per token, from the
    client's --perf-csv (pass 0 is the prompt: skipped). The workers of a block run in parallel,
    so a block costs its slowest round trip: the slowest compute plus the wire beyond it."""
    with open(perf_csv, newline="") as f:
        reader = csv.DictReader(f)
        missing = set(PERF_COLUMNS) - set(reader.fieldnames or [])
        if missing:
            raise SystemExit(f"error: {perf_csv} lacks columns {sorted(missing)} (has "
                             f"{reader.fieldnames}): update PERF_COLUMNS to the client's format")
        blocks, nbytes = defaultdict(list), 0
        for r in reader:
            if int(r["token"]) >= 1:
                blocks[r["token"], r["layer"], r["block"]].append(
                    (int(r["worker_compute_us"]), int(r["round_trip_us"])))
                nbytes += int(r["bytes_sent"]) + int(r["bytes_received"])
    tokens = len({k[0] for k in blocks})
    if not tokens:
        raise SystemExit(f"error: {perf_csv} has no generated token: raise --tokens above 1")
    compute = sum(max(c for c, _ in b) for b in blocks.values()) / tokens / 1000
    wire = sum(max(t for _, t in b) for b in blocks.values()) / tokens / 1000 - compute
    return {"compute_ms": compute, "wire_ms": wire, "client_ms": ms_per_token - compute - wire,
            "bytes_per_token": nbytes / tokens}


def groups(names: list[str]) -> list[list[str]]:
    """The configurations compared with one another, each group run together: one cap's N = 1,
    2, 4 (8), or the mixed cluster's two splits."""
    out: dict[str, list[str]] = {}
    for n in names:
        out.setdefault("mixed" if n.startswith("mixed") else n.split("x")[0], []).append(n)
    return list(out.values())


def run_client(c: Cluster, name: str, model: Path, tokens: int, wire: str, perf: Path) -> dict:
    """One generation on cluster c with the configuration's --workers weights: tok/s and the
    split of a token's time."""
    r = c.run_client([str(model), "-i", PROMPT, "-n", str(tokens), "--temperature", "0",
                      "--ctx", "256", "--threads", "1", "--no-local", "--json", "--wire", wire,
                      "--workers", c.workers_arg(CONFIGS[name][1]), "--perf-csv", str(perf)])
    if r.returncode:
        raise SystemExit(f"error: {name}: the client failed ({r.returncode}):\n{r.stderr[-3000:]}")
    out = json.loads(r.stdout)
    return {"tok_s": out["gen_tok_s"], "ms_per_token": out["ms_per_token"],
            **split_token_time(perf, out["ms_per_token"])}


def run_group(names: list[str], model: Path, tokens: int, reps: int, rate: str, delay_ms: float,
              wire: str) -> list[dict]:
    """A group's clusters all up at once (one per distinct set of hosts: the mixed cluster's two
    splits share theirs; an idle worker under a CPU quota blocks on its socket and takes no CPU),
    then `reps` rounds, each running every configuration once, in alternating order. This
    machine's memory bandwidth drifts by a third over minutes: run one after another, one host's
    three runs ranged 3.75-5.27 tok/s, and a speedup over a baseline measured minutes before
    measured the drift as much as the scaling. Speedups are medians of the rounds' ratios (over
    N = 1 at the same cap; the balanced mixed plan over the equal one)."""
    hosts = lambda n: tuple(CONFIGS[n][0])  # noqa: E731
    with contextlib.ExitStack() as stack:
        clusters = {}
        for name in names:
            if hosts(name) not in clusters:
                click.echo(f"{name}: starting {len(hosts(name))} workers "
                           f"({'/'.join(f'{c:g}' for c in hosts(name))} core)", err=True)
                clusters[hosts(name)] = stack.enter_context(
                    Cluster(cpus=list(hosts(name)), rate=rate, delay_ms=delay_ms))
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        for name in names:  # warm-up, not counted: the upload, and a session that tells each
            # worker what a step costs it (HelloReply.step_cpu_us), so that round 1's measured
            # plan is the one a user's second run gets and later rounds keep (KEEP_PLAN)
            click.echo(f"{name}: warm-up run", err=True)
            run_client(clusters[hosts(name)], name, model, 8, wire, tmp / f"{name}-warm.csv")
        runs: dict[str, list[dict]] = {n: [] for n in names}
        for rep in range(reps):
            for name in names if rep % 2 == 0 else names[::-1]:
                runs[name].append(run_client(clusters[hosts(name)], name, model, tokens, wire,
                                             tmp / f"{name}-{rep}.csv"))
                click.echo(f"{name}: round {rep + 1}/{reps}: {runs[name][-1]['tok_s']:.2f} tok/s", err=True)
        base = next((n for n in names if len(hosts(n)) == 1 or n == "mixed-equal"), None)
        rows = []
        for name in names:
            cpus, c = hosts(name), clusters[hosts(name)]
            ratio = (statistics.median(a["tok_s"] / b["tok_s"] for a, b in zip(runs[name], runs[base]))
                     if base else None)
            rows.append({"config": name, "n": len(cpus), "cores": "/".join(f"{x:g}" for x in cpus),
                         "cap": cpus[0] if len(set(cpus)) == 1 else None,
                         "split": "equal" if CONFIGS[name][1] else "measured",
                         **{k: statistics.median(r[k] for r in runs[name]) for k in runs[name][0]},
                         "speedup": ratio if len(set(cpus)) == 1 else None,
                         "vs_equal": ratio if name == "mixed-balanced" and base == "mixed-equal" else None,
                         "tok_s_reps": " ".join(f"{r['tok_s']:.3f}" for r in runs[name]),
                         "peak_mib": " ".join(f"{h}:{c.peak_memory(h) >> 20}" for h in c.workers + ["client"]),
                         "relay_overhead_us": c.relay_overhead_us()})
        return rows


def print_table(rows: list[dict], model: str, tokens: int, rate: str, delay_ms: float) -> None:
    print(f"\n{model}, Q8_0, {tokens} tokens, links {rate}, {delay_ms:g} ms each way "
          f"(medians of the rounds; speedup: median of the rounds' ratios); ms per token = compute + wire + client/wait")
    print(f"{'config':<15} {'N':>2} {'tok/s':>7} {'speedup':>7} {'ms/tok':>8} {'compute':>8} "
          f"{'wire':>7} {'client':>7} {'KB/tok':>7} {'relay us':>8}  peak MiB")
    for r in rows:
        sp = f"{r['speedup']:.2f}x" if r["speedup"] else "-"
        print(f"{r['config']:<15} {r['n']:>2} {r['tok_s']:>7.2f} {sp:>7} {r['ms_per_token']:>8.1f} "
              f"{r['compute_ms']:>8.1f} {r['wire_ms']:>7.1f} {r['client_ms']:>7.1f} "
              f"{r['bytes_per_token'] / 1000:>7.1f} {r['relay_overhead_us']:>8.0f}  {r['peak_mib']}")
    for r in rows:
        if r["vs_equal"]:
            print(f"mixed cluster: the default (balanced) plan {r['vs_equal']:.2f}x the equal split "
                  "(median of the rounds' ratios)")


def plot(rows: list[dict], model: str, path: Path) -> None:
    try:
        import matplotlib
    except ImportError:
        raise SystemExit("error: the plot needs matplotlib: .venv/bin/python -m pip install -e '.[bench]'")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    ns = sorted({r["n"] for r in rows if r["speedup"]})
    ax.plot(ns, ns, "k--", label="ideal")
    for cap in sorted({r["cap"] for r in rows if r["speedup"]}, reverse=True):
        pts = sorted((r["n"], r["speedup"]) for r in rows if r["speedup"] and r["cap"] == cap)
        ax.plot(*zip(*pts), "o-", label=f"{cap:g} core per host")
    ax.set(xlabel="worker hosts N", ylabel="speedup over N = 1", xticks=ns,
           title=f"{model} (Q8_0) on an emulated LAN")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--tokens", default=32, show_default=True, help="Tokens to generate per run.")
@click.option("--reps", default=3, show_default=True, help="Rounds, each running every configuration once (medians).")
@click.option("--rate", default="1gbit", show_default=True, help="Link rate of every host (tc syntax).")
@click.option("--delay-ms", default=0.1, show_default=True, help="One-way delay client <-> workers.")
@click.option("--configs", default=",".join(CONFIGS), show_default=True,
              help="Comma-separated subset of the configurations.")
@click.option("--model", type=click.Path(path_type=Path), default=None,
              help="Model folder (default: the TinyLlama-1.1B shape, generated once into models/).")
@click.option("--wire", type=click.Choice(["f64", "f32", "bf16", "q8_0"]), default="q8_0",
              show_default=True, help="The client's --wire: how activations and partial sums travel.")
def main(tokens, reps, rate, delay_ms, configs, model, wire):
    """Tok/s of a CPU-capped emulated cluster against its number of hosts (needs root)."""
    need_root()
    names = [c for c in configs.split(",") if c]
    unknown = [c for c in names if c not in CONFIGS]
    if unknown:
        raise click.BadParameter(f"unknown {unknown}; choose from {', '.join(CONFIGS)}",
                                 param_hint="--configs")
    if model is None:
        from bench.make_model import make_model
        model = ROOT / "models" / "tinyllama-1.1b"
        make_model(SHAPES / "tinyllama-1.1b.json", model)
    rows = [row for group in groups(names) for row in run_group(group, model, tokens, reps, rate, delay_ms, wire)]
    print_table(rows, f"{model.name}, wire {wire}", tokens, rate, delay_ms)
    OUT.mkdir(parents=True, exist_ok=True)
    with open(OUT / "scaling.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    plot(rows, model.name, OUT / "scaling.png")
    print(f"wrote {OUT / 'scaling.csv'} and {OUT / 'scaling.png'}")


if __name__ == "__main__":
    main()
