#!/usr/bin/env python3
"""Tests of the `masa` tool on small synthetic models (numpy, float64
references). Files are written and read here by a few lines of numpy, not by
libmasa, so the tool's output is checked independently of its own reader.

usage: test_masa_tool.py PATH/TO/masa
"""
import json
import os
import struct
import subprocess
import sys
import tempfile
import zlib

import numpy as np

MASA = None
L, D, DKV = 6, 24, 12  # layers, d_model, GQA key/value width
NP_DTYPE = {"F32": np.float32, "F64": np.float64, "F16": np.float16, "U64": np.uint64}


def write_st(path, tensors, metadata=None):
    """tensors: name -> (dtype name, array)."""
    header, blobs, off = {}, [], 0
    if metadata:
        header["__metadata__"] = metadata
    for name, (dt, a) in tensors.items():
        b = np.ascontiguousarray(a, dtype=NP_DTYPE[dt]).tobytes()
        header[name] = {"dtype": dt, "shape": list(np.shape(a)), "data_offsets": [off, off + len(b)]}
        blobs.append(b)
        off += len(b)
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h + b"".join(blobs))


def read_st(path):
    data = open(path, "rb").read()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    meta = header.pop("__metadata__", {})
    base = 8 + n
    out = {}
    for name, e in header.items():
        b, end = e["data_offsets"]
        out[name] = np.frombuffer(data[base + b:base + end], dtype=NP_DTYPE[e["dtype"]]).reshape(e["shape"])
    return out, meta


def run(*args, ok=True):
    p = subprocess.run([MASA, *args], capture_output=True, text=True)
    if ok and p.returncode != 0:
        raise AssertionError(f"masa {' '.join(args)} exited {p.returncode}: {p.stderr}")
    return p


def model(rng):
    """Layer weights in nn.Linear layout [d_out, d_in]: a shared low-rank
    structure plus per-layer noise, q/k in F32, v in F16, o in F32."""
    base = {p: rng.standard_normal((3, *shape)) for p, shape in
            {"q": (D, D), "k": (DKV, D), "v": (DKV, D), "o": (D, D)}.items()}
    w = {}
    for p in "qkvo":
        for l in range(L):
            mix = rng.standard_normal(3)
            w[(p, l)] = np.tensordot(mix, base[p], 1) + 0.3 * rng.standard_normal(base[p].shape[1:])
    tensors = {}
    for (p, l), a in w.items():
        dt = "F16" if p == "v" else "F32"
        w[(p, l)] = a.astype(NP_DTYPE[dt]).astype(np.float64)  # what the file holds
        tensors[f"model.layers.{l}.self_attn.{p}_proj.weight"] = (dt, a)
    return w, tensors


def groups_of(cfg):
    return [tuple(g) for g in cfg["groups"]]


def check_masa(out, cfg, w, p):
    """Atoms orthonormal; coefficients = <D_s, W_l>; group error = sum of the
    dropped eigenvalues of the group's Gram (float64 reference)."""
    d_in, d_out = cfg["d_in"], cfg["d_out"]
    err_total = 0.0
    for g, (first, count, S) in enumerate(groups_of(cfg)):
        atoms = out[f"masa.{p}.group{g}.atoms"].astype(np.float64)
        coefs = out[f"masa.{p}.group{g}.coefficients"].astype(np.float64)
        assert atoms.shape == (S, d_in, d_out) and coefs.shape == (count, S)
        flat = atoms.reshape(S, -1)
        np.testing.assert_allclose(flat @ flat.T, np.eye(S), atol=2e-5)
        ws = np.stack([w[(p, l)].T.reshape(-1) for l in range(first, first + count)])
        np.testing.assert_allclose(coefs, ws @ flat.T, rtol=1e-4, atol=1e-4 * np.abs(coefs).max())
        eig = np.sort(np.linalg.eigvalsh(ws @ ws.T))[::-1]
        err = ((ws - coefs @ flat) ** 2).sum()
        dropped = eig[S:].clip(0).sum()
        assert abs(err - dropped) <= 1e-4 * eig.sum(), (p, g, err, dropped)
        err_total += err
    return err_total


def w_hat(out, cfg, p, l):
    for g, (first, count, S) in enumerate(groups_of(cfg)):
        if first <= l < first + count:
            atoms = out[f"masa.{p}.group{g}.atoms"].astype(np.float64)
            coefs = out[f"masa.{p}.group{g}.coefficients"].astype(np.float64)
            return np.tensordot(coefs[l - first], atoms, 1)
    raise AssertionError("layer in no group")


