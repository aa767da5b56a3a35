#!/usr/bin/env python3
"""Python's share of one decode call: masa.decode() against the bare ctypes
call it makes, on one dense layer of SmolLM2-135M's shape (d_model 576, 9
query heads, 3 key/value heads, RoPE), one new token per call. Prints the
median of each over --calls calls, the cache growing from 0 to --calls
positions for each. README's "Throughput" of the pretrained results quotes it.

    PYTHONPATH=bindings/python python3 benchmarks/decode_overhead.py [--threads 2] [--calls 1500]
"""

import argparse
import statistics
import time

import numpy as np

import masa
from masa import _lib
from masa._arrays import pointer, workspace
from masa.decode import KVCache, decode


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--calls", type=int, default=1500)
    args = ap.parse_args()
    ctx = masa.Context(n_threads=args.threads)
    d = 576
    layer = masa.Layer(ctx, d_model=d, n_heads=9, n_kv_heads=3, causal=True, rope=True)
    rng = np.random.default_rng(0)
    for p in "qkvo":
        rows, cols = layer.projection_shape(p)
        layer.set_dense(p, (rng.standard_normal((rows, cols)) / np.sqrt(rows)).astype(np.float32))
    cache = KVCache(layer, 1, args.calls)
    x = rng.standard_normal((1, 1, d)).astype(np.float32)
    y = np.empty_like(x)

    wrapped = []
    for _ in range(args.calls):
        t = time.perf_counter()
        decode(layer, cache, x, out=y)
        wrapped.append(time.perf_counter() - t)
    cache.reset()
    ws = workspace(layer._size(_lib.lib().masa_layer_decode_workspace_size, 1, 1, "n_new"))
    call = _lib.lib().masa_layer_decode
    args_c = (layer._handle(), cache._handle(), 1, 1, pointer(x), pointer(y), pointer(ws), ws.nbytes)
    bare = []
    for _ in range(args.calls):
        t = time.perf_counter()
        call(*args_c)
        bare.append(time.perf_counter() - t)
    w, b = 1e6 * statistics.median(wrapped), 1e6 * statistics.median(bare)
    print(f"libmasa {masa.version()}, BLIS {masa.blis_arch()}, {args.threads} thread(s), "
          f"{args.calls} calls: masa.decode() {w:.0f} us, bare ctypes call {b:.0f} us, "
          f"Python's share {w - b:.0f} us per call")
    cache.close()
    layer.close()
    ctx.close()


if __name__ == "__main__":
    main()
