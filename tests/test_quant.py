"""Q8_0 quantizer and kernels against the independent float64 reference (tests/reference.py)."""
import os

import numpy as np
import pytest

from reference import bf16_round_ref, q8_0_dequantize_ref, q8_0_quantize_ref
from quant import q8_0 as Q

rng = np.random.default_rng(1234)


def _hard_rows(rows, cols):
    """Random data plus the cases that break quantizers: zero blocks, negative amax, ties."""
    x = (rng.standard_normal((rows, cols)) * rng.choice([1e-3, 0.02, 1, 300], (rows, 1))).astype(np.float32)
    x[0, : min(cols, 40)] = 0.0
    if rows > 1 and cols >= 32:
        x[1, :32] = np.arange(32) - 30.0     # amax at a negative value, exact .5 ties after scaling
        x[1, 5] = -127.0
    if rows > 2 and cols >= 32:
        x[2, :32] = (np.arange(32) - 16) * 0.5
    return x


@pytest.mark.parametrize("rows,cols", [(1, 32), (7, 40), (33, 172), (5, 64), (3, 1), (17, 2048)])
def test_quantize_bit_exact_with_llama_cpp_reference(rows, cols):
    x = _hard_rows(rows, cols)
    qr, dr = q8_0_quantize_ref(x)
    w = Q.quantize(x)
    assert w.q.shape == qr.shape and w.d.shape == dr.shape and w.cols == cols
    assert np.array_equal(w.q, qr)
    assert np.array_equal(w.d, dr.view(np.uint16))
    assert (w.q[:, cols:] == 0).all()   # zero padding


@pytest.mark.parametrize("rows,cols", [(1, 2048), (3, 40), (2, 64), (5, 1)])
def test_activation_bytes_are_the_quantized_tensor(rows, cols):
    """The q8_0 wire's packing of activations (one fused pass): the bytes of quantize(X), quants
    then fp16 scales, partial last blocks and zero blocks included; finite_scales spots an fp16
    infinity or NaN among the scales."""
    X = _hard_rows(rows, cols)
    t = Q.quantize(X)
    assert Q.quantize_bytes(X).tobytes() == t.q.tobytes() + t.d.tobytes()
    assert Q.finite_scales(t.d)
    for bad in (0x7C00, 0xFC00, 0x7E01):   # +inf, -inf, a NaN
        d = t.d.copy()
        d[-1, -1] = bad
        assert not Q.finite_scales(d)


def test_quantize_from_f16_and_bf16_sources():
    x = _hard_rows(9, 100)
    x16 = x.astype(np.float16)
    w = Q.quantize(x16)
    qr, dr = q8_0_quantize_ref(x16.astype(np.float32))
    assert np.array_equal(w.q, qr) and np.array_equal(w.d, dr.view(np.uint16))
    xb = bf16_round_ref(x).astype(np.float32)
    bits = (xb.view(np.uint32) >> 16).astype(np.uint16)
    w = Q.quantize(bits, "bf16")
    qr, dr = q8_0_quantize_ref(xb)
    assert np.array_equal(w.q, qr) and np.array_equal(w.d, dr.view(np.uint16))


def test_quantize_strided_column_slice_equals_quantized_copy():
    x = _hard_rows(6, 200)
    a = Q.quantize(x[:, 64:136])          # a column slice straight from a bigger matrix
    b = Q.quantize(np.ascontiguousarray(x[:, 64:136]))
    assert np.array_equal(a.q, b.q) and np.array_equal(a.d, b.d)


def test_round_trip_error_bound():
    x = _hard_rows(64, 96)
    w = Q.quantize(x)
    deq = Q.dequantize(w).astype(np.float64)
    assert np.array_equal(deq, q8_0_dequantize_ref(w.q, w.d.view(np.float16), 96))
    blocks = np.abs(x.astype(np.float64)).reshape(64, 3, 32)
    d32 = blocks.max(axis=2) / 127                              # exact scale
    d16 = w.d.view(np.float16).astype(np.float64)              # stored scale
    bound = np.repeat(d32 / 2 + 127 * np.abs(d32 - d16), 32, axis=1)
    assert (np.abs(deq - x) <= bound * (1 + 1e-6) + 1e-30).all()


