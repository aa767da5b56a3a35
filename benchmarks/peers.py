#!/usr/bin/env python3
"""The attention layer of bench_layer in other libraries, timed the same way.

One causal attention layer without bias or RoPE: Q, K, V, O projections
(weights ~ U(-1, 1) / sqrt(d_in)), scaled dot-product attention with
n_heads query heads and n_kv_heads key/value heads, on x of shape [B, T, d].

Peers (each runs in the interpreter that has it):
  pytorch2   PyTorch 2.x: nn.Linear projections and
             F.scaled_dot_product_attention(is_causal=True); forward under
             torch.inference_mode(), forward+backward with dx and every
             weight gradient (gradients accumulate, as libmasa's ADD mode).
  pytorch1   PyTorch 1.x (Debian's 1.13): nn.MultiheadAttention(bias=False,
             batch_first=True) with a boolean causal mask, need_weights=False;
             forward in eval mode without grad, forward+backward in train mode
             (no dropout). No GQA in nn.MultiheadAttention: GQA shapes are
             skipped.
  onnxruntime  ONNX Runtime CPU, forward only: a graph of MatMul projections
             around the opset-23 Attention op (q_num_heads, kv_num_heads,
             is_causal), or com.microsoft MultiHeadAttention when the
             runtime lacks it (no GQA then).

Each result is one JSON line on stdout, with the shape names and FLOP counts
of bench_layer (forward = P + A, forward+backward = 3 P + 3.5 A; see
bench_layer.c). Progress goes to stderr.

  peers.py --peer NAME [--threads 2] [--reps 7] [--budget 20] [--min-reps 2]
           [--quick] [--shape NAME]
  peers.py --self-check [--peer NAME]

--with-self-check makes a timing run check its peer first (exit 1 on a
mismatch, before any timing).

--self-check runs every peer available in this interpreter (or the one named)
on a tiny shape and compares its forward output, and for the PyTorch peers
dx, with a float64 numpy reference; it exits 1 on a mismatch.
"""
import argparse
import json
import math
import statistics
import sys
import time

import numpy as np

FULL_SHAPES = [(4, 512, 512, 8, 8), (1, 2048, 1024, 16, 16),
               (1, 8192, 512, 8, 8), (1, 2048, 1024, 16, 4),
               (1, 512, 512, 8, 8)]
QUICK_SHAPES = [(2, 64, 64, 4, 4), (1, 96, 64, 4, 2)]
CHECK_SHAPES = [(2, 7, 16, 4, 4), (1, 9, 16, 4, 2)]


def shape_name(s):
    B, T, d, H, KV = s
    name = f"B{B}-T{T}-d{d}-H{H}"
    return name if KV == H else f"{name}-KV{KV}"


def flops(s):
    B, T, d, H, KV = s
    hd = d // H
    dq, dkv = H * hd, KV * hd
    proj = 2.0 * B * T * (d * dq + 2 * d * dkv + dq * d)
    attn = 4.0 * B * H * T * T * hd / 2.0  # causal
    return {"fwd": proj + attn, "fwd+bwd": 3 * proj + 3.5 * attn}


def make_data(s, seed=0):
    """float32 weights (d_in x d_out, row vectors: y = x W) and x, dy."""
    B, T, d, H, KV = s
    hd = d // H
    rng = np.random.default_rng(seed)

    def w(din, dout):
        return (rng.uniform(-1, 1, (din, dout)) / math.sqrt(din)).astype(
            np.float32)

    return {"wq": w(d, H * hd), "wk": w(d, KV * hd), "wv": w(d, KV * hd),
            "wo": w(H * hd, d),
            "x": rng.uniform(-1, 1, (B, T, d)).astype(np.float32),
            "dy": (0.01 * rng.uniform(-1, 1, (B, T, d))).astype(np.float32)}


