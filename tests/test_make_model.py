"""Tests for bench/make_model.py on a tiny custom shape (runs in a few seconds)."""

from __future__ import annotations

import hashlib
import json
import re
import struct
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open

from bench import make_model as mm
from bench.make_model import (MakeModelError, encode, make_model, reference_tensor, tensor_specs,
                              write_safetensors)
from client.errors import UserError

TINY = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 320,
    "hidden_size": 64,
    "intermediate_size": 176,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "hidden_act": "silu",
    "max_position_embeddings": 128,
    "rms_norm_eps": 1e-05,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "torch_dtype": "float16",
}
ST_DTYPE = {"f16": "F16", "bf16": "BF16", "f32": "F32"}
TOKENIZER = mm.DEFAULT_TOKENIZER if mm.DEFAULT_TOKENIZER.is_file() else None


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    # 1000 floats per step: chunks end mid-tensor and mid-row (rows are 64/176 wide)
    monkeypatch.setattr(mm, "_CHUNK_ELEMS", 1000)


@pytest.fixture
def shape(tmp_path) -> Path:
    p = tmp_path / "tiny.json"
    p.write_text(json.dumps(TINY))
    return p


def build(shape, out, **kw):
    kw.setdefault("tokenizer", TOKENIZER)
    kw.setdefault("verbose", False)
    return make_model(shape, out, **kw)


def read_raw(path: Path) -> dict[str, tuple[str, list[int], bytes]]:
    """An independent safetensors reader (numpy has no bfloat16)."""
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    assert n % 8 == 0
    header = json.loads(data[8:8 + n])
    assert header.pop("__metadata__") == {"format": "pt"}
    base = 8 + n
    out, ends = {}, []
    for name, info in header.items():
        b, e = info["data_offsets"]
        out[name] = (info["dtype"], info["shape"], data[base + b:base + e])
        ends.append((b, e))
    ends.sort()
    assert ends[0][0] == 0 and all(a[1] == b[0] for a, b in zip(ends, ends[1:]))
    assert base + ends[-1][1] == len(data)  # no gap, no trailing bytes
    return out


def model_tensors(out: Path) -> dict[str, tuple[str, list[int], bytes]]:
    index = out / "model.safetensors.index.json"
    if not index.exists():
        return read_raw(out / "model.safetensors")
    wm = json.loads(index.read_text())["weight_map"]
    res = {}
    for fname in sorted(set(wm.values())):
        part = read_raw(out / fname)
        assert {k for k, v in wm.items() if v == fname} == set(part)
        res.update(part)
    return res


def sha_dir(d: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir())}


def bf16_independent(x: np.ndarray) -> np.ndarray:
    """Round float32 -> bfloat16 by comparing exact float64 distances to the two
    neighbouring bf16 values (ties to even), not by the add-and-shift trick."""
    u = x.astype(np.float32).view(np.uint32).astype(np.uint64)
    lo = (u >> 16).astype(np.uint64)  # truncation: toward zero
    hi = lo + 1                       # next bf16 away from zero
    val = lambda b: (b << 16).astype(np.uint32).view(np.float32).astype(np.float64)
    xv = x.astype(np.float64)
    dlo, dhi = np.abs(xv - val(lo)), np.abs(val(hi) - xv)
    pick_hi = (dhi < dlo) | ((dhi == dlo) & (lo % 2 == 1))
    return np.where(pick_hi, hi, lo).astype(np.uint16)


# --------------------------------------------------------------------------- #

