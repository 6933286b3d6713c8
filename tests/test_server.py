"""bin/client serve end to end, driven by the official openai client: completions and chat,
streamed and not, the CLI's greedy text, stop strings, seeds, errors, batching and a load test."""
import asyncio
import json
import re
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

from conftest import ROOT, STORIES

openai = pytest.importorskip("openai")

CLIENT = str(ROOT / "bin" / "client")
PROMPTS = ["Once upon a time", "Tom had a red", "The sun was", "Lily saw a", "One day, a little",
           "The dog ran", "A bird sang", "Sam and Max"]


class Server:
    def __init__(self, *args, token=None):
        self.log = tempfile.NamedTemporaryFile("w+", prefix="tensorlan-serve-", suffix=".log")
        self.proc = subprocess.Popen([CLIENT, "serve", STORIES, "--port", "0", *map(str, args)],
                                     stdout=subprocess.DEVNULL, stderr=self.log, text=True)
        self.token = token
        deadline = time.time() + 120
        while not (m := re.search(r"serving \S+ on (http://\S+/v1)", open(self.log.name).read())):
            assert self.proc.poll() is None and time.time() < deadline, open(self.log.name).read()
            time.sleep(0.1)
        self.base = m.group(1)
        self.root = self.base[:-3]
        while True:
            try:
                self.get("/health")
                break
            except OSError:
                assert self.proc.poll() is None and time.time() < deadline
                time.sleep(0.1)

    def client(self, **kw):
        return openai.OpenAI(base_url=self.base, api_key=self.token or "none", **kw)

    def get(self, path):
        with urllib.request.urlopen(self.root + path, timeout=30) as r:
            return json.loads(r.read())

    def post(self, path, body, headers=None):
        """(status, JSON body) of a raw POST: for the error shapes."""
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        req = urllib.request.Request(self.root + path, data, method="POST", headers={
            "Content-Type": "application/json", **(headers or {})})
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    def rss_kb(self):
        status = open(f"/proc/{self.proc.pid}/status").read()
        return int(re.search(r"VmRSS:\s+(\d+)", status).group(1))

    def stop(self):
        self.proc.terminate()
        try:
            assert self.proc.wait(timeout=20) == 0, open(self.log.name).read()
        finally:
            self.proc.kill()
            self.log.close()


@pytest.fixture(scope="module")
def server():
    s = Server("--slots", 8, "--threads", 1)
    yield s
    s.stop()


def cli_text(prompt, n):
    p = subprocess.run([CLIENT, STORIES, "-i", prompt, "-n", str(n), "--temperature", "0", "--json",
                        "--threads", "1"], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)


def complete(client, prompt, **kw):
    r = client.completions.create(model="stories260K", prompt=prompt, **kw)
    return r.choices[0].text, r


def stream_complete(client, prompt, **kw):
    chunks = list(client.completions.create(model="m", prompt=prompt, stream=True, **kw))
    finish = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finish[-1] in ("stop", "length") and set(finish[:-1]) == {None}
    return "".join(c.choices[0].text for c in chunks if c.choices), chunks


def test_models_and_health(server):
    assert [m.id for m in server.client().models.list().data] == ["stories260K"]
    h = server.get("/health")
    assert h["status"] == "ok" and h["slots"] == 8 and h["workers"] == [] and h["ctx"] == 512


def test_streamed_greedy_text_equals_the_cli(server):
    cli = cli_text("Once upon a time", 40)
    text, chunks = stream_complete(server.client(), "Once upon a time", max_tokens=40,
                                   temperature=0, stream_options={"include_usage": True})
    assert "Once upon a time" + text == cli["text"]
    assert chunks[-1].usage.completion_tokens == len(cli["new_ids"]) == 40
    assert chunks[-1].usage.prompt_tokens == len(cli["prompt_ids"]) == 5
    assert chunks[-1].usage.total_tokens == 45
    plain, r = complete(server.client(), "Once upon a time", max_tokens=40, temperature=0)
    assert plain == text and r.choices[0].finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (5, 40, 45)


