"""Weights cached on workers (root only, bench/lan.py): the first load of the TinyLlama-1.1B shape
in Q8_0 onto N workers of an emulated gigabit LAN uploads every slice; a second client with the
same model and plan sends only hashes. Prints both load times and their ratio.

    sudo .venv/bin/python -m bench.reconnect [--workers 2] [--cores 0.5] [--reps 3]

The client runs --no-local (the workers hold every slice) on its own uncapped host; each worker
host is capped at --cores. The load time is the client's (config, handshakes, plan, embedding,
uploads or hash checks, opening the sessions), from its --json output.
"""
from __future__ import annotations

import json
import statistics

import click

from bench.engine import ROOT, SHAPES
from bench.lan import Cluster, need_root


def load_seconds(c: Cluster, model, extra=()) -> tuple[float, str]:
    r = c.run_client([str(model), "-i", "Hello", "-n", "1", "--ctx", "256", "--no-local", "--json",
                      "--workers", c.workers_arg(), *extra])
    if r.returncode:
        raise SystemExit(f"error: the client failed ({r.returncode}):\n{r.stderr[-3000:]}")
    nodes = [line for line in r.stderr.splitlines() if line.startswith("node ")]
    return json.loads(r.stdout)["load_seconds"], "\n".join(nodes)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--workers", "n", default=2, show_default=True, help="Worker hosts.")
@click.option("--cores", default=0.5, show_default=True, help="CPU cap of each worker host.")
@click.option("--rate", default="1gbit", show_default=True)
@click.option("--delay-ms", default=0.1, show_default=True)
@click.option("--reps", default=3, show_default=True, help="Reconnections (median).")
def main(n, cores, rate, delay_ms, reps):
    """First upload against reconnecting to workers that cache the slices."""
    need_root()
    from bench.make_model import make_model
    model = ROOT / "models" / "tinyllama-1.1b"
    make_model(SHAPES / "tinyllama-1.1b.json", model)
    with Cluster(cpus=[cores] * n, rate=rate, delay_ms=delay_ms) as c:
        first, nodes = load_seconds(c, model)
        click.echo(f"first load (uploads): {first:.2f} s\n{nodes}", err=True)
        again = []
        for _ in range(reps):
            t, nodes = load_seconds(c, model)
            again.append(t)
            click.echo(f"reconnect (hashes only): {t:.2f} s", err=True)
        click.echo(nodes, err=True)
        forced, _ = load_seconds(c, model, ["--no-cache"])
    rec = statistics.median(again)
    print(f"\nTinyLlama-1.1B shape, Q8_0, {n} workers at {cores:g} core, {rate}, {delay_ms:g} ms each "
          f"way: first load {first:.2f} s, reconnect {rec:.2f} s (median of {reps}): "
          f"{first / rec:.1f}x faster; client --no-cache: {forced:.2f} s")


if __name__ == "__main__":
    main()
