#!/usr/bin/env python3
"""Runs libmasa's benchmarks and its peers and prints one markdown report.

Builds nothing: it expects a configured and built tree (./build by default,
scripts/build.sh). It runs, each when present:
  bench_layer            dense vs MASA attention layer, forward and
                         forward+backward, then again in a fresh process with
                         --peak-memory
  bench_project          projection GEMMs against BLIS's own sgemm
  bench_decode           per-token decode time of a 24-layer stack
  peers.py               PyTorch 2.x and ONNX Runtime in the venv of
                         benchmarks/setup-peers.sh, PyTorch 1.13 in Debian's
                         /usr/bin/python3; each peer is optional and skipped
                         with a note when its interpreter or package is absent
and prints the report (targets of issue 5 first) to stdout, progress to
stderr. The run's time (--max-seconds) is shared among the programs; one
that overruns its share is stopped and what it printed so far is kept (the
report says so). With --out FILE the report replaces, in FILE, the section
of this kind of CPU (vendor, vector ISA, BLIS kernels; added when missing)
above its marker line "<!-- notes -->"; the section's notes below the
marker and the other CPU kinds' sections are kept.

  benchmarks/run.py [--build DIR] [--threads 2] [--quick] [--no-peers]
                    [--max-seconds 540] [--out benchmarks/RESULTS.md]
  benchmarks/run.py --validate-layer BENCH_LAYER   (smoke test: runs
                    BENCH_LAYER --quick --json and checks every line)

Only the standard library is used, so any python3 runs it. No result is a
test: the targets are reported met or missed, never asserted.
"""
import argparse
import datetime
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
MARKER = "<!-- notes -->"

LAYER_SHAPES = ["B4-T512-d512-H8", "B1-T2048-d1024-H16", "B1-T8192-d512-H8",
                "B1-T2048-d1024-H16-KV4", "B1-T512-d512-H8"]
QUICK_SHAPES = ["B2-T64-d64-H4", "B1-T96-d64-H4-KV2"]
PASSES = ["fwd", "fwd+bwd"]
PEER_ORDER = ["pytorch2", "pytorch1", "onnxruntime"]
PEER_LABEL = {"pytorch2": "PyTorch 2.x SDPA", "pytorch1":
              "PyTorch 1.13 nn.MultiheadAttention",
              "onnxruntime": "ONNX Runtime Attention"}


def log(msg):
    print(f"run.py: {msg}", file=sys.stderr, flush=True)


def cpus_busy(seconds=2.0):
    """CPUs' worth of work running now, from /proc/stat over `seconds`
    (None where there is no /proc/stat). Unlike the load average, it does
    not still count work that ended a minute ago."""
    def sample():
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        idle = v[3] + (v[4] if len(v) > 4 else 0)  # idle + iowait
        return sum(v), idle
    try:
        t0, i0 = sample()
        time.sleep(seconds)
        t1, i1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    if t1 == t0:
        return None
    return (1.0 - (i1 - i0) / (t1 - t0)) * (os.cpu_count() or 1)


SIMD_FLAGS = re.compile(r"^(sse4_2|avx|avx2|fma|avx512\w*|avx_vnni|amx\w*)$")


def cpu_info():
    """The CPU as /proc/cpuinfo describes its first processor: model name,
    vendor, family and model, its SIMD flags, and the vector ISA class the
    library dispatches on (avx512, avx2 or baseline)."""
    info = {"model": platform.processor() or "?", "vendor": "?",
            "family": "?", "model_no": "?", "flags": []}
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read().split("\n\n")[0]
    except OSError:
        text = ""
    fields = dict((k.strip(), v.strip()) for k, _, v in
                  (line.partition(":") for line in text.splitlines()))
    info["model"] = fields.get("model name", info["model"])
    info["vendor"] = fields.get("vendor_id", "?")
    info["family"] = fields.get("cpu family", "?")
    info["model_no"] = fields.get("model", "?")
    info["flags"] = sorted(f for f in fields.get("flags", "").split()
                           if SIMD_FLAGS.match(f))
    info["isa"] = ("avx512" if "avx512f" in info["flags"] else
                   "avx2" if "avx2" in info["flags"] else "baseline")
    return info


def section_key(cpu, blis_arch):
    """What makes a kind of CPU for RESULTS.md: vendor, vector ISA and the
    BLIS kernels that run there (the same machine forced to other kernels
    with BLIS_ARCH_TYPE is another kind)."""
    return f"{cpu['vendor']} {cpu['isa']} {blis_arch}"


