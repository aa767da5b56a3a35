"""Compressing the attention of a pretrained transformers decoder into MASA
form (shared atoms + coefficients per layer group, per-layer low-rank
factors), writing and reloading the result. Command line: ``python -m
masa.compress --help``.

Output directory:
  attention.safetensors  the compressed attention tensors (names below)
  config.json            what to reload it: source model, method, fraction,
                         geometry, per projection the groups (start, layers,
                         atoms) and per-layer ranks
  report.json, report.md parameters, energies, errors, choices, timings
Tensor names: ``attn.{p}.group{g}.atoms`` [S, d_in, d_out],
``attn.{p}.group{g}.coefficients`` [layers, S],
``attn.layers.{l}.{p}.lowrank_a`` [d_in, r], ``...lowrank_b`` [r, d_out]
(p in q, k, v, o; row-vector convention, W = transpose of nn.Linear.weight).
Everything outside attention (and attention biases) comes from the source
model, which config.json names.
"""

from __future__ import annotations

import json
import os
import time

import numpy as np

from . import methods
from .core import get_core

CONFIG_VERSION = 1


def attention_weights(model):
    """{p: [L, d_in, d_out] float32} of the model's attention projections."""
    from ..hf import PROJ, attention_modules

    out = {p: [] for p in "qkvo"}
    for _, attn in attention_modules(model):
        for p in "qkvo":
            out[p].append(getattr(attn, PROJ[p]).weight.detach().float().t().contiguous().numpy())
    return {p: np.stack(ws) for p, ws in out.items()}


# ---------------------------------------------------------------------------
# Writing and reading
# ---------------------------------------------------------------------------


def tensors_of(results):
    t = {}
    for p, r in results.items():
        for g, grp in enumerate(r["groups"]):
            t[f"attn.{p}.group{g}.atoms"] = np.ascontiguousarray(grp["atoms"], dtype=np.float32)
            t[f"attn.{p}.group{g}.coefficients"] = np.ascontiguousarray(grp["coefs"], dtype=np.float32)
        for l, (a, b) in r["lowrank"].items():
            t[f"attn.layers.{l}.{p}.lowrank_a"] = np.ascontiguousarray(a, dtype=np.float32)
            t[f"attn.layers.{l}.{p}.lowrank_b"] = np.ascontiguousarray(b, dtype=np.float32)
    return t


def plan_of(results):
    """The JSON-able structure of results (no arrays)."""
    plan = {}
    for p, r in results.items():
        plan[p] = {
            "groups": [{"start": g["start"], "layers": g["count"], "atoms": int(g["atoms"].shape[0])}
                       for g in r["groups"]],
            "ranks": {str(l): int(a.shape[1]) for l, (a, _) in sorted(r["lowrank"].items())},
            "params": r["params"], "dense_params": r["dense_params"],
        }
    return plan


def write_safetensors(path, tensors, metadata):
    """Through libmasa's C writer (masa.safetensors_file) when built in,
    else the safetensors package; both write atomically."""
    try:
        from .. import safetensors_file

        safetensors_file.save(path, tensors, metadata=metadata)
        return "libmasa C writer"
    except (ImportError, AttributeError):
        from safetensors.numpy import save_file

        tmp = f"{path}.tmp{os.getpid()}"
        save_file(tensors, tmp, metadata=metadata)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        return "safetensors package"


def read_safetensors(path):
    try:
        from .. import safetensors_file

        return safetensors_file.load(path)
    except (ImportError, AttributeError):
        from safetensors.numpy import load_file

        return load_file(path)


def write_json(path, obj):
    from ..evaluate import write_atomic

    write_atomic(path, json.dumps(obj, indent=1, sort_keys=False) + "\n")


def save(out_dir, results, config, report):
    os.makedirs(out_dir, exist_ok=True)
    writer = write_safetensors(os.path.join(out_dir, "attention.safetensors"), tensors_of(results),
                               {"format": "masa-attention", "method": config["method"]})
    config = dict(config, plan=plan_of(results), config_version=CONFIG_VERSION)
    write_json(os.path.join(out_dir, "config.json"), config)
    report = dict(report, writer=writer)
    write_json(os.path.join(out_dir, "report.json"), report)
    return config


def results_from(tensors, config):
    """Rebuilds the per-projection results from the saved tensors."""
    out = {}
    for p, pp in config["plan"].items():
        groups = []
        for g, grp in enumerate(pp["groups"]):
            groups.append({"start": grp["start"], "count": grp["layers"],
                           "atoms": tensors[f"attn.{p}.group{g}.atoms"],
                           "coefs": tensors[f"attn.{p}.group{g}.coefficients"]})
        lowrank = {int(l): (tensors[f"attn.layers.{l}.{p}.lowrank_a"],
                            tensors[f"attn.layers.{l}.{p}.lowrank_b"]) for l in pp["ranks"]}
        out[p] = {"groups": groups, "lowrank": lowrank, "params": pp["params"],
                  "dense_params": pp["dense_params"]}
    return out