@pytest.mark.parametrize("dtype", ["f16", "bf16", "f32"])
def test_names_shapes_dtypes_and_values(shape, tmp_path, dtype):
    out = build(shape, tmp_path / "m", dtype=dtype, seed=7)
    specs = tensor_specs(TINY)
    hd = 64 // 4
    expect = {"model.embed_tokens.weight": [320, 64], "lm_head.weight": [320, 64],
              "model.norm.weight": [64]}
    for i in range(3):
        p = f"model.layers.{i}."
        expect.update({
            p + "self_attn.q_proj.weight": [4 * hd, 64],
            p + "self_attn.k_proj.weight": [2 * hd, 64],
            p + "self_attn.v_proj.weight": [2 * hd, 64],
            p + "self_attn.o_proj.weight": [64, 4 * hd],
            p + "mlp.gate_proj.weight": [176, 64],
            p + "mlp.up_proj.weight": [176, 64],
            p + "mlp.down_proj.weight": [64, 176],
            p + "input_layernorm.weight": [64],
            p + "post_attention_layernorm.weight": [64],
        })
    assert {s.name: list(s.shape) for s in specs} == expect

    # the safetensors library agrees on names / shapes / dtypes
    with safe_open(out / "model.safetensors", framework="numpy") as f:
        assert set(f.keys()) == set(expect)
        assert f.metadata() == {"format": "pt"}
        for name, shp in expect.items():
            sl = f.get_slice(name)
            assert sl.get_shape() == shp and sl.get_dtype() == ST_DTYPE[dtype]
            if dtype != "bf16":
                assert f.get_tensor(name).dtype == (np.float16 if dtype == "f16" else np.float32)

    # and the values are exactly the documented recipe
    raw = read_raw(out / "model.safetensors")
    for s in specs:
        st, shp, data = raw[s.name]
        ref = reference_tensor(s.name, s.shape, seed=7, kind=s.kind)
        if dtype == "f16":
            got, want = np.frombuffer(data, np.uint16), ref.astype(np.float16).view(np.uint16).ravel()
        elif dtype == "f32":
            got, want = np.frombuffer(data, np.uint32), ref.view(np.uint32).ravel()
        else:
            got, want = np.frombuffer(data, np.uint16), bf16_independent(ref.ravel())
        assert np.array_equal(got, want), s.name
        if s.kind == "ones":
            assert np.all(ref == 1)

    cfg = json.loads((out / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 3
    assert cfg["torch_dtype"] == {"f16": "float16", "bf16": "bfloat16", "f32": "float32"}[dtype]
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["bos_token_id"] == 1 and gen["eos_token_id"] == 2
    if TOKENIZER is not None:
        assert (out / "tokenizer.model").read_bytes() == TOKENIZER.read_bytes()
        tc = json.loads((out / "tokenizer_config.json").read_text())
        assert tc["tokenizer_class"] == "LlamaTokenizer" and tc["add_bos_token"] is True


def test_statistics(shape, tmp_path):
    out = build(shape, tmp_path / "m", n_layers=1)
    with safe_open(out / "model.safetensors", framework="numpy") as f:
        w = np.concatenate([f.get_tensor(k).astype(np.float64).ravel() for k in f.keys()
                            if not k.endswith("norm.weight")])
    assert abs(w.mean()) < 1e-3
    assert abs(w.std() - 0.02) < 5e-4


def test_layers_override_and_tied_embeddings(tmp_path):
    cfg = dict(TINY, tie_word_embeddings=True)
    p = tmp_path / "tied.json"
    p.write_text(json.dumps(cfg))
    out = build(p, tmp_path / "m", n_layers=1)
    names = set(read_raw(out / "model.safetensors"))
    assert "lm_head.weight" not in names
    assert not any(n.startswith("model.layers.1.") for n in names)
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 1


def test_deterministic_and_independent_of_threads_and_chunks(shape, tmp_path, monkeypatch):
    a = build(shape, tmp_path / "a", threads=1)
    monkeypatch.setattr(mm, "_CHUNK_ELEMS", 37)  # chunks shorter than a row
    b = build(shape, tmp_path / "b", threads=4)
    assert sha_dir(a) == sha_dir(b)
    c = build(shape, tmp_path / "c", seed=1)
    assert sha_dir(c)["model.safetensors"] != sha_dir(a)["model.safetensors"]


def test_sharded_equals_single_file(shape, tmp_path):
    single = build(shape, tmp_path / "single")
    shard_bytes = 60_000
    sharded = build(shape, tmp_path / "sharded", shard_bytes=shard_bytes)
    assert not (sharded / "model.safetensors").exists()
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    n = len(files)
    assert n > 2
    assert files == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert sorted(p.name for p in sharded.glob("model-*.safetensors")) == files

    a, b = model_tensors(single), model_tensors(sharded)
    assert a == b
    assert index["metadata"]["total_size"] == sum(len(d) for _, _, d in a.values())
    # HF-style greedy fill in model order; shards only exceed the limit when a
    # single tensor is bigger than it
    order = [s.name for s in tensor_specs(TINY)]
    flat = [index["weight_map"][k] for k in order]
    assert flat == sorted(flat)
    for fname in files:
        sizes = [len(b[k][2]) for k in order if index["weight_map"][k] == fname]
        assert sum(sizes) <= shard_bytes or len(sizes) == 1

    # with safetensors itself, too
    for name, fname in index["weight_map"].items():
        with safe_open(sharded / fname, framework="numpy") as f, \
                safe_open(single / "model.safetensors", framework="numpy") as g:
            assert np.array_equal(f.get_tensor(name), g.get_tensor(name))


def test_everything_in_one_shard_gives_single_file(shape, tmp_path):
    out = build(shape, tmp_path / "m", shard_bytes=10**9)  # like HF: no index for one shard
    assert (out / "model.safetensors").exists()
    assert not (out / "model.safetensors.index.json").exists()


def test_bf16_rounding_matches_independent_computation():
    rng = np.random.default_rng(0)
    bits = rng.integers(0, 2**32, 200_000, dtype=np.uint64).astype(np.uint32)
    x = bits.view(np.float32)
    x = x[np.isfinite(x) & (np.abs(x) < 3e38)]  # keep hi = next bf16 finite
    special = np.array([0x3F808000,   # exact tie, even below -> round down
                        0x3F818000,   # exact tie, odd below  -> round up
                        0x3F808001,   # just above a tie      -> up
                        0x3F807FFF,   # just below a tie      -> down
                        0xBF818000,   # negative tie, odd     -> up in magnitude
                        0x00000000, 0x80000000, 0x00000001, 0x3F800000],
                       dtype=np.uint32).view(np.float32)
    normals = rng.standard_normal(200_000, dtype=np.float32) * np.float32(0.02)
    for v in (x, special, normals):
        assert np.array_equal(encode(v, "bf16"), bf16_independent(v))
    assert [hex(b) for b in encode(special[:5], "bf16")] == \
        ["0x3f80", "0x3f82", "0x3f81", "0x3f80", "0xbf82"]
    assert list(encode(np.array([np.inf, -np.inf], np.float32), "bf16")) == [0x7F80, 0xFF80]


def test_f16_conversion_matches_numpy():
    rng = np.random.default_rng(1)
    bits = rng.integers(0, 2**32, 500_000, dtype=np.uint64).astype(np.uint32)
    x = bits.view(np.float32)
    x = x[~np.isnan(x)]
    with np.errstate(over="ignore"):
        want = x.astype(np.float16).view(np.uint16)
        # values around the f16 subnormal / normal boundaries and ties
        edge = (np.arange(-40000, 40000, dtype=np.int64) + 0x38800000).astype(np.uint32).view(np.float32)
        edge2 = (np.arange(0, 0x4000000, 997, dtype=np.int64) + 0x33000000).astype(np.uint32).view(np.float32)
        for v in (x, edge, edge2, -edge2):
            assert np.array_equal(encode(v, "f16"), v.astype(np.float16).view(np.uint16))
    assert np.array_equal(encode(x, "f16"), want)


@pytest.mark.parametrize("dtype", ["f32", "f16", "bf16"])
@pytest.mark.parametrize("shard_bytes", [None, 2_000])
def test_write_safetensors_round_trip(tmp_path, dtype, shard_bytes):
    rng = np.random.default_rng(3)
    tensors = {"b.weight": rng.standard_normal((40, 30), dtype=np.float32),
               "a.weight": rng.standard_normal((7,)).astype(np.float32),  # order kept, not sorted
               "c.scalar": np.float32(rng.standard_normal(1)).reshape(()),
               "d.view": rng.standard_normal((30, 50), dtype=np.float32)[:, ::2]}  # not contiguous
    paths = write_safetensors(tmp_path, tensors, dtype=dtype, shard_bytes=shard_bytes)
    assert sorted(paths) == sorted(tmp_path.iterdir())  # returns every file it wrote
    got = model_tensors(tmp_path)
    assert list(got) == list(tensors) if shard_bytes is None else set(got) == set(tensors)
    if shard_bytes is None:
        assert [p.name for p in paths] == ["model.safetensors"]
    else:
        assert len(paths) > 2 and paths[-1].name == "model.safetensors.index.json"
        wm = json.loads(paths[-1].read_text())["weight_map"]
        assert [wm[k] for k in tensors] == sorted(wm[k] for k in tensors)  # greedy, in order
    for name, a in tensors.items():
        st, shp, data = got[name]
        assert st == ST_DTYPE[dtype] and shp == list(a.shape)
        if dtype == "f32":
            assert np.array_equal(np.frombuffer(data, np.float32).reshape(a.shape), a)
        elif dtype == "f16":
            want = a.astype(np.float16)
            assert np.array_equal(np.frombuffer(data, np.float16).reshape(a.shape), want)
        else:
            assert np.array_equal(np.frombuffer(data, np.uint16), bf16_independent(a.ravel()))


def test_skips_when_up_to_date_and_regenerates_when_not(shape, tmp_path, monkeypatch, capsys):
    out = build(shape, tmp_path / "m", verbose=True)
    before = sha_dir(out)
    marker = json.loads((out / mm.MARKER_NAME).read_text())
    assert marker["complete"] is True and marker["args"]["seed"] == 0

    def boom(*a, **k):
        raise AssertionError("should not regenerate")

    monkeypatch.setattr(mm, "_write_tensor", boom)
    capsys.readouterr()
    build(shape, out, verbose=True)
    assert "skipping" in capsys.readouterr().err
    build(shape, out, n_layers=3)  # 3 is the config's own count: same model
    assert sha_dir(out) == before
    monkeypatch.undo()
    monkeypatch.setattr(mm, "_CHUNK_ELEMS", 1000)

    # different arguments -> rewritten; switching to shards removes the old file
    build(shape, out, shard_bytes=60_000)
    assert not (out / "model.safetensors").exists()
    assert (out / "model.safetensors.index.json").exists()
    build(shape, out)
    assert sha_dir(out) == before

    # a damaged model (truncated weights) is regenerated
    with open(out / "model.safetensors", "r+b") as f:
        f.truncate(100)
    build(shape, out)
    assert sha_dir(out) == before


def test_refuses_to_overwrite_foreign_weights(shape, tmp_path):
    out = tmp_path / "real"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"not ours")
    with pytest.raises(MakeModelError, match="not made by make_model"):
        build(shape, out)
    build(shape, out, force=True)
    assert (out / mm.MARKER_NAME).exists()


def test_api_errors(shape, tmp_path):
    with pytest.raises(MakeModelError, match="not found"):
        build(tmp_path / "missing.json", tmp_path / "m")
    with pytest.raises(MakeModelError, match="layers"):
        build(shape, tmp_path / "m", n_layers=0)
    with pytest.raises(MakeModelError, match="dtype"):
        build(shape, tmp_path / "m", dtype="int8")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(dict(TINY, num_key_value_heads=3)))
    with pytest.raises(UserError, match="num_key_value_heads"):
        build(bad, tmp_path / "m")
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(MakeModelError, match="not a directory|cannot create"):
        build(shape, afile / "sub")