def merge_results(old, key, title, report):
    """RESULTS.md with the section of `key` replaced by `report` under
    `title` (its text below the section's notes marker kept), or added at
    the end; other CPU kinds' sections are left as they are. A file without
    sections is kept whole below the new section."""
    begin, end = f"<!-- cpu: {key} -->", "<!-- end cpu -->"
    # the report's own headings one level down, under the section title
    body = re.sub(r"^(#+) ", r"#\1 ", report.split("\n", 1)[1],
                  flags=re.M).strip()
    notes = "\n"
    head = ("# libmasa benchmark results\n\n"
            "One section per kind of CPU measured (vendor, vector ISA, BLIS "
            "kernels): `benchmarks/run.py --out benchmarks/RESULTS.md` "
            "replaces the section of the CPU it runs on and keeps the "
            "others. Figures of one kind say nothing about another.\n")
    rest = ""
    if begin in old:
        i = old.index(begin)
        j = old.index(end, i) if end in old[i:] else len(old)
        section = old[i:j]
        if MARKER in section:
            notes = section[section.index(MARKER) + len(MARKER):]
        before, after = old[:i], old[j + len(end):]
    elif "<!-- cpu: " in old:
        before, after = old.rstrip() + "\n\n", "\n"
    else:
        before, after, rest = head + "\n", "\n", old
    new = (f"{begin}\n## {title}\n\n{body}\n\n{MARKER}{notes.rstrip()}"
           f"\n\n{end}")
    out = before + new + after
    if rest.strip():
        out = out.rstrip() + "\n\n" + rest
    return out.rstrip() + "\n"


def run(cmd, timeout):
    """(returncode, stdout, seconds); the program's stderr (its progress)
    goes straight to ours."""
    log("$ " + " ".join(shlex.quote(c) for c in cmd))
    t0 = time.monotonic()
    try:
        p = subprocess.run(cmd, stdout=subprocess.PIPE, text=True,
                           timeout=timeout, cwd=ROOT)
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else e.stdout
        log(f"stopped after {timeout:.0f} s")
        return -1, out or "", timeout
    secs = time.monotonic() - t0
    log(f"exit {p.returncode} after {secs:.0f} s")
    return p.returncode, p.stdout, secs


def json_lines(text):
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("{"):
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    return out


def usage_of(exe):
    """The program's usage text (its --help output, stdout and stderr)."""
    try:
        p = subprocess.run([exe, "--help"], stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True, timeout=20)
        return p.stdout
    except (OSError, subprocess.TimeoutExpired):
        return ""


def args_for(exe, quick, threads):
    """The flags among --quick, --threads N, --json that exe says it takes."""
    text = usage_of(exe)
    args = []
    if quick and "--quick" in text:
        args.append("--quick")
    if "--threads" in text:
        args += ["--threads", str(threads)]
    if "--json" in text:
        args.append("--json")
    return args


# ------------------------------------------------------------ validation

def check_layer(records, shapes):
    """Problems with bench_layer's JSON records: [] when complete."""
    problems = []
    info = [r for r in records if r.get("kind") == "info"]
    if len(info) != 1:
        problems.append("no info line")
    times = {(r.get("shape"), r.get("pass")): r for r in records
             if r.get("kind") == "time"}
    keys = ["dense_ms", "masa_ms", "dense_gflops", "masa_gflops",
            "masa_over_dense", "reps", "flop"]
    for s in shapes:
        for p in PASSES:
            r = times.get((s, p))
            if r is None:
                problems.append(f"missing {s} {p}")
                continue
            for k in keys:
                v = r.get(k)
                if not isinstance(v, (int, float)) or not v > 0:
                    problems.append(f"{s} {p}: bad {k} {v!r}")
    return problems


def check_peak(records):
    peak = [r for r in records if r.get("kind") == "peak_memory"]
    if len(peak) != 1:
        return ["no peak_memory line"]
    keys = ["peak_rss_bytes", "accounted_bytes", "ratio",
            "ratio_without_workspace"]
    return [f"peak: bad {k}" for k in keys
            if not isinstance(peak[0].get(k), (int, float))
            or not peak[0][k] > 0]


def validate_layer(exe):
    rc, out, _ = run([exe, "--quick", "--json"], 120)
    if rc != 0:
        print(f"bench_layer --quick failed ({rc})", file=sys.stderr)
        return 1
    problems = check_layer(json_lines(out), QUICK_SHAPES)
    rc, out, _ = run([exe, "--peak-memory", "--quick", "--json"], 120)
    problems += [f"--peak-memory exit {rc}"] if rc else []
    problems += check_peak(json_lines(out))
    for p in problems:
        print("problem: " + p, file=sys.stderr)
    print("bench_layer --quick output: " +
          ("complete" if not problems else f"{len(problems)} problems"))
    return 1 if problems else 0