KERNELS = [False] + ([True] if Q.VNNI else [])  # the VNNI kernels where the CPU has them


def _activations_ref(X, int8):
    """The activations the kernels multiply by, in float64: X itself, or (VNNI kernels) each row
    quantized to Q8_0 as llama.cpp's quantize_row_q8_0 does."""
    if not int8:
        return X.astype(np.float64)
    return q8_0_dequantize_ref(*q8_0_quantize_ref(X), X.shape[1])


@pytest.mark.parametrize("vnni", KERNELS)
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("rows,cols", [(1, 32), (5, 40), (33, 172), (130, 96), (257, 64)])
def test_matmul_against_float64_reference(vnni, threads, rows, cols, monkeypatch):
    """Float kernels: X as is. VNNI (T < 32): every row of X quantized to Q8_0 first."""
    monkeypatch.setattr(Q, "VNNI", vnni)
    Q.set_threads(threads)
    try:
        x = _hard_rows(rows, cols)
        w = Q.quantize(x)
        W = q8_0_dequantize_ref(*q8_0_quantize_ref(x), cols)             # float64 [rows, cols]
        for T in range(1, 18):
            X = rng.standard_normal((T, cols)).astype(np.float32)
            Xr = _activations_ref(X, vnni)
            ref = Xr @ W.T
            got = Q.matmul(w, X)
            assert got.shape == (T, rows) and got.dtype == np.float32
            scale = np.abs(Xr) @ np.abs(W).T + 1e-30    # error scales with |x||w|
            assert (np.abs(got - ref) / scale).max() < 2e-6, (T, threads)
    finally:
        Q.set_threads(2)


@pytest.mark.parametrize("vnni", KERNELS)
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("rows,cols", [(1, 64), (7, 40), (33, 172), (130, 2048), (65, 5632)])
def test_one_token_kernels(vnni, threads, rows, cols):
    """Float kernel: x as is. VNNI kernel: x quantized to Q8_0 first (llama.cpp's
    quantize_row_q8_0), then exact integer dots: compare with that in float64."""
    Q.set_threads(threads)
    try:
        w_src = _hard_rows(rows, cols)
        w = Q.quantize(w_src)
        W = q8_0_dequantize_ref(*q8_0_quantize_ref(w_src), cols)
        x = rng.standard_normal(cols).astype(np.float32)
        got = Q.matvec(w, x, vnni=vnni)
        uses_int8 = vnni
        xr = q8_0_dequantize_ref(*q8_0_quantize_ref(x[None, :]), cols)[0] if uses_int8 else x
        ref = W @ xr.astype(np.float64)
        scale = np.abs(W) @ np.abs(xr.astype(np.float64)) + 1e-30
        assert (np.abs(got - ref) / scale).max() < 2e-6
        if uses_int8:  # and the int8 activations stay within their quantization error of x
            exact = W @ x.astype(np.float64)
            assert (np.abs(got - exact) / (np.abs(W) @ np.abs(x.astype(np.float64)) + 1e-30)).max() < 0.01
    finally:
        Q.set_threads(2)


@pytest.mark.parametrize("vnni", KERNELS)
@pytest.mark.parametrize("acc64", [False, True])
@pytest.mark.parametrize("rows,cols", [(37, 64), (130, 288), (45, 96), (33, 480), (100, 2048),
                                       (20, 172), (50, 5632)])
