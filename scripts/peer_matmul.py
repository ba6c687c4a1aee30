#!/usr/bin/env python3
"""Peer measurement for `cargo xtask bench`: f32 matmul GFLOP/s with torch, else numpy.

Prints one JSON object on stdout. Exit status 3 (with {"error": ...}) when neither torch
nor numpy is importable, so the caller can say why there is no peer figure.

The thread count is pinned to what lathe uses (--threads): torch.set_num_threads for torch,
threadpoolctl (when installed) for numpy's BLAS; the caller also sets OMP_NUM_THREADS,
OPENBLAS_NUM_THREADS and MKL_NUM_THREADS before the interpreter starts, which is what makes
OpenBLAS honour the limit when threadpoolctl is absent.
"""

import argparse
import json
import sys
import time


def blas_info():
    """What BLAS numpy/torch runs, as threadpoolctl sees it (None when not installed)."""
    try:
        import threadpoolctl
    except ImportError:
        return None
    return [
        {
            k: info.get(k)
            for k in ("internal_api", "version", "architecture", "num_threads", "threading_layer")
        }
        for info in threadpoolctl.threadpool_info()
    ]


def time_runs(op, warmup, runs):
    """Best and median wall time of `op` after `warmup` untimed calls."""
    for _ in range(warmup):
        op()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        op()
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[0], times[len(times) // 2]


def bench_torch(n, threads, warmup, runs):
    import torch

    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=gen, dtype=torch.float32)
    b = torch.randn(n, n, generator=gen, dtype=torch.float32)
    best, median = time_runs(lambda: torch.matmul(a, b), warmup, runs)
    return {
        "library": "torch",
        "version": torch.__version__,
        "threads": torch.get_num_threads(),
        "best_s": best,
        "median_s": median,
        "blas": blas_info(),
    }


def bench_numpy(n, threads, warmup, runs):
    import numpy as np

    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)

    def op():
        return np.matmul(a, b)

    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        best, median = time_runs(op, warmup, runs)
        threads_used = threads  # from OPENBLAS_NUM_THREADS / OMP_NUM_THREADS set by the caller
    else:
        with threadpool_limits(limits=threads, user_api="blas"):
            best, median = time_runs(op, warmup, runs)
            info = blas_info() or []
            threads_used = max((i.get("num_threads") or 0 for i in info), default=threads)
    return {
        "library": "numpy",
        "version": np.__version__,
        "threads": threads_used,
        "best_s": best,
        "median_s": median,
        "blas": blas_info(),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()

    result = None
    errors = []
    for bench in (bench_torch, bench_numpy):
        try:
            result = bench(args.size, args.threads, args.warmup, args.runs)
            break
        except ImportError as e:
            errors.append(str(e))
    if result is None:
        print(json.dumps({"error": "neither torch nor numpy importable: " + "; ".join(errors)}))
        return 3

    n = args.size
    result["size"] = [n, n, n]
    result["gflops"] = 2.0 * n * n * n / result["best_s"] / 1e9
    result["python"] = sys.version.split()[0]
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
