"""The LLaMA forward pass, client side: embedding, norms, residuals and the sum of slice partials.

    x = embed[tokens]                                            # [T, D]
    for each layer:
        x += sum(node.attention(layer, rmsnorm(x) * w_attn, p0))  # one round trip to all nodes
        x += sum(node.feed_forward(layer, rmsnorm(x) * w_ffn))    # one more
    logits = concat(node.logits(rmsnorm(x) * w_final))           # classifier rows split too

A node is a SliceSet (client/slices.py) run in-process, or a RemoteNode (client/cluster.py): a
worker running the same SliceSet code on its shard. For each block the client first sends the
step to every remote node, then computes its own share while they work, then collects.
"""
from __future__ import annotations

import functools
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from client import kernels
from client.checkpoint import Checkpoint
from client.cluster import (NodeLost, RemoteNode, activations_wire, add_to_manifest, manifest_key,
                            plan_key, read_manifest, read_plan, write_plan)
from client.config import LlamaConfig
from client.fanout import Fanout
from client.errors import UserError
from client.host import available_memory, cpu_quota, room_for_huge_pages
from client.progress import Progress
from client.slices import (Shard, SliceSet, layer_name, load_matrix, output_name,
                           shard_nbytes, shard_tensors, slice_key)
from client.tokenizer import Tokenizer
from proto.wire import encode
from quant.q8_0 import QK, Q8Tensor, Q8Tiles, dequantize, untiled
from quant.q8_0 import nbytes as q8_nbytes


MAX_PASS_ROWS = 512  # rows per forward pass: a step of 512 x 8192 float64 partials is 32 MB


def warn(msg: str) -> None:
    """One line on stderr: something went wrong and the run carries on."""
    print(f"warning: {msg}", file=sys.stderr, flush=True)


def split_counts(total: int, weights: list[float]) -> list[int]:
    """`total` items in proportion to `weights` (largest remainder; every count >= 0)."""
    w = np.asarray(weights, np.float64)
    exact = total * w / w.sum()
    counts = np.floor(exact).astype(int)
    for i in np.argsort(-(exact - counts), kind="stable")[: total - counts.sum()]:
        counts[i] += 1
    return counts.tolist()


def _ranges(counts: list[int], unit: int = 1, end: int | None = None) -> list[tuple[int, int]]:
    bounds = np.concatenate([[0], np.cumsum(counts)]) * unit
    if end is not None:
        bounds = np.minimum(bounds, end)
    return [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]