def test_small_batch_rows_equal_one_token(vnni, acc64, rows, cols, monkeypatch):
    """Continuous batching: on VNNI CPUs row t of matmul(w, X) is bit for bit matvec(w, X[t]),
    whatever the other rows (rows not a multiple of 16: a short last group, written through a
    buffer; odd block counts too). Without VNNI the 4-token float kernel runs: close, not
    equal. Both within float rounding of the float64 product with the activations they
    multiply by."""
    monkeypatch.setattr(Q, "VNNI", vnni)
    w_src = _hard_rows(rows, cols)
    w = Q.quantize(w_src)
    W = q8_0_dequantize_ref(*q8_0_quantize_ref(w_src), cols)
    dtype = np.float64 if acc64 else np.float32
    for T in (2, 3, 5, 8, 17, 31):
        X = rng.standard_normal((T, cols)).astype(np.float32) * rng.choice([0.01, 1, 50], (T, 1)).astype(np.float32)
        got = Q.matmul(w, X, acc64=acc64)
        assert got.shape == (T, rows) and got.dtype == dtype
        one = np.stack([Q.matvec(w, X[t], acc64=acc64) for t in range(T)])
        Xr = _activations_ref(X, vnni)
        scale = np.abs(Xr) @ np.abs(W).T + 1e-30
        if vnni:
            assert np.array_equal(got, one), T
            assert np.array_equal(Q.matmul(w, X[::-1], acc64=acc64), got[::-1])  # order of the batch
            exact = X.astype(np.float64) @ W.T   # the int8 activations' own error: as llama.cpp
            assert (np.abs(got - exact) / (np.abs(X.astype(np.float64)) @ np.abs(W).T + 1e-30)).max() < 0.01
        else:
            assert (np.abs(got - one) / scale).max() < 4e-6, T
        assert (np.abs(got - Xr @ W.T) / scale).max() < 2e-6, T


@pytest.mark.parametrize("vnni", KERNELS)
@pytest.mark.parametrize("acc64", [False, True])
@pytest.mark.parametrize("rows,cols", [(37, 64), (45, 96), (20, 172), (100, 2048)])
def test_activations_given_quantized(vnni, acc64, rows, cols, monkeypatch):
    """A q8_0 request: matmul(w, quantize(X)). On VNNI CPUs the same bits as matmul(w, X) (the
    kernel would quantize X to those very blocks); elsewhere the product with the dequantized
    activations. Both against the float64 reference of the activations they stand for."""
    monkeypatch.setattr(Q, "VNNI", vnni)
    w_src = _hard_rows(rows, cols)
    w = Q.runnable(Q.quantize(w_src))
    W = q8_0_dequantize_ref(*q8_0_quantize_ref(w_src), cols)
    for T in (1, 3, 9):
        X = rng.standard_normal((T, cols)).astype(np.float32) * rng.choice([0.01, 1, 50], (T, 1)).astype(np.float32)
        got = Q.matmul(w, Q.quantize(X), acc64=acc64)
        assert got.shape == (T, rows) and got.dtype == (np.float64 if acc64 else np.float32)
        if vnni:
            assert np.array_equal(got, Q.matmul(w, X, acc64=acc64)), T
        Xr = _activations_ref(X, True)  # what the blocks stand for, either way
        scale = np.abs(Xr) @ np.abs(W).T + 1e-30
        assert (np.abs(got - Xr @ W.T) / scale).max() < 4e-6, T