def test_fixed_plan_and_plain_residual(tmp, rng):
    w, tensors = model(rng)
    src = os.path.join(tmp, "in.safetensors")
    dst = os.path.join(tmp, "out.safetensors")
    write_st(src, tensors)
    r = 3
    p = run("compress", "--atoms", "2", "--groups", "2", "--rank", str(r), "--quiet", src, dst)
    assert p.stderr == "", p.stderr  # --quiet: no progress
    out, meta = read_st(dst)
    cfg = json.loads(meta["masa.model"])
    assert cfg["format_version"] == 1 and cfg["n_layers"] == L
    assert meta["source"] == src
    for p_ in "qkvo":
        c = cfg["projections"][p_]
        assert c["kind"] == "masa" and c["ranks"] == [r] * L
        assert groups_of(c) == [(0, 3, 2), (3, 3, 2)]
        assert (c["d_in"], c["d_out"]) == ((D, DKV) if p_ in "kv" else (D, D))
        check_masa(out, c, w, p_)
        for l in range(L):
            e = w[(p_, l)].T - w_hat(out, c, p_, l)
            ab = out[f"masa.{p_}.layer{l}.lowrank_a"].astype(np.float64) @ \
                out[f"masa.{p_}.layer{l}.lowrank_b"].astype(np.float64)
            sv = np.linalg.svd(e, compute_uv=False)
            got, want = ((e - ab) ** 2).sum(), (sv[r:] ** 2).sum()
            assert abs(got - want) <= 1e-3 * (sv ** 2).sum(), (p_, l, got, want)
    report = open(dst + ".report.md").read()
    assert "| q | 0-2 | 2 | 3 |" in report and "| all |" in report
    info = run("info", dst).stdout
    assert "compressed model: 6 layers" in info and "k: masa, 24 x 12" in info


def test_whitened_residual_and_calib_file(tmp, rng):
    w, tensors = model(rng)
    src = os.path.join(tmp, "in.safetensors")
    dst = os.path.join(tmp, "w.safetensors")
    cal = os.path.join(tmp, "calib.safetensors")
    write_st(src, tensors)
    cal_t, names, xs = {}, [], {}
    for l in range(L):
        for kind in ("qkv", "o"):
            x = rng.standard_normal((40, D)) * np.linspace(0.2, 3, D)
            xs[(l, kind)] = x
            name = f"layer{l}.{kind}"
            names.append(name)
            cal_t[f"masa.calib.{name}.matrix"] = ("F64", x.T @ x)
            cal_t[f"masa.calib.{name}.rows"] = ("U64", np.array(40, dtype=np.uint64))
    write_st(cal, cal_t, {"masa.model": json.dumps(
        {"format_version": 1, "n_layers": L, "projections": {}, "calibration": names})})
    r = 4
    run("compress", "--atoms", "1", "--rank", str(r), "--calib", cal, "--projections", "qo",
        "--report", "-", "--quiet", src, dst)
    out, meta = read_st(dst)
    cfg = json.loads(meta["masa.model"])
    assert sorted(cfg["projections"]) == ["o", "q"]
    for p_ in "qo":
        c = cfg["projections"][p_]
        check_masa(out, c, w, p_)
        for l in range(L):
            x = xs[(l, "o" if p_ == "o" else "qkv")]
            e = w[(p_, l)].T - w_hat(out, c, p_, l)
            ab = out[f"masa.{p_}.layer{l}.lowrank_a"].astype(np.float64) @ \
                out[f"masa.{p_}.layer{l}.lowrank_b"].astype(np.float64)
            # ||X (E - A B)||^2 = sum of the dropped squared singular values
            # of R^T E, R R^T = X^T X
            R = np.linalg.cholesky(x.T @ x)
            sv = np.linalg.svd(R.T @ e, compute_uv=False)
            got, want = ((x @ (e - ab)) ** 2).sum(), (sv[r:] ** 2).sum()
            assert abs(got - want) <= 1e-3 * (sv ** 2).sum(), (p_, l, got, want)
            # and it beats the plain SVD of E in the whitened norm
            u, s, vt = np.linalg.svd(e)
            plain = ((x @ (e - (u[:, :r] * s[:r]) @ vt[:r])) ** 2).sum()
            assert got <= plain * (1 + 1e-6)


def test_budget_plan(tmp, rng):
    w, tensors = model(rng)
    src = os.path.join(tmp, "in.safetensors")
    dst = os.path.join(tmp, "b.safetensors")
    write_st(src, tensors)
    run("compress", "--remove", "0.5", "--rank", "1", "--quiet", src, dst)
    out, meta = read_st(dst)
    cfg = json.loads(meta["masa.model"])
    for p_ in "qkvo":
        c = cfg["projections"][p_]
        d_in, d_out = c["d_in"], c["d_out"]
        starts = [g[0] for g in c["groups"]]
        assert starts[0] == 0 and sum(g[1] for g in c["groups"]) == L
        params = sum(S * (d_in * d_out + n) for _, n, S in c["groups"]) + L * (d_in + d_out)
        assert params <= 0.5 * L * d_in * d_out, (p_, params)
        # the planner spends the budget: one more atom would not fit
        assert params + d_in * d_out + L > int(0.5 * L * d_in * d_out)
        check_masa(out, c, w, p_)