# ------------------------------------------------------------ report parts

def fmt(v, digits=2):
    if v is None:
        return "–"
    if isinstance(v, str):
        return v
    return f"{v:.{digits}f}"


def markdown_rows(text):
    """Rows of every markdown table in text, as lists of cell strings."""
    rows = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("|") and not re.match(r"^\|[-:| ]+\|$", line):
            rows.append([c.strip() for c in line.strip("|").split("|")])
    return rows


def number(cell):
    try:
        return float(cell)
    except (TypeError, ValueError):
        return None


def llc_bytes():
    try:
        with open("/sys/devices/system/cpu/cpu0/cache/index3/size") as f:
            t = f.read().strip()
        mult = {"K": 1024, "M": 1024 ** 2}.get(t[-1], 1)
        return int(t.rstrip("KM")) * mult
    except (OSError, ValueError):
        return None


def decode_rows(text, threads):
    """[(d, variant, dictionaries MiB, dense ms, MASA ms)] from bench_decode's
    per-token table, for the rows at `threads`. Columns are found by their
    headers: "d_model", "threads", "MASA dictionaries (MiB)",
    "dense ms/token" and every "MASA ... ms/token" (one per MASA variant,
    e.g. on the fly and cached)."""
    out, cols = [], None
    for cells in markdown_rows(text):
        low = [c.lower() for c in cells]
        if "dense ms/token" in low:
            cols = {"d": low.index("d_model") if "d_model" in low else 0,
                    "threads": low.index("threads") if "threads" in low
                    else None,
                    "dict": next((i for i, c in enumerate(low)
                                  if c.startswith("masa dictionaries")),
                                 None),
                    "dense": low.index("dense ms/token"),
                    "masa": [(i, c[len("masa"):-len("ms/token")].strip())
                             for i, c in enumerate(low)
                             if c.startswith("masa")
                             and c.endswith("ms/token")]}
            continue
        if not cols or not cells or not cells[0].isdigit():
            if cells and not cells[0].isdigit():
                cols = None if "rows" in low else cols
            continue
        if len(cells) <= max([cols["dense"]] + [i for i, _ in cols["masa"]]):
            continue
        if cols["threads"] is not None and \
                number(cells[cols["threads"]]) != threads:
            continue
        d = int(cells[cols["d"]])
        dict_mib = number(cells[cols["dict"]]) if cols["dict"] is not None \
            else None
        for i, name in cols["masa"]:
            out.append((d, name, dict_mib, number(cells[cols["dense"]]),
                        number(cells[i])))
    return out


def project_fractions(text):
    """{column: [(rows, d, fraction), ...]} from bench_project's table: the
    cells "GFLOP/s (NN%)" give the share of BLIS's own sgemm rate that a
    MASA projection reaches (JSON lines with a field named *sgemm* are
    read as well, should the program print them)."""
    fr = {}
    for r in json_lines(text):
        for k, v in r.items():
            if "sgemm" in k and isinstance(v, (int, float)) and 0 < v < 3:
                fr.setdefault(k, []).append((r.get("rows"), r.get("d"), v))
    header = None
    for cells in markdown_rows(text):
        if cells and cells[0] == "rows":
            header = cells
            continue
        if not header or len(cells) != len(header) or not cells[0].isdigit():
            continue
        for name, cell in zip(header, cells):
            m = re.search(r"\(([0-9.]+)%\)", cell)
            if m:
                fr.setdefault(name, []).append(
                    (int(cells[0]), int(cells[1]), float(m.group(1)) / 100))
    return fr


def project_blis_rates(text):
    """{(rows, d, pass): GFLOP/s} of BLIS's own sgemm in bench_project's
    table, the better of its two columns (own threads / pool blocks)."""
    rates, header = {}, None
    for cells in markdown_rows(text):
        if cells and cells[0] == "rows":
            header = cells
            continue
        if not header or len(cells) != len(header) or not cells[0].isdigit():
            continue
        for name, cell in zip(header, cells):
            m = re.match(r"BLIS (fwd\+bwd|fwd) GFLOP/s", name)
            nums = [float(x) for x in re.findall(r"[0-9.]+", cell)]
            if m and nums:
                rates[(int(cells[0]), int(cells[1]), m.group(1))] = max(nums)
    return rates