def load_compressed(out_dir, path="libmasa", context=None, model=None, tokenizer=None):
    """(model, tokenizer, info): the source model with its attention
    replaced by the compressed one, on libmasa (path "libmasa"; architectures
    libmasa does not cover fall back to "materialised") or written back into
    the original modules as dense weights ("materialised")."""
    from .. import hf

    with open(os.path.join(out_dir, "config.json")) as f:
        config = json.load(f)
    tensors = read_safetensors(os.path.join(out_dir, "attention.safetensors"))
    results = results_from(tensors, config)
    if model is None:
        model, tokenizer = hf.load_model(config["source"])
    info = {"config": config}
    if path == "libmasa":
        ok, why = hf.check_supported(model)
        if not ok:
            info["fallback_reason"] = why
            path = "materialised"
    if path == "libmasa":
        from .modules import compressed_cores

        cores = compressed_cores(model, results, context)
        hf.swap_attention(model, cores=cores, context=context)
    elif path == "materialised":
        materialise_results(model, results)
    elif path != "transformers":
        raise ValueError(f"path must be 'libmasa' or 'materialised', got {path!r}")
    info["path"] = path
    return model, tokenizer, info


def materialise_results(model, results):
    from .. import hf

    L = len(hf.decoder_layers(model))
    weights = {l: {} for l in range(L)}
    for p, r in results.items():
        shape = _shape_of(r)
        for l in range(L):
            weights[l][p] = methods.reconstruct(r, l, shape)
    return hf.materialise(model, weights)


def _shape_of(r):
    if r["groups"]:
        return tuple(r["groups"][0]["atoms"].shape[1:])
    a, b = next(iter(r["lowrank"].values()))
    return (a.shape[0], b.shape[1])


# ---------------------------------------------------------------------------
# The pipeline
# ---------------------------------------------------------------------------


def calibration_data(model, tokenizer, n_sequences, seq_len, cache_path=None, context=None,
                     progress=None):
    """({(layer, "qkv"|"o"): C}, KL drift, info); cached in an .npz file
    when cache_path is given (computed once per model and split)."""
    if cache_path and os.path.exists(cache_path):
        z = np.load(cache_path)
        if int(z["n_sequences"]) == n_sequences and int(z["seq_len"]) == seq_len:
            stats = {}
            for name in z.files:
                if name.startswith("C_"):
                    _, l, key = name.split("_")
                    stats[(int(l), key)] = z[name]
            return stats, z["drift"], {"cached": cache_path, "rows": int(z["rows"]),
                                       "backend": str(z["backend"])}
    from ..evaluate import Corpus
    from .calibration import calibrate

    corpus = Corpus(tokenizer)
    seqs = corpus.calibration(n_sequences, seq_len)
    st, drift, seconds = calibrate(model, seqs, context=context, progress=progress)
    stats = {k: st.matrix(*k) for k in st.stats}
    rows = st.rows(0, "qkv")
    if cache_path:
        arrays = {f"C_{l}_{key}": m for (l, key), m in stats.items()}
        tmp = f"{cache_path}.tmp{os.getpid()}.npz"
        np.savez(tmp, drift=drift, n_sequences=n_sequences, seq_len=seq_len, rows=rows,
                 backend=st.backend, **arrays)
        os.replace(tmp, cache_path)
    return stats, drift, {"seconds": seconds, "rows": rows, "backend": st.backend}


def compress_model(model, tokenizer, method, removed, *, source, calib_sequences=32,
                   calib_len=512, calib_cache=None, kl_groups=3, context=None, prefer_c=True,
                   progress=None):
    """Compresses the attention of a loaded model; returns (results,
    config, report) ready for save()."""
    from .. import hf

    t0 = time.perf_counter()
    core = get_core(prefer_c, context)
    weights = attention_weights(model)
    need_calib = method in ("svd-llm", "full", "pca-kl")
    stats_map, drift, calib_info = {}, None, None
    if need_calib:
        stats_map, drift, calib_info = calibration_data(
            model, tokenizer, calib_sequences, calib_len, calib_cache, context, progress)
    t1 = time.perf_counter()
    results = methods.compress_attention(core, method, weights, removed,
                                         stats=lambda l, key: stats_map[(l, key)],
                                         drift=drift, kl_groups=kl_groups, progress=progress)
    t2 = time.perf_counter()
    dense = sum(r["dense_params"] for r in results.values())
    kept = sum(r["params"] for r in results.values())
    g = hf.attention_geometry(model)
    config = {"source": source, "method": method, "removed_target": removed,
              "geometry": g, "kl_groups": kl_groups if method == "pca-kl" else None}
    report = {
        "method": method, "removed_target": removed,
        "attention_params_dense": dense, "attention_params_kept": kept,
        "removed_actual": 1.0 - kept / dense,
        "per_projection": {p: {"params": r["params"], "budget": r["budget"],
                               "dense": r["dense_params"], **_jsonable(r["info"])}
                           for p, r in results.items()},
        "core": core.name, "calibration": calib_info,
        "kl_drift": None if drift is None else [float(x) for x in drift],
        "seconds": {"calibration": t1 - t0, "compression": t2 - t1},
    }
    return results, config, report


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    return obj