def test_layout_in_out_and_pattern(tmp, rng):
    w, _ = model(rng)
    src = os.path.join(tmp, "io.safetensors")
    dst = os.path.join(tmp, "io-out.safetensors")
    write_st(src, {f"blk{l}.{p}": ("F32", w[(p, l)].T) for p in "qk" for l in range(L)})
    run("compress", "--pattern", "blk{l}.{p}", "--layout", "in-out", "--projections", "qk",
        "--atoms", "3", "--quiet", src, dst)
    out, meta = read_st(dst)
    cfg = json.loads(meta["masa.model"])
    for p_ in "qk":
        check_masa(out, cfg["projections"][p_], w, p_)


def test_errors(tmp, rng):
    w, tensors = model(rng)
    src = os.path.join(tmp, "in.safetensors")
    dst = os.path.join(tmp, "never.safetensors")
    write_st(src, tensors)

    def fails(code, *args, says):
        p = run(*args, ok=False)
        assert p.returncode == code, (args, p.returncode, p.stderr)
        lines = p.stderr.strip().splitlines()
        assert len(lines) == 1 and says in lines[0], (args, p.stderr)
        assert not os.path.exists(dst), args
        assert not any(n.startswith("never") for n in os.listdir(tmp)), os.listdir(tmp)

    fails(2, "compress", src, dst, says="exactly one of --atoms and --remove")
    fails(2, "compress", "--atoms", "x", src, dst, says="bad value")
    fails(2, "compress", "--atoms", "1", "--bogus", src, dst, says="unknown option")
    fails(2, "compress", "--atoms", "1", src, says="needs IN and OUT")
    fails(2, "compress", "--remove", "1.5", src, dst, says="bad value")
    fails(2, "compress", "--atoms", "1", "--calib", src, src, dst, says="--calib needs --rank")
    fails(2, "frobnicate", says="unknown command")
    fails(1, "compress", "--atoms", "1", "-q", os.path.join(tmp, "missing"), dst,
          says="No such file")
    fails(1, "compress", "--atoms", "1", "-q", "--pattern", "x.{l}", src, dst,
          says='no tensor "x.0"')
    fails(1, "compress", "--atoms", "7", "-q", src, dst, says="exceeds group 0's 6 layers")
    fails(1, "compress", "--atoms", "1", "--groups", "7", "-q", src, dst, says="--groups 7")
    fails(1, "compress", "--remove", "0.99", "-q", src, dst, says="budget cannot be met")
    fails(1, "compress", "--atoms", "1", "--rank", "13", "-q", src, dst, says="rank")
    bad = dict(tensors)
    bad["model.layers.4.self_attn.k_proj.weight"] = ("F32", np.zeros((DKV, D + 1)))
    write_st(src, bad)
    fails(1, "compress", "--atoms", "1", "-q", src, dst, says="layer 0's is [12, 24]")
    open(src, "wb").write(b"\x10\x00\x00\x00\x00\x00\x00\x00{nonsense}      ")
    fails(1, "compress", "--atoms", "1", "-q", src, dst, says="not valid JSON")
    fails(1, "info", src, says="not valid JSON")
    fails(2, "info", says="needs one FILE")
    fails(2, says="needs a command")
    # a calibration file of the wrong width
    write_st(src, tensors)
    cal = os.path.join(tmp, "cal.safetensors")
    write_st(cal, {"masa.calib.layer0.qkv.matrix": ("F64", np.eye(5)),
                   "masa.calib.layer0.qkv.rows": ("U64", np.array(5, dtype=np.uint64))},
             {"masa.model": json.dumps({"format_version": 1, "n_layers": 1, "projections": {},
                                        "calibration": ["layer0.qkv"]})})
    fails(1, "compress", "--atoms", "1", "--rank", "1", "--calib", cal, "-q", src, dst,
          says="calibration layer0.qkv is 5 x 5")
    assert run("--help").stdout.startswith("usage: masa")
    assert "--remove F" in run("compress", "--help").stdout


def main():
    global MASA
    MASA = os.path.abspath(sys.argv[1])
    tests = [v for k, v in sorted(globals().items()) if k.startswith("test_")]
    for t in tests:
        with tempfile.TemporaryDirectory() as tmp:
            t(tmp, np.random.default_rng(zlib.crc32(t.__name__.encode())))
        print(f"ok {t.__name__}")
    print(f"{len(tests)} tests passed")


if __name__ == "__main__":
    main()