def build_report(res, args, wall):
    L = res["layer"]
    times = {(r["shape"], r["pass"]): r for r in L if r.get("kind") == "time"}
    info = next((r for r in L if r.get("kind") == "info"), {})
    shapes = QUICK_SHAPES if args.quick else LAYER_SHAPES
    peers = res["peers"]  # name -> {(shape, pass): record}
    out = []
    w = out.append
    now = datetime.datetime.now(datetime.timezone.utc)
    w("# libmasa benchmark results\n")
    w(f"Measured {now:%Y-%m-%d %H:%M} UTC with `{res['command']}` "
      f"({wall:.0f} s wall time{', --quick shapes' if args.quick else ''}).\n")
    cpu = res["cpu_info"]
    ukr = res.get("ukr") or "micro-kernel not reported (no bench_project)"
    w(f"Machine: {cpu['model']} ({cpu['vendor']}, family {cpu['family']}, "
      f"model {cpu['model_no']}), {os.cpu_count()} CPUs, "
      f"{res['mem_gib']:.0f} GiB; BLIS kernels `{info.get('blis_arch', '?')}`"
      f" ({ukr})"
      f"; libmasa {info.get('version', '?')}; {args.threads} threads for "
      f"every program. Load average (1 min) {res['load_start']:.2f} at the "
      f"start, {os.getloadavg()[0]:.2f} at the end"
      + (f"; {res['busy_start']:.2f} CPUs busy just before the start"
         if res["busy_start"] is not None else "") + ".\n")
    w(f"CPU SIMD flags: {' '.join(cpu['flags']) or 'none'}.\n")
    if res.get("git"):
        w(f"Source: {res['git']}.\n")
    # Before the run: the CPUs busy right then (the 1-minute load average
    # still counts work that just ended). At the end the load counts the
    # run's own threads. Beyond those, half a CPU of other work makes times
    # noisy.
    load_end = os.getloadavg()[0]
    before = res["busy_start"]
    if before is None:
        before = res["load_start"]
    other = max(before, load_end - args.threads)
    if other > 0.5 * (os.cpu_count() or 1):
        w(f"**The machine was busy**: about {other:.1f} of its "
          f"{os.cpu_count()} CPUs ran other work besides this run's own "
          f"{args.threads} threads, sharing the cores with them. Absolute "
          f"times are slower than on a quiet machine and noisy, and "
          f"comparisons between programs that ran at different moments "
          f"(the peers against libmasa) are unreliable; libmasa's MASA / "
          f"dense ratios, measured in interleaved pairs, suffer least.\n")
    w("Times are medians of repetitions (count in the tables); ratios of "
      "libmasa MASA / dense are medians of A B B A pair ratios measured in one "
      "process; peer ratios are peer time / libmasa time (> 1: libmasa is "
      "faster). GFLOP/s count the same FLOPs for every implementation "
      "(benchmarks/README.md).\n")

    # ---- targets
    w("## Targets\n")
    w("| target | measured | status |")
    w("|---|---|---|")
    for t in targets(res, times, shapes, peers):
        w(f"| {t[0]} | {t[1]} | {t[2]} |")
    w("")

    # ---- layer
    w("## Attention layer: libmasa dense and MASA (L=24, S=8, on the fly)\n")
    w("Causal, no RoPE, no bias; forward is inference (no reserve), "
      "forward+backward computes dx and every parameter gradient.\n")
    w("| shape | pass | dense ms | dense GFLOP/s | MASA ms | MASA GFLOP/s | "
      "MASA/dense | reps |")
    w("|---|---|---:|---:|---:|---:|---:|---:|")
    for s in shapes:
        for p in PASSES:
            r = times.get((s, p))
            if not r:
                w(f"| {s} | {p} | missing | | | | | |")
                continue
            w(f"| {s} | {p} | {fmt(r['dense_ms'])} | "
              f"{fmt(r['dense_gflops'], 1)} | {fmt(r['masa_ms'])} | "
              f"{fmt(r['masa_gflops'], 1)} | {fmt(r['masa_over_dense'], 3)} "
              f"| {r['reps']} |")
    w("")

    # ---- peers
    w("## Peers: the same layer, same machine, same thread count\n")
    present = [n for n in PEER_ORDER if peers.get(n)]
    if present:
        impl = {n: next(iter(peers[n].values()))["impl"] for n in present}
        head = "| shape | pass | libmasa dense ms | libmasa MASA ms |"
        head += "".join(f" {impl[n]} ms | / dense | / MASA |" for n in present)
        w(head)
        w("|---|---|---:|---:|" + "---:|---:|---:|" * len(present))
        for s in shapes:
            for p in PASSES:
                r = times.get((s, p), {})
                row = f"| {s} | {p} | {fmt(r.get('dense_ms'))} | " \
                      f"{fmt(r.get('masa_ms'))} |"
                for n in present:
                    q = peers[n].get((s, p))
                    if not q:
                        row += " – | | |"
                        continue
                    cold = ", cold" if q.get("cold") else ""
                    row += f" {fmt(q['ms'])} ({q['reps']}{cold}) |"
                    row += f" {ratio(q['ms'], r.get('dense_ms'))} |"
                    row += f" {ratio(q['ms'], r.get('masa_ms'))} |"
                w(row)
        w("")
        w("Peer ms with its repetition count in parentheses (`cold`: one "
          "run longer than the budget, timed without a warm-up run); "
          "`/ dense` and `/ MASA`: peer time over libmasa's.\n")
    for note in res["peer_notes"]:
        w(f"- {note}")
    if res["peer_notes"]:
        w("")

    # ---- peak memory
    w("## Peak memory\n")
    pk = res["peak"]
    if pk:
        mib = 1024.0 * 1024.0
        w(f"`bench_layer --peak-memory` in a fresh process: {pk['shape']}, "
          f"{pk['proj']} projections, forward+backward once "
          f"({pk['seconds']:.2f} s).\n")
        w("| peak RSS MiB | inputs | outputs | parameters | reserve | "
          "workspace | peak / (in+out+param+reserve) | peak / (... + "
          "workspace) |")
        w("|---:|---:|---:|---:|---:|---:|---:|---:|")
        w(f"| {pk['peak_rss_bytes'] / mib:.1f} | "
          f"{pk['inputs_bytes'] / mib:.1f} | {pk['outputs_bytes'] / mib:.1f} "
          f"| {pk['parameters_bytes'] / mib:.1f} | "
          f"{pk['reserve_bytes'] / mib:.1f} | "
          f"{pk['workspace_bytes'] / mib:.1f} | "
          f"{pk['ratio_without_workspace']:.3f} | {pk['ratio']:.3f} |\n")
        w(f"Outputs include dx and the parameter gradients; the process "
          f"itself held {pk['start_rss_bytes'] / mib:.1f} MiB before any "
          f"allocation (counted in the peak).\n")
    else:
        w("not measured\n")

    for key, title in (("decode", "Decode"), ("project", "Projections")):
        w(f"## {title} (`bench_{key}`)\n")
        text = res.get(key)
        if text is None:
            w(f"bench_{key} is not built in this tree: not measured.\n")
        else:
            body = text.strip()
            # the program's own headings go one level down
            body = re.sub(r"^(#+) ", lambda m: "#" * max(3, len(m.group(1)))
                          + " ", body, flags=re.M)
            w(body + "\n")
    if res.get("notes"):
        w("## Run notes\n")
        for note in res["notes"]:
            w(f"- {note}")
        w("")
    return "\n".join(out)