def test_chat_streamed_and_not(server):
    c = server.client()
    msgs = [{"role": "system", "content": "Tell stories."}, {"role": "user", "content": "A story"}]
    r = c.chat.completions.create(model="x", messages=msgs, max_tokens=30, temperature=0)
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content and r.usage.completion_tokens <= 30
    chunks = list(c.chat.completions.create(model="x", messages=msgs, max_tokens=30, temperature=0,
                                            stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason == r.choices[0].finish_reason
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == r.choices[0].message.content


def test_stop_strings_and_ignore_eos(server):
    c = server.client()
    full, _ = complete(c, "Once upon a time", max_tokens=40, temperature=0)
    text, r = complete(c, "Once upon a time", max_tokens=40, temperature=0, stop=["Lily", "zzz"])
    assert text == full[:full.index("Lily")] and r.choices[0].finish_reason == "stop"
    streamed, _ = stream_complete(c, "Once upon a time", max_tokens=40, temperature=0, stop=" little g")
    assert streamed == full[:full.index(" little g")]
    _, r = complete(c, "Once upon a time", max_tokens=300, temperature=0, extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 300 and r.choices[0].finish_reason == "length"


def test_seed_reproducibility(server):
    c = server.client()
    a, _ = complete(c, "The cat", max_tokens=30, temperature=0.9, top_p=0.9, seed=5)
    b, _ = complete(c, "The cat", max_tokens=30, temperature=0.9, top_p=0.9, seed=5)
    d, _ = complete(c, "The cat", max_tokens=30, temperature=0.9, top_p=0.9, seed=6)
    assert a == b != d


def test_errors_have_openai_shape(server):
    for body, param in [({"prompt": "x", "temperature": 5}, "temperature"),
                        ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
                        ({"max_tokens": 3}, "prompt"),
                        ({"prompt": ["a", "b"]}, "prompt"),
                        ({"prompt": "x", "n": 2}, "n"),
                        ({"prompt": "x", "max_tokens": 600}, "max_tokens")]:
        status, out = server.post("/v1/completions", body)
        assert status == 400, body
        assert out["error"]["type"] == "invalid_request_error" and out["error"]["param"] == param
        assert set(out["error"]) == {"message", "type", "param", "code"}
    status, out = server.post("/v1/completions", {"prompt": "x", "max_tokens": 600})
    assert "600" in out["error"]["message"] and "512" in out["error"]["message"]
    status, out = server.post("/v1/completions", b"{not json")
    assert status == 400 and "JSON" in out["error"]["message"]
    status, out = server.post("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]})
    assert status == 400 and out["error"]["param"].startswith("messages")
    status, out = server.post("/v1/nothing", {})
    assert status == 404 and "error" in out
    with pytest.raises(openai.BadRequestError) as e:
        server.client().completions.create(model="m", prompt="x", top_p=0)
    assert e.value.status_code == 400


def test_token_and_queue_full():
    s = Server("--slots", 1, "--max-queue", 1, "--threads", 1, "--token", "s3cret", token="s3cret")
    try:
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=s.base, api_key="wrong").models.list()
        status, out = s.post("/v1/completions", {"prompt": "x"})
        assert status == 401 and out["error"]["code"] == "invalid_api_key"
        assert s.get("/health")["status"] == "ok"  # no token needed

        c = s.client(max_retries=0)

        def one(i):
            try:
                return complete(c, PROMPTS[i % 8], max_tokens=400, temperature=0,
                                extra_body={"ignore_eos": True})[1].usage.completion_tokens
            except openai.RateLimitError as e:
                assert e.status_code == 429 and e.body["code"] == "queue_full"
                return 429
        with ThreadPoolExecutor(8) as ex:
            got = list(ex.map(one, range(8)))
        assert 429 in got and 400 in got, got  # some refused, the others complete
        assert set(got) == {400, 429}
    finally:
        s.stop()


def test_refuses_public_host_without_token():
    p = subprocess.run([CLIENT, "serve", STORIES, "--host", "0.0.0.0", "--port", "0"],
                       capture_output=True, text=True, timeout=60, env={"PATH": "/usr/bin:/bin"})
    assert p.returncode == 2 and p.stderr.startswith("error:") and "--token" in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1


def test_greedy_output_same_alone_or_batched(server):
    c = server.client()
    kw = dict(max_tokens=120, temperature=0, extra_body={"ignore_eos": True})
    alone = [complete(c, p, **kw)[0] for p in PROMPTS]
    with ThreadPoolExecutor(8) as ex:
        together = list(ex.map(lambda p: stream_complete(c, p, **kw)[0], PROMPTS))
    assert together == alone


@pytest.mark.slow
def test_load_64_streams_3_rounds(server):
    async def one(client, i):
        """A raw stream through the official client: every chunk, a finish_reason, then [DONE]."""
        n = 16 + i % 24
        async with client.completions.with_streaming_response.create(
                model="m", prompt=PROMPTS[i % 8], max_tokens=n, temperature=0.8, seed=i,
                stream=True, stream_options={"include_usage": True}) as resp:
            data = [line[6:] async for line in resp.iter_lines() if line.startswith("data: ")]
        assert data[-1] == "[DONE]", data[-3:]
        chunks = [json.loads(d) for d in data[:-1]]
        assert "error" not in chunks[-1], chunks[-1]
        assert chunks[-2]["choices"][0]["finish_reason"] in ("stop", "length")
        assert 1 <= chunks[-1]["usage"]["completion_tokens"] <= n
        return 1

    async def round_():
        async with openai.AsyncOpenAI(base_url=server.base, api_key="none", max_retries=0,
                                      timeout=120) as client:
            return await asyncio.gather(*(one(client, i) for i in range(64)),
                                        return_exceptions=True)

    asyncio.run(round_())  # warm-up
    idle = server.rss_kb()
    t0 = time.time()
    for _ in range(3):
        res = asyncio.run(round_())
        errors = [r for r in res if r != 1]
        assert not errors, errors[:3]
    elapsed = time.time() - t0
    h = server.get("/health")
    assert h["active"] == h["queued"] == 0
    assert server.rss_kb() - idle < 50_000, (idle, server.rss_kb())
    print(f"3 rounds of 64 streams in {elapsed:.1f} s; RSS idle {idle} kB, after {server.rss_kb()} kB")