@pytest.mark.parametrize("vnni", KERNELS)
def test_large_batch(vnni, monkeypatch):
    """Prompts: VNNI CPUs run the same kernel as for one token (int8 activations, each row
    bit for bit matvec's); elsewhere float32 SGEMM on dequantized tiles."""
    monkeypatch.setattr(Q, "VNNI", vnni)
    x = rng.standard_normal((300, 172)).astype(np.float32)
    w = Q.quantize(x)
    W = q8_0_dequantize_ref(*q8_0_quantize_ref(x), 172)
    for T in (32, 64, 130):
        X = rng.standard_normal((T, 172)).astype(np.float32)
        got = Q.matmul(w, X)
        Xr = _activations_ref(X, vnni)
        scale = np.abs(Xr) @ np.abs(W).T + 1e-30
        assert (np.abs(got - Xr @ W.T) / scale).max() < (2e-6 if vnni else 2e-5)
        if vnni:
            assert np.array_equal(got[[0, T // 2, T - 1]],
                                  np.stack([Q.matvec(w, X[t]) for t in (0, T // 2, T - 1)]))


def test_bf16_conversion_kernels_round_to_nearest_even():
    from numba import njit

    @njit
    def to_bf16(a):
        out = np.empty(a.shape[0], np.uint16)
        for i in range(a.shape[0]):
            out[i] = Q.f32_to_bf16_bits(a[i])
        return out

    @njit
    def from_bf16(b):
        out = np.empty(b.shape[0], np.float32)
        for i in range(b.shape[0]):
            out[i] = Q.bf16_bits_to_f32(b[i])
        return out

    a = np.concatenate([rng.standard_normal(5000).astype(np.float32),
                        np.array([1 + 2 ** -8, 1 + 3 * 2 ** -8, -1 - 2 ** -8, 1e-40], np.float32)])
    assert np.array_equal(from_bf16(to_bf16(a)), bf16_round_ref(a).astype(np.float32))



def test_tiles_hold_the_same_weights():
    """The VNNI layout (16-row groups, rows padded) gives back the row-major tensor exactly, and
    the embedding lookup of tied weights reads the same rows from either."""
    rng = np.random.default_rng(5)
    for rows, cols in [(1, 32), (37, 100), (64, 256)]:
        w = Q.quantize(rng.standard_normal((rows, cols)).astype(np.float32))
        t = Q.tiles(w)
        assert t.shape == w.shape and t.q.shape[0] == -(-rows // 16)
        back = Q.untiled(t)
        assert np.array_equal(back.q, w.q) and np.array_equal(back.d, w.d) and back.cols == w.cols
        idx = np.array([rows - 1, 0, rows // 2])
        assert np.array_equal(Q.dequantize(t, idx), Q.dequantize(w, idx))


@pytest.mark.skipif(not Q.VNNI, reason="tiles are the VNNI kernel's layout")
def test_tiles_in_huge_pages_are_the_same_weights(monkeypatch):
    """Held weights in the huge-page arena: each tiles array 64-byte aligned, none overlapping
    another (several per chunk, and one larger than a chunk), the same bytes as NumPy-memory
    tiles, and the arena's mappings advised for huge pages (smaps: THPeligible)."""
    monkeypatch.setattr(Q.Arena, "CHUNK", 4 << 20)
    arena = Q.Arena()
    rng = np.random.default_rng(9)
    ws = [Q.quantize(rng.standard_normal((r, 256)).astype(np.float32)) for r in (40, 16, 17000, 300, 3)]
    held = [Q.runnable(w, arena) for w in ws]
    for w, h in zip(ws, held):
        t = Q.tiles(w)
        assert h.q.ctypes.data % 64 == 0
        np.testing.assert_array_equal(h.q, t.q)
        np.testing.assert_array_equal(h.d, t.d)
        x = rng.standard_normal(256).astype(np.float32)
        np.testing.assert_array_equal(Q.matvec(h, x), Q.matvec(t, x))
    spans = sorted((h.q.ctypes.data, h.q.ctypes.data + h.q.nbytes) for h in held)
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))
    for k, h in enumerate(held):  # writing one leaves the others as they were
        h.q[...] = k
    assert all((h.q == k).all() for k, h in enumerate(held))
    thp = "/sys/kernel/mm/transparent_hugepage/enabled"
    if not os.path.exists(thp) or "[never]" in open(thp).read():
        return  # (no huge pages on this host: plain memory, checked above)
    eligible, start = {}, None
    for line in open("/proc/self/smaps"):
        head = line.split()
        if "-" in head[0] and len(head) >= 5:
            start, end = (int(v, 16) for v in head[0].split("-"))
        elif head[0] == "THPeligible:":
            eligible[(start, end)] = head[1] == "1"
    for a, b in spans:
        region = [ok for (s, e), ok in eligible.items() if s <= a < e]
        assert region == [True], (hex(a), region)


@pytest.mark.skipif(not Q.VNNI, reason="tiles are the VNNI kernel's layout")
def test_an_arena_is_unmapped_with_its_weights():
    """Weights loaded into an arena and then dropped, arena and all, leave no mapping behind
    (a worker taking upload after upload must not keep the space of the ones it dropped)."""
    import gc

    def mapped(addr):
        for line in open("/proc/self/maps"):
            s, e = (int(v, 16) for v in line.split()[0].split("-"))
            if s <= addr < e:
                return True
        return False

    arena = Q.Arena()
    w = Q.runnable(Q.quantize(np.ones((64, 256), np.float32)), arena)
    addr = w.q.ctypes.data
    assert mapped(addr)
    del w, arena
    gc.collect()
    assert not mapped(addr)
