"""The cluster profile printed to stderr, and matmul_perf.csv."""
from __future__ import annotations

import csv
from pathlib import Path

import click
import numpy as np

from client.cluster import NodeLost, RemoteNode


def _echo(s: str) -> None:
    click.echo(s, err=True)


def print_nodes(model) -> None:
    """Which node holds what share."""
    if not model.remote and not model.idle:
        return
    for i, n in enumerate(model.nodes):
        if isinstance(n, RemoteNode):
            sent = f"{n.uploaded_bytes / 1e6:,.1f} MB uploaded" if n.uploaded_bytes else "all cached there"
            rtt = f"steps cost {_costs(n)} beyond compute, " if n.fixed_ms is not None else ""
            sh, who = n.shard, (f"{n.addr} ({n.info.cores} cores, {n.info.speed_gb_s:.1f} GB/s, {rtt}"
                                f"{n.info.memory_bytes / 1e9:.1f} GB free, {sent})")
        else:
            sh, who = n.shard, "this process"
        _echo(f"node {i}: {who}: heads {sh.heads[0]}-{sh.heads[1]}, ffn units {sh.units[0]}-"
              f"{sh.units[1]}, classifier rows {sh.rows[0]}-{sh.rows[1]}")
    if model.plan_note:
        _echo(model.plan_note)
    for n in model.idle:
        _echo(f"worker {n.addr} ({n.info.speed_gb_s:.1f} GB/s) left out: its steps would cost "
              f"{_costs(n)} beyond compute, more than its share of the compute would save (a *W "
              "weight includes it)")


def _costs(n: RemoteNode) -> str:
    """What a worker's steps cost per token beyond compute, as the plan measured it."""
    s = f"{n.fixed_ms:.0f} ms/token"
    return s + (f" ({n.busy_ms:.0f} ms/token of its CPU quota when busy)" if n.busy_ms is not None else "")


def print_pings(model) -> None:
    """Before the first token: each worker's round trip carrying one activation vector."""
    for n in list(model.remote):
        try:
            us = n.ping(model.cfg.dim * 4)
        except NodeLost as e:  # lost already: re-planned around (or the run stops), as mid-pass
            model.recover(e)
            continue
        _echo(f"worker {n.addr}: ping {us:.0f} us round trip ({model.cfg.dim * 4} bytes each way)")


def print_calls(model) -> None:
    """After the last token: per worker, average round trip, its compute, the network overhead
    (round trip beyond the worker's own compute), bytes per call."""
    for n in model.remote:
        c = n.calls
        if not c:
            continue
        rtt = np.mean([x.rtt_us for x in c])
        comp = np.mean([x.compute_us for x in c])
        _echo(f"worker {n.addr}: {len(c)} calls, avg round trip {rtt:.0f} us = compute {comp:.0f}"
              f" + network overhead {rtt - comp:.0f} us; {np.mean([x.sent for x in c]):.0f} B out,"
              f" {np.mean([x.received for x in c]):.0f} B in per call")


def rpc_line(model) -> str:
    calls = [x for n in model.remote for x in n.calls]
    if not calls:
        return ""
    passes = len({x.token for x in calls})
    per_token = len({(x.token, x.layer, x.op) for x in calls}) / max(passes, 1)
    return (f", {np.mean([x.rtt_us for x in calls]) / 1000:.2f} ms/rpc, "
            f"{per_token:.0f} round trips/token")


def write_perf_csv(model, path: Path) -> None:
    rows = sorted((x.token, x.layer, x.op, n.addr, x.rows, x.sent, x.received, x.compute_us,
                   x.rtt_us) for n in model.remote for x in n.calls)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["token", "layer", "block", "worker", "rows", "bytes_sent", "bytes_received",
                    "worker_compute_us", "round_trip_us"])
        w.writerows(rows)