def ratio(peer_ms, ours_ms):
    if not peer_ms or not ours_ms:
        return "–"
    return f"{peer_ms / ours_ms:.2f}"


def targets(res, times, shapes, peers):
    rows = []
    quick = shapes == QUICK_SHAPES

    def status(ok):
        return "n/a" if ok is None else ("met" if ok else "**missed**")

    # 1. MASA / dense forward+backward
    for s in shapes:
        r = times.get((s, "fwd+bwd"))
        m = re.match(r"B(\d+)-T(\d+)", s)
        tokens = int(m.group(1)) * int(m.group(2))
        if tokens >= 2048:
            limit = 1.05
        elif tokens >= 512:
            limit = 1.08  # issue 13 (issue 5 asked 1.15)
        else:
            limit = None
        v = r["masa_over_dense"] if r else None
        rows.append((f"MASA/dense fwd+bwd {s} ({tokens} tokens) <= "
                     f"{fmt(limit) if limit else '(no target)'}",
                     fmt(v, 3), "not measured" if v is None else
                     status(None if limit is None else v <= limit)))
    # 2. projection GEMMs: the large ones (rows >= 2048)
    fr = res.get("project_fractions")
    what = "projection GEMMs >= 85% of BLIS sgemm"
    if res.get("project") is None:
        rows.append((what, "bench_project not built", "not measured"))
    elif not fr:
        rows.append((what, "see Projections", "not parsed"))
    else:
        for col, vals in fr.items():
            big = [v for v in vals if v[0] is None or v[0] >= 2048]
            if not big:
                rows.append((f"{what}: {col}, rows >= 2048", "no such shape "
                             "measured", "not measured"))
                continue
            worst = min(big, key=lambda v: v[2])
            rows.append((f"{what}: {col}, rows >= 2048",
                         f"lowest {100 * worst[2]:.0f}% (rows {worst[0]}, d "
                         f"{worst[1]}) of {len(big)}",
                         status(worst[2] >= 0.85)))
    # 2b. the whole layer against BLIS's sgemm rate on its projection
    # shapes (rows = B T, d), same run: T >= 2048, fwd+bwd 70%, fwd 75%
    rates = project_blis_rates(res.get("project") or "")
    for s in shapes:
        m = re.match(r"B(\d+)-T(\d+)-d(\d+)", s)
        if not m or int(m.group(2)) < 2048:
            continue
        b, t, d = (int(x) for x in m.groups())
        for p, need in (("fwd", 0.75), ("fwd+bwd", 0.70)):
            what = (f"layer {p} GFLOP/s >= {100 * need:.0f}% of BLIS sgemm "
                    f"on its projections (rows {b * t}, d {d}), {s}")
            r, blis = times.get((s, p)), rates.get((b * t, d, p))
            if not r or not blis:
                rows.append((what, "layer or bench_project row missing",
                             "not measured"))
                continue
            fd, fm = r["dense_gflops"] / blis, r["masa_gflops"] / blis
            rows.append((what, f"{100 * fd:.0f}% dense, {100 * fm:.0f}% "
                         f"MASA of {blis:.1f}", status(min(fd, fm) >= need)))
    # 3. peers
    for name, p, label, need in (("pytorch2", "fwd+bwd", "PyTorch 2.x", 1.0),
                                 ("pytorch2", "fwd", "PyTorch 2.x", 1.0),
                                 ("onnxruntime", "fwd", "ONNX Runtime", 1.0)):
        table = peers.get(name) or {}
        for s in shapes:
            r = times.get((s, p))
            q = table.get((s, p))
            lim = need
            if (name == "pytorch2" and p == "fwd+bwd" and s == shapes[0]
                    and not quick):
                lim = 1.5
            what = f"{p} faster than {label}" + \
                (f" by {lim}x" if lim > 1 else "") + f", {s}"
            if not q or not r:
                rows.append((what, "peer not run", "not measured"))
                continue
            vd, vm = q["ms"] / r["dense_ms"], q["ms"] / r["masa_ms"]
            rows.append((what, f"{vd:.2f}x dense, {vm:.2f}x MASA",
                         status(min(vd, vm) > lim if lim == 1.0
                                else min(vd, vm) >= lim)))
    # 4. peak memory
    pk = res["peak"]
    if pk:
        rows.append((f"peak memory {pk['shape']} fwd+bwd < 2x (inputs + "
                     "outputs + parameters + reserve)",
                     f"{pk['ratio_without_workspace']:.2f}x",
                     status(pk["ratio_without_workspace"] < 2.0)))
    else:
        rows.append(("peak memory < 2x", "–", "not measured"))
    # 5. decode
    dec = res.get("decode_rows")
    llc = llc_bytes()
    if res.get("decode") is None:
        rows.append(("decode: MASA per-token <= dense when the dictionary "
                     "fits in cache", "bench_decode not built",
                     "not measured"))
    elif not dec:
        rows.append(("decode: MASA per-token <= dense when the dictionary "
                     "fits in cache", "see Decode", "not parsed"))
    else:
        for d, variant, dict_mib, dms, mms in dec:
            fits = (llc is None or dict_mib is None
                    or dict_mib * 1024 * 1024 <= llc)
            if not fits or dms is None or mms is None:
                continue
            rows.append((f"decode d={d}, MASA{' ' + variant if variant else ''}"
                         f": ms/token <= dense "
                         f"(dictionaries {fmt(dict_mib, 1)} MiB fit the "
                         f"{(llc or 0) // 2 ** 20} MiB LLC)",
                         f"{fmt(mms, 3)} vs {fmt(dms, 3)} ms "
                         f"({mms / dms:.2f}x)", status(mms <= dms)))
    return rows


