"""Kernel experiments behind quant/q8_0.py's choices, measured in one run on this machine.

1. Ways to write the Q8_0 matrix-vector product in Numba (TinyLlama's FFN shape, a working set
   far larger than the caches), as GB/s of weights streamed, against the read bandwidth:
     flat     our kernel: one loop over the row, acc += q[i] * ds[i >> 5] * x[i]
     blocks   the same maths as a loop over blocks with an inner 32-element reduction
     int8     llama.cpp's way: activations quantized to Q8_0, int8 x int8 dots per block
     int8flat int8 x int8 products in a flat loop, scales per element
2. Batched products: T tokens through the 4-token kernel vs dequantized tiles into SGEMM.
3. Batches on VNNI CPUs: T = 1..16 decoding sequences and T = 32..512 prompt tokens through
   matmul (the 16-rows-per-vector VNNI kernel, rows bit for bit matvec's) over TinyLlama's FFN
   matrices, four of each shape cycled (46 MB, beyond the L3) so that every call streams its
   weights from RAM: ms per call, the cost of batching time(T) / time(1), and the float paths
   at the same T (the 4-token kernel _matmul4 below 32, dequantized tiles into SGEMM from 32).

    .venv/bin/python -m bench.kernels [--threads 1,2] [--only continuous]
"""
from __future__ import annotations

import statistics
import time

import click
import numpy as np
from numba import njit, prange

from bench.engine import bandwidth
from quant import q8_0 as Q
from quant.q8_0 import _row_scales


