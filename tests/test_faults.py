"""A worker lost mid-generation does not lose the generation: killed (SIGKILL) or hung (SIGSTOP)
at token 20 of 64, or during the prompt, the client re-plans over the nodes left, rebuilds the
KV caches by replaying the tokens so far, and the greedy text is the one of a run with no
failure; the stall stays under 5 s on stories260K."""
import os
import signal
import subprocess
import time

import numpy as np
import pytest

from cluster_util import Workers, wait_ready
from conftest import ROOT, STORIES
from client.errors import UserError
from client.generate import generate
from client.model import Model

pytestmark = pytest.mark.slow
PROMPT = "Once upon a time"


@pytest.fixture(scope="module")
def expected():
    m = Model.load(STORIES)
    ids = m.tokenizer.encode(PROMPT)
    new = generate(m, ids, 64).new_ids
    assert len(new) > 30  # long enough to lose a worker at token 20 and go on
    return ids, new


@pytest.fixture
def three():
    w = Workers(3)
    yield w
    for p in w.procs:
        if p.poll() is None:
            os.kill(p.pid, signal.SIGCONT)
    w.stop()


def _load(workers, **kw):
    # weights given: all three workers take part (the default plan may leave slow ones out)
    return Model.load(STORIES, workers=[(a, 1.0) for a in workers.addrs], **kw)


def _generate(m, ids, at=None, action=None):
    """Greedy tokens, the longest gap between two tokens, and whether action ran at token `at`."""
    times = [time.perf_counter()]

    def on_token(_):
        times.append(time.perf_counter())
        if len(times) - 1 == at:
            action()

    new = generate(m, ids, 64, on_token=on_token).new_ids
    return new, float(np.diff(times).max())


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGSTOP])
def test_worker_lost_at_token_20(three, expected, capfd, sig):
    ids, want = expected
    m = _load(three)
    assert len(m.remote) == 3
    victim = three.procs[1]
    got, stall = _generate(m, ids, 20, lambda: os.kill(victim.pid, sig))
    assert got == want
    assert stall <= 5.0, f"stalled {stall:.1f} s"
    assert len(m.remote) == 2 and m.lost == [three.addrs[1]]
    err = capfd.readouterr().err
    assert err.count("warning:") == 1 and f"worker {three.addrs[1]} lost" in err and "replayed" in err


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGSTOP])
def test_worker_lost_during_the_prompt(three, expected, sig):
    ids, want = expected
    m = _load(three)
    os.kill(three.procs[0].pid, sig)  # the prompt's first step finds it gone or hung
    got, stall = _generate(m, ids)
    assert got == want
    assert stall <= 5.0, f"stalled {stall:.1f} s"  # the first gap: the prompt and the re-plan
    assert m.lost == [three.addrs[0]]


def test_two_of_three_lost(three, expected):
    """Losses one after another: the client ends up computing with the one worker left."""
    ids, want = expected
    m = _load(three)
    got, _ = _generate(m, ids, 10, lambda: [p.kill() for p in three.procs[:2]])
    assert got == want and len(m.remote) == 1


def test_batched_sequences_survive_a_loss(three):
    """Two sequences decoding together in two KV slots: both replayed after the loss."""
    one = Model.load(STORIES, slots=2)
    m = _load(three, slots=2)
    prompts = [one.tokenizer.encode(p) for p in ("Once upon a time", "The little dog")]

    def run(model, kill_at=None):
        outs = model.forward_batch([(s, ids, 0) for s, ids in enumerate(prompts)])
        seqs = [[int(o[-1].argmax())] for o in outs]
        for step in range(30):
            if step == kill_at:
                three.procs[2].kill()
            segs = [(s, [seq[-1]], len(prompts[s]) + len(seq) - 1) for s, seq in enumerate(seqs)]
            for seq, o in zip(seqs, model.forward_batch(segs)):
                seq.append(int(o[-1].argmax()))
        return seqs

    assert run(m, kill_at=12) == run(one)
    assert len(m.remote) == 2


def test_on_worker_loss_fail(three, expected):
    ids, _ = expected
    m = _load(three, on_loss="fail")
    three.procs[2].kill()
    with pytest.raises(UserError, match=r"lost .*--on-worker-loss fail"):
        generate(m, ids, 64)


