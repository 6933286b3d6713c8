"""The whole model against the independent float64 reference, on the real stories260K model."""
import json
import shutil

import numpy as np
import pytest

from conftest import STORIES, ROOT
from reference import config_inv_freq, q8_0_roundtrip_ref, reference_logits, reference_perplexity
from client.config import LlamaConfig, rope_inv_freq
from client.generate import generate, perplexity, sample
from client.model import Model, plan_shards, split_counts

TEXT = (ROOT / "tests" / "data" / "story.txt").read_text()


@pytest.fixture(scope="module")
def f32():
    return Model.load(STORIES, fmt="f32", kv_dtype="f32")


@pytest.fixture(scope="module")
def q8():
    return Model.load(STORIES, fmt="q8_0", kv_dtype="f32")


@pytest.fixture(scope="module")
def story_ids(f32):
    return f32.tokenizer.encode(TEXT)[:300]


def test_f32_logits_match_float64_reference_batch_and_incremental(f32, story_ids):
    ids = story_ids[:120]
    ref = reference_logits(STORIES, ids)
    batch = f32.forward(ids, 0, all_logits=True)
    assert np.abs(batch - ref).max() <= 1e-4
    # the KV-cache path: a 50-token prompt as one batch, then one token per pass
    rows = [f32.forward(ids[:50], 0, all_logits=True)]
    rows += [f32.forward([t], p) for p, t in enumerate(ids[50:], start=50)]
    step = np.concatenate(rows)
    assert np.abs(step - ref).max() <= 1e-4


