"""The batching engine with a stand-in model (no kernels): stop strings, failures, cancellation,
the queue bound; and the chat formats."""
import json
import queue
import shutil
import time
from types import SimpleNamespace

import numpy as np
import pytest

from client.batch import Batcher, QueueFull, Request, stop_cut
from client.chat import ChatError, ChatFormat
from client.tokenizer import Tokenizer
from conftest import STORIES

TOK = Tokenizer(STORIES)


class FakeModel:
    """Greedy always picks the next token of `script` (by position); `fail` makes passes raise."""

    def __init__(self, script, slots=2, ctx=64):
        self.script, self.slots, self.ctx = script, slots, ctx
        self.cfg = SimpleNamespace(eos_ids=[TOK.eos_id])
        self.tokenizer, self.history, self.lost = TOK, {}, []
        self.fail, self.passes = False, []

    def forward_batch(self, segs, all_logits=False):
        self.passes.append([(s, len(ids), p0) for s, ids, p0 in segs])
        if self.fail:
            raise RuntimeError("boom")
        out = []
        for slot, ids, p0 in segs:
            self.history[slot] = self.history.get(slot, [])[:p0] + list(ids)
            logits = np.zeros((1, TOK.vocab_size), np.float32)
            logits[0, self.script[(p0 + len(ids)) % len(self.script)]] = 1
            out.append(logits)
        return out


def collect(q):
    text = ""
    while True:
        kind, value = q.get(timeout=10)
        if kind != "text":
            return text, kind, value
        text += value


def req(prompt, n, **kw):
    q = queue.Queue()
    return Request(TOK.encode(prompt), n, q.put, **kw), q


def test_stop_cut():
    assert stop_cut("hello wor", ["world"]) == ("hello ", "wor", False)
    assert stop_cut("hello world!", ["world", "lo"]) == ("hel", "", True)
    assert stop_cut("abc", []) == ("abc", "", False)


def test_engine_stops_fails_and_keeps_serving():
    words = TOK.encode(" the cat sat on the mat and", bos=False)
    m = FakeModel(words, slots=2)
    b = Batcher(m, max_queue=1)
    try:
        r, q = req("x", 30, stop=["mat"])
        b.submit(r)
        text, kind, why = collect(q)
        assert kind == "done" and why == "stop" and "mat" not in text and text.endswith("on the ")
        r, q = req("x", 3)
        b.submit(r)
        assert collect(q)[1:] == ("done", "length") and r.completion_tokens == 3
        m.fail = True
        r, q = req("x", 3)
        b.submit(r)
        assert collect(q)[1:] == ("error", "RuntimeError: boom")
        m.fail = False
        r, q = req("x", 2)
        b.submit(r)
        assert collect(q)[1] == "done"
        assert b.stats() == {"active": 0, "queued": 0, "slots": 2} and m.history == {}
    finally:
        b.close()


def test_cancelled_request_leaves_and_queue_is_bounded():
    m = FakeModel(TOK.encode(" a b c", bos=False), slots=1, ctx=4096)
    b = Batcher(m, max_queue=1)
    try:
        long, q1 = req("x", 4000, ignore_eos=True)
        b.submit(long)
        while not b.stats()["active"]:
            time.sleep(0.01)
        waiting, q2 = req("y", 2)
        b.submit(waiting)
        with pytest.raises(QueueFull, match="max-queue 1"):
            b.submit(req("z", 2)[0])
        long.cancel()
        assert collect(q1)[1:] == ("error", "cancelled")
        assert collect(q2)[1:] == ("done", "length")
        # decode steps were one row each (one slot), the prompts passes of their own
        assert all(len(p) == 1 for p in m.passes)
    finally:
        b.close()


def test_chat_formats(tmp_path):
    llama2 = ChatFormat(STORIES, TOK)
    assert llama2.template is None
    ids = llama2.encode([{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi"},
                         {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Bye"}])
    assert ids == (TOK.encode("[INST] <<SYS>>\nBe kind.\n<</SYS>>\n\nHi [/INST]")
                   + TOK.encode(" Hello ", bos=False) + [TOK.eos_id] + TOK.encode("[INST] Bye [/INST]"))
    with pytest.raises(ChatError, match="alternating"):
        llama2.encode([{"role": "assistant", "content": "x"}])

    shutil.copy(STORIES / "tokenizer.model", tmp_path)
    cfg = json.loads((STORIES / "tokenizer_config.json").read_text())
    cfg["chat_template"] = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}"
                            "{{ raise_exception('no system') }}{% endif %}<|{{ m['role'] }}|>"
                            "{{ m['content'] }}{{ eos_token }}{% endfor %}"
                            "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    tpl = ChatFormat(tmp_path, TOK)
    assert tpl.encode([{"role": "user", "content": "Hi"}]) == (
        [TOK.bos_id] + TOK.encode("<|user|>Hi", bos=False) + [TOK.eos_id]
        + TOK.encode("<|assistant|>", bos=False))
    with pytest.raises(ChatError, match="no system"):
        tpl.encode([{"role": "system", "content": "x"}])


def test_lost_workers_are_tried_again_when_idle(monkeypatch):
    import client.batch
    monkeypatch.setattr(client.batch, "REJOIN_EVERY", 0.05)
    m = FakeModel(TOK.encode(" a b c", bos=False))
    m.lost, tries = ["10.0.0.9:7000"], []

    def rejoin():
        tries.append(time.monotonic())
        if len(tries) == 2:
            m.lost.clear()
        return []
    m.rejoin = rejoin
    b = Batcher(m)
    try:
        deadline = time.time() + 5
        while m.lost and time.time() < deadline:
            time.sleep(0.02)
        assert len(tries) == 2 and tries[1] - tries[0] >= 0.05
        r, q = req("x", 2)
        b.submit(r)
        assert collect(q)[1] == "done"
    finally:
        b.close()