def reference(s, data):
    """float64 numpy forward: y, and dx for the loss sum(y * dy)."""
    B, T, d, H, KV = s
    hd, g = d // H, H // KV
    x = data["x"].astype(np.float64)
    W = {k: data[k].astype(np.float64) for k in ("wq", "wk", "wv", "wo")}
    dy = data["dy"].astype(np.float64)
    q = (x @ W["wq"]).reshape(B, T, H, hd).transpose(0, 2, 1, 3)
    k = (x @ W["wk"]).reshape(B, T, KV, hd).transpose(0, 2, 1, 3)
    v = (x @ W["wv"]).reshape(B, T, KV, hd).transpose(0, 2, 1, 3)
    k = np.repeat(k, g, axis=1)
    v = np.repeat(v, g, axis=1)
    sc = q @ k.transpose(0, 1, 3, 2) / math.sqrt(hd)
    sc = np.where(np.tril(np.ones((T, T), bool)), sc, -np.inf)
    p = np.exp(sc - sc.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    a = (p @ v).transpose(0, 2, 1, 3).reshape(B, T, H * hd)
    y = a @ W["wo"]
    # backward
    da = (dy @ W["wo"].T).reshape(B, T, H, hd).transpose(0, 2, 1, 3)
    dp = da @ v.transpose(0, 1, 3, 2)
    dv = p.transpose(0, 1, 3, 2) @ da
    ds = p * (dp - (dp * p).sum(-1, keepdims=True)) / math.sqrt(hd)
    dq = ds @ k
    dk = ds.transpose(0, 1, 3, 2) @ q
    dk = dk.reshape(B, KV, g, T, hd).sum(2)
    dv = dv.reshape(B, KV, g, T, hd).sum(2)

    def flat(t):
        return t.transpose(0, 2, 1, 3).reshape(B, T, -1)

    dx = (flat(dq) @ W["wq"].T + flat(dk) @ W["wk"].T
          + flat(dv) @ W["wv"].T)
    return y, dx


# ---------------------------------------------------------------- peers

class Pytorch2:
    name = "pytorch2"

    def __init__(self, threads):
        import torch
        if int(torch.__version__.split(".")[0]) < 2:
            raise RuntimeError(f"torch {torch.__version__} is not 2.x")
        self.torch = torch
        torch.set_num_threads(threads)
        self.version = torch.__version__
        self.impl = "pytorch-" + torch.__version__.split("+")[0]

    def supports(self, s):
        return True

    def build(self, s, data):
        torch = self.torch
        import torch.nn.functional as F
        B, T, d, H, KV = s
        hd = d // H
        lin = {}
        for k in ("wq", "wk", "wv", "wo"):
            w = torch.from_numpy(data[k])
            m = torch.nn.Linear(w.shape[0], w.shape[1], bias=False)
            with torch.no_grad():
                m.weight.copy_(w.T)
            lin[k] = m
        gqa = KV != H
        try:
            F.scaled_dot_product_attention(
                torch.zeros(1, 2, 1, 2), torch.zeros(1, 1, 1, 2),
                torch.zeros(1, 1, 1, 2), enable_gqa=True)
            native_gqa = True
        except TypeError:
            native_gqa = False

        def layer(x):
            q = lin["wq"](x).view(B, T, H, hd).transpose(1, 2)
            k = lin["wk"](x).view(B, T, KV, hd).transpose(1, 2)
            v = lin["wv"](x).view(B, T, KV, hd).transpose(1, 2)
            if gqa and native_gqa:
                a = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                   enable_gqa=True)
            else:
                if gqa:
                    k = k.repeat_interleave(H // KV, dim=1)
                    v = v.repeat_interleave(H // KV, dim=1)
                a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            return lin["wo"](a.transpose(1, 2).reshape(B, T, H * hd))

        x = torch.from_numpy(data["x"])
        xg = x.clone().requires_grad_(True)
        dy = torch.from_numpy(data["dy"])

        def fwd():
            with torch.inference_mode():
                return layer(x)

        def fwd_bwd():
            xg.grad = None
            y = layer(xg)
            y.backward(dy)
            return y, xg.grad

        return {"fwd": fwd, "fwd+bwd": fwd_bwd}


class Pytorch1:
    name = "pytorch1"

    def __init__(self, threads):
        import torch
        if int(torch.__version__.split(".")[0]) != 1:
            raise RuntimeError(f"torch {torch.__version__} is not 1.x")
        self.torch = torch
        torch.set_num_threads(threads)
        self.version = torch.__version__
        self.impl = "pytorch-" + torch.__version__.split("+")[0]

    def supports(self, s):
        return s[3] == s[4]

    def build(self, s, data):
        torch = self.torch
        B, T, d, H, KV = s
        mha = torch.nn.MultiheadAttention(d, H, bias=False, batch_first=True)
        with torch.no_grad():
            w_in = np.concatenate([data["wq"].T, data["wk"].T,
                                   data["wv"].T], axis=0)
            mha.in_proj_weight.copy_(torch.from_numpy(w_in))
            mha.out_proj.weight.copy_(torch.from_numpy(data["wo"].T))
        mask = torch.triu(torch.ones(T, T, dtype=torch.bool), diagonal=1)
        x = torch.from_numpy(data["x"])
        xg = x.clone().requires_grad_(True)
        dy = torch.from_numpy(data["dy"])

        def fwd():
            mha.eval()
            with torch.no_grad():
                return mha(x, x, x, attn_mask=mask, need_weights=False)[0]

        def fwd_bwd():
            mha.train()
            xg.grad = None
            y = mha(xg, xg, xg, attn_mask=mask, need_weights=False)[0]
            y.backward(dy)
            return y, xg.grad

        return {"fwd": fwd, "fwd+bwd": fwd_bwd}


class OnnxRuntime:
    name = "onnxruntime"

    def __init__(self, threads):
        import onnx  # noqa: F401
        import onnxruntime as ort
        self.ort = ort
        self.threads = threads
        self.version = ort.__version__
        self.impl = "onnxruntime-" + ort.__version__
        self.op = None

    def supports(self, s):
        return True

    def _model(self, s, data, op):
        import onnx
        from onnx import TensorProto, helper, numpy_helper
        B, T, d, H, KV = s
        hd = d // H
        x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [B, T, d])
        y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [B, T, d])
        inits = [numpy_helper.from_array(data[k], k)
                 for k in ("wq", "wk", "wv", "wo")]
        nodes = [helper.make_node("MatMul", ["x", "wq"], ["q"]),
                 helper.make_node("MatMul", ["x", "wk"], ["k"]),
                 helper.make_node("MatMul", ["x", "wv"], ["v"])]
        if op == "Attention-23":
            nodes.append(helper.make_node(
                "Attention", ["q", "k", "v"], ["a"], q_num_heads=H,
                kv_num_heads=KV, is_causal=1, scale=1.0 / math.sqrt(hd)))
            opsets = [helper.make_opsetid("", 23)]
        else:  # com.microsoft MultiHeadAttention, no GQA
            if KV != H:
                raise RuntimeError("MultiHeadAttention has no GQA")
            nodes.append(helper.make_node(
                "MultiHeadAttention", ["q", "k", "v"], ["a"],
                domain="com.microsoft", num_heads=H, unidirectional=1))
            opsets = [helper.make_opsetid("", 17),
                      helper.make_opsetid("com.microsoft", 1)]
        nodes.append(helper.make_node("MatMul", ["a", "wo"], ["y"]))
        graph = helper.make_graph(nodes, "attention_layer", [x], [y], inits)
        model = helper.make_model(graph, opset_imports=opsets)
        model.ir_version = min(model.ir_version, 10)
        onnx.checker.check_model(model)
        return model.SerializeToString()

    def build(self, s, data):
        ort = self.ort
        so = ort.SessionOptions()
        so.intra_op_num_threads = self.threads
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = \
            ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        errors = []
        for op in ("Attention-23", "MultiHeadAttention"):
            try:
                sess = ort.InferenceSession(self._model(s, data, op), so,
                                            providers=["CPUExecutionProvider"])
                sess.run(None, {"x": data["x"]})
                self.op = op
                break
            except Exception as e:  # the runtime lacks the op: try the next
                errors.append(f"{op}: {e}")
        else:
            raise RuntimeError("; ".join(errors))
        x = data["x"]

        def fwd():
            return sess.run(None, {"x": x})[0]

        return {"fwd": fwd}


