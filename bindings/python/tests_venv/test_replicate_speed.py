"""examples/python/replicate_speed.py on a few steps: one process and two
side by side (the --jobs 2 way of replicate_scale.py), the report written
with both rows and figures that add up. Timings are not judged."""

import os
import re
import sys

import pytest

pytest.importorskip("torch")

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))
EXAMPLES = os.path.join(REPO, "examples", "python")
if EXAMPLES not in sys.path:
    sys.path.insert(0, EXAMPLES)

import replicate_speed  # noqa: E402


def test_one_process_and_two_side_by_side(tmp_path, monkeypatch):
    monkeypatch.setenv("MASA_VENV", os.path.dirname(os.path.dirname(sys.executable)))
    monkeypatch.setitem(replicate_speed.CONFIGS, "venv-1", (sys.executable, True, (1, 1), 1))
    monkeypatch.setitem(replicate_speed.CONFIGS, "venv-1x2", (sys.executable, True, (1, 1), 2))
    out = tmp_path / "speed.md"
    assert replicate_speed.main(["--configs", "venv-1,venv-1x2", "--steps", "2", "--warmup", "1",
                                 "--rounds", "1", "--out", str(out)]) == 0
    text = out.read_text()
    rows = {m.group(1): m for m in re.finditer(
        r"^\| (venv-1x?2?) \| [^|]+ \| 1 \+ 1( \(2 processes\))? \| ([\d,]+) \| ([\d,]+) \|", text,
        re.M)}
    assert set(rows) == {"venv-1", "venv-1x2"}
    assert rows["venv-1"].group(2) is None and rows["venv-1x2"].group(2) is not None
    for m in rows.values():
        assert int(m.group(3).replace(",", "")) > 0 and m.group(3) == m.group(4)  # one round
    breakdown = re.search(r"^\| venv-1x2 \| (\d+) \|((?: \d+ \|)+)$", text, re.M)
    assert breakdown and int(breakdown.group(1)) > 0
