"""The cluster on loopback: real worker processes, output identical to one process."""
import socket

import numpy as np
import pytest

from cluster_util import Workers
from conftest import ROOT, STORIES
from client.generate import generate
from client.model import Model
from proto import tensorlan_pb2 as pb
from proto.wire import FrameReader, send_frame

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def workers():
    w = Workers(4)
    yield w
    logs = w.stop()
    for log in logs:  # clean exit on SIGTERM, one line per session
        assert "stopped" in log and "Traceback" not in log


@pytest.fixture(scope="module")
def tiny2():
    """A 2-layer random model of the TinyLlama-1.1B shape (cached under models/)."""
    from bench.make_model import make_model
    return make_model(ROOT.parent / "shared/models/shapes/tinyllama-1.1b.json",
                      ROOT / "models" / "tinyllama-2layer", n_layers=2, verbose=False)


def _greedy(model, ids, n):
    return generate(model, ids, n).new_ids


# nodes = this process + k workers; weights uneven on purpose; 5 nodes > the 4 KV heads. The
# default wire (f32 partial sums) rounds each node's partial once, so equality is observed on
# these models but not guaranteed; f64 partials guarantee it.
PLANS = [
    (1, None, "f32"),
    (2, [1.0], "f32"),
    (3, [2.0, 0.5], "f32"),
    (5, [1.0, 3.0, 1.0, 0.7], "f32"),
    (5, [1.0, 3.0, 1.0, 0.7], "f64"),
]


@pytest.mark.parametrize("nodes,weights,wire", PLANS)
def test_stories_cluster_equals_in_process(workers, nodes, weights, wire):
    one = Model.load(STORIES)
    ids = one.tokenizer.encode("Once upon a time")
    want = _greedy(one, ids, 60)
    ws = [(a, w) for a, w in zip(workers.addrs, weights or [])]
    many = Model.load(STORIES, workers=ws, wire=wire)
    assert len(many.nodes) == nodes
    assert _greedy(many, ids, 60) == want
    L = many.cfg.n_layers
    for n in many.remote:  # round trips per token: 2 per layer + the classifier
        per_pass = {}
        for c in n.calls:
            per_pass[c.token] = per_pass.get(c.token, 0) + 1
        assert max(per_pass.values()) <= 2 * L + 1


def test_stories_workers_only(workers):
    one = Model.load(STORIES)
    ids = one.tokenizer.encode("The dog")
    many = Model.load(STORIES, workers=[(a, 1.0) for a in workers.addrs[:3]], local=False)
    assert len(many.remote) == 3 and len(many.nodes) == 3
    assert _greedy(many, ids, 40) == _greedy(one, ids, 40)


def test_plan_leaves_out_workers_not_worth_their_round_trips(workers):
    """stories260K's matmuls take microseconds: every worker's round trips cost more than it
    would save, so the time-balanced plan keeps this process alone; explicit weights include
    them anyway (test_stories_workers_only)."""
    one = Model.load(STORIES)
    ids = one.tokenizer.encode("The dog")
    auto = Model.load(STORIES, workers=[(a, None) for a in workers.addrs[:2]])
    assert len(auto.nodes) == 1 and not auto.remote and len(auto.idle) == 2
    assert all(r.fixed_ms > 0 for r in auto.idle)
    # with --no-local the faster of two alike workers may keep both (the split then follows the
    # measured costs, which differ by noise): never none, never a worker twice
    remote_only = Model.load(STORIES, workers=[(a, None) for a in workers.addrs[:2]], local=False)
    assert len(remote_only.remote) >= 1 and len(remote_only.remote) + len(remote_only.idle) == 2
    assert _greedy(auto, ids, 20) == _greedy(remote_only, ids, 20) == _greedy(one, ids, 20)


def test_a_reload_keeps_the_plan_the_workers_hold(workers, tiny2, monkeypatch):
    """A measured plan is kept for the next load of the same model on the same workers, whose
    slices are there, unless a new one is predicted more than KEEP_PLAN faster (that choice:
    test_model's test_a_held_plan_is_kept_...; here, with any held plan good enough, that the
    plan is kept where the next load finds it, used, and finds its slices on the workers)."""
    import client.model as cm
    from client.cluster import plan_key, read_plan, write_plan
    from client.slices import Shard
    from quant.q8_0 import nbytes as q8_nbytes
    monkeypatch.setattr(cm, "KEEP_PLAN", 100.0)  # loopback workers beside other tests measure noisily
    ws = [(a, None) for a in workers.addrs[:2]]
    first = Model.load(tiny2, ctx=64, workers=ws, local=False, wire="f64")
    shards = [r.shard for r in first.remote]
    assert len(shards) == 2 and "predicted" in first.plan_note
    key = plan_key(first.src["ckpt"], first.src["config_json"], "q8_0", False, [r.addr for r in first.remote])
    assert read_plan(key) == (shards, True)   # no worker under a CPU quota: nothing to learn
    # the plan a run before might have left there: 256 classifier rows the other way
    cut = shards[0].rows[1] + 256
    moved = [Shard(shards[0].heads, shards[0].units, (0, cut)), Shard(shards[1].heads, shards[1].units,
                                                                      (cut, shards[1].rows[1]))]
    write_plan(key, moved, True)
    again = Model.load(tiny2, ctx=64, workers=ws, local=False, wire="f64")
    assert [r.shard for r in again.remote] == moved and "kept" in again.plan_note
    # the manifest is per slice: of the moved plan, only the classifier rows are new to the workers
    for r in again.remote:
        rows = r.shard.rows[1] - r.shard.rows[0]
        assert 0 < r.uploaded_bytes <= q8_nbytes(rows, again.cfg.dim), (r.addr, r.uploaded_bytes)
    third = Model.load(tiny2, ctx=64, workers=ws, local=False, wire="f64")
    assert [r.shard for r in third.remote] == moved and all(r.uploaded_bytes == 0 for r in third.remote)
    ids = list(range(1, 12))
    assert _greedy(third, ids, 8) == _greedy(Model.load(tiny2, ctx=64), ids, 8)