@njit(parallel=True, fastmath=True, cache=True)
def mv_blocks(q, d, x, out):
    R, C = q.shape
    for r in prange(R):
        ds = np.empty(d.shape[1], np.float32)
        _row_scales(d[r], ds)
        qr = q[r]
        acc = np.float32(0.0)
        for b in range(C // 32):
            s = np.float32(0.0)
            for j in range(b * 32, b * 32 + 32):
                s += np.float32(qr[j]) * x[j]
            acc += s * ds[b]
        out[r] = acc


@njit(parallel=True, fastmath=True, cache=True)
def mv_int8(q, d, xq, xd, out):
    R, C = q.shape
    for r in prange(R):
        ds = np.empty(d.shape[1], np.float32)
        _row_scales(d[r], ds)
        qr = q[r]
        acc = np.float32(0.0)
        for b in range(C // 32):
            s = np.int32(0)
            for j in range(b * 32, b * 32 + 32):
                s += np.int32(qr[j]) * np.int32(xq[j])
            acc += np.float32(s) * ds[b] * xd[b]
        out[r] = acc


@njit(parallel=True, fastmath=True, cache=True)
def mv_int8flat(q, d, xq, xd, out):
    R, C = q.shape
    for r in prange(R):
        ds = np.empty(d.shape[1], np.float32)
        _row_scales(d[r], ds)
        qr = q[r]
        acc = np.float32(0.0)
        for i in range(C):
            acc += np.float32(np.int16(qr[i]) * np.int16(xq[i])) * (ds[i >> 5] * xd[i >> 5])
        out[r] = acc


def _median_time(f, reps=5):
    f()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def continuous_batching(rng, threads=2, reps=7):
    Q.set_threads(threads)
    print(f"\ncontinuous batching, {threads} threads, VNNI {Q.VNNI}: ms per call (median of {reps}), "
          f"cost vs T=1, the 4-token float kernel at the same T")
    for R, C in ((5632, 2048), (2048, 5632)):
        ws = [Q.quantize((rng.standard_normal((R, C)) * 0.02).astype(np.float32)) for _ in range(4)]
        rs = [Q.runnable(w) for w in ws]  # as nodes hold them (repacked on VNNI CPUs)
        t1 = None
        for T in (1, 2, 4, 8, 16, 32, 128, 512):
            X = rng.standard_normal((T, C)).astype(np.float32)
            n = reps if T <= 32 else 3
            X4 = np.zeros((4, C), np.float32)
            o4 = np.empty((4, R), np.float32)

            def old(w):  # the float paths: groups of four tokens through _matmul4, or SGEMM
                if T >= Q._GEMM_MIN_T:
                    return Q._gemm(w.q, w.d, X, np.empty((T, R), np.float32))
                for k in range(0, T, 4):
                    X4[:min(4, T - k)] = X[k:k + 4]
                    Q._matmul4(w.q, w.d, X4, o4, np.float32(0))
            new = _median_time(lambda: [Q.matmul(r, X) for r in rs], n) / len(rs)
            t1 = t1 or new
            was = _median_time(lambda: [old(w) for w in ws], n) / len(ws) if T > 1 else None
            print(f"  {R}x{C} T={T:<3} {new * 1e3:7.3f} ms  x{new / t1:6.2f} of T=1  "
                  f"{new / T * 1e3:6.3f} ms/token" +
                  (f"   {'SGEMM' if T >= Q._GEMM_MIN_T else '_matmul4'} {was * 1e3:7.3f} ms "
                   f"({was / new:4.2f}x slower)" if was else ""), flush=True)


@click.command()
@click.option("--threads", default="1,2", show_default=True)
@click.option("--only", type=click.Choice(["continuous"]), default=None,
              help="run only section 3 (a few seconds)")
def main(threads, only):
    """Print GB/s of each matvec variant and the batched crossover, as ratios in one run."""
    rng = np.random.default_rng(0)
    if only == "continuous":
        continuous_batching(rng)
        return
    R, C, n = 5632, 2048, 24      # 24 matrices: ~290 MB, far beyond the 32 MB L3
    ws = [Q.quantize((rng.standard_normal((R, C)) * 0.02).astype(np.float32)) for _ in range(n)]
    x = rng.standard_normal(C).astype(np.float32)
    xw = Q.quantize(x[None, :])
    xq, xd = xw.q[0], (xw.d[0].view(np.float16)).astype(np.float32)
    out = np.empty(R, np.float32)
    nbytes = sum(w.nbytes for w in ws)
    variants = {
        "flat": lambda w: Q._matvec(w.q, w.d, x, out, np.float32(0)),
        "blocks": lambda w: mv_blocks(w.q, w.d, x, out),
        "int8": lambda w: mv_int8(w.q, w.d, xq, xd, out),
        "int8flat": lambda w: mv_int8flat(w.q, w.d, xq, xd, out),
    }
    for th in map(int, threads.split(",")):
        bw = bandwidth(th)
        Q.set_threads(th)
        print(f"\n{th} thread(s): read bandwidth {bw / 1e9:.1f} GB/s")
        for name, f in variants.items():
            dt = _median_time(lambda: [f(w) for w in ws], reps=3)
            print(f"  matvec {name:<9} {nbytes / dt / 1e9:6.1f} GB/s  {nbytes / dt / bw:5.0%} of bandwidth")
        w, r = ws[0], Q.runnable(ws[0])
        t1 = _median_time(lambda: Q.matmul(r, x[None, :]))
        for T in (2, 4, 8, 12, 16, 32, 128, 512):
            X = rng.standard_normal((T, C)).astype(np.float32)
            small = _median_time(lambda: Q._matmul4(w.q, w.d, X[:4] if T >= 4 else np.resize(X, (4, C)),
                                                     np.empty((4, R), np.float32), np.float32(0))) * -(-T // 4)
            gemm = _median_time(lambda: Q._gemm(w.q, w.d, X, np.empty((T, R), np.float32)))
            print(f"  T={T:<4} 4-token kernel {small * 1e3:7.2f} ms  SGEMM tiles {gemm * 1e3:7.2f} ms"
                  f"  (T x matvec {T * t1 * 1e3:7.2f} ms)  SGEMM {2 * T * R * C / gemm / 1e9:6.1f} GFLOP/s")
    continuous_batching(rng)


if __name__ == "__main__":
    main()
