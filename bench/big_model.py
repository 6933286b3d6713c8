"""Bigger than any one host (root only, bench/lan.py): the Llama-2-7B shape in Q8_0 (7.2 GB) on
four emulated hosts with 2.5 GB of memory each (memory cgroups), the client's own host included,
on a gigabit LAN. One such host alone must refuse before loading.

    sudo .venv/bin/python -m bench.big_model [--tokens 8] [--mem-gb 2.5]

Generates the random-weight model once (13.5 GB of f16 under models/, ~2 min). Prints the
single host's refusal and its peak memory, then the cluster's load time, speed, and each host's
peak memory as its memory cgroup saw it (max_usage_in_bytes: the process's memory plus the page
cache charged to it, which the kernel reclaims under the limit).
"""
from __future__ import annotations

import json
import re
import subprocess

import click

from bench.engine import ROOT, SHAPES
from bench.lan import CLIENT, Cluster, Lan, need_root


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--tokens", default=8, show_default=True)
@click.option("--mem-gb", default=2.5, show_default=True, help="Memory of every host.")
@click.option("--hosts", default=4, show_default=True, help="Hosts, the client's included.")
def main(tokens, mem_gb, hosts):
    """Llama-2-7B shape on N hosts of --mem-gb each; one host alone refuses."""
    need_root()
    from bench.make_model import make_model
    model = ROOT / "models" / "llama2-7b"
    make_model(SHAPES / "llama2-7b.json", model, shard_bytes=4_000_000_000)
    mem = int(mem_gb * 1e9)
    # one compute thread per host: four "hosts" share this machine's two cores
    args = [str(model), "-i", "The capital of France is", "-n", str(tokens), "--ctx", "256", "--json",
            "--threads", "1"]

    with Lan(["client"], mem={"client": mem}) as lan:
        p = lan.run("client", [CLIENT, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        _, err = p.communicate(timeout=600)
        peak = lan.peak_memory("client")
    refusal = err.strip().splitlines()[-1] if err.strip() else ""
    print(f"one {mem_gb:g} GB host alone: exit {p.returncode}, peak {peak / 1e9:.2f} GB\n  {refusal}")
    if p.returncode != 2 or "does not fit" not in refusal:
        raise SystemExit("error: a lone host did not refuse cleanly")

    with Cluster(cpus=[None] * (hosts - 1), mem=mem, client_mem=mem) as c:
        r = c.run_client([*args, "--workers", c.workers_arg()], timeout=3600)
        peaks = {h: c.peak_memory(h) for h in ["client", *c.workers]}
        c_workers, logs = c.workers, {h: c.log(h) for h in c.workers}
    if r.returncode:
        raise SystemExit(f"error: the cluster run failed ({r.returncode}):\n{r.stderr[-3000:]}")
    out = json.loads(r.stdout)
    for line in r.stderr.splitlines():
        if line.startswith(("node ", "prompt:", "worker ")):
            print(" ", line)
    rss = {"client": out["peak_rss_bytes"]}
    for h in c_workers:
        m = re.findall(r"worker peak RSS ([\d.]+) GB", logs[h])
        rss[h] = float(m[-1]) * 1e9 if m else float("nan")
    print(f"Llama-2-7B shape, Q8_0, {hosts} hosts of {mem_gb:g} GB: loaded in {out['load_seconds']:.0f} s, "
          f"{out['gen_tok_s']:.2f} tok/s; text: {out['text']!r}")
    print("peak memory per host, the process's RSS / all its memory cgroup charged (page cache "
          "included, reclaimed at the limit): " + ", ".join(
              f"{h} {rss[h] / 1e9:.2f} / {b / 1e9:.2f} GB" for h, b in peaks.items()))
    if max(peaks.values()) > mem:
        raise SystemExit("error: a host went over its memory")


if __name__ == "__main__":
    main()
