"""Compressing the attention of a pretrained transformers decoder into MASA
form (shared atoms + coefficients per layer group, per-layer low-rank
factors), writing and reloading the result. Command line: ``python -m
masa.compress --help``.

Output directory:
  attention.safetensors  the compressed attention in libmasa's
                         compressed-model format (include/masa/io.h:
                         ``masa.{p}.group{g}.atoms`` [S, d_in, d_out],
                         ``.coefficients`` [layers, S],
                         ``masa.{p}.layer{l}.lowrank_a`` [d_in, r] and
                         ``_b`` [r, d_out], the "masa.model" metadata), written
                         by the C writer; ``masa info`` lists it and
                         masa_model_open() / masa.safetensors_file.load_model
                         read it
  config.json            what to reload it: source model, method, fraction,
                         geometry, the plan (groups, atoms, ranks)
  report.json            parameters, energies, errors, choices, timings
p in q, k, v, o; row-vector convention, W = transpose of nn.Linear.weight.
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


def write_model(path, results, n_layers, metadata=None, context=None):
    """The compressed attention as a libmasa compressed-model file (io.h's
    format: what ``masa info`` and masa_model_open() read), through the C
    writer (atomic, fsync'd)."""
    from .. import safetensors_file

    groups = {p: [(g["start"], g["atoms"], g["coefs"]) for g in r["groups"]]
              for p, r in results.items() if r["groups"]}
    lowrank = {p: dict(r["lowrank"]) for p, r in results.items() if r["lowrank"]}
    safetensors_file.save_model(path, n_layers, groups=groups, lowrank=lowrank,
                                metadata=metadata, context=context)
    return "libmasa C writer (masa_model_writer, io.h compressed-model format)"


def read_model(path, context=None):
    """{p: result} (groups and low-rank terms) of a compressed-model file,
    read by libmasa (masa_model_open checks it whole)."""
    from .. import safetensors_file
    from ..core import default_context

    context = context if context is not None else default_context()
    m = safetensors_file.load_model(context, path)
    try:
        out = {}
        for p in "qkvo":
            info = m.projection(p)
            if info.kind is None:
                continue
            if info.kind == "dense":
                raise ValueError(f"{path}: projection {p} is dense; masa.compress writes none")
            groups = []
            for g, (first, count, _) in enumerate(info.groups):
                _, atoms, coefs = m.group(p, g)
                groups.append({"start": first, "count": count, "atoms": atoms, "coefs": coefs})
            lowrank = {}
            for l in range(m.n_layers):
                term = m.lowrank(p, l)
                if term is not None:
                    lowrank[l] = term
            r = {"groups": groups, "lowrank": lowrank}
            r["params"] = methods.count_params(r, (info.d_in, info.d_out))
            r["dense_params"] = m.n_layers * info.d_in * info.d_out
            out[p] = r
        return out
    finally:
        m.close()


def write_json(path, obj):
    from ..evaluate import write_atomic

    write_atomic(path, json.dumps(obj, indent=1, sort_keys=False) + "\n")


MODEL_FILE = "attention.safetensors"


def save(out_dir, results, config, report, context=None):
    os.makedirs(out_dir, exist_ok=True)
    writer = write_model(os.path.join(out_dir, MODEL_FILE), results, _n_layers(results),
                         {"compress_method": config["method"]}, context)
    config = dict(config, plan=plan_of(results), config_version=CONFIG_VERSION)
    write_json(os.path.join(out_dir, "config.json"), config)
    report = dict(report, writer=writer)
    write_json(os.path.join(out_dir, "report.json"), report)
    return config


def _n_layers(results):
    n = 0
    for r in results.values():
        for g in r["groups"]:
            n = max(n, g["start"] + g["count"])
        if r["lowrank"]:
            n = max(n, max(r["lowrank"]) + 1)
    return n


def load_compressed(out_dir, path="libmasa", context=None, model=None, tokenizer=None,
                    keep_original=False):
    """(model, tokenizer, info): the source model with its attention
    replaced by the compressed one, on libmasa (path "libmasa"; architectures
    libmasa does not cover fall back to "materialised") or written back into
    the original modules as dense weights ("materialised")."""
    from .. import hf

    with open(os.path.join(out_dir, "config.json")) as f:
        config = json.load(f)
    results = read_model(os.path.join(out_dir, MODEL_FILE), context)
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
        hf.swap_attention(model, cores=cores, context=context, keep_original=keep_original)
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


def compress_model(model, tokenizer, method, removed, *, source, calib_sequences=16,
                   calib_len=512, calib_cache=None, kl_groups=3, context=None, prefer_c=True,
                   progress=None, plan=None):
    """Compresses the attention of a loaded model; returns (results,
    config, report) ready for save(). With ``plan`` (methods.parse_plan) the
    groups, atoms and ranks are the plan's (``removed`` is ignored, None is
    fine) and the residuals are whitened unless the method is an unwhitened
    one (svd, pca, pca-kl, pca-dp)."""
    from .. import hf

    t0 = time.perf_counter()
    core = get_core(prefer_c, context)
    weights = attention_weights(model)
    need_calib = method in ("svd-llm", "full", "pca-kl")
    if plan is not None:
        need_calib = method in ("svd-llm", "full")
    stats_map, drift, calib_info = {}, None, None
    if need_calib:
        stats_map, drift, calib_info = calibration_data(
            model, tokenizer, calib_sequences, calib_len, calib_cache, context, progress)
    t1 = time.perf_counter()
    stats = lambda l, key: stats_map[(l, key)]  # noqa: E731
    if plan is None:
        results = methods.compress_attention(core, method, weights, removed, stats=stats,
                                             drift=drift, kl_groups=kl_groups, progress=progress)
    else:
        results = methods.compress_with_plan(core, weights, plan, stats, whiten=need_calib,
                                             progress=progress)
    t2 = time.perf_counter()
    dense = sum(int(w.size) for w in weights.values())
    # projections a plan leaves out stay dense
    kept = sum(results[p]["params"] if p in results else int(w.size) for p, w in weights.items())
    g = hf.attention_geometry(model)
    config = {"source": source, "method": method, "removed_target": removed,
              "geometry": g, "kl_groups": kl_groups if method == "pca-kl" else None,
              "explicit_plan": plan is not None}
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