def test_cli_warns_once_and_finishes(three, expected):
    """bin/client with a worker killed as soon as its upload arrived (so during the session's
    opening or the prompt): one warning line, the same text; with --on-worker-loss fail, one
    error line and exit code 2."""
    import json
    import threading
    ids, want = expected
    args = lambda addrs: [str(ROOT / "bin/client"), str(STORIES), "-i", PROMPT, "-n", "64",  # noqa
                          "--workers", ",".join(f"{a}*1" for a in addrs), "--json", "--no-cache"]

    def kill_after_upload(i, n):
        t = time.time()
        while three.log(i).count(" upload ") < n and time.time() - t < 60:
            time.sleep(0.002)  # its n-th upload: the one of the run going on
        three.procs[i].kill()

    outs = []
    for victim, extra in [(0, []), (1, ["--on-worker-loss", "fail"])]:
        # its next upload (the first run re-plans over worker 1, which takes a second one then)
        uploads = three.log(victim).count(" upload ") + 1
        watcher = threading.Thread(target=kill_after_upload, args=(victim, uploads))
        watcher.start()
        cmd = args(three.addrs[victim:]) + extra  # (the first victim is gone in the second run)
        outs.append(subprocess.run(cmd, capture_output=True, text=True, timeout=120))
        watcher.join(5)
    ok, failed = outs
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["new_ids"] == want
    assert ok.stderr.count("warning:") == 1 and f"worker {three.addrs[0]} lost" in ok.stderr
    assert failed.returncode == 2 and "Traceback" not in failed.stderr, failed.stderr
    assert [l for l in failed.stderr.splitlines() if l.startswith("error:")] == [
        next(l for l in failed.stderr.splitlines() if "--on-worker-loss fail" in l)]


def test_lost_worker_rejoins(three, expected):
    """A worker that comes back is planned in again at the next request (Model.rejoin)."""
    ids, want = expected
    m = _load(three)
    victim = three.procs[1]
    got, _ = _generate(m, ids, 5, victim.kill)
    assert got == want and len(m.remote) == 2
    port = three.addrs[1].rpartition(":")[2]
    three.procs[1] = subprocess.Popen([str(ROOT / "bin/worker"), port, "--threads", "1"],
                                      stderr=subprocess.DEVNULL)
    wait_ready(three.addrs[1])
    assert m.rejoin() == [three.addrs[1]]
    assert len(m.remote) == 3 and m.lost == []
    assert _generate(m, ids)[0] == want


def test_worker_lost_before_the_first_ping(three, expected, capfd):
    """The CLI pings every worker before the first token: one that is gone by then is planned
    around there (or stops the run with --on-worker-loss fail), with no traceback."""
    from client.profile import print_pings
    ids, want = expected
    m = _load(three)
    three.procs[2].kill()
    three.procs[2].wait()
    print_pings(m)
    assert m.lost == [three.addrs[2]] and len(m.remote) == 2
    assert _generate(m, ids)[0] == want
    assert capfd.readouterr().err.count("warning:") == 1
    m = Model.load(STORIES, workers=[(a, 1.0) for a in three.addrs[:2]], on_loss="fail")
    three.procs[1].kill()
    three.procs[1].wait()
    with pytest.raises(UserError, match=r"lost .*--on-worker-loss fail"):
        print_pings(m)


def test_step_channel_refused_lost_or_firewalled(three):
    """A step channel refused after the handshake: lost (NodeLost, planned around) when the
    worker's gRPC port is gone too, since it died; a firewall message when the worker still
    answers there. (The CLI run above met the first case as a flaky 'open it in the firewall'.)"""
    from client.cluster import NodeLost, RemoteNode
    from cluster_util import free_port
    alive = RemoteNode(three.addrs[0])
    alive.hello()
    alive.info.data_port = free_port()  # nothing listens there: as if a firewall refused it
    with pytest.raises(UserError, match="open it in the firewall"):
        alive.connect()
    dead = RemoteNode(three.addrs[1])
    dead.hello()
    three.procs[1].kill()
    three.procs[1].wait()
    with pytest.raises(NodeLost, match="step channel"):
        dead.connect()
    for n in (alive, dead):
        n.close()