def test_q8_0_logits_match_reference_of_quantized_weights(story_ids, monkeypatch):
    """The same maths with Q8_0 round-tripped weights in float64: differences only from f32
    sums. Our embedding lookup is Q8_0 as well (llama.cpp quantizes token_embd too), and Wo is
    quantized head by head when head_dim (8 here) is not a multiple of 32. The float kernels
    (what runs without VNNI): the VNNI ones quantize activations as well, checked against their
    own float64 reference in test_quant and here by top-1 agreement and perplexity."""
    from quant import q8_0 as Q
    from reference import load_hf_llama_f64
    monkeypatch.setattr(Q, "VNNI", False)  # loaded after: weights stay row-major Q8Tensors
    q8 = Model.load(STORIES, fmt="q8_0", kv_dtype="f32")
    ids = story_ids[:64]
    cfg, w = load_hf_llama_f64(STORIES)
    hd = cfg["head_dim"]
    for name, m in w.items():
        if m.ndim != 2:
            continue
        if name.endswith("o_proj.weight"):
            w[name] = np.concatenate([q8_0_roundtrip_ref(m[:, h * hd:(h + 1) * hd])
                                      for h in range(m.shape[1] // hd)], axis=1)
        else:
            w[name] = q8_0_roundtrip_ref(m)
    ref = reference_logits((cfg, w), ids)
    got = q8.forward(ids, 0, all_logits=True)
    assert np.abs(got - ref).max() <= 2e-4


def test_q8_0_teacher_forced_top1_agreement_with_f32(f32, q8, story_ids):
    a = f32.forward(story_ids, 0, all_logits=True).argmax(axis=1)
    b = q8.forward(story_ids, 0, all_logits=True).argmax(axis=1)
    assert (a == b).mean() >= 0.97


def test_q8_0_one_token_path_top1_agreement_with_f32(f32, q8, story_ids):
    """Decoding one token per pass runs the one-token kernel (int8 activations on VNNI CPUs)."""
    ids = story_ids[:200]
    a = f32.forward(ids, 0, all_logits=True).argmax(axis=1)
    q8.forward(ids[:1], 0)
    b = [q8.forward([t], p)[0].argmax() for p, t in enumerate(ids[1:], start=1)]
    assert (a[1:] == np.array(b)).mean() >= 0.97


def test_q8_0_perplexity_within_one_percent_of_f32(f32, q8, story_ids):
    p32, n = perplexity(f32, story_ids)
    p8, _ = perplexity(q8, story_ids)
    assert n == len(story_ids) - 1
    assert abs(p8 / p32 - 1) <= 0.01
    assert abs(p32 / reference_perplexity(STORIES, story_ids) - 1) < 1e-5
    assert p32 < 20  # a trained model on a story of its kind; shuffled text scores far worse
    shuffled = list(np.random.default_rng(0).permutation(story_ids))
    assert perplexity(f32, shuffled)[0] > 5 * p32


def test_greedy_text_of_the_models_readme():
    expect = ("Once upon a time, there was a little girl named Lily. She loved to play outside in the "
              "park. One day, she saw a big, red ball.")
    for fmt in ("f32", "q8_0"):
        for kv in ("bf16", "f32"):
            m = Model.load(STORIES, fmt=fmt, kv_dtype=kv)
            ids = m.tokenizer.encode("Once upon a time")
            r = generate(m, ids, 40)
            assert m.tokenizer.decode(ids + r.new_ids) == expect, (fmt, kv)


@pytest.mark.parametrize("fmt", ["f32", "q8_0"])
@pytest.mark.parametrize("weights", [[1, 1], [1, 1, 1], [3, 1, 1, 2, 1], [1] * 9])
def test_sliced_plans_equal_the_one_slice_plan(fmt, weights, story_ids):
    one = Model.load(STORIES, fmt=fmt, kv_dtype="f32")
    many = Model.load(STORIES, fmt=fmt, kv_dtype="f32", weights=weights)
    assert len(many.nodes) == len(weights)
    ids = story_ids[:40]
    assert np.abs(one.forward(ids, 0, all_logits=True) - many.forward(ids, 0, all_logits=True)).max() < 1e-4
    a = generate(one, ids[:5], 60).new_ids
    b = generate(many, ids[:5], 60).new_ids
    assert a == b


@pytest.mark.parametrize("weights", [None, [3, 1, 1, 2, 1]])
def test_one_call_slice_steps_equal_the_composed_kernels(weights, story_ids, monkeypatch):
    """On VNNI CPUs a slice's step runs as one compiled call (kernels.attention_block,
    ffn_block): it must give the bits of the same kernels composed through q8_0.matmul, for a
    prompt and for single tokens, with heads padded to whole blocks (head_dim 8) and FFN slices
    whose units are not a multiple of 32 (172 units)."""
    from client import kernels, slices
    from quant import q8_0 as Q
    if not Q.VNNI:
        pytest.skip("the one-call steps run on VNNI weights only (this CPU has no AVX-512 VNNI)")
    calls = []
    for name in ("attention_block", "ffn_block"):
        monkeypatch.setattr(kernels, name, lambda *a, f=getattr(kernels, name), n=name: calls.append(n) or f(*a))
    ids = story_ids[:40]

    def run():
        m = Model.load(STORIES, fmt="q8_0", kv_dtype="f32", weights=weights)
        prompt = m.forward(ids, 0, all_logits=True)
        steps = [m.forward([t], 40 + i) for i, t in enumerate(story_ids[40:44])]
        return prompt, steps

    one_call = run()
    assert set(calls) == {"attention_block", "ffn_block"}
    monkeypatch.setattr(slices, "_one_call", lambda *a: False)
    calls.clear()
    composed = run()
    assert not calls
    assert np.array_equal(one_call[0], composed[0])
    assert all(np.array_equal(a, b) for a, b in zip(one_call[1], composed[1]))


def test_wire_steps_equal_decode_run_encode(story_ids):
    """A worker's attention / FFN step with activations on the q8_0 wire runs from the
    request's bytes to the reply's in one compiled call (SliceSet.run_wire): it must give the
    bytes of decoding x, running the step and encoding the partial (decode_q8, run, encode) for
    partial sums in q8_0, f32 and f64, on every shard of an uneven 5-node plan (padded heads, a
    last FFN slice of 44 units), for a prompt and for single tokens; leave bf16 to run(); and
    refuse x with a non-finite scale."""
    from client.checkpoint import Checkpoint
    from client.slices import SliceSet
    from proto.wire import decode_q8, encode
    from quant import q8_0 as Q
    if not Q.VNNI:
        pytest.skip("the one-call wire steps run on VNNI weights only (no AVX-512 VNNI here)")
    cfg, ckpt = LlamaConfig.load(STORIES), Checkpoint(STORIES)
    rng, ran = np.random.default_rng(3), 0
    for shard in plan_shards(cfg, [3, 1, 1, 2, 1]):
        a, b = (SliceSet.build(ckpt, cfg, shard, "q8_0", "bf16", 64) for _ in range(2))
        p0 = 0
        for T, wire in ((7, "q8_0"), (1, "f32"), (1, "f64"), (1, "q8_0"), (1, "bf16")):
            segs = [(0, p0, T)]
            for layer in range(cfg.n_layers):
                for op in ("attention", "ffn"):
                    xb = encode(rng.standard_normal((T, cfg.dim)).astype(np.float32), "q8_0")
                    fast = a.run_wire(op, layer, np.frombuffer(xb, np.uint8), T, segs, wire)
                    if wire == "bf16":
                        assert fast is None
                        y = a.run(op, layer, decode_q8(xb, T, cfg.dim), segs)  # (the caches move on alike)
                        fast = None if y is None else encode(y, wire)
                    slow = b.run(op, layer, decode_q8(xb, T, cfg.dim), segs)
                    assert (fast is None) == (slow is None)
                    ran += fast is not None and wire != "bf16"
                    if slow is not None:
                        assert bytes(fast) == encode(slow, wire)
            p0 += T
        assert ran
        bad = bytearray(encode(np.ones((1, cfg.dim), np.float32), "q8_0"))
        bad[-2:] = np.array([0x7C00], np.uint16).tobytes()  # the last block's scale: infinity
        for op in ("attention", "ffn"):
            if (a.attn if op == "attention" else a.ffn)[0] is not None:
                with pytest.raises(FloatingPointError):
                    a.run_wire(op, 0, np.frombuffer(bytes(bad), np.uint8), 1, [(0, p0, 1)], "f32")


def test_plan_covers_everything_in_proportion():
    cfg = LlamaConfig.load(STORIES)
    shards = plan_shards(cfg, [2, 1, 1])
    assert shards[0].heads == (0, 4) and shards[-1].heads[1] == cfg.n_heads
    # 172 units = 3 pairs of Q8_0 blocks, 64 units each (the last short): 1.5, 0.75, 0.75 ->
    # floors 1, 0, 0 and the two largest remainders (0.75, 0.75) get the rest: 1, 1, 1
    assert [s.units for s in shards] == [(0, 64), (64, 128), (128, 172)]
    assert shards[-1].rows[1] == cfg.vocab_size
    assert split_counts(10, [1, 1, 1]) == [4, 3, 3]
    assert sum(split_counts(176, [0.5, 0.125, 0.125, 0.125])) == 176


def test_sampling_temperature_top_p_seed():
    logits = np.array([2.0, 1.0, 0.5, -1.0, -3.0], np.float32)
    rng = lambda: np.random.default_rng(7)  # noqa: E731
    assert sample(logits, 0, 1, rng()) == 0
    a = [sample(logits, 1.0, 1.0, r) for r in [rng()] for _ in range(50)]
    b = [sample(logits, 1.0, 1.0, r) for r in [rng()] for _ in range(50)]
    assert a == b and len(set(a)) > 2
    # top_p small enough keeps only the most likely token
    r = rng()
    assert {sample(logits, 1.0, 0.3, r) for _ in range(50)} == {0}
    # frequencies follow softmax(logits / T)
    r = np.random.default_rng(1)
    draws = np.bincount([sample(logits, 2.0, 1.0, r) for _ in range(4000)], minlength=5) / 4000
    p = np.exp(logits / 2.0) / np.exp(logits / 2.0).sum()
    assert np.abs(draws - p).max() < 0.03


def test_llama3_rope_scaling_matches_reference():
    c = json.loads((ROOT.parent / "shared/models/shapes/llama3-8b.json").read_text())
    c["rope_scaling"] = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    ours = rope_inv_freq(LlamaConfig.from_dict(c))
    assert np.allclose(ours, config_inv_freq(c), rtol=1e-12, atol=0)
    assert not np.allclose(ours, config_inv_freq({**c, "rope_scaling": None}))


def test_sharded_bf16_and_f16_checkpoints(tmp_path, story_ids):
    """The same model written as sharded bf16 and single-file f16 loads to the reference logits
    of those rounded weights."""
    from bench.make_model import write_safetensors  # the project's one safetensors writer
    from reference import load_hf_llama_f64
    cfg, w = load_hf_llama_f64(STORIES)
    ids = story_ids[:30]
    for dtype in ("bf16", "f16"):
        d = tmp_path / dtype
        d.mkdir()
        for f in ("config.json", "tokenizer.model", "tokenizer_config.json"):
            shutil.copy(STORIES / f, d / f)
        tensors = {k: v.astype(np.float32) for k, v in w.items()}
        write_safetensors(d, tensors, dtype=dtype, shard_bytes=300_000 if dtype == "bf16" else None)
        assert (d / "model.safetensors.index.json").is_file() == (dtype == "bf16")
        m = Model.load(d, fmt="f32", kv_dtype="f32")
        ref = reference_logits(d, ids)
        assert np.abs(m.forward(ids, 0, all_logits=True) - ref).max() <= 1e-4


def test_stream_decoder_pieces_add_up_to_the_full_text():
    """Streaming (a short decoding window) gives exactly the text of decoding everything, on the
    Llama 2 tokenizer with multi-byte characters split over byte pieces."""
    from client.tokenizer import StreamDecoder, Tokenizer
    tok = Tokenizer(ROOT.parent / "shared/models/llama2-tokenizer")
    text = "Héllo wörld — 東京 🦙 is a  double space,\nnew line. " * 5
    ids = tok.encode(text)
    dec = StreamDecoder(tok, ids[:3])
    out = tok.decode(ids[:3]) + "".join(dec.push([i]) for i in ids[3:]) + dec.flush()
    assert out == tok.decode(ids)
    assert "\ufffd" not in out


@pytest.mark.parametrize("fmt", ["q8_0", "f32"])
def test_shard_nbytes_predicts_what_loading_holds(fmt):
    """Memory checks use shard_nbytes before loading: it must equal the loaded tensors plus the
    caches, on stories260K (head_dim 8: Wo padded per head) and the TinyLlama shape (head_dim 64)."""
    from bench.make_model import make_model
    from client.checkpoint import Checkpoint
    from client.slices import Shard, SliceSet, shard_nbytes
    tiny = make_model(ROOT.parent / "shared/models/shapes/tinyllama-1.1b.json",
                      ROOT / "models" / "tinyllama-2layer", n_layers=2, verbose=False)
    for path, shards in ((STORIES, [Shard((0, 3), (0, 64), (0, 100)), Shard((3, 8), (64, 172), (100, 512)),
                                    Shard((5, 5), (32, 172), (0, 0))]),
                         (tiny, [Shard((0, 7), (0, 2048), (0, 9000)), Shard((7, 32), (2048, 5632), (9000, 32000))])):
        cfg, ckpt = LlamaConfig.load(path), Checkpoint(path)
        for sh in shards:
            s = SliceSet.build(ckpt, cfg, sh, fmt, "bf16", 40)
            held = sum(w.nbytes for w in s.tensors().values())
            held += sum(a.cache_k.nbytes + a.cache_v.nbytes for a in s.attn if a is not None)
            assert shard_nbytes(cfg, sh, fmt, 40, "bf16") == held, (path, sh)


def test_plan_respects_each_nodes_memory(monkeypatch):
    """A node whose speed-weighted share does not fit its memory gets less; a model that cannot
    fit at all is refused before anything is loaded, naming the node, the sizes and the fix."""
    from types import SimpleNamespace
    import client.model as cm
    from client.errors import UserError
    from client.slices import shard_nbytes
    cfg = LlamaConfig.load(STORIES)
    big = 10 << 30
    monkeypatch.setattr(cm, "available_memory", lambda: (big, "test"))
    worker = lambda mem: SimpleNamespace(addr="w:1", info=SimpleNamespace(memory_bytes=mem))  # noqa: E731
    even = cm.plan_in_memory(STORIES, cfg, [1, 1], [worker(big)], True, "q8_0", "bf16", 64)
    assert even == plan_shards(cfg, [1, 1])
    small = (64 << 20) + shard_nbytes(cfg, even[1], "q8_0", 64) // 2   # room for about half its share
    shards = cm.plan_in_memory(STORIES, cfg, [1, 1], [worker(small)], True, "q8_0", "bf16", 64)
    assert shard_nbytes(cfg, shards[1], "q8_0", 64) * 1.02 + (64 << 20) <= small
    assert shards[1].units[1] - shards[1].units[0] < even[1].units[1] - even[1].units[0]
    monkeypatch.setattr(cm, "available_memory", lambda: (1 << 20, "memory cgroup limit, /x/memory.limit_in_bytes"))
    with pytest.raises(UserError, match=r"this host.s share needs .* GB but it has 0.00 GB \(memory cgroup"):
        Model.load(STORIES)


def test_time_balanced_shares_weigh_each_nodes_round_trips():
    """Equal time per token: share_i * whole_i + fixed_i = t. With no fixed cost, shares follow
    speed; a node whose round trips alone outlast t is left out."""
    from client.model import time_balanced
    whole = [1.0, 4.0, 4.0, 4.0]                      # one node 4x faster
    assert np.allclose(time_balanced(whole, [0, 0, 0, 0]), [4 / 7, 1 / 7, 1 / 7, 1 / 7])
    s = time_balanced(whole, [0, 0.2, 0.2, 0.2])
    t = [f + x * w for f, x, w in zip([0, 0.2, 0.2, 0.2], s, whole)]
    assert abs(sum(s) - 1) < 1e-12 and np.allclose(t, t[0]) and s[1] < 1 / 7
    assert time_balanced(whole, [0, 1.0, 1.0, 1.0]) == [1.0, 0.0, 0.0, 0.0]


def test_time_balanced_leaves_out_nodes_whose_serial_cost_outweighs_their_share():
    """serial_i is paid on top of the balanced time: two equal nodes split evenly while a
    worker's serial cost is below the half it saves, and the client keeps it all beyond."""
    from client.model import time_balanced
    assert np.allclose(time_balanced([1.0, 1.0], [0, 0], [0, 0.4]), [0.5, 0.5])   # 0.5 + 0.4 < 1
    assert time_balanced([1.0, 1.0], [0, 0], [0, 0.6]) == [1.0, 0.0]               # 0.5 + 0.6 > 1
    # three workers, one slow to reach: only it goes
    s = time_balanced([1.0, 1.0, 1.0, 1.0], [0, 0, 0, 0], [0, 0.01, 0.01, 0.5])
    assert s[3] == 0 and np.allclose(s[:3], [1 / 3] * 3)


def test_a_capped_node_computes_at_full_speed_until_its_quota_runs_out():
    """Under a CPU quota q a node's time per token is the larger of its round trips plus its
    compute at full speed (q times its measured time) and its steps' cost when busy plus its
    compute at the measured, quota-bound speed."""
    from client.model import time_balanced
    steps = 45
    # one 0.5-core host and three 0.125-core ones (their speeds, round trips and busy costs as
    # measured on the emulated LAN): each slow host takes a share, 1/5 of the fast one's
    whole, fixed = [0.081, 0.344, 0.344, 0.344], [steps * 0.4e-3] * 4
    capped = [(0.5, steps * 60e-6)] + [(0.125, steps * 226e-6)] * 3
    s = time_balanced(whole, fixed, capped=capped)
    t = [max(f + x * q * w, b + x * w) for x, w, f, (q, b) in zip(s, whole, fixed, capped)]
    assert abs(sum(s) - 1) < 1e-12 and np.allclose(t, t[0]) and s[1] == s[2] == s[3]
    assert 0.1 < s[1] < 0.15 and t[0] == max(fixed[0] + s[0] * 0.5 * whole[0], capped[0][1] + s[0] * whole[0])
    # a small share leaves a capped node idle most of each period: its round trips and its
    # compute at full speed decide (its quota would allow more), no throttled waits
    s = time_balanced([0.11, 1.0], [0.0, 0.1], capped=[None, (0.125, 0.0)])
    assert 0 < s[1] < 0.1 and np.isclose(0.1 + s[1] * 0.125, s[0] * 0.11)
    # once its share keeps it busy, its quota decides: less than its round trips would allow
    s = time_balanced([1.0, 1.0], [0.0, 0.01], capped=[None, (0.125, 0.05)])
    assert np.isclose(0.05 + s[1] * 1.0, s[0]) and s[1] < (1 - 0.01) / 1.125
    # a node with no quota: one line, as before
    assert np.allclose(time_balanced([1.0, 1.0], [0.0, 0.1], capped=[None, None]),
                       time_balanced([1.0, 1.0], [0.0, 0.1]))


def test_quota_share_is_the_part_of_its_threads_time_a_node_may_run():
    from client.host import quota_share
    assert quota_share(1000, 8000, 1) == pytest.approx(0.125)
    assert quota_share(2000, 4000, 2) == pytest.approx(0.25)   # half a core over two threads
    assert quota_share(8000, 4000, 2) is None                  # a core per thread: never throttled
    assert quota_share(0, 0, 1) is None


def test_default_threads_follow_the_cpu_quota(monkeypatch):
    """One kernel thread per core, but no more than a CPU quota rounds up to."""
    from client import host
    monkeypatch.setattr(host.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    for quota, threads in [(None, 4), (0.25, 1), (1.0, 1), (1.5, 2), (2.5, 3), (16.0, 4)]:
        monkeypatch.setattr(host, "cpu_quota", lambda q=quota: q)
        assert host.default_threads() == threads, quota


def test_batched_sequences_equal_alone():
    """Continuous batching: three sequences in their own KV slots, prompts and decode steps in
    one pass each, give every sequence exactly the logits it gets alone (each row's arithmetic
    does not depend on the rows beside it: quant.q8_0.matmul under 32 rows)."""
    from client.errors import UserError
    m = Model.load(STORIES, slots=3, ctx=96)
    prompts = [m.tokenizer.encode(p) for p in ("Once upon a time", "Tom had a red", "The sun")]

    def decode(segs_of_step, steps=12):
        seqs = {s: list(ids) for s, ids in prompts_by_slot.items()}
        outs = {s: [] for s in seqs}
        first = m.forward_batch([(s, seqs[s], 0) for s in segs_of_step], all_logits=True)
        for s, o in zip(segs_of_step, first):
            outs[s].append(o)
            seqs[s].append(int(o[-1].argmax()))
        for _ in range(steps):
            res = m.forward_batch([(s, seqs[s][-1:], len(seqs[s]) - 1) for s in segs_of_step])
            for s, o in zip(segs_of_step, res):
                outs[s].append(o)
                seqs[s].append(int(o[-1].argmax()))
        return seqs, outs

    prompts_by_slot = dict(enumerate(prompts))
    together = decode([0, 1, 2])
    for s in range(3):
        alone = decode([s])
        assert alone[0][s] == together[0][s]
        for a, b in zip(alone[1][s], together[1][s]):
            assert np.array_equal(a, b), s
    with pytest.raises(UserError, match="slot 3"):
        m.forward_batch([(3, [1], 0)])
    with pytest.raises(UserError, match="follows no tokens"):
        m.forward_batch([(0, [1], 40)])


def test_long_passes_go_in_pieces(monkeypatch):
    """A pass of more rows than MAX_PASS_ROWS (a long prompt, a replay of many sequences) runs in
    pieces, each continuing the KV caches where the last ended: the same logits as one pass
    (to the rounding of the batch kernels) and the same next tokens."""
    import client.model as cm
    m = Model.load(STORIES, slots=2, ctx=96)
    ids = m.tokenizer.encode("Once upon a time, there was a little girl named Lily. She loved to play")
    prompts = [(0, ids, 0), (1, ids[:9], 0)]
    whole = m.forward_batch(prompts, all_logits=True)
    monkeypatch.setattr(cm, "MAX_PASS_ROWS", 7)
    pieces = m.forward_batch(prompts, all_logits=True)
    for a, b in zip(whole, pieces):
        assert a.shape == b.shape and np.abs(a - b).max() < 1e-3 * np.abs(a).max()
        assert (a.argmax(1) == b.argmax(1)).all()
    nxt = m.forward_batch([(0, [5], len(ids)), (1, [5], 9)])   # the caches hold every piece
    monkeypatch.setattr(cm, "MAX_PASS_ROWS", 512)
    m.forward_batch(prompts)
    again = m.forward_batch([(0, [5], len(ids)), (1, [5], 9)])
    assert all(np.abs(a - b).max() < 1e-3 * np.abs(a).max() for a, b in zip(nxt, again))


def test_token_time_is_the_slowest_nodes_line_plus_the_serial_costs():
    """token_time prices any split with time_balanced's model: the balanced shares give its t,
    a lopsided split the slower node's line, and a node with a share adds its serial cost."""
    from client.model import time_balanced, token_time
    whole, fixed, serial = [1.0, 2.0], [0.0, 0.1], [0.0, 0.05]
    s = time_balanced(whole, fixed, serial)
    assert np.isclose(token_time(s, whole, fixed, serial), s[0] * 1.0 + 0.05)
    assert np.isclose(token_time([0.9, 0.1], whole, fixed, serial), 0.9 + 0.05)      # node 0 slowest
    assert np.isclose(token_time([0.2, 0.8], whole, fixed, serial), 0.1 + 1.6 + 0.05)
    assert np.isclose(token_time([1.0, 0.0], whole, fixed, serial), 1.0)             # node 1 left out
    # a capped node: the larger of its two lines
    capped = [None, (0.25, 0.3)]
    assert np.isclose(token_time([0.5, 0.5], whole, fixed, capped=capped), max(0.5, 0.1 + 0.25, 0.3 + 1.0))


def test_a_held_plan_is_kept_while_predicted_within_keep_plan_of_a_new_one(tmp_path):
    """Re-planning moves most of every worker's slices: the plan the workers hold stays unless a
    new one is predicted more than KEEP_PLAN faster, and only if it still covers the model and
    fits each node's memory."""
    from types import SimpleNamespace
    import client.model as cm
    from client.cluster import read_plan, write_plan
    from client.slices import Shard
    cfg = LlamaConfig.load(STORIES)
    big = 10 << 30
    worker = lambda mem: SimpleNamespace(addr="w:1", info=SimpleNamespace(memory_bytes=mem))  # noqa: E731
    me = SimpleNamespace(cfg=cfg, fmt="q8_0", kv_dtype="bf16", ctx=64, slots=1, src={"local": False},
                         plan_note="")
    me._held_or_new = lambda *a: cm.Model._held_or_new(me, *a)
    key = tmp_path / "plan.json"

    def keep(held, mem=big, known=True, held_known=True):
        if held is None:
            key.unlink(missing_ok=True)
        else:
            write_plan(key, held, held_known)
        return cm.Model.keep_held_plan(me, key, new, costs, [worker(mem)] * 2, known)[0]

    costs = ([1.0, 1.0], [0.0, 0.0], [0.0, 0.0], [None, None])  # two alike nodes
    new = plan_shards(cfg, [1, 1])
    near, far = plan_shards(cfg, [1.08, 0.92]), plan_shards(cfg, [1.0, 0.1])
    t = lambda shards: cm.token_time(cm.shard_shares(cfg, shards, "q8_0"), *costs)  # noqa: E731
    assert near != new and t(near) <= t(new) * (1 + cm.KEEP_PLAN) < t(far)
    assert keep(near) == near and "kept" in me.plan_note
    assert keep(far) == new and "worth a re-upload" in me.plan_note
    assert keep(None) == new and keep(new) == new
    # a held plan that does not cover the model (another model's, a file edited by hand), or one
    # node's share no longer fits its memory: the new plan
    gap = [Shard(near[0].heads, near[0].units, (0, 10)),
           Shard(near[1].heads, near[1].units, (11, cfg.vocab_size))]
    assert keep(gap) == new and keep(near[:1]) == new
    assert keep(near, mem=(64 << 20) + 1000) == new
    # a plan made from pings alone (a capped worker had not run a session) is not kept once every
    # worker has reported what a step costs it; kept while none has
    assert keep(near, held_known=False) == new and "pings alone" in me.plan_note
    assert keep(near, known=False, held_known=False) == near
    # what is kept says how it was made: the file round-trips, a damaged one is no plan
    write_plan(key, near, False)
    assert read_plan(key) == (near, False)
    key.write_text('{"shards": [[1, 2]], "steps_known": true}')
    assert read_plan(key) == (None, False)
    assert cm.covers_model(cfg, near, 2) and not cm.covers_model(cfg, gap, 2)