@pytest.mark.parametrize("weights", [[1.0], [3.0, 1.0, 2.0], [1.0, 1.0, 1.0, 5.0]])
def test_tinyllama_shape_cluster_equals_in_process(workers, tiny2, weights):
    """f64 partial sums: equal by construction. (A random model's logits have near ties: with
    the default f32 partials, each node's rounded once, a change of kernel once flipped the
    12th token of the 5-node plan.)"""
    one = Model.load(tiny2, ctx=64)
    ids = list(range(1, 12))
    want = _greedy(one, ids, 12)
    many = Model.load(tiny2, ctx=64, workers=list(zip(workers.addrs, weights)), wire="f64")
    assert _greedy(many, ids, 12) == want
    # the logits themselves agree closely (partial sums add in another order)
    a = Model.load(tiny2, ctx=64).forward(ids, 0)
    b = Model.load(tiny2, ctx=64, workers=list(zip(workers.addrs, weights))).forward(ids, 0)
    assert np.abs(a - b).max() < 1e-3 * np.abs(a).max()


def test_perf_csv_and_profile(workers, tmp_path):
    import subprocess
    csv = tmp_path / "matmul_perf.csv"
    p = subprocess.run([str(ROOT / "bin/client"), str(STORIES), "-i", "Once upon a time", "-n", "20",
                        "--workers", ",".join(f"{a}*1" for a in workers.addrs[:2]), "--perf-csv", str(csv)],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("Once upon a time, there was a little girl named Lily.")
    for what in ("ping", "avg round trip", "network overhead", "ms/rpc", "round trips/token"):
        assert what in p.stderr
    rows = csv.read_text().splitlines()
    assert rows[0] == ("token,layer,block,worker,rows,bytes_sent,bytes_received,"
                       "worker_compute_us,round_trip_us")
    body = [r.split(",") for r in rows[1:]]
    assert len(body) == 2 * 20 * (2 * 5 + 1)  # 2 workers x 20 passes x (2 per layer + 1)
    per_token = {}
    for r in body:
        per_token.setdefault((r[0], r[3]), set()).add((r[1], r[2]))
    assert max(len(v) for v in per_token.values()) <= 2 * 5 + 1


def test_worker_answers_bad_steps_and_keeps_serving(workers):
    from client.cluster import RemoteNode
    node = RemoteNode(workers.addrs[0])
    info = node.hello()
    s = socket.create_connection(("127.0.0.1", info.data_port))
    frames = FrameReader(s)
    for req in (pb.StepRequest(op=pb.FFN, layer=0, tokens=1, x=b"\0" * 256),       # no OPEN
                pb.StepRequest(op=pb.OPEN, slice_set_id="nope", ctx=16, kv_dtype="bf16")):
        send_frame(s, req)
        rep, _ = frames.read(pb.StepReply)
        assert rep.error_code != 0 and rep.error
    s.close()
    # still serving a real session
    one = Model.load(STORIES)
    ids = one.tokenizer.encode("Once")
    many = Model.load(STORIES, workers=[(workers.addrs[0], None)])
    assert _greedy(many, ids, 10) == _greedy(one, ids, 10)


def test_grpc_session_serves_the_same_steps(workers):
    """The Session RPC (the gRPC twin of the step channel) gives the same partial sums."""
    import grpc
    from proto import tensorlan_pb2_grpc as rpc
    from proto.wire import decode, encode
    m = Model.load(STORIES, workers=[(workers.addrs[1], None)], local=False)
    node = m.remote[0]
    x = np.random.default_rng(0).standard_normal((2, m.cfg.dim)).astype(np.float32)
    node.start("ffn", 1, x, [(0, 0, 2)])
    want = node.wait()
    stub = rpc.WorkerStub(grpc.insecure_channel(workers.addrs[1]))
    reqs = [pb.StepRequest(seq=1, op=pb.OPEN, slice_set_id=node.slice_set_id, ctx=64, kv_dtype="bf16"),
            pb.StepRequest(seq=2, op=pb.FFN, layer=1, pos=0, tokens=2, x=encode(x, "f32")),
            pb.StepRequest(seq=3, op=pb.LOGITS, layer=0, pos=0, tokens=0, x=b"")]
    replies = list(stub.Session(iter(reqs), timeout=30))
    assert [r.seq for r in replies] == [1, 2, 3]
    assert replies[0].error_code == 0
    assert np.array_equal(decode(replies[1].y, 2, m.cfg.dim, "f32"), want)
    assert replies[2].error_code != 0   # zero tokens: refused with a status, session survives
    # activations in q8_0 (what a client sends a VNNI worker): the same partial sums as from the
    # floats on VNNI workers (their kernels make those very blocks), where the client's own
    # step above went as q8_0 already; a block scale of infinity is refused
    xq = bytearray(encode(x, "q8_0"))
    xq[2 * m.cfg.dim + 1] = 0x7C  # the first scale's high byte: fp16 infinity
    reqs = [pb.StepRequest(seq=1, op=pb.OPEN, slice_set_id=node.slice_set_id, ctx=64, kv_dtype="bf16",
                           x_wire="q8_0"),
            pb.StepRequest(seq=2, op=pb.FFN, layer=1, pos=0, tokens=2, x=encode(x, "q8_0")),
            pb.StepRequest(seq=3, op=pb.FFN, layer=1, pos=0, tokens=2, x=bytes(xq)),
            pb.StepRequest(seq=4, op=pb.FFN, layer=1, pos=0, tokens=2, x=encode(x, "f32"))]
    replies = list(stub.Session(iter(reqs), timeout=30))
    assert [r.error_code for r in replies[:2]] == [0, 0]
    assert node.x_wire == ("q8_0" if node.info.q8_activations else "f32")
    y = decode(replies[1].y, 2, m.cfg.dim, "f32")
    assert np.array_equal(y, want) if node.info.q8_activations else np.abs(y - want).max() < 0.05 * np.abs(want).max()
    assert replies[2].error_code == grpc.StatusCode.INVALID_ARGUMENT.value[0] and "NaN or inf" in replies[2].error
    assert replies[3].error_code == grpc.StatusCode.INVALID_ARGUMENT.value[0]   # f32 bytes: the wrong size


def test_wire_formats_accuracy_and_bytes(workers):
    """Teacher-forced over 120 tokens of a story, generation's path (a 16-token prompt, then one
    token per pass): f64 partials reproduce the in-process logits to float32 rounding (their
    float64 sums round to the same float32 all but rarely: one flip was seen in ~10 runs, a
    1e-8 change of the perplexity); f32, bf16 and q8_0
    keep the perplexity within 1e-4 / 0.5% / 2% while the bytes per call shrink."""
    from conftest import ROOT
    text = (ROOT / "tests" / "data" / "story.txt").read_text()
    one = Model.load(STORIES)
    ids = one.tokenizer.encode(text)[:120]

    def logits(m):
        rows = [m.forward(ids[:16], 0, all_logits=True)]
        rows += [m.forward([t], p) for p, t in enumerate(ids[16:], start=16)]
        return np.concatenate(rows)

    def ppl(z):
        z = z[:-1].astype(np.float64)
        lse = np.log(np.exp(z - z.max(1, keepdims=True)).sum(1)) + z.max(1)
        return float(np.exp(np.mean(lse - z[np.arange(len(z)), ids[1:]])))

    want = logits(one)
    sent = {}
    for wire, tol in [("f64", 1e-6), ("f32", 1e-4), ("bf16", 5e-3), ("q8_0", 2e-2)]:
        m = Model.load(STORIES, workers=[(a, w) for a, w in zip(workers.addrs[:2], [1.0, 2.5])], wire=wire)
        got = logits(m)
        assert abs(ppl(got) / ppl(want) - 1) <= tol, wire
        if wire == "f64":
            assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()
        m.forward(ids[:1], len(ids))  # one more token: the calls of a single token
        calls = [c for c in m.remote[0].calls if c.token == 1 and c.op == "ffn"]
        sent[wire] = (calls[0].sent, calls[0].received)
    # D = 64 here: 256 bytes of f32 against 68 of q8_0, plus 11-16 bytes of framing each
    assert sent["q8_0"][1] * 3.3 < sent["f32"][1] < sent["f64"][1]
    assert sent["bf16"][1] * 1.8 < sent["f32"][1]
    if m.remote[0].info.q8_activations:  # activations go as q8_0 whatever the wire (no loss there)
        assert sent["f64"][0] == sent["f32"][0] == sent["bf16"][0] == sent["q8_0"][0]
    else:
        assert sent["q8_0"][0] * 3.2 < sent["f32"][0] == sent["f64"][0]


def test_hello_measures_the_speed_again(workers):
    """A client about to plan asks for a fresh speed figure (HelloRequest.measure_speed): a new
    probe's result, in the range of the one the worker took at its start."""
    from client.cluster import RemoteNode
    node = RemoteNode(workers.addrs[3])
    try:
        first = node.hello().speed_gb_s
        again = node.hello(measure=True).speed_gb_s
        assert node.hello().speed_gb_s == again   # kept for later handshakes
    finally:
        node.close()
    assert first > 0 and again != first and 0.5 < again / first < 2, (first, again)