def plan_shards(cfg: LlamaConfig, weights: list[float]) -> list[Shard]:
    """Split query heads, FFN units and classifier rows by weight. Units go in whole Q8_0
    blocks (in pairs, 64 units), so that every cut of Wdown sums the same per-block terms as
    the whole (quant.q8_0.matmul, acc64)."""
    heads = _ranges(split_counts(cfg.n_heads, weights))
    units = _ranges(split_counts(-(-cfg.ffn_dim // (2 * QK)), weights), 2 * QK, cfg.ffn_dim)
    rows = _ranges(split_counts(cfg.vocab_size, weights))
    return [Shard(h, u, r) for h, u, r in zip(heads, units, rows)]


@functools.lru_cache(maxsize=1)
def local_speed() -> float:
    """This host's Q8_0 matvec GB/s, measured once per process (~0.2 s): a re-plan after a
    worker loss reuses it, as it reuses the workers' figures from their handshake."""
    from quant.q8_0 import measure_speed
    return measure_speed(cpu_quota())


def node_weights(remote: list, local: bool) -> list[float]:
    """Explicit weights where given (the rest 1), else every node's measured speed."""
    explicit = [r.weight for r in remote]
    if any(w is not None for w in explicit):
        return ([1.0] if local else []) + [w or 1.0 for w in explicit]
    return ([local_speed()] if local else []) + [r.info.speed_gb_s for r in remote]


def _time_lines(whole_seconds, fixed, capped) -> list[list[tuple[float, float]]]:
    # per node, the lines t = a + s * b of its time per token at share s (time_balanced); the
    # largest is in force
    return [[(f, w)] if not cap else [(f, cap[0] * w), (cap[1], w)]
            for f, w, cap in zip(fixed, whole_seconds, capped or [None] * len(whole_seconds))]


def token_time(shares: list[float], whole_seconds: list[float], fixed: list[float],
               serial: list[float] | None = None, capped: list | None = None) -> float:
    """Seconds per token that a split `shares` would take under time_balanced's model: its
    slowest node's time, plus the serial costs of the nodes with a share."""
    lines = _time_lines(whole_seconds, fixed, capped)
    on = [i for i, s in enumerate(shares) if s > 0]
    return (max(max(a + shares[i] * b for a, b in lines[i]) for i in on)
            + sum(serial[i] for i in on if serial is not None))


def time_balanced(whole_seconds: list[float], fixed: list[float],
                  serial: list[float] | None = None, capped: list | None = None) -> list[float]:
    """Shares s_i (summing to 1) that give every node the same time per token t:
        t = fixed_i + s_i * whole_seconds_i,
    where whole_seconds_i is node i's time for the whole model's matmuls (bytes / its speed) and
    fixed_i what it costs per token whatever its share (a round trip per layer step) while the
    others compute. A node whose fixed cost alone exceeds t gets nothing.

    capped_i = (q, busy) for a node under a CPU quota: it may run a fraction q of its threads'
    time (its speed, measured over whole periods, is q times its full speed) and its steps cost
    it `busy` per token at its own pace when kept busy. Such a node computes at full speed until
    the period's quota is used up, then waits for the next period, so
        t = max(fixed_i + s_i * q * whole_seconds_i,  busy + s_i * whole_seconds_i):
    while its share leaves it quota to spare, a step costs the round trip and its compute at
    full speed; once its share keeps it busy, its quota is the limit, throttled waits included.
    (A small share on a 0.125-core host is then worth having: measured, 8:1:1:1 over one 0.5-core
    and three 0.125-core hosts ran 14-15 tok/s, the 0.5-core host alone 11.5-13.)

    serial_i: what node i costs every token on top of t, whatever the split (the client's own
    CPU to send it its steps and read its replies): a node is left out, too, when dropping it
    makes t plus the serial costs of the nodes kept smaller (with stories260K's microseconds of
    matmuls, every worker)."""
    n = len(whole_seconds)
    c = np.zeros(n) if serial is None else np.asarray(serial, np.float64)
    lines = _time_lines(whole_seconds, fixed, capped)

    def share(i, t):  # node i's share at time per token t: the least any of its lines allows
        return max(0.0, min((t - a) / b for a, b in lines[i]))

    def balance(active):  # -> (shares, time per token with the serial costs)
        idx = np.flatnonzero(active)
        lo = min(max(a for a, _ in lines[i]) for i in idx)                  # no share yet
        hi = max(max(a + b for a, b in lines[i]) for i in idx)              # anyone could do all
        for _ in range(200):  # sum of shares: continuous, increasing in t
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if sum(share(i, mid) for i in idx) < 1 else (lo, mid)
        # the lines in force at t, solved exactly: t = (1 + sum a/b) / sum 1/b over the nodes
        # with a share (so that a node alone gets exactly 1 and one left out exactly 0)
        on = [(i, min(lines[i], key=lambda ab: (hi - ab[0]) / ab[1])) for i in idx
              if share(i, hi) > 1e-9]
        t = (1 + sum(a / b for _, (a, b) in on)) / sum(1 / b for _, (_, b) in on)
        s = np.zeros(n)
        for i, (a, b) in on:
            s[i] = max(0.0, (t - a) / b)
        return s / s.sum(), t + c[[i for i, _ in on]].sum()

    shares, total = balance(np.ones(n, bool))
    while (shares > 0).sum() > 1:  # leave out the node whose absence saves most, while one does
        kept = shares > 0
        (trial, t), i = min(((balance(kept & (np.arange(n) != i)), i) for i in np.flatnonzero(kept)),
                            key=lambda x: x[0][1])
        if t >= total:
            break
        shares, total = trial, t
    return shares.tolist()


def plan_costs(cfg: LlamaConfig, fmt: str, remote: list, local: bool, wire: str) -> tuple:
    """What time_balanced weighs, per node: (whole_seconds, fixed, serial, capped), from each
    node's measured speed and what its 2L + 1 steps per token cost beyond compute (see
    RemoteNode.step_cost): what a worker adds while this process computes its own share, for a
    worker under a CPU quota also what its steps cost it when kept busy, and this process's own
    CPU to send it each step and read the reply, which no split hides."""
    speeds = node_weights(remote, local)
    steps = 2 * cfg.n_layers + 1
    gb = shard_nbytes(cfg, Shard.whole(cfg), fmt) / 1e9
    x = np.zeros((1, cfg.dim), np.float32)
    reply = len(encode(x, wire))  # a ping echoes its bytes: the larger of a step's two ways
    costs = [r.step_cost(max(reply, len(encode(x, activations_wire(wire, fmt, r.info)))))
             for r in remote]  # (beyond, client, busy) seconds per step
    fixed = ([0.0] if local else []) + [steps * beyond for beyond, _, _ in costs]
    serial = ([0.0] if local else []) + [steps * client for _, client, _ in costs]
    # a capped worker's steps when busy: at least what a ping costs it, and what a step cost it
    # in its last session if it has had one (a ping's CPU misses a step's own: ~30 vs ~80 us)
    capped = ([None] if local else []) + [
        (r.quota, steps * max(busy, r.info.step_cpu_us * 1e-6 / r.quota)) if r.quota else None
        for r, (_, _, busy) in zip(remote, costs)]
    for r, f, c, cap in zip(remote, fixed[local:], serial[local:], capped[local:]):
        r.fixed_ms = (f + c) * 1e3
        r.busy_ms = cap[1] * 1e3 if cap else None
    return [gb / v for v in speeds], fixed, serial, capped


def shard_shares(cfg: LlamaConfig, shards: list[Shard], fmt: str) -> list[float]:
    """Each shard's part of the model's matmul bytes: a plan's shares."""
    whole = shard_nbytes(cfg, Shard.whole(cfg), fmt)
    return [shard_nbytes(cfg, sh, fmt) / whole for sh in shards]


def covers_model(cfg: LlamaConfig, shards: list[Shard], n: int) -> bool:
    """Whether `shards` are n nodes' plan of the model (plan_shards): heads, units and rows each
    cut into consecutive ranges from 0 to the whole, units in whole pairs of Q8_0 blocks."""
    if len(shards) != n:
        return False
    for part, whole in (("heads", cfg.n_heads), ("units", cfg.ffn_dim), ("rows", cfg.vocab_size)):
        at = 0
        for sh in shards:
            a, b = getattr(sh, part)
            if a != at or b < a:
                return False
            at = b
        if at != whole:
            return False
    return all(u % (2 * QK) == 0 or u == cfg.ffn_dim for sh in shards for u in sh.units)


def water_fill(weights: list[float], caps: list[float]) -> list[float] | None:
    """Fractions in proportion to `weights`, none above its cap (what is cut is shared among the
    rest, again by weight); None if the caps sum to less than 1."""
    w = np.asarray(weights, np.float64)
    cap = np.asarray(caps, np.float64)
    fixed = np.zeros(len(w), bool)
    p = np.zeros(len(w))
    while True:
        mass = 1.0 - cap[fixed].sum()
        free = ~fixed
        if mass < 0 or not free.any():
            return None if mass > 1e-12 or mass < 0 else np.where(fixed, cap, 0.0).tolist()
        p = np.where(fixed, cap, mass * w / w[free].sum())
        over = free & (p > cap)
        if not over.any():
            return p.tolist()
        fixed |= over


MARGIN = 64 << 20  # the runtime's own allocations while loading
KEEP_PLAN = 0.25   # a held plan is kept while predicted within 25% of a new one (keep_held_plan)


def memory_room(cfg: LlamaConfig, remote: list, local: bool, fmt: str) -> tuple[list, list[int]]:
    """Per node: (bytes it has free, where the figure comes from), and the bytes it holds beyond
    its shard (this process: the embedding)."""
    room = ([available_memory()] if local else []) + [
        (r.info.memory_bytes, f"available on worker {r.addr}") for r in remote]
    return room, ([q8_nbytes(cfg.vocab_size, cfg.dim, fmt)] if local else []) + [0] * len(remote)


def memory_need(cfg: LlamaConfig, shards: list[Shard], extra: list[int], fmt: str, kv_dtype: str,
                ctx: int, slots: int) -> list[int]:
    """Bytes each node needs to hold its shard (KV caches included), with 2% and MARGIN to spare."""
    return [int(shard_nbytes(cfg, sh, fmt, ctx, kv_dtype, slots) * 1.02) + MARGIN + e
            for sh, e in zip(shards, extra)]


def plan_in_memory(model_dir, cfg: LlamaConfig, weights: list[float], remote: list, local: bool,
                   fmt: str, kv_dtype: str, ctx: int, slots: int = 1) -> list[Shard]:
    """plan_shards, with no node given more than fits its memory (what does not fit goes to the
    others, by weight); if the model cannot fit at all, a UserError before anything is loaded."""
    whole = Shard.whole(cfg)
    total = shard_nbytes(cfg, whole, fmt, ctx, kv_dtype, slots)
    room, extra = memory_room(cfg, remote, local, fmt)
    names = (["this host"] if local else []) + [f"worker {r.addr}" for r in remote]
    if not remote:  # everything in this process (several in-process slice sets: tests)
        weights = [1.0]
    caps = [max(0.0, (r - MARGIN - e) / (total * 1.02)) for (r, _), e in zip(room, extra)]
    for _ in range(8):
        frac = water_fill(weights, caps)
        if frac is None:
            break
        shards = plan_shards(cfg, frac)
        need = memory_need(cfg, shards, extra, fmt, kv_dtype, ctx, slots)
        over = [i for i, (n, (r, _)) in enumerate(zip(need, room)) if n > r]
        if not over:
            return shards
        for i in over:  # whole heads and blocks of 32 units: rounding overshot; aim lower
            caps[i] = max(0.0, caps[i] - (need[i] - room[i][0]) / total - 1e-3)
    i = int(np.argmin(caps))
    want = weights[i] / sum(weights) * total * 1.02 + MARGIN + extra[i]
    raise UserError(f"{model_dir}: the model needs {total / 1e9:.2f} GB ({fmt}, KV cache for {ctx} "
                    f"positions) and does not fit: {names[i]}'s share needs {want / 1e9:.2f} GB but "
                    f"it has {room[i][0] / 1e9:.2f} GB ({room[i][1]}). Add workers (--workers), "
                    "lower --ctx, or free memory")


@dataclass
class Model:
    cfg: LlamaConfig
    tokenizer: Tokenizer
    embedding: object            # [V, D] Q8Tensor or float32 (Q8Tiles when tied: the classifier)
    attn_norm: list[np.ndarray]  # [D] per layer
    ffn_norm: list[np.ndarray]
    final_norm: np.ndarray
    nodes: list                  # SliceSets (in-process) or remote nodes
    fmt: str
    kv_dtype: str
    ctx: int
    slots: int = 1               # KV cache slots: sequences that can decode together
    load_seconds: float = 0.0
    passes: int = 0              # forward passes so far (the token index of matmul_perf.csv)
    idle: list = field(default_factory=list)  # workers left out of the plan (too slow to reach)
    lost: list = field(default_factory=list)  # workers that stopped answering (addresses)
    on_loss: str = "replan"      # a worker lost: "replan" over the rest, or "fail"
    history: dict = field(default_factory=dict)  # slot -> the token ids its KV caches hold
    src: dict = field(default_factory=dict)      # what placing slices needs (see place)
    fanout: Fanout | None = None                 # the remote nodes' layer steps, compiled
    plan_note: str = ""                          # how the measured plan was chosen (profile)

    @staticmethod
    def load(model_dir, fmt="q8_0", kv_dtype="bf16", ctx=None, weights=None, progress=None,
             workers=(), local=True, cache=True, wire="f32", slots=1, on_loss="replan", token=None,
             tls=None):
        """Load a model; with `workers` [(host:port, weight or None)], spread it over them (and
        this process unless local=False): in proportion to explicit weights, else with equal
        time per token on every node (plan_costs, time_balanced; workers not worth their round
        trips are left out, in `idle`), or as the workers' last plan (keep_held_plan). Every
        node's share is checked against its memory before anything is loaded; workers get theirs
        streamed, all at once (and, with `cache`, only what they do not hold).
        `slots` sequences can decode together (forward_batch), each with its own KV caches.
        `token` and `tls` (proto.security.ClientTLS): how to reach workers that require them."""
        t0 = time.perf_counter()
        model_dir = Path(model_dir)
        cfg = LlamaConfig.load(model_dir)
        tok = Tokenizer(model_dir)
        if tok.vocab_size > cfg.vocab_size:
            raise UserError(f"{model_dir / 'tokenizer.model'}: {tok.vocab_size} pieces but "
                            f"config.json vocab_size is {cfg.vocab_size}; use the model's own tokenizer")
        ckpt = Checkpoint(model_dir)
        ctx = min(ctx or cfg.max_seq_len, cfg.max_seq_len)
        if not local and not workers:
            raise UserError("no nodes: --no-local needs --workers")
        remote = [RemoteNode(addr, w, token, tls) for addr, w in workers]
        balance = weights is None and all(w is None for _, w in workers)  # on measured speeds
        for r in remote:  # one after another: probes at once would share a machine's memory bus
            r.hello(measure=balance)
        D = cfg.dim
        norm = lambda name: ckpt.f32(name, (D,))  # noqa: E731
        attn_norm = [norm(layer_name(l, "input_layernorm")) for l in range(cfg.n_layers)]
        ffn_norm = [norm(layer_name(l, "post_attention_layernorm")) for l in range(cfg.n_layers)]
        final_norm = norm("model.norm.weight")
        emb_name = "model.embed_tokens.weight"
        embedding = load_matrix(ckpt, emb_name, (cfg.vocab_size, D), fmt=fmt)
        m = Model(cfg, tok, embedding, attn_norm, ffn_norm, final_norm, [], fmt, kv_dtype, ctx,
                  slots, on_loss=on_loss)
        m.src = dict(model_dir=model_dir, ckpt=ckpt, config_json=(model_dir / "config.json").read_text(),
                     tied=output_name(cfg, ckpt) == emb_name, local=local, cache=cache, wire=wire,
                     weights=weights, progress=progress, token=token, tls=tls)
        m.place(remote)
        m.load_seconds = time.perf_counter() - t0
        return m

    def place(self, remote: list) -> None:
        """Plan the split over this process (unless local=False) and the `remote` workers, and
        give every node its shard: this process builds its slices out of the mapped checkpoint,
        workers get theirs uploaded (only what they do not hold already) and open a session with
        fresh KV caches. A worker lost while this happens is left out and the plan made again."""
        cfg, fmt, src = self.cfg, self.fmt, self.src
        local, weights = src["local"], src["weights"]
        while True:
            if not local and not remote:
                raise UserError("every worker is lost and --no-local keeps this process out: "
                                "restart the workers, or drop --no-local")
            try:  # (a worker lost while measuring its step cost or taking its shard: left out)
                costs = None  # what a measured plan weighed (plan_costs)
                if weights is not None and (not remote or len(weights) == local + len(remote)):
                    w = list(weights)  # given (tests: several in-process slice sets)
                elif remote:  # explicit *W weights, else balanced on what was measured
                    costs = (plan_costs(cfg, fmt, remote, local, src["wire"])
                             if all(r.weight is None for r in remote) else None)
                    w = time_balanced(*costs) if costs else node_weights(remote, local)
                    self.idle = [r for r, x in zip(remote, w[local:]) if x == 0]
                    for r in self.idle:  # slower to reach than their share of the work would save
                        r.close()
                    remote = [r for r in remote if r not in self.idle]
                    kept = [i for i, x in enumerate(w) if x > 0]
                    w, costs = [w[i] for i in kept], costs and [[c[i] for i in kept] for c in costs]
                else:
                    w = [1.0]
                shards = plan_in_memory(src["model_dir"], cfg, w, remote, local, fmt, self.kv_dtype,
                                        self.ctx, self.slots)
                if not remote:  # several in-process slice sets: tests of the slicing
                    shards = plan_shards(cfg, w)
                key = (plan_key(src["ckpt"], src["config_json"], fmt, local, [r.addr for r in remote])
                       if remote and src["cache"] else None)
                steps_known = all(r.info.step_cpu_us > 0 for r in remote if r.quota)
                if key and costs:
                    shards, steps_known = self.keep_held_plan(key, shards, costs, remote, steps_known)
                self.nodes = []  # drop the old slices before building the new
                self.fanout = None
                self.nodes = self._nodes(shards, remote)
                self.fanout = Fanout.of(self.remote)
                if key:
                    write_plan(key, shards, steps_known)
                return
            except NodeLost as e:
                self.fail_on(e)
                e.node.close()
                self.lost.append(e.node.addr)
                remote = [r for r in remote if r is not e.node]
                warn(f"{e}: re-planning over the {local + len(remote)} nodes left")

    def keep_held_plan(self, key: Path, shards: list[Shard], costs, remote: list,
                       steps_known: bool) -> tuple[list[Shard], bool]:
        """The plan these workers hold from this model's last placement (kept at `key`) instead
        of the new one `shards`, while the held one's predicted time per token (token_time over
        the measured `costs`) is within KEEP_PLAN of the new one's and it still fits every node's
        memory: a new plan moves most of each worker's slices (on four 0.25-core hosts of the
        emulated LAN, 240-320 MB each), and on alike hosts it differs from the held one only by
        the noise of their measured speeds: 4.2-5.9 GB/s between runs there, 7.8-11.5 on two
        0.5-core hosts, where with a 10% margin the second of three loads re-planned. A
        fresh plan is no better than the noise it was made from, so keeping one loses nothing on
        average; a host that really changed moves the prediction by more than that.

        steps_known: every CPU-capped worker has reported what a step costs it (after a session;
        before, the plan has pings alone, which give it more than it carries). A held plan made
        without that is not kept once it is known. -> (the plan, whether it was made knowing)"""
        held, held_known = read_plan(key)
        pings_only = held is not None and steps_known and not held_known
        plan = self._held_or_new(shards, None if pings_only else held, costs, remote)
        if pings_only:
            self.plan_note += " (the workers' last plan, made from pings alone, not kept)"
        return plan, held_known if plan is held else steps_known

    def _held_or_new(self, shards: list[Shard], held: list[Shard] | None, costs,
                     remote: list) -> list[Shard]:
        # keep_held_plan's choice between two plans; self.plan_note says which and why
        cfg, fmt = self.cfg, self.fmt
        t_new = token_time(shard_shares(cfg, shards, fmt), *costs)
        self.plan_note = f"plan: {t_new * 1e3:.0f} ms/token predicted"
        if not held or held == shards or not covers_model(cfg, held, len(shards)):
            return shards
        room, extra = memory_room(cfg, remote, self.src["local"], fmt)
        if any(n > r for n, (r, _) in zip(memory_need(cfg, held, extra, fmt, self.kv_dtype, self.ctx,
                                                       self.slots), room)):
            return shards
        t_held = token_time(shard_shares(cfg, held, fmt), *costs)
        if t_held > t_new * (1 + KEEP_PLAN):
            self.plan_note += f" (the workers' last plan: {t_held * 1e3:.0f}; worth a re-upload)"
            return shards
        self.plan_note = (f"plan: the workers' last one kept, {t_held * 1e3:.0f} ms/token predicted "
                          f"(a new one: {t_new * 1e3:.0f}, not worth a re-upload)")
        return held

    def _nodes(self, shards: list[Shard], remote: list) -> list:
        """The plan's nodes, each given its shard: this process's slices first, then the
        workers' uploads all at once (a worker's own CPU takes in what it receives: one after
        another, four 0.25-core hosts of the emulated LAN took 37-45 s), under one progress bar."""
        if not remote:
            return [self._node(i, sh, remote) for i, sh in enumerate(shards)]
        local = self.src["local"]
        mine = [self._node(0, shards[0], remote)] if local else []
        bar = Progress(sum(shard_nbytes(self.cfg, sh, self.fmt) for sh in shards[local:]),
                       f"upload to {len(remote)} worker{'s' * (len(remote) > 1)}", " MB", 1e6)
        try:
            with ThreadPoolExecutor(len(remote)) as pool:
                uploads = [pool.submit(self._node, i, sh, remote, bar)
                           for i, sh in enumerate(shards) if i >= local]
                return mine + [u.result() for u in uploads]
        finally:
            bar.close()

    def _node(self, i: int, sh: Shard, remote: list, bar=None):
        """Node i of the plan, holding shard sh: this process's SliceSet or a remote worker
        (`bar`: the uploads' shared Progress)."""
        src, cfg, fmt = self.src, self.cfg, self.fmt
        whole = self.embedding if src["tied"] and sh.rows == (0, cfg.vocab_size) else None
        if not remote or (src["local"] and i == 0):  # (several in-process slice sets: tests)
            s = SliceSet.build(src["ckpt"], cfg, sh, fmt, self.kv_dtype, self.ctx, whole,
                               src["progress"], self.slots, room_for_huge_pages(shard_nbytes(cfg, sh, fmt)))
            if whole is not None:  # tied: the lookup reads the classifier as repacked, one copy
                self.embedding = s.classifier
            return s
        if isinstance(whole, Q8Tiles):  # uploads carry the row-major form
            whole = untiled(whole)
        node = remote[i - src["local"]]
        node.disconnect()  # a session from an earlier plan ends; its KV caches are freed
        key = manifest_key(src["ckpt"], src["config_json"], fmt) if src["cache"] else None
        loaders = shard_tensors(src["ckpt"], cfg, sh, fmt, whole)
        slices = [slice_key(name, sh) for name, _ in loaders]
        sent = read_manifest(key) if key else {}
        infos = node.upload(sh, loaders, src["config_json"], shard_nbytes(cfg, sh, fmt),
                            [sent.get(k) for k in slices], bar)
        if key:
            add_to_manifest(key, dict(zip(slices, infos)))
        node.token_seconds = shard_nbytes(cfg, sh, fmt) / (node.info.speed_gb_s * 1e9 or 1e9)
        node.open(self.ctx, self.kv_dtype, src["wire"], self.slots, fmt)
        return node

    def embed(self, ids: list[int]) -> np.ndarray:
        # [T] -> [T, D]
        idx = np.asarray(ids, np.int64)
        if isinstance(self.embedding, (Q8Tensor, Q8Tiles)):
            return dequantize(self.embedding, idx)
        return self.embedding[idx].copy()

    def forward(self, ids: list[int], p0: int, all_logits: bool = False, slot: int = 0) -> np.ndarray:
        """Run T tokens at positions p0..p0+T-1 of the sequence in KV slot `slot` through the
        model (filling every node's KV caches) and return logits [T, V] (all_logits) or [1, V]
        for the last token."""
        return self.forward_batch([(slot, ids, p0)], all_logits)[0]

    def forward_batch(self, segs: list, all_logits: bool = False) -> list[np.ndarray]:
        """Several sequences in one pass (continuous batching): segs [(slot, ids, p0)], each
        continuing the sequence in KV slot `slot` from position p0 (0 starts a new one). Every
        weight is read once for all of them. Returns per segment logits [n, V] (all_logits) or
        [1, V] for its last token. A worker lost on the way is re-planned around (recover) and
        the pass run again."""
        for slot, ids, p0 in segs:
            if not 0 <= slot < self.slots:
                raise UserError(f"KV slot {slot}: this model was loaded with {self.slots} slots")
            if p0 + len(ids) > self.ctx:
                raise UserError(f"{p0 + len(ids)} tokens exceed the context of {self.ctx}")
            if p0 > len(self.history.get(slot, ())):
                raise UserError(f"slot {slot}: position {p0} follows no tokens before it")
        while True:
            try:
                out = self._passes(segs, all_logits)
                break
            except NodeLost as e:
                self.recover(e)
        for slot, ids, p0 in segs:  # what each slot's KV caches now hold (for a replay)
            self.history.setdefault(slot, [])[p0:] = ids
        return out

    def _passes(self, segs: list, all_logits: bool) -> list[np.ndarray]:
        """The segments in passes of at most MAX_PASS_ROWS rows: a long prompt (or a replay of
        many sequences) goes in pieces, each continuing where the one before ended, so that no
        step outgrows a worker's message limit (--max-message-mb)."""
        if sum(len(ids) for _, ids, _ in segs) <= MAX_PASS_ROWS:
            return self._pass(segs, all_logits)
        pieces = [(k, slot, ids[i:i + MAX_PASS_ROWS], p0 + i) for k, (slot, ids, p0) in enumerate(segs)
                  for i in range(0, len(ids), MAX_PASS_ROWS)]
        out = [[] for _ in segs]
        while pieces:
            n, batch = 0, []
            while pieces and (not batch or n + len(pieces[0][2]) <= MAX_PASS_ROWS):
                batch.append(pieces.pop(0))
                n += len(batch[-1][2])
            for (k, *_), logits in zip(batch, self._pass([b[1:] for b in batch], all_logits)):
                out[k].append(logits)
        return [np.concatenate(o) if all_logits else o[-1] for o in out]

    def _pass(self, segs: list, all_logits: bool) -> list[np.ndarray]:
        """One forward pass over the segments' rows, stacked: the maths of the module docstring."""
        eps = self.cfg.norm_eps
        for n in self.remote:
            n.token = self.passes
        self.passes += 1
        rows = [(slot, p0, len(ids)) for slot, ids, p0 in segs]               # where each row goes
        x = self.embed([t for _, ids, _ in segs for t in ids])              # [T, D]
        for l in range(self.cfg.n_layers):
            xn = kernels.rmsnorm(x, self.attn_norm[l], eps)
            x += sum(self.gather("attention", l, xn, rows))                 # round trip 1
            xn = kernels.rmsnorm(x, self.ffn_norm[l], eps)
            x += sum(self.gather("ffn", l, xn, rows))                       # round trip 2
        ends = np.cumsum([n for _, _, n in rows])
        keep = np.arange(ends[-1]) if all_logits else ends - 1              # rows that need logits
        xn = kernels.rmsnorm(np.ascontiguousarray(x[keep]), self.final_norm, eps)
        parts = self.gather("logits", 0, xn, [(0, 0, len(keep))])           # rows in node order
        logits = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=1)
        if not all_logits:
            return [logits[i:i + 1] for i in range(len(segs))]
        return np.split(logits, ends[:-1])

    def recover(self, e: NodeLost) -> None:
        """A worker stopped answering mid-pass: leave it out, plan again over the nodes left
        (this process included), give them their new shards (from the mapped checkpoint; a
        worker gets only what it does not hold), and rebuild every sequence's KV caches by
        replaying its tokens so far as one batch. Then the interrupted pass can run again."""
        t0 = time.perf_counter()
        lost, replay = e, self._replay()
        while True:
            if lost.alive:  # only the session ended (idle too long): open new ones, same plan
                self.place(self.remote)
            else:
                self.fail_on(lost)
                lost.node.close()
                self.lost.append(lost.node.addr)
                self.place([n for n in self.remote if n is not lost.node])
            try:
                if replay:
                    self._passes(replay, False)
                break
            except NodeLost as again:
                lost = again
        warn(f"{e}: re-planned over {len(self.nodes)} nodes and replayed "
             f"{sum(len(ids) for _, ids, _ in replay)} tokens in {time.perf_counter() - t0:.2f} s")

    def _replay(self) -> list:
        """Segments that rebuild every slot's KV caches from position 0 (after a re-plan)."""
        return [(slot, ids, 0) for slot, ids in sorted(self.history.items()) if ids]

    def fail_on(self, e: NodeLost) -> None:
        if self.on_loss == "fail":
            raise UserError(f"{e}; stopping (--on-worker-loss fail). With --on-worker-loss replan "
                            "the run goes on without it")

    def rejoin(self, timeout: float = 2.0) -> list[str]:
        """Workers lost earlier that answer again are planned back in (between requests: the
        KV caches are rebuilt by replaying). Returns the addresses that rejoined."""
        back = []
        for addr in list(self.lost):
            node = RemoteNode(addr, None, self.src["token"], self.src["tls"])
            try:
                node.hello(timeout)
            except UserError:
                node.close()
                continue
            back.append(node)
            self.lost.remove(addr)
        if back:
            self.place(self.remote + back)
            replay = self._replay()
            if replay:
                self.forward_batch(replay)  # rebuild the KV caches under the new plan
        return [n.addr for n in back]

    def gather(self, op: str, layer: int, xn: np.ndarray, segs) -> list[np.ndarray]:
        """Every node's result for one block (partial sums [T, D] float64, or logits [T, rows]
        float32, in node order): remote nodes get the step first, then this
        process computes its share while they work, then their replies are read. A layer step
        goes out and comes back through the compiled fan-out where it applies (client/fanout.py:
        the remote nodes' partial sums come back added, after this process's)."""
        fan = self.fanout
        if op != "logits" and fan is not None and fan.usable:
            fan.send(op, layer, xn, segs)
            parts = [n.run(op, layer, xn, segs) for n in self.nodes if not isinstance(n, RemoteNode)]
            return parts + [fan.wait()]
        sent = {}  # activations wire -> payload: encoded once for all workers
        for n in self.remote:
            if n.x_wire not in sent:
                sent[n.x_wire] = encode(xn, n.x_wire)
            n.start(op, layer, xn, segs, sent[n.x_wire])
        parts = [None if isinstance(n, RemoteNode) else n.run(op, layer, xn, segs) for n in self.nodes]
        for i, n in enumerate(self.nodes):
            if isinstance(n, RemoteNode):
                parts[i] = n.wait()
        return [p for p in parts if p is not None]

    @property
    def remote(self) -> list:
        return [n for n in self.nodes if isinstance(n, RemoteNode)]

    def memory_table(self) -> list[tuple[str, str, int, int]]:
        """(layer type, quant, bytes, params) per kind of weight held in this process (workers
        hold the rest), then the KV cache."""
        groups: dict[str, list] = {}

        def add(kind, w):
            if w is None:
                return
            if isinstance(w, (Q8Tensor, Q8Tiles)):
                b, p, q = w.nbytes, w.params, "q8_0"
            else:
                b, p, q = w.nbytes, w.size, "f32"
            g = groups.setdefault(kind, [q, 0, 0])
            g[1] += b
            g[2] += p

        add("embedding", self.embedding)
        seen = {id(self.embedding)}
        kv = 0
        for n in self.nodes:
            if not isinstance(n, SliceSet):
                continue
            for a in n.attn:
                if a is not None:
                    add("attention qkv", a.wqkv)
                    add("attention out", a.wo)
                    kv += a.cache_k.nbytes + a.cache_v.nbytes
            for f in n.ffn:
                if f is not None:
                    add("ffn gate+up", f.wgu)
                    add("ffn down", f.wdown)
            if id(n.classifier) not in seen:
                add("classifier", n.classifier)
        for w in self.attn_norm + self.ffn_norm + [self.final_norm]:
            add("norms", w)
        rows = [(k, q, b, p) for k, (q, b, p) in groups.items()]
        rows.append((f"kv cache ({self.ctx} pos)", self.kv_dtype, kv, 0))
        return rows