PEERS = {"pytorch2": Pytorch2, "pytorch1": Pytorch1,
         "onnxruntime": OnnxRuntime}


def load_peer(name, threads):
    try:
        return PEERS[name](threads), None
    except Exception as e:  # not installed in this interpreter
        return None, f"{type(e).__name__}: {e}"


# ---------------------------------------------------------------- modes

def time_fn(fn, reps, budget, min_reps):
    """(times, cold): a warm-up run, then as many as fit in budget seconds
    (at least min_reps, at most reps). With min_reps <= 1, a warm-up longer
    than the budget is the one measurement (cold: True), so the slowest
    peers fit in the run's time."""
    t0 = time.perf_counter()
    fn()  # warm-up
    warm = time.perf_counter() - t0
    if min_reps <= 1 and warm > budget:
        return [warm], True
    n = max(min_reps, min(reps, int(budget / max(warm, 1e-9))))
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times, False


def bench(peer, args):
    shapes = QUICK_SHAPES if args.quick else FULL_SHAPES
    info = {"bench": "layer", "kind": "info", "impl": peer.impl,
            "peer": peer.name, "version": peer.version,
            "threads": args.threads, "python": sys.version.split()[0]}
    print(json.dumps(info), flush=True)
    found = False
    for s in shapes:
        name = shape_name(s)
        if args.shape and args.shape != name:
            continue
        found = True
        B, T, d, H, KV = s
        base = {"bench": "layer", "impl": peer.impl, "peer": peer.name,
                "shape": name, "B": B, "T": T, "d": d, "H": H, "KV": KV,
                "causal": True, "threads": args.threads}
        if not peer.supports(s):
            print(json.dumps({**base, "kind": "skipped",
                              "reason": "no GQA in this API"}), flush=True)
            continue
        fns = peer.build(s, make_data(s))
        fl = flops(s)
        for p, fn in fns.items():
            print(f"peers.py: {peer.name} {name} {p}", file=sys.stderr,
                  flush=True)
            times, cold = time_fn(fn, args.reps, args.budget,
                                  args.min_reps)
            ms = 1e3 * statistics.median(times)
            rec = {**base, "kind": "time", "pass": p, "flop": fl[p],
                   "reps": len(times), "ms": round(ms, 4),
                   "min_ms": round(1e3 * min(times), 4),
                   "gflops": round(fl[p] / ms * 1e-6, 3), "cold": cold}
            if getattr(peer, "op", None):
                rec["op"] = peer.op
            print(json.dumps(rec), flush=True)
        del fns
    if not found:
        print(f"peers.py: no shape named {args.shape}", file=sys.stderr)
        return 2
    return 0