# ------------------------------------------------------------ main

class Clock:
    """Splits what is left of the run's time among the steps still to run,
    in proportion to their weights, so the whole run ends in time however
    long each step takes (a step that ends early leaves its time to the
    next ones)."""

    def __init__(self, total, weights):
        self.t0 = time.monotonic()
        self.total = total
        self.left = dict(weights)

    def share(self, name):
        remaining = self.total - (time.monotonic() - self.t0)
        w = self.left.pop(name)
        return max(15.0, remaining * w / (w + sum(self.left.values())))


def peers_venv_python():
    """The peers' interpreter: $MASA_PEERS_VENV, else setup-peers.sh's
    default venv, else the project's venv of install-deps.sh ($MASA_VENV,
    default ~/.cache/libmasa/venv), which has torch 2.x (ONNX Runtime is
    then optional: the peer is skipped with a note where it is missing)."""
    if "MASA_PEERS_VENV" in os.environ:
        venvs = [os.environ["MASA_PEERS_VENV"]]
    else:
        venvs = [os.path.expanduser("~/.cache/masa/peers-venv"),
                 os.environ.get("MASA_VENV", os.path.expanduser(
                     "~/.cache/libmasa/venv"))]
    for venv in venvs:
        py = os.path.join(venv, "bin", "python")
        if os.access(py, os.X_OK):
            return py
    return None