@pytest.mark.skipif(TOKENIZER is None, reason="needs the shared Llama 2 tokenizer")
def test_cli(shape, tmp_path, capsys):
    out = tmp_path / "cli"
    rc = mm.main([str(shape), str(out), "--layers", "1", "--seed", "3", "--dtype", "bf16",
                  "--shard-gb", "0.00005"])
    cap = capsys.readouterr()
    assert rc == 0
    assert cap.out.strip() == str(out.absolute())
    assert "wrote" in cap.err
    assert "vocab_size 320" in cap.err  # the tokenizer-mismatch note
    assert (out / "model.safetensors.index.json").exists()
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"

    rc = mm.main([str(shape), str(out), "--layers", "1", "--seed", "3", "--dtype", "bf16",
                  "--shard-gb", "0.00005"])
    assert rc == 0 and "skipping" in capsys.readouterr().err


@pytest.mark.parametrize("argv,msg", [
    (["{missing}", "{out}"], "shape config not found"),
    (["{shape}", "{out}", "--layers", "0"], "--layers"),
    (["{shape}", "{out}", "--layers", "two"], "--layers"),
    (["{shape}", "{out}", "--dtype", "f8"], "dtype"),
    (["{shape}", "{out}", "--shard-gb", "-1"], "--shard-gb"),
    (["{shape}", "{afile}/sub"], "output"),
    (["{shape}"], "OUT_DIR"),
])
def test_cli_errors_are_one_line_exit_2(shape, tmp_path, capsys, argv, msg):
    afile = tmp_path / "afile"
    afile.write_text("x")
    subst = {"missing": tmp_path / "nope.json", "out": tmp_path / "o", "shape": shape,
             "afile": afile}
    rc = mm.main([a.format(**subst) for a in argv])
    cap = capsys.readouterr()
    assert rc == 2
    lines = cap.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("make_model: error:") and msg in lines[0]
    assert "Traceback" not in cap.err


def test_cli_help(capsys):
    assert mm.main(["--help"]) == 0
    out = capsys.readouterr().out
    for opt in ("--layers", "--seed", "--dtype", "--shard-gb", "SHAPE_CONFIG", "OUT_DIR"):
        assert opt in out
    assert re.search(r"normal\(0, 0\.02\)", out)