def rel_err(a, b):
    a = np.asarray(a, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def check_peer(peer):
    """Self-check records of one loaded peer; True when all agree."""
    ok = True
    for s in CHECK_SHAPES:
        rec = {"kind": "self_check", "peer": peer.name, "impl": peer.impl,
               "shape": shape_name(s)}
        if not peer.supports(s):
            print(json.dumps({**rec, "status": "skipped"}), flush=True)
            continue
        data = make_data(s, seed=1)
        y_ref, dx_ref = reference(s, data)
        fns = peer.build(s, data)
        errs = {"y": rel_err(np.asarray(fns["fwd"]()), y_ref)}
        if "fwd+bwd" in fns:
            y, dx = fns["fwd+bwd"]()
            errs["y_train"] = rel_err(y.detach().numpy(), y_ref)
            errs["dx"] = rel_err(dx.numpy(), dx_ref)
        good = all(e < 1e-4 for e in errs.values())
        ok &= good
        rec.update({"status": "ok" if good else "MISMATCH",
                    "rel_err": {k: float(f"{v:.3g}")
                                for k, v in errs.items()}})
        if getattr(peer, "op", None):
            rec["op"] = peer.op
        print(json.dumps(rec), flush=True)
    return ok


def self_check(names, threads):
    ok = True
    for name in names:
        peer, why = load_peer(name, threads)
        if peer is None:
            print(json.dumps({"kind": "self_check", "peer": name,
                              "status": "unavailable", "reason": why}))
            continue
        ok &= check_peer(peer)
    return 0 if ok else 1


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--peer", choices=sorted(PEERS))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--min-reps", type=int, default=2)
    ap.add_argument("--budget", type=float, default=20.0,
                    help="seconds per shape and pass (default 20)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--shape")
    ap.add_argument("--self-check", action="store_true")
    ap.add_argument("--with-self-check", action="store_true",
                    help="check the peer (as --self-check) before timing")
    args = ap.parse_args()
    if args.self_check:
        return self_check([args.peer] if args.peer else sorted(PEERS),
                          args.threads)
    if not args.peer:
        ap.error("--peer is required (or --self-check)")
    peer, why = load_peer(args.peer, args.threads)
    if peer is None:
        print(json.dumps({"bench": "layer", "kind": "unavailable",
                          "peer": args.peer, "reason": why}), flush=True)
        return 3
    if args.with_self_check and not check_peer(peer):
        return 1
    return bench(peer, args)


if __name__ == "__main__":
    sys.exit(main())
