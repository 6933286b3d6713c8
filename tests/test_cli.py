"""bin/client end to end: streamed text, --json, perplexity, and one clear line for bad input."""
import json
import shutil
import subprocess

import pytest

from conftest import ROOT, STORIES

CLIENT = str(ROOT / "bin" / "client")
EXPECT = ("Once upon a time, there was a little girl named Lily. She loved to play outside in the "
          "park. One day, she saw a big, red ball.")


def run(*args, ok=True):
    p = subprocess.run([CLIENT, *map(str, args)], capture_output=True, text=True, timeout=300)
    if ok:
        assert p.returncode == 0, p.stderr
    return p


@pytest.mark.parametrize("weights", ["q8_0", "f32"])
def test_generate_streams_the_readme_text(weights):
    p = run(STORIES, "-i", "Once upon a time", "-n", 40, "--temperature", 0, "--weights", weights)
    assert p.stdout.strip() == EXPECT
    for what in ("loaded", "layer type", "kv cache", "total", "prompt:", "tok/s", "ms/token"):
        assert what in p.stderr
    # -n 30 stops 30 tokens in: a prefix of the same text; the subcommand form is the same
    p30 = run("generate", STORIES, "-i", "Once upon a time", "-n", 30, "--weights", weights)
    assert EXPECT.startswith(p30.stdout.strip()) and len(p30.stdout.strip()) > 80


def test_json_output():
    p = run(STORIES, "-i", "Once upon a time", "-n", 40, "--json", "--threads", 1)
    out = json.loads(p.stdout)
    assert out["text"] == EXPECT
    assert out["prompt_ids"][0] == 1 and len(out["new_ids"]) == 40
    assert out["prompt_tok_s"] > 0 and out["gen_tok_s"] > 0


def test_sampling_is_reproducible_with_a_seed():
    a = run(STORIES, "-i", "The cat", "-n", 30, "--temperature", 0.9, "--top-p", 0.9, "--seed", 5, "--json")
    b = run(STORIES, "-i", "The cat", "-n", 30, "--temperature", 0.9, "--top-p", 0.9, "--seed", 5, "--json")
    c = run(STORIES, "-i", "The cat", "-n", 30, "--temperature", 0.9, "--top-p", 0.9, "--seed", 6, "--json")
    assert json.loads(a.stdout)["new_ids"] == json.loads(b.stdout)["new_ids"]
    assert json.loads(a.stdout)["new_ids"] != json.loads(c.stdout)["new_ids"]


def test_perplexity_command():
    text = ROOT / "tests" / "data" / "story.txt"
    a = json.loads(run("perplexity", STORIES, text, "--json", "--weights", "f32").stdout)
    b = json.loads(run("perplexity", STORIES, text, "--json").stdout)
    assert a["n_tokens"] == b["n_tokens"] > 300
    assert 1 < a["perplexity"] < 20 and abs(b["perplexity"] / a["perplexity"] - 1) < 0.01
    assert "perplexity" in run("perplexity", STORIES, text).stdout


def test_help_explains():
    p = run("--help")
    assert "generate" in p.stdout and "perplexity" in p.stdout
    p = run("generate", "--help")
    for opt in ("--temperature", "--top-p", "--seed", "--threads", "--kv-dtype", "--weights", "--json"):
        assert opt in p.stdout


def _model_copy(tmp_path, skip=()):
    d = tmp_path / "m"
    d.mkdir()
    for f in STORIES.iterdir():
        if f.name not in skip:
            shutil.copy(f, d / f.name)
    return d


def _bad(tmp_path, make, *extra):
    d = make(tmp_path)
    p = run(d, "-i", "Once upon a time", "-n", 5, *extra, ok=False)
    assert p.returncode == 2, p.stderr
    assert "Traceback" not in p.stderr
    lines = [l for l in p.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), p.stderr
    return lines[0]


def test_missing_directory(tmp_path):
    assert "no such model folder" in _bad(tmp_path, lambda t: t / "nope")


def test_corrupt_config(tmp_path):
    def make(t):
        d = _model_copy(t)
        (d / "config.json").write_text("{not json")
        return d
    assert "config.json" in _bad(tmp_path, make)


def test_not_a_llama_config(tmp_path):
    def make(t):
        d = _model_copy(t)
        c = json.loads((d / "config.json").read_text())
        c["model_type"], c["architectures"] = "gpt2", ["GPT2LMHeadModel"]
        (d / "config.json").write_text(json.dumps(c))
        return d
    assert "not a LLaMA" in _bad(tmp_path, make)


def test_truncated_safetensors(tmp_path):
    def make(t):
        d = _model_copy(t)
        data = (d / "model.safetensors").read_bytes()
        (d / "model.safetensors").write_bytes(data[: len(data) // 2])
        return d
    assert "truncated" in _bad(tmp_path, make)


def test_garbage_safetensors(tmp_path):
    def make(t):
        d = _model_copy(t)
        (d / "model.safetensors").write_bytes(b"\x00" * 10 + b"hello" * 100)
        return d
    assert "model.safetensors" in _bad(tmp_path, make)


def test_tensor_of_the_wrong_shape(tmp_path):
    def make(t):
        d = _model_copy(t)
        c = json.loads((d / "config.json").read_text())
        c["intermediate_size"] = 160
        (d / "config.json").write_text(json.dumps(c))
        return d
    msg = _bad(tmp_path, make)
    assert "shape" in msg and "mlp" in msg


def test_missing_tokenizer(tmp_path):
    assert "tokenizer.model" in _bad(tmp_path, lambda t: _model_copy(t, skip={"tokenizer.model"}))


def test_prompt_longer_than_context(tmp_path):
    msg = _bad(tmp_path, lambda t: STORIES, "--ctx", 4)
    assert "context" in msg


def test_n_below_one(tmp_path):
    p = run(STORIES, "-i", "hi", "-n", 0, ok=False)
    assert p.returncode == 2 and "Traceback" not in p.stderr and "-n" in p.stderr