def run_peer(python, name, args, res, share):
    budget = min(args.peer_budget, share / 20)
    cmd = [python, os.path.join(HERE, "peers.py"), "--peer", name,
           "--threads", str(args.threads), "--budget", f"{budget:.1f}",
           "--min-reps", "1", "--with-self-check"]
    if args.quick:
        cmd.append("--quick")
    rc, out, secs = run(cmd, share)
    recs = json_lines(out)
    checks = [r for r in recs if r.get("kind") == "self_check"]
    bad = [c for c in checks if c.get("status") == "MISMATCH"]
    t = {(r["shape"], r["pass"]): r for r in recs if r.get("kind") == "time"}
    if rc == 3 or any(r.get("kind") == "unavailable" for r in recs):
        why = next((r.get("reason") for r in recs
                    if r.get("kind") == "unavailable"), "")
        res["peer_notes"].append(f"{PEER_LABEL[name]}: skipped, not "
                                 f"available in {python} ({why})")
        return
    if bad:
        res["peer_notes"].append(f"{PEER_LABEL[name]}: self-check MISMATCH "
                                 f"{bad}; its times are not reported")
        return
    if rc != 0:
        res["peer_notes"].append(f"{PEER_LABEL[name]}: exited {rc} after "
                                 f"{secs:.0f} s (-1: stopped at its share "
                                 f"of --max-seconds); the {len(t)} results "
                                 f"it printed are kept")
    skipped = [r["shape"] for r in recs if r.get("kind") == "skipped"]
    impl = next((r.get("impl") for r in recs if r.get("impl")), name)
    note = (f"{PEER_LABEL[name]} ({impl}, {python}): self-check against "
            f"numpy {'ok' if checks else 'not run'}"
            f" ({', '.join(c['shape'] + ' ' + c['status'] for c in checks)})")
    op = next((r.get("op") for r in recs if r.get("op")), None)
    if op:
        note += f"; op {op}"
    if skipped:
        note += f"; skipped {', '.join(skipped)} (no GQA in its API)"
    res["peer_notes"].append(note + f"; {secs:.0f} s")
    res["peers"][name] = t


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--build", default=os.path.join(ROOT, "build"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-peers", action="store_true")
    ap.add_argument("--out")
    ap.add_argument("--layer-budget", type=float, default=10.0,
                    help="bench_layer --budget (s per shape and pass)")
    ap.add_argument("--peer-budget", type=float, default=6.0,
                    help="peers.py --budget (s per shape and pass)")
    ap.add_argument("--max-seconds", type=float, default=540.0,
                    help="the whole run's time, shared among the programs; "
                    "one that overruns its share is stopped (default 540)")
    ap.add_argument("--torch1-python", default="/usr/bin/python3")
    ap.add_argument("--validate-layer", metavar="BENCH_LAYER")
    args = ap.parse_args()
    if args.validate_layer:
        return validate_layer(os.path.abspath(args.validate_layer))

    t_start = time.monotonic()
    bdir = os.path.join(args.build, "benchmarks")
    res = {"peers": {}, "peer_notes": [], "peak": None, "notes": [],
           "load_start": os.getloadavg()[0], "busy_start": cpus_busy(),
           "command": "benchmarks/run.py " + " ".join(
               shlex.quote(a) for a in sys.argv[1:])}
    res["cpu_info"] = cpu_info()
    try:
        with open("/proc/meminfo") as f:
            res["mem_gib"] = int(f.readline().split()[1]) / 2 ** 20
    except OSError:
        res["mem_gib"] = 0
    try:
        res["git"] = "commit " + subprocess.run(
            ["git", "-C", ROOT, "describe", "--always", "--dirty"],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
            timeout=10).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        pass
    problems = []
    notes = res["notes"]

    layer = os.path.join(bdir, "bench_layer")
    if not os.access(layer, os.X_OK):
        print(f"run.py: {layer} not found; build first (scripts/build.sh)",
              file=sys.stderr)
        return 2
    # The steps that can run, each with its share of --max-seconds.
    steps = {"layer": 30, "peak": 5}
    if not args.no_peers:
        venv_py = peers_venv_python()
        if venv_py:
            steps.update({"pytorch2": 12, "onnxruntime": 6})
        else:
            res["peer_notes"].append(
                "PyTorch 2.x and ONNX Runtime: skipped, no venv (run "
                "benchmarks/setup-peers.sh)")
        if os.access(args.torch1_python, os.X_OK):
            steps["pytorch1"] = 14
        else:
            res["peer_notes"].append(f"PyTorch 1.13: skipped, no "
                                     f"{args.torch1_python}")
    else:
        res["peer_notes"].append("peers not run (--no-peers)")
    for key in ("project", "decode"):
        res[key] = None
        if os.access(os.path.join(bdir, "bench_" + key), os.X_OK):
            steps[key] = 10
        else:
            log(f"bench_{key} not built: skipped")
    clock = Clock(args.max_seconds, steps)

    def stopped(what, rc, share):
        if rc == -1:
            notes.append(f"{what} was stopped at its share of --max-seconds "
                         f"({share:.0f} s); what it printed before is kept, "
                         f"the rest is missing")
        return rc == -1

    share = clock.share("layer")
    budget = min(args.layer_budget, share / 20)
    cmd = [layer, "--json", "--threads", str(args.threads), "--budget",
           f"{budget:.1f}"] + (["--quick"] if args.quick else [])
    rc, out, _ = run(cmd, share)
    res["layer"] = json_lines(out)
    if not stopped("bench_layer", rc, share):
        problems += [f"bench_layer exit {rc}"] if rc else []
        problems += check_layer(res["layer"],
                                QUICK_SHAPES if args.quick else LAYER_SHAPES)

    share = clock.share("peak")
    cmd = [layer, "--peak-memory", "--json", "--threads",
           str(args.threads)] + (["--quick"] if args.quick else [])
    rc, out, _ = run(cmd, share)
    pk = json_lines(out)
    if not stopped("bench_layer --peak-memory", rc, share):
        problems += [f"bench_layer --peak-memory exit {rc}"] if rc else []
        problems += check_peak(pk)
    res["peak"] = next((r for r in pk if r.get("kind") == "peak_memory"),
                       None)

    for name in ("pytorch2", "onnxruntime"):
        if name in steps:
            run_peer(venv_py, name, args, res, clock.share(name))
    if "pytorch1" in steps:
        run_peer(args.torch1_python, "pytorch1", args, res,
                 clock.share("pytorch1"))

    for key in ("project", "decode"):
        if key not in steps:
            continue
        exe = os.path.join(bdir, "bench_" + key)
        share = clock.share(key)
        rc, out, secs = run([exe] + args_for(exe, args.quick, args.threads),
                            share)
        if not stopped(f"bench_{key}", rc, share) and rc != 0:
            problems.append(f"bench_{key} exit {rc}")
        if rc != 0:
            out += f"\n\n(bench_{key} exited {rc})\n"
        res[key] = out
    if res.get("decode") is not None:
        res["decode_rows"] = decode_rows(res["decode"], args.threads)
    if res.get("project") is not None:
        res["project_fractions"] = project_fractions(res["project"])
        m = re.search(r"sgemm micro-kernel (\d+) x (\d+), prefers (\w+)",
                      res["project"])
        if m:
            res["ukr"] = (f"sgemm micro-kernel {m.group(1)} x {m.group(2)}, "
                          f"prefers {m.group(3)}-stored C")

    wall = time.monotonic() - t_start
    report = build_report(res, args, wall)
    print(report)
    if args.out:
        old = ""
        if os.path.exists(args.out):
            with open(args.out) as f:
                old = f.read()
        cpu = res["cpu_info"]
        arch = next((r.get("blis_arch") for r in res["layer"]
                     if r.get("kind") == "info"), None) or "unknown"
        isa = {"avx512": "AVX-512", "avx2": "AVX2"}.get(cpu["isa"],
                                                       "no AVX2")
        title = f"{cpu['model']} ({cpu['vendor']}, {isa}), BLIS {arch}"
        text = merge_results(old, section_key(cpu, arch), title, report)
        tmp = args.out + ".tmp"
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, args.out)
        log(f"wrote {args.out} (section {section_key(cpu, arch)})")
    log(f"done in {wall:.0f} s")
    for p in problems:
        log("problem: " + p)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
