"""A layer cut into slices, and the one implementation that runs them (in-process or in a worker).

Partial sums come back in float64 (see quant.q8_0.matmul): summed in float64 and rounded once,
they give the same residual whatever the slicing.

    attention slice = a set of query heads S, with the key/value heads they read and their cache:
        qkv     = xn @ [Wq[S rows]; Wk[kv rows]; Wv[kv rows]]^T      one matmul
        o       = attention(RoPE(q), RoPE(k) -> cache, v -> cache)
        partial = o @ Wo[:, cols of S]^T                              a D-vector per token
    FFN slice = a set of hidden units U (a multiple of 64, except at the end of F):
        partial = (silu(xn @ Wgate[U]^T) * (xn @ Wup[U]^T)) @ Wdown[:, U]^T
    classifier slice = rows [r0, r1) of the output matrix: logits[:, r0:r1] = xn @ W[r0:r1]^T

The full block output is the sum of the partials over the slices (see ../shared/DESIGN.md).
On VNNI CPUs each of the first two is one compiled call of the same kernels in the same order
(kernels.attention_block / ffn_block), elsewhere a composition of quant.q8_0.matmul calls.
A Shard names what one node holds; `SliceSet` builds and runs that node's slices for all layers.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from client import kernels
from client.checkpoint import Checkpoint
from client.config import LlamaConfig, rope_tables
from quant import q8_0 as q8
from quant.q8_0 import matmul, quantize

KV_DTYPES = {"bf16": np.uint16, "f32": np.float32}


@dataclass(frozen=True)
class Shard:
    """What one node computes: query heads [h0, h1), FFN units [u0, u1), classifier rows [r0, r1)."""
    heads: tuple[int, int]
    units: tuple[int, int]
    rows: tuple[int, int]

    @staticmethod
    def whole(cfg) -> "Shard":
        """Every head, unit and classifier row: the model on one node."""
        return Shard((0, cfg.n_heads), (0, cfg.ffn_dim), (0, cfg.vocab_size))


def rows_of(segs) -> tuple[np.ndarray, np.ndarray]:
    """Segments [(slot, p0, n)]: n consecutive tokens of the sequence in KV slot `slot`, from
    position p0 (a step's rows, segment after segment) -> (pos [T], slot [T]) per row."""
    if len(segs) == 1:  # (one sequence: 1 us instead of 3)
        b, p0, n = segs[0]
        return np.arange(p0, p0 + n, dtype=np.int64), np.full(n, b, np.int64)
    pos = np.concatenate([np.arange(p0, p0 + n) for _, p0, n in segs]).astype(np.int64)
    slot = np.concatenate([np.full(n, b) for b, _, n in segs]).astype(np.int64)
    return pos, slot


def layer_name(layer: int, what: str) -> str:
    return f"model.layers.{layer}.{what}.weight"


def output_name(cfg: LlamaConfig, ckpt: Checkpoint) -> str:
    if cfg.tie_embeddings or "lm_head.weight" not in ckpt:
        return "model.embed_tokens.weight"
    return "lm_head.weight"


def _rows_cols(ckpt, name, shape, rows, cols):
    raw, kind = ckpt.raw(name, shape)
    ckpt.populate(name, rows)
    return raw[slice(*rows) if rows else slice(None), slice(*cols) if cols else slice(None)], kind


def load_matrix(ckpt: Checkpoint, name: str, shape, rows=None, cols=None, fmt="q8_0"):
    """Rows/columns of a checkpoint matrix as Q8_0 (quantized from the mapped f32/f16/bf16
    values, column slices padded to whole blocks) or as float32."""
    return load_stacked(ckpt, [(name, shape, rows)], cols, fmt)


def load_stacked(ckpt: Checkpoint, parts, cols=None, fmt="q8_0"):
    """Row ranges of several checkpoint matrices stacked into one matrix, written in place (no
    concatenation copy): parts = [(name, shape, (r0, r1) or None)]. Each tensor's mapped pages
    are dropped once read, so loading holds little more than the result."""
    views = [_rows_cols(ckpt, n, s, r, cols) for n, s, r in parts]
    rows = sum(v.shape[0] for v, _ in views)
    ncols = views[0][0].shape[1]
    out = q8.empty(rows, ncols) if fmt == "q8_0" else np.empty((rows, ncols), np.float32)
    r = 0
    for (v, kind), (name, _, rows_of) in zip(views, parts):
        if fmt == "q8_0":
            quantize(v, kind, out=q8.row_range(out, r, r + v.shape[0]))
        elif kind == "bf16":
            out[r:r + v.shape[0]] = (v.astype(np.uint32) << 16).view(np.float32)
        else:
            out[r:r + v.shape[0]] = v
        r += v.shape[0]
        ckpt.release(name, rows_of)
    return out


@dataclass
class AttentionSlice:
    heads: tuple[int, int]       # query heads [h0, h1)
    kv_heads: tuple[int, int]    # key/value heads [k0, k1) that those read
    wqkv: object                 # [(nq + 2 nkv) d, D]
    wo: object                   # [D, nq d]
    kv_of_q: np.ndarray          # [nq] local kv index of each query head
    cache_k: np.ndarray          # [slots, nkv, d, ctx]: one cache per sequence slot, keys transposed
    cache_v: np.ndarray          # [slots, nkv, ctx, d]

    @staticmethod
    def make(cfg: LlamaConfig, heads: tuple[int, int], wqkv, wo, ctx: int, kv_dtype: str, slots: int = 1):
        """The slice of query heads [h0, h1) with the key/value heads they read, empty caches."""
        g = cfg.group
        k0, k1 = kv_range(cfg, heads)
        kv_of_q = np.array([h // g - k0 for h in range(*heads)], np.int64)
        empty = np.zeros((0, k1 - k0, 0, cfg.head_dim), KV_DTYPES[kv_dtype])
        return AttentionSlice(heads, (k0, k1), wqkv, wo, kv_of_q, empty, empty).fresh(ctx, kv_dtype, slots)

    def fresh(self, ctx: int, kv_dtype: str, slots: int = 1) -> "AttentionSlice":
        """The same weights with new, empty KV caches: keys [slots, nkv, d, ctx] (transposed, so
        a query's scores are multiply-adds along positions), values [slots, nkv, ctx, d]."""
        slots_nkv, d = (slots, self.kv_heads[1] - self.kv_heads[0]), self.cache_v.shape[3]
        return replace(self, cache_k=np.zeros(slots_nkv + (d, ctx), KV_DTYPES[kv_dtype]),
                       cache_v=np.zeros(slots_nkv + (ctx, d), KV_DTYPES[kv_dtype]))

    def forward(self, xn: np.ndarray, segs, rope) -> np.ndarray:
        # xn [T, D], rows placed by segs (see rows_of) -> partial [T, D]
        nq = self.heads[1] - self.heads[0]
        pos, slot = rows_of(segs)
        if _one_call(xn, self.wqkv, self.wo):  # VNNI: the same steps in one compiled call
            return kernels.attention_block(*q8.vnni_activations(xn), self.wqkv.q, self.wqkv.d, self.wqkv.rows,
                                           self.wo.q, self.wo.d, self.wo.rows, pos, slot, rope[0], rope[1],
                                           self.cache_k, self.cache_v, self.kv_of_q, nq)
        qkv = matmul(self.wqkv, xn)                                        # [T, (nq+2nkv) d]
        o = kernels.attention(qkv, pos, slot, rope[0], rope[1], self.cache_k, self.cache_v,
                              self.kv_of_q, nq)                            # [T, nq d]
        if self.wo.shape[1] != o.shape[1]:  # head_dim not a multiple of 32: heads padded
            T, d = o.shape[0], o.shape[1] // nq
            op = np.zeros((T, nq, self.wo.shape[1] // nq), np.float32)
            op[:, :, :d] = o.reshape(T, nq, d)
            o = op.reshape(T, -1)
        return matmul(self.wo, o, acc64=True)                              # [T, D] float64

    def forward_wire(self, xb: np.ndarray, T: int, segs, rope, yb: np.ndarray, out: int) -> bool:
        # xn [T, D] as q8_0 wire bytes -> the partial's bytes into yb (kernels.attention_step_wire)
        pos, slot = rows_of(segs)
        return kernels.attention_step_wire(xb, T, self.wqkv.q, self.wqkv.d, self.wqkv.rows, self.wo.q,
                                           self.wo.d, self.wo.rows, pos, slot, rope[0], rope[1], self.cache_k,
                                           self.cache_v, self.kv_of_q, self.heads[1] - self.heads[0], yb, out)


@dataclass
class FFNSlice:
    units: tuple[int, int]       # hidden units [u0, u1)
    wgu: object                  # [2 |U|, D]: gate rows then up rows
    wdown: object                # [D, |U|]

    def forward(self, xn: np.ndarray) -> np.ndarray:
        # xn [T, D] -> partial [T, D]
        nu = self.units[1] - self.units[0]
        if _one_call(xn, self.wgu, self.wdown):  # VNNI: the same steps in one compiled call
            return kernels.ffn_block(*q8.vnni_activations(xn), self.wgu.q, self.wgu.d, nu,
                                     self.wdown.q, self.wdown.d, self.wdown.rows)
        h = kernels.swiglu(matmul(self.wgu, xn), nu)                       # [T, |U|]
        return matmul(self.wdown, h, acc64=True)                           # [T, D] float64

    def forward_wire(self, xb: np.ndarray, T: int, yb: np.ndarray, out: int) -> bool:
        # xn [T, D] as q8_0 wire bytes -> the partial's bytes into yb (kernels.ffn_step_wire)
        return kernels.ffn_step_wire(xb, T, self.wgu.q, self.wgu.d, self.units[1] - self.units[0],
                                     self.wdown.q, self.wdown.d, self.wdown.rows, yb, out)


def _one_call(x, w_in, w_out) -> bool:
    """A slice's step can run as one compiled call (kernels.attention_block / ffn_block): VNNI
    tiles on both sides, and x with the columns the first one takes (f32 [T, D] in whole blocks,
    or q8_0 blocks of that width); anything else goes through quant.q8_0.matmul."""
    cols = x.q.shape[1] if isinstance(x, q8.Q8Tensor) else x.shape[1]
    return isinstance(w_in, q8.Q8Tiles) and isinstance(w_out, q8.Q8Tiles) and cols == w_in.d.shape[1] * q8.QK


def kv_range(cfg: LlamaConfig, heads: tuple[int, int]) -> tuple[int, int]:
    """The key/value heads [k0, k1) that query heads [h0, h1) read."""
    return heads[0] // cfg.group, (heads[1] - 1) // cfg.group + 1


def _load_wqkv(ckpt, cfg, l, heads, fmt):
    """[Wq rows of the heads; Wk rows; Wv rows of their kv heads] as one matrix."""
    D, d = cfg.dim, cfg.head_dim
    (h0, h1), (k0, k1) = heads, kv_range(cfg, heads)
    q, k, v = (layer_name(l, f"self_attn.{x}_proj") for x in "qkv")
    return load_stacked(ckpt, [(q, (cfg.n_heads * d, D), (h0 * d, h1 * d)),
                               (k, (cfg.n_kv_heads * d, D), (k0 * d, k1 * d)),
                               (v, (cfg.n_kv_heads * d, D), (k0 * d, k1 * d))], fmt=fmt)


def _load_wo(ckpt, cfg, l, heads, fmt):
    """The columns of Wo that the heads' outputs meet."""
    D, d = cfg.dim, cfg.head_dim
    h0, h1 = heads
    o = layer_name(l, "self_attn.o_proj")
    if fmt == "q8_0" and d % q8.QK:
        # Q8_0 blocks of Wo run along its columns = head outputs: with head_dim not a multiple
        # of 32, each head is quantized on its own (padded), so that a block never spans two
        # heads and any cut by heads gives the same blocks, hence the same output
        parts = [load_matrix(ckpt, o, (D, cfg.n_heads * d), cols=(h * d, (h + 1) * d))
                 for h in range(h0, h1)]
        return q8.Q8Tensor(np.concatenate([p.q for p in parts], axis=1),
                           np.concatenate([p.d for p in parts], axis=1), (h1 - h0) * q8.padded(d))
    return load_matrix(ckpt, o, (D, cfg.n_heads * d), cols=(h0 * d, h1 * d), fmt=fmt)


def shard_shapes(cfg: LlamaConfig, shard: Shard, fmt="q8_0") -> dict[str, tuple[int, int]]:
    """The [rows, cols] of each tensor of a shard (the names of shard_tensors), from the config
    alone: Wo's columns are head_dim per head in f32 and whole Q8_0 blocks per head in q8_0
    (see _load_wo)."""
    D, d = cfg.dim, cfg.head_dim
    nq = shard.heads[1] - shard.heads[0]
    nkv = (lambda k: k[1] - k[0])(kv_range(cfg, shard.heads)) if nq else 0
    nu = shard.units[1] - shard.units[0]
    d_wo = q8.padded(d) if fmt == "q8_0" else d
    out = {}
    for l in range(cfg.n_layers):
        if nq:
            out[f"layers.{l}.wqkv"], out[f"layers.{l}.wo"] = ((nq + 2 * nkv) * d, D), (D, nq * d_wo)
        if nu:
            out[f"layers.{l}.wgu"], out[f"layers.{l}.wdown"] = (2 * nu, D), (D, nu)
    out["classifier"] = (shard.rows[1] - shard.rows[0], D)
    return out


def shard_nbytes(cfg: LlamaConfig, shard: Shard, fmt="q8_0", ctx: int = 0, kv_dtype="bf16",
                 slots: int = 1) -> int:
    """Bytes a node holding `shard` needs for its weights (and, given ctx, its KV caches: one per
    sequence slot),
    from the shapes alone: for planning and memory checks before anything is loaded."""
    weights = sum(q8.nbytes(r, c, fmt, held=True) for r, c in shard_shapes(cfg, shard, fmt).values())
    nq = shard.heads[1] - shard.heads[0]
    nkv = (lambda k: k[1] - k[0])(kv_range(cfg, shard.heads)) if nq else 0
    kv = 2 * slots * nkv * ctx * cfg.head_dim * np.dtype(KV_DTYPES[kv_dtype]).itemsize
    return weights + cfg.n_layers * kv


def slice_key(name: str, shard: Shard) -> str:
    """A tensor of shard_tensors named with the range it is cut by (heads for wqkv and wo, units
    for wgu and wdown, rows for the classifier): the same key, the same bytes, in any plan."""
    kind = name.rsplit(".", 1)[-1]
    a, b = shard.heads if kind in ("wqkv", "wo") else shard.units if kind in ("wgu", "wdown") else shard.rows
    return f"{name}[{a}:{b}]"


def shard_tensors(ckpt: Checkpoint, cfg: LlamaConfig, shard: Shard, fmt="q8_0", classifier=None):
    """A shard's weights in a fixed order, each as (name, load): load() quantizes (or copies)
    it out of the mapped checkpoint, dropping the pages it read. Lazy, so that an upload can
    stream them one at a time and skip those a worker already holds. `classifier` reuses an
    already loaded output matrix (tied embeddings)."""
    D, F = cfg.dim, cfg.ffn_dim
    h, (u0, u1), (r0, r1) = shard.heads, shard.units, shard.rows
    out = []
    for l in range(cfg.n_layers):
        n = lambda what, l=l: layer_name(l, what)  # noqa: E731
        if h[1] > h[0]:  # a node may hold FFN units and no heads
            out.append((f"layers.{l}.wqkv", lambda l=l: _load_wqkv(ckpt, cfg, l, h, fmt)))
            out.append((f"layers.{l}.wo", lambda l=l: _load_wo(ckpt, cfg, l, h, fmt)))
        if u1 > u0:
            out.append((f"layers.{l}.wgu", lambda n=n: load_stacked(
                ckpt, [(n("mlp.gate_proj"), (F, D), (u0, u1)), (n("mlp.up_proj"), (F, D), (u0, u1))],
                fmt=fmt)))
            out.append((f"layers.{l}.wdown", lambda n=n: load_matrix(
                ckpt, n("mlp.down_proj"), (D, F), cols=(u0, u1), fmt=fmt)))
    if classifier is not None:
        out.append(("classifier", lambda: classifier))
    else:
        out.append(("classifier", lambda: load_matrix(ckpt, output_name(cfg, ckpt), (cfg.vocab_size, D),
                                                      (r0, r1), fmt=fmt)))
    return out


@dataclass
class SliceSet:
    """One node's slices of every layer and of the classifier."""
    shard: Shard
    attn: list[AttentionSlice] = field(default_factory=list)
    ffn: list[FFNSlice] = field(default_factory=list)
    classifier: object = None    # [r1 - r0, D]
    rope: tuple = ()

    def attention(self, layer: int, xn: np.ndarray, segs) -> np.ndarray | None:
        a = self.attn[layer]
        return None if a is None else a.forward(xn, segs, self.rope)

    def feed_forward(self, layer: int, xn: np.ndarray) -> np.ndarray | None:
        f = self.ffn[layer]
        return None if f is None else f.forward(xn)

    def logits(self, xn: np.ndarray) -> np.ndarray:
        return matmul(self.classifier, xn)                                 # [T, r1 - r0]

    def tensors(self) -> dict:
        """name -> weight as held (Q8Tiles on VNNI CPUs, else Q8Tensor, or float32)."""
        out = {}
        for l, (a, f) in enumerate(zip(self.attn, self.ffn)):
            if a is not None:
                out[f"layers.{l}.wqkv"], out[f"layers.{l}.wo"] = a.wqkv, a.wo
            if f is not None:
                out[f"layers.{l}.wgu"], out[f"layers.{l}.wdown"] = f.wgu, f.wdown
        out["classifier"] = self.classifier
        return out

    @staticmethod
    def from_tensors(cfg: LlamaConfig, shard: Shard, tensors: dict, ctx: int, kv_dtype="bf16",
                     slots: int = 1):
        """A SliceSet from the named tensors of shard_tensors (a worker after an upload), in the
        form this host's kernels run (q8.runnable: a no-op for tensors the caller already made
        runnable, as build() and a worker's upload do, so that a node holds one copy)."""
        s = SliceSet(shard, rope=rope_tables(cfg, ctx))  # positions < ctx: the caches' length
        w = lambda name: q8.runnable(tensors[name])  # noqa: E731
        for l in range(cfg.n_layers):
            s.attn.append(AttentionSlice.make(cfg, shard.heads, w(f"layers.{l}.wqkv"),
                                              w(f"layers.{l}.wo"), ctx, kv_dtype, slots)
                          if shard.heads[1] > shard.heads[0] else None)
            s.ffn.append(FFNSlice(shard.units, w(f"layers.{l}.wgu"), w(f"layers.{l}.wdown"))
                         if shard.units[1] > shard.units[0] else None)
        s.classifier = w("classifier")
        return s

    def run_wire(self, op: str, layer: int, xb: np.ndarray, T: int, segs, wire: str) -> np.ndarray | None:
        """An attention or FFN step of a worker whose activations came on the q8_0 wire, from the
        request's bytes xb (uint8, [T, D] in Q8_0) to the bytes of the partial sum in `wire`, in
        one compiled call: the bits of run() on the decoded x, then encode. None where that does
        not apply (no slice of this block here, weights not in VNNI tiles, a bf16 wire): run()
        then. FloatingPointError if a scale of x is infinite or NaN."""
        s = (self.attn if op == "attention" else self.ffn)[layer]
        out = kernels.WIRE_OUT.get(wire)
        if s is None or out is None:
            return None
        w_in, w_out = (s.wqkv, s.wo) if op == "attention" else (s.wgu, s.wdown)
        if not (isinstance(w_in, q8.Q8Tiles) and isinstance(w_out, q8.Q8Tiles)):
            return None
        D = self.classifier.shape[1]
        yb = np.empty(kernels.wire_nbytes(T, D, out), np.uint8)
        if not (s.forward_wire(xb, T, segs, self.rope, yb, out) if op == "attention"
                else s.forward_wire(xb, T, yb, out)):
            raise FloatingPointError("x holds NaN or infinity (a Q8_0 scale)")
        return yb

    def run(self, op: str, layer: int, x: np.ndarray, segs) -> np.ndarray | None:
        """One step by name: what a worker does with a StepRequest. segs [(slot, p0, n)] place
        x's rows in the sequences' KV caches (attention only)."""
        if op == "attention":
            return self.attention(layer, x, segs)
        if op == "ffn":
            return self.feed_forward(layer, x)
        return self.logits(x)

    @staticmethod
    def build(ckpt: Checkpoint, cfg: LlamaConfig, shard: Shard, fmt="q8_0", kv_dtype="bf16",
              ctx: int | None = None, classifier=None, progress=None, slots: int = 1,
              huge: bool = False) -> "SliceSet":
        """Quantize (or copy) this shard's rows and columns out of the mapped checkpoint, one
        tensor at a time; progress(done, total) counts tensors. huge: weights in huge pages
        (q8.runnable)."""
        loaders = shard_tensors(ckpt, cfg, shard, fmt, classifier)
        tensors, arena = {}, q8.Arena() if huge else None
        for i, (name, load) in enumerate(loaders):
            tensors[name] = q8.runnable(load(), arena)
            if progress:
                progress(i + 1, len(loaders))
        return SliceSet.from_tensors(cfg, shard, tensors, ctx or cfg.max_seq_len, kv_dtype, slots)
