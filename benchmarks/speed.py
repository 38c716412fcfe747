"""Speed benchmark: decode attention latency, end-to-end decode tokens/s, measured cache memory, and
a bandwidth bound for GPUs on paper (issue 4, section 4).

Parts (`--parts`, comma list; all by default):

- attention: one decode query (B=1, 9 query heads, 3 kv heads, D=64: SmolLM2-135M shapes) against
  a cache of 1K..128K tokens. Dense SDPA (fp32, bf16, enable_gqa=True) against VQ attention through
  `torch.ops.antkv.attention` (whatever kernel ops/ dispatches to) at 4, 2, 1, 0.5 bits (PQSpec
  presets; window 32, anchors 1%). Caches are built directly from random codes, centroids, anchors
  and window (content does not change speed); once per setting the VQ output is checked against
  dense SDPA on the dequantized cache. Median of repeated perf_counter timings after warm-up.
- e2e: greedy decode tokens/s of SmolLM2-135M-Instruct (fp32) at 1K, 4K, 16K, 32K tokens of context.
  FP: DynamicCache of dense K/V, `torch.compile(model)` (Inductor); HF StaticCache (max_cache_len =
  context + the steps run), `torch.compile(model, dynamic=False)` (Inductor), with GQA inside SDPA
  (HF's TRANSFORMERS_SDPA_FORCE_GQA; why: the comment opening part 2 below) and, for the record, with HF's
  default sdpa attention. Ours: `antkv_compile.patch` (antkv_backend), a DynamicCache whose layers
  already hold VQTensors (1 bit). The baseline at each context is the faster FP cache. The context
  is synthetic (random K/V, random codes / anchors / window), not prefilled: prefilling 32K tokens
  on 2 CPU cores is too slow and does not change the decode step. Compile time (first calls) is
  reported apart from the timed steps; a torch.profiler pass over a few steps gives the top ops and,
  for ours, the share of antkv::append (quantize-on-write) and antkv::attention in the step.
- eager: `model.generate` (greedy, the README demo's three prompts, 48 new tokens) with the FP
  DynamicCache against `ak.AntKVCache` (1 bit, random codebooks) after `ak.use_antkv_attention`:
  ms per generated token, and the ratio (issue 11's target: ours within 1.5x).
- memory: cache bytes measured from real allocations (every inner tensor's untyped storage, each
  once) of all 30 layers, fp16 dense DynamicCache against ours (fp16 anchors/window) at 4/2/1/0.5
  bit, and the longest context whose cache fits the budget (8 GiB), found by allocating caches
  (a prediction from measured probe lengths, then a search that brackets it by real allocations).
- impl: why the CPU kernel is C++: at one cache length (65,536 tokens) and 1 and 4 bits, the CPU
  implementations of antkv::attention side by side in one run: the PyTorch reference eager, the
  same reference through torch.compile (Inductor code from the decomposition), and the C++ kernel
  (antkv_compile/ops/cpu), with dense fp32 SDPA for scale; outputs checked against the reference.
- write: the quantize-on-write of one decode token (antkv::append: window flush, anchor top-k, basis
  map, encode, concatenations) per call and cache side at SmolLM2 shapes (B=1, 3 kv heads, D=64,
  window 32, anchors 1%, 1 bit; keys with a random orthogonal basis) at 4K and 32K tokens: the
  PyTorch reference (state.append), the C++ kernel (antkv_compile/ops/cpu/write.cpp) called
  directly and through the op as compiled graphs call it, and the codes `torch.cat` alone (the
  O(T) copy the op's new-tensor contract costs); the kernel's outputs checked against the reference.
- gpu: on paper, not measured: HBM bytes one decode step must read per layer (dense fp16 K/V
  against codes + anchors + window + codebooks) and the time that implies at H100 bandwidth
  (3.35 TB/s): a lower bound, labelled as such.

    python benchmarks/speed.py                         # full run, writes benchmarks/results/speed.*
    python benchmarks/speed.py --parts attention,gpu   # a subset (--merge keeps the other parts' rows)
    python benchmarks/speed.py --quick                 # smoke test (small sizes, 2-layer model), temp dir; CI runs it
                                                       # (tests/test_benchmarks.py)
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import json
import math
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
import traceback
from datetime import datetime
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from tqdm import tqdm
from transformers.generation.streamers import BaseStreamer

import antkv_compile as ak
from antkv_compile.cache import CacheSettings, VQTensor
from antkv_compile.evaluation import cache_nbytes, code_version, tensors_nbytes
from antkv_compile.quant.codebook import Codebooks, CodebookSide, LayerCodebook, model_fingerprint
from antkv_compile.quant.pq import spec_for_bits

RESULTS_DIR = Path(__file__).resolve().parent / "results"
PARTS = ("attention", "e2e", "eager", "memory", "impl", "write", "gpu")
PART_KIND = {"impl": "cpu_impl", "write": "cpu_write", "gpu": "gpu_bound"}  # the `kind` of a part's records, where it differs

# SmolLM2-135M-Instruct (checked against the loaded config in the e2e part).
LAYERS, Q_HEADS, KV_HEADS, HEAD_DIM = 30, 9, 3, 64
PARAMS = 134_515_008  # parameters of SmolLM2-135M (tied embeddings counted once)
H100_BYTES_PER_S = 3.35e12  # H100 SXM HBM3

VQ_BITS = (4.0, 2.0, 1.0, 0.5)
E2E_METHODS = ("fp-dynamiccache", "fp-staticcache", "fp-staticcache-hf-sdpa", "antkv-patch", "antkv-static")  # e2e part: FP first, see its comment
GIB = 1 << 30

FULL = dict(attn_contexts=[1 << e for e in range(10, 18)], e2e_contexts=[1024, 4096, 16384, 32768], e2e_steps=16, e2e_warmup=3,
            e2e_layers=LAYERS, e2e_methods=",".join(E2E_METHODS), profile_steps=3, eager_prompts=3, eager_tokens=48, eager_reps=3,
            eager_layers=LAYERS, mem_probes=[1024, 4096, 16384, 65536], budget_gib=8.0, min_time=1.0,
            gpu_contexts=[4096, 32768, 131072, 1 << 20], impl_context=65536, impl_bits="1,4", compile_cache="cold",
            write_contexts=[4096, 32768])
QUICK = dict(attn_contexts=[1024, 4096], e2e_contexts=[1024], e2e_steps=3, e2e_warmup=1, e2e_layers=2,
             e2e_methods="fp-dynamiccache,fp-staticcache,antkv-patch,antkv-static",
             profile_steps=1, eager_prompts=1, eager_tokens=8, eager_reps=1, eager_layers=2, mem_probes=[1024, 4096], budget_gib=0.25,
             min_time=0.1, gpu_contexts=[4096, 32768], impl_context=4096, impl_bits="1", compile_cache="kernels",
             write_contexts=[4096])


def _now() -> str:
    return datetime.now().astimezone().isoformat(timespec="seconds")


def _rss() -> int:
    """Resident set size of this process in bytes (Linux /proc; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return 0


def _peak_rss() -> int:
    """Peak resident set size of this process so far, bytes (Linux: ru_maxrss is in KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _cpu_seconds() -> float:
    """CPU time (user + system) of this process and its finished children (compile workers)."""
    import resource

    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def _free():
    gc.collect()


def time_fn(fn: Callable[[], object], min_time: float, min_reps: int = 5, max_reps: int = 1000, warmup: int = 2) -> dict:
    """Median (and quartiles) of perf_counter timings of `fn`, after `warmup` calls; repeats until
    both `min_reps` calls and `min_time` seconds are done (or `max_reps`)."""
    for _ in range(warmup):
        fn()
    times = []
    deadline = time.perf_counter() + min_time
    while len(times) < max_reps and (len(times) < min_reps or time.perf_counter() < deadline):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    q = statistics.quantiles(times, n=4) if len(times) > 1 else [times[0]] * 3
    return {"median": statistics.median(times), "q1": q[0], "q3": q[2], "reps": len(times)}


# --- synthetic caches ----------------------------------------------------------------------------
#
# Caches of 32K tokens cannot be grown through the real append path in a benchmark's time (every
# token encoded, the window flushed token by token), so they are built in the state a decode step
# leaves. To survive changes of the cache's internals they start from the public constructor
# (VQTensor.empty: dtypes, codebook and basis as the package lays them out) and only the per-token
# tensors are filled in, through the tensor-subclass protocol (__tensor_flatten__ /
# __tensor_unflatten__); check_synthetic then compares every inner tensor (name, shape, dtype) and
# the bytes held with a cache grown by the real append path, so a change of the layout fails loudly
# here instead of timing a cache that is not the one the package builds.

# Calibration's default fits a key basis for sub-vectors of up to this many dims (1 bit and up);
# random codebooks get a random orthogonal one there, so the step pays for the basis map as it
# does with calibrated codebooks.
from antkv_compile.calibrate import KEY_BASIS_MAX_SUB_DIM  # noqa: E402


def random_codebooks(config, bits: float, gen: torch.Generator) -> Codebooks:
    """Codebooks of random centroids for `config` at `bits` per element (K and V alike): speed and
    memory do not depend on the centroids' values. Keys get a random orthogonal basis where
    calibration would fit one."""
    spec = spec_for_bits(bits)
    H = config.num_key_value_heads
    S = HEAD_DIM // spec.sub_dim

    def side():
        return torch.randn(H, S, spec.num_centroids, spec.sub_dim, generator=gen)

    def layer():
        if spec.sub_dim > KEY_BASIS_MAX_SUB_DIM:
            return LayerCodebook(CodebookSide(spec, side(), torch.ones(H)), CodebookSide(spec, side(), torch.ones(H)))
        basis = torch.linalg.qr(torch.randn(H, HEAD_DIM, HEAD_DIM, generator=gen)).Q.contiguous()
        return LayerCodebook(CodebookSide(spec, side(), torch.ones(H), basis, basis.transpose(1, 2).contiguous()),
                             CodebookSide(spec, side(), torch.ones(H)))

    layers = [layer() for _ in range(config.num_hidden_layers)]
    return Codebooks(layers, model_fingerprint(config), {"bits": bits, "random": True})


def window_len(window: int) -> int:
    """Exact tokens in the window between decode steps: the flush keeps `window`, then the step's
    token joins it."""
    return window + 1


def with_state(empty: VQTensor, **state: torch.Tensor) -> VQTensor:
    """`empty` with some inner tensors replaced, through the tensor-subclass protocol (the inner
    tensors not named keep empty's: codebook, basis)."""
    names, context = empty.__tensor_flatten__()
    unknown = sorted(set(state) - set(names))
    if unknown:
        raise RuntimeError(f"VQTensor has no inner tensor {', '.join(unknown)} (it has {', '.join(names)}): the cache layout changed, "
                           f"update synthetic_vq in benchmarks/speed.py to it")
    inner = {n: state.get(n, getattr(empty, n)) for n in names}
    return type(empty).__tensor_unflatten__(inner, context, None, None)


def synthetic_vq(T: int, codebook: CodebookSide, settings: CacheSettings, dtype: torch.dtype,
                 gen: torch.Generator | None, fill: str = "random", batch: int = 1) -> VQTensor:
    """A VQTensor of T tokens in the state a decode step leaves (cache.py's flush rule): codes for
    every token, window+1 exact recent tokens, ceil(anchor_frac x encoded tokens) anchors at
    distinct positions. `fill="zeros"` skips the random content (memory measurements). Dtypes are
    those of VQTensor.empty's inner tensors."""
    empty = VQTensor.empty(batch, codebook, settings, dtype=dtype)
    H, S, K, d = codebook.centroids.shape
    D = S * d
    Tw = min(T, window_len(settings.window))
    Tc = T - Tw
    A = math.ceil(settings.anchor_frac * Tc)
    shapes = dict(codes=(T, S), anchor_rows=(A, D), anchor_pos=(A,), anchor_score=(A,), window=(Tw, D), window_err=(Tw,), window_score=(Tw,))
    state = {}
    for name, tail in shapes.items():
        like, shape = getattr(empty, name), (batch, H, *tail)
        if fill != "random" or name == "window_score":  # the score a flushed window starts from
            state[name] = torch.zeros(shape, dtype=like.dtype)
        elif name == "codes":
            state[name] = torch.randint(0, K, shape, generator=gen, dtype=torch.int32).to(like.dtype)
        elif name == "anchor_pos":
            pos = [torch.randperm(Tc, generator=gen)[:A].sort().values for _ in range(batch * H)]
            state[name] = torch.stack(pos).view(shape).to(like.dtype) if pos and A else torch.zeros(shape, dtype=like.dtype)
        elif like.is_floating_point():
            state[name] = (torch.randn if name in ("anchor_rows", "window") else torch.rand)(shape, generator=gen).to(like.dtype)
        else:
            raise AssertionError(f"no rule for the inner tensor {name} ({like.dtype})")
    if fill != "random":
        state["anchor_pos"] = torch.arange(A, dtype=state["anchor_pos"].dtype).expand(batch, H, A).contiguous()
    return with_state(empty, **state)


def synthetic_side(T: int, book: LayerCodebook, side: str, settings: CacheSettings, dtype: torch.dtype, gen, fill: str = "random") -> VQTensor:
    """synthetic_vq for the key or the value side of a layer's codebook (keys with its basis)."""
    return synthetic_vq(T, getattr(book, side), settings, dtype, gen, fill)


def check_synthetic(book: LayerCodebook, settings: CacheSettings, dtype: torch.dtype, T: int = 2048) -> str:
    """The synthetic cache has the layout of one grown by the real append path (a prefill of T-1
    tokens, then one decode token): the same inner tensors with the same shapes and dtypes, and the
    same bytes held. Raises (naming the tensors that differ) otherwise."""
    exclude = book.tensors()
    for side in ("key", "value"):
        H, S, _, d = getattr(book, side).centroids.shape
        real = VQTensor.empty(1, getattr(book, side), settings, dtype=dtype)
        real = real.append(torch.randn(1, H, T - 1, S * d, dtype=dtype)).append(torch.randn(1, H, 1, S * d, dtype=dtype))
        real = real.clone()  # its state, compact: eager appends keep capacity buffers (cache.py), not part of the layout
        synth = synthetic_side(T, book, side, settings, dtype, torch.Generator().manual_seed(0))
        names = real.__tensor_flatten__()[0]
        if synth.__tensor_flatten__()[0] != names:
            raise AssertionError(f"synthetic {side} cache has inner tensors {synth.__tensor_flatten__()[0]}, the appended one {names}")
        differ = {n: ((tuple(getattr(real, n).shape), getattr(real, n).dtype), (tuple(getattr(synth, n).shape), getattr(synth, n).dtype))
                  for n in names if (getattr(real, n).shape, getattr(real, n).dtype) != (getattr(synth, n).shape, getattr(synth, n).dtype)}
        if differ or (synth.shape, synth.dtype) != (real.shape, real.dtype):
            raise AssertionError(f"synthetic {side} cache != one grown by append at T={T} (appended, synthetic): {differ}; "
                                 f"outer {tuple(real.shape)} {real.dtype} vs {tuple(synth.shape)} {synth.dtype}")
        got, want = tensors_nbytes([synth], exclude=exclude), tensors_nbytes([real], exclude=exclude)
        if got != want:
            raise AssertionError(f"synthetic {side} cache holds {got} bytes, the appended one {want}")
    return f"synthetic == appended cache (inner tensors, shapes, dtypes, bytes) at T={T}"


def vq_attention_args(q: torch.Tensor, K: VQTensor, V: VQTensor) -> tuple:
    """The arguments of antkv::attention for one decode query over the caches K and V (each side
    a list of its state.Side fields; the op maps q into the key basis itself)."""
    return (q, list(K.side), list(V.side), None, False, None)


def vq_attention(q: torch.Tensor, K: VQTensor, V: VQTensor) -> Callable[[], torch.Tensor]:
    """One decode attention call of `torch.ops.antkv.attention` (whatever kernel ops.py dispatches
    to); the closure returns the output."""
    op_args = vq_attention_args(q, K, V)
    return lambda: torch.ops.antkv.attention(*op_args)[0]


# --- part 1: decode attention latency ------------------------------------------------------------

def attention_path(q: torch.Tensor, K: VQTensor) -> str:
    """Which implementation `torch.ops.antkv.attention` runs for this call on CPU."""
    from antkv_compile.ops import cpu

    return "C++ CPU kernel" if cpu.supported(q, K.side) else "PyTorch reference (the CPU kernel declines this call)"


def run_attention(args, records: list, progress) -> None:
    gen = torch.Generator().manual_seed(0)
    settings = CacheSettings(window=args.window, anchor_frac=args.anchor_frac)
    methods = [("dense-fp32", 32.0), ("dense-bf16", 16.0)] + [(f"vq-{b:g}bit", b) for b in args.bits]
    bar = tqdm(total=len(args.attn_contexts) * len(methods), desc="attention", unit="setting")
    for T in args.attn_contexts:
        q32 = torch.randn(1, Q_HEADS, 1, HEAD_DIM, generator=gen)
        k32 = torch.randn(1, KV_HEADS, T, HEAD_DIM, generator=gen)
        v32 = torch.randn(1, KV_HEADS, T, HEAD_DIM, generator=gen)
        dense_ms = None
        for method, bits in methods:
            bar.set_postfix_str(f"T={T} {method}")
            rec = dict(kind="attention", metric="latency", method=method, bits=bits, context=T, value=None, unit="ms",
                       ratio_vs_dense=None, q1=None, q3=None, reps=None, check=None, error=None)
            try:
                if method.startswith("dense"):
                    dt = torch.float32 if bits == 32 else torch.bfloat16
                    q, k, v = q32.to(dt), k32.to(dt), v32.to(dt)

                    def fn(q=q, k=k, v=v):
                        return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)

                    rec["dtype"] = str(dt).replace("torch.", "")
                    if dt is not torch.float32:  # accuracy of the low-precision baseline, for reference
                        ref = F.scaled_dot_product_attention(q32, k32, v32, enable_gqa=True)
                        rec["check"] = f"max |out - fp32| {(fn().float() - ref).abs().max().item():.2e}"
                else:
                    spec = spec_for_bits(bits)
                    S = HEAD_DIM // spec.sub_dim
                    K, V = (synthetic_vq(T, CodebookSide(spec, torch.randn(KV_HEADS, S, spec.num_centroids, spec.sub_dim, generator=gen),
                                                         torch.ones(KV_HEADS)), settings, torch.float32, gen) for _ in range(2))
                    fn = vq_attention(q32, K, V)

                    # Sanity (not timed): VQ attention == dense SDPA on the dequantized cache.
                    ref = F.scaled_dot_product_attention(q32, K.dequantize(), V.dequantize(), enable_gqa=True)
                    out = fn()
                    err = (out - ref).abs().max().item()
                    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-3,
                                               msg=lambda m: f"VQ attention != SDPA(dequantized) at T={T}, {method}: {m}")
                    rec.update(dtype="float32", check=f"max |vq - sdpa(dequantized)| {err:.2e}", path=attention_path(q32, K),
                               anchors=int(K.anchor_pos.shape[2]), window=int(K.window.shape[2]))
                    del ref, out
                with torch.inference_mode():
                    t = time_fn(fn, args.min_time)
                rec.update(value=t["median"] * 1e3, q1=t["q1"] * 1e3, q3=t["q3"] * 1e3, reps=t["reps"])
                if method == "dense-fp32":
                    dense_ms = rec["value"]
                rec["ratio_vs_dense"] = rec["value"] / dense_ms if dense_ms else None
            except Exception as exc:
                traceback.print_exc()
                rec["error"] = f"{type(exc).__name__}: {exc}"
            records.append(rec)
            progress()
            bar.update()
            fn = None  # the caches go with it (reference counting)
    bar.close()


# --- part 2: end-to-end decode -------------------------------------------------------------------
#
# Why FP StaticCache compiled was once measured slower than FP DynamicCache compiled (issue 11: 1164
# vs 587 ms per step at 4K), profiled on SmolLM2 with 2 layers at 4K (torch.profiler and the
# Inductor output code): not recompiles (one graph for every step; HF marks the buffers with
# mark_static_address and keeps the length in a tensor) and not the write (Inductor reinplaces
# StaticLayer's `index_copy_` into a kernel that writes one row in place). It is HF's "sdpa"
# attention under torch.compile: a static cache always needs a mask (it attends over max_cache_len
# slots, the unfilled ones masked), and with a mask `use_gqa_in_sdpa` refuses enable_gqa on CPU/CUDA
# while `pack_gqa` is skipped when Dynamo traces, so `repeat_kv` runs: every layer, every step, K
# and V are copied to 9 query heads (3x the cache bytes written, then read by SDPA with a float
# mask). The DynamicCache decode step has no mask (HF skips it for one query token) and attends with
# enable_gqa over the 3 kv heads. Measured (loaded machine, 1 thread, so only the proportions mean
# anything): 30 layers at 4K, ms per step: static with HF's sdpa 235, dynamic 180, static with the
# fix 160; self time of Inductor's own kernels per step (torch.profiler, the repeat_kv copies are
# there) 128 vs 64 (dynamic: its torch.cat copies) vs 14. 2 layers at 4K: SDPA 3.0 vs 1.2 ms per
# call without / with the fix. The harness fix: `fp-staticcache` sets HF's own switch
# TRANSFORMERS_SDPA_FORCE_GQA=1 while it compiles and runs (SDPA with enable_gqa and the mask: no
# copies); `fp-staticcache-hf-sdpa` keeps HF's default, for the record. What stays inherent to a
# static cache: attention over max_cache_len slots (here context + the steps run, so a few dozen
# masked slots) and a graph per max_cache_len (compiled with dynamic=False, as generate's
# CompileConfig does).

FORCE_GQA_ENV = "TRANSFORMERS_SDPA_FORCE_GQA"
E2E_NOTES = {
    "fp-dynamiccache": "DynamicCache, torch.compile(model) (Inductor)",
    "fp-staticcache": f"HF StaticCache(max_cache_len = context + steps), torch.compile(model, dynamic=False) (Inductor), {FORCE_GQA_ENV}=1",
    "fp-staticcache-hf-sdpa": "HF StaticCache, torch.compile(model, dynamic=False) (Inductor), HF's default sdpa (repeat_kv under compile)",
    "antkv-patch": "antkv_compile.patch (antkv_backend), DynamicCache of VQTensors",
    "antkv-static": "antkv_compile.patch (antkv_backend), AntKVStaticCache(max_cache_len = context + steps) of StaticVQTensors",
}


@functools.cache
def _loaded():
    """SmolLM2 as loaded from its GGUF (slow to parse: loaded once per run, copied per part)."""
    from antkv_compile.evaluation import load_smollm2

    return load_smollm2()


def load_model(layers: int):
    """A fresh copy of SmolLM2-135M-Instruct (fp32) and its tokenizer; only the first `layers`
    layers if fewer than 30 (--quick). Each part gets its own: e2e patches its model in place."""
    import copy

    loaded, tokenizer = _loaded()
    model = copy.deepcopy(loaded)
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (LAYERS, Q_HEADS, KV_HEADS, HEAD_DIM), cfg
    assert sum(p.numel() for p in model.parameters()) == PARAMS
    if layers < LAYERS:  # --quick: a smoke test of the harness on the first layers only
        model.model.layers = model.model.layers[:layers]
        cfg.num_hidden_layers = layers
        if getattr(cfg, "layer_types", None):
            cfg.layer_types = cfg.layer_types[:layers]
    return model, tokenizer


class E2E:
    """The model and its synthetic caches."""

    def __init__(self, args):
        self.args = args
        self.model, self.tokenizer = load_model(args.e2e_layers)
        self.gen = torch.Generator().manual_seed(1)
        self.settings = CacheSettings(window=args.window, anchor_frac=args.anchor_frac)
        self.codebooks_note = ""
        self.books = None

    def codebooks(self) -> Codebooks:
        if self.books is None:
            if self.args.codebooks == "calibrate":
                from antkv_compile.evaluation import load_wikitext_ids

                ids = load_wikitext_ids(self.tokenizer, self.args.data)[:512]
                self.books = ak.calibrate(self.model, ids, bits=1.0, seq_len=512, max_tokens=512, kv_split="equal", progress=False)
                self.codebooks_note = "1-bit codebooks from ak.calibrate on WikiText-2 test tokens [0, 512), K/V split equal"
            else:
                self.books = random_codebooks(self.model.config, 1.0, self.gen)
                self.codebooks_note = "1-bit codebooks of random centroids and a random orthogonal key basis (speed does not depend on them)"
        return self.books

    def cache(self, T: int, method: str, steps: int = 0):
        """A cache holding T tokens of random content: a DynamicCache of dense K/V, an HF StaticCache
        with room for `steps` more, or a DynamicCache whose layers hold VQTensors (ours). Dynamic
        caches have their sequence sizes marked dynamic as the backend marks the caches it returns,
        so the first compiled call is already the general decode step."""
        from transformers import DynamicCache, StaticCache

        dtype = self.model.dtype
        if method.startswith("fp-staticcache"):
            cache = StaticCache(config=self.model.config, max_cache_len=T + steps)
            # Allocates every layer and marks its buffers static (mark_static_address), as the first update would.
            cache.early_initialization(1, KV_HEADS, HEAD_DIM, dtype, torch.device("cpu"))
            for layer in cache.layers:
                layer.keys[:, :, :T] = torch.randn(1, KV_HEADS, T, HEAD_DIM, generator=self.gen, dtype=dtype)
                layer.values[:, :, :T] = torch.randn(1, KV_HEADS, T, HEAD_DIM, generator=self.gen, dtype=dtype)
                layer.cumulative_length.fill_(T)
            return cache
        if method == "antkv-static":
            cache = ak.AntKVStaticCache(T + steps, self.books, self.settings)
            for i, layer in enumerate(cache.layers):
                k, v = (ak.StaticVQTensor.from_cache(synthetic_side(T, self.books[i], side, self.settings, dtype, self.gen), T + steps)
                        for side in ("key", "value"))  # fmt: skip
                layer.initialize(1, dtype, k.device)
                layer.keys, layer.values = k, v
                layer.cumulative_length.fill_(T)
            return cache
        cache = DynamicCache(config=self.model.config)
        for i, layer in enumerate(cache.layers):
            if method == "antkv-patch":
                book = self.books[i]
                k = ak.mark_growing(synthetic_side(T, book, "key", self.settings, dtype, self.gen))
                v = ak.mark_growing(synthetic_side(T, book, "value", self.settings, dtype, self.gen))
            else:
                k = torch.randn(1, KV_HEADS, T, HEAD_DIM, generator=self.gen, dtype=dtype)
                v = torch.randn(1, KV_HEADS, T, HEAD_DIM, generator=self.gen, dtype=dtype)
                torch._dynamo.maybe_mark_dynamic(k, 2)
                torch._dynamo.maybe_mark_dynamic(v, 2)
            layer.dtype, layer.device = dtype, k.device
            layer.keys, layer.values, layer.is_initialized = k, v, True
        return cache


COMPILE_CACHES = {
    "cold": "cold (Inductor caches disabled: every compile from scratch)",
    "kernels": "kernel binaries cached by source (graphs always traced, lowered and generated anew; no FX graph, AOT or PGO cache)",
    "warm": "warm allowed (every Inductor cache; compile time depends on earlier runs)",
}


def configure_compile_caches(mode: str) -> None:
    """Cold compiles for the reported compile times (Inductor's on-disk caches would make them depend
    on earlier runs). --quick only caches compiled C++ kernels by their source: every graph is still
    traced, lowered and generated by this checkout's code, but a kernel whose source an earlier
    compile (of this run or another) already built is not rebuilt by the C++ compiler."""
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config

    inductor_config.force_disable_caches = mode == "cold"
    if mode == "kernels":
        inductor_config.fx_graph_cache = False
        inductor_config.fx_graph_remote_cache = False
        functorch_config.enable_autograd_cache = False
        torch._dynamo.config.automatic_dynamic_local_pgo = False


def _clone_cache(cache):
    """A copy of a DynamicCache or StaticCache (VQTensor.clone copies the inner tensors, codebooks
    shared; a static layer's length counter is copied too)."""
    import copy

    twin = copy.copy(cache)
    twin.layers = []
    for layer in cache.layers:
        new = copy.copy(layer)
        new.keys, new.values = layer.keys.clone(), layer.values.clone()
        if isinstance(getattr(layer, "cumulative_length", None), torch.Tensor):
            new.cumulative_length = layer.cumulative_length.clone()
        twin.layers.append(new)
    return twin


def _step(fwd, ids, cache, kwarg: str):
    out = fwd(input_ids=ids, use_cache=True, **{kwarg: cache})
    return out.logits[:, -1:].argmax(-1), out.logits[:, -1]


def _profile(fwd, ids, cache, kwarg: str, steps: int, ours: bool) -> tuple[dict, torch.Tensor]:
    """Top self time per step of the profiled decode steps (torch.profiler) and, for ours, the share
    of their wall time inside antkv::append and antkv::attention (inclusive time of the op's range
    on the calling thread) and the rest."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            ids, _ = _step(fwd, ids, cache, kwarg)
        wall = time.perf_counter() - t0
    averages = prof.key_averages()
    top = sorted(averages, key=lambda e: e.self_cpu_time_total, reverse=True)[:10]
    out = {"profile_top_self_ms_per_step": {e.key: round(e.self_cpu_time_total / 1e3 / steps, 3) for e in top},
           "profile_steps": steps, "profile_wall_s": wall}
    if ours:
        events = {e.key: e for e in averages}

        def total(name):
            e = events.get(name)
            return e.cpu_time_total / 1e6 if e is not None else 0.0

        if "antkv::static_attention_" in events:  # the static step: one op per layer, its write and flush as ranges inside
            append = total("antkv::static_write") + total("antkv::static_flush")
            attention = total("antkv::static_attention_") - append
        else:
            append, attention = total("antkv::append"), total("antkv::attention")
        out.update(append_share=append / wall, attention_share=attention / wall, rest_share=max(0.0, 1 - (append + attention) / wall),
                   append_ms_per_step=append / steps * 1e3, attention_ms_per_step=attention / steps * 1e3)
    return out, ids


@contextlib.contextmanager
def _env(name: str, value: str | None):
    """Set (or, with None, unset) an environment variable for the block."""
    old = os.environ.get(name)
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


def _e2e_baselines(records: list) -> None:
    """ratio_vs_dense of every e2e row: its tokens/s over the fastest FP cache's at the same context
    (the baseline to beat, issue 11), with the baseline's name; and the ratio to each FP cache."""
    rows = [r for r in records if r["kind"] == "e2e" and r.get("value") is not None]
    for r in rows:
        fp = [f for f in rows if f["context"] == r["context"] and f["method"].startswith("fp-")]
        if not fp:
            continue
        best = max(fp, key=lambda f: f["value"])
        r.update(ratio_vs_dense=r["value"] / best["value"], baseline=best["method"],
                 ratio_vs={f["method"]: r["value"] / f["value"] for f in fp})


def run_e2e(args, records: list, progress) -> None:
    e = E2E(args)
    model, kwarg = e.model, ak.cache_keyword(e.model)
    note = "" if args.e2e_layers == LAYERS else f"quick smoke test: first {args.e2e_layers} of {LAYERS} layers"
    steps_per_context = 1 + max(0, args.e2e_warmup - 1) + args.e2e_steps + args.profile_steps
    bar = tqdm(total=len(args.e2e_methods) * len(args.e2e_contexts), desc="e2e", unit="context")
    torch.manual_seed(0)
    for method in args.e2e_methods:
        ours, static = method.startswith("antkv"), method.startswith("fp-staticcache") or method == "antkv-static"
        bits = 1.0 if ours else 32.0
        fwd = None
        if ours:
            e.codebooks()
        # Only the static row runs with HF's GQA switch (see the comment opening part 2); Dynamo reads it while tracing.
        with _env(FORCE_GQA_ENV, "1" if method == "fp-staticcache" else None):
            for ci, T in enumerate(args.e2e_contexts):
                bar.set_postfix_str(f"{method} T={T}")
                rec = dict(kind="e2e", metric="decode_tokens_per_s", method=method, bits=bits, context=T, value=None, unit="tokens/s",
                           ratio_vs_dense=None, baseline=None, ms_per_step=None, q1_ms=None, q3_ms=None, steps=args.e2e_steps,
                           warmup_steps=args.e2e_warmup, first_call_s=None, compile_s=None, graphs=None, check=None,
                           notes=note, error=None)
                try:
                    with torch.no_grad():
                        cache = e.cache(T, method, steps_per_context)
                        ids = torch.tensor([[e.tokenizer.encode(" the")[0]]])
                        eager_logits = None
                        if ci == 0 or static:
                            # Sanity (not timed): the compiled step's logits equal the eager model's on a
                            # copy of the same cache (ours: eager VQ attention through AntKV attention).
                            twin = _clone_cache(cache)
                            if ours:
                                ak.use_antkv_attention(model)
                            # patch() replaced model.forward with the compiled one after the first context: run the original
                            _, eager_logits = _step(getattr(model, "antkv_original_forward", model), ids, twin, kwarg)
                            del twin
                            _free()
                        if fwd is None:
                            torch._dynamo.utils.counters.clear()
                            if ours:
                                ak.patch(model, e.books, window=args.window, anchor_frac=args.anchor_frac)
                                fwd = model
                            else:  # a static cache compiles one graph per max_cache_len, as generate's CompileConfig
                                fwd = torch.compile(model, dynamic=False if static else None)
                        graphs_before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
                        t0 = time.perf_counter()
                        ids, logits = _step(fwd, ids, cache, kwarg)
                        first = time.perf_counter() - t0
                        compiled_first = torch._dynamo.utils.counters["stats"]["unique_graphs"] > graphs_before
                        if eager_logits is not None:
                            diff = (logits - eager_logits).abs().max().item()
                            torch.testing.assert_close(logits, eager_logits, atol=2e-3, rtol=2e-3,
                                                       msg=lambda m: f"{method}: compiled logits != eager: {m}")
                            rec["check"] = f"compiled vs eager logits, first step: max |diff| {diff:.1e}"
                        for _ in range(args.e2e_warmup - 1):
                            ids, _ = _step(fwd, ids, cache, kwarg)
                        times = []
                        for _ in range(args.e2e_steps):
                            t0 = time.perf_counter()
                            ids, _ = _step(fwd, ids, cache, kwarg)
                            times.append(time.perf_counter() - t0)
                        med = statistics.median(times)
                        q = statistics.quantiles(times, n=4) if len(times) > 1 else [med] * 3
                        rec.update(value=1 / med, ms_per_step=med * 1e3, q1_ms=q[0] * 1e3, q3_ms=q[2] * 1e3, first_call_s=first,
                                   graphs=torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs_before)
                        if compiled_first:
                            rec["compile_s"] = first - med
                            rec["compile_cache"] = COMPILE_CACHES[args.compile_cache]
                        if ours:
                            layer0 = cache.layers[0]
                            assert isinstance(layer0.keys, (VQTensor, ak.StaticVQTensor)), type(layer0.keys)
                            if ci == 0:
                                rec["synthetic_check"] = check_synthetic(e.books[0], e.settings, model.dtype)
                            rec["sites_rewritten"] = f"{sum(s.rewritten for s in model.antkv_backend.sites)}/{len(model.antkv_backend.sites)}"
                            rec["notes"] = "; ".join(x for x in (note, e.codebooks_note, f"window {args.window}, anchors {args.anchor_frac:.0%}") if x)
                        else:
                            rec["notes"] = "; ".join(x for x in (note, E2E_NOTES[method], f"attn {model.config._attn_implementation}") if x)
                        if args.profile_steps:
                            shares, ids = _profile(fwd, ids, cache, kwarg, args.profile_steps, ours)
                            rec.update(shares)
                        rec["final_context"] = int(cache.get_seq_length())
                        if static:
                            rec["max_cache_len"] = T + steps_per_context
                    del cache
                except Exception as exc:
                    traceback.print_exc()
                    rec["error"] = f"{type(exc).__name__}: {exc}"
                records.append(rec)
                _e2e_baselines(records)
                progress()
                bar.update()
                _free()
        if not ours:
            fwd = None
            torch._dynamo.reset()
    bar.close()


# --- part 2b: eager generation (the README demo path) -------------------------------------------

DEMO_PROMPTS = [  # examples/demo.py
    "The history of the Roman Empire",
    "Photosynthesis is the process by which",
    "In computer science, a hash table",
]


class _Clock(BaseStreamer):
    """A generate() streamer that records when each token arrives (the prompt first)."""

    def __init__(self):
        self.times = []

    def put(self, value):
        self.times.append(time.perf_counter())

    def end(self):
        pass


def run_eager(args, records: list, progress) -> None:
    """model.generate, greedy, the demo's prompts: FP DynamicCache against ak.AntKVCache (1 bit,
    random codebooks), after ak.use_antkv_attention(model) as the demo does. Time per generated
    token = generate's wall time / new tokens (prefill of the short prompt included); step = median
    interval between consecutive new tokens (decode steps only)."""
    from transformers import DynamicCache

    model, tok = load_model(args.eager_layers)
    kwarg = ak.cache_keyword(model)
    books = random_codebooks(model.config, 1.0, torch.Generator().manual_seed(3))
    ak.use_antkv_attention(model)
    methods = {"fp-dynamiccache": lambda n: DynamicCache(config=model.config),  # n: the tokens it will hold (prompt + new)
               "antkv-cache": lambda n: ak.AntKVCache(books, window=args.window, anchor_frac=args.anchor_frac, max_cache_len=n)}
    note = "" if args.eager_layers == LAYERS else f"quick smoke test: first {args.eager_layers} of {LAYERS} layers"
    prompts = DEMO_PROMPTS[: args.eager_prompts]
    bar = tqdm(total=len(prompts) * len(methods), desc="eager", unit="run")
    for prompt in prompts:
        ids = tok(prompt, return_tensors="pt").input_ids
        fp = None
        for method, make in methods.items():
            bar.set_postfix_str(f"{method} {prompt[:20]!r}")
            rec = dict(kind="eager", metric="ms_per_token", method=method, bits=1.0 if method == "antkv-cache" else 32.0,
                       context=ids.shape[1], value=None, unit="ms/token", ratio_vs_dense=None, prompt=prompt, new_tokens=args.eager_tokens,
                       reps=args.eager_reps, step_ms=None, first_token_ms=None, total_s=None, notes=note, error=None)
            try:
                with torch.no_grad():
                    def generate(streamer=None):
                        cache = make(ids.shape[1] + args.eager_tokens)  # preallocated as the demo does
                        out = model.generate(ids, max_new_tokens=args.eager_tokens, min_new_tokens=args.eager_tokens, do_sample=False,
                                             streamer=streamer, **{kwarg: cache})
                        return out, cache

                    generate()  # warm-up: first-call costs (kernel build / load, allocator) apart
                    totals, steps, firsts = [], [], []
                    for _ in range(args.eager_reps):
                        clock = _Clock()
                        t0 = time.perf_counter()
                        out, cache = generate(clock)
                        totals.append(time.perf_counter() - t0)
                        new = out.shape[1] - ids.shape[1]
                        assert new == args.eager_tokens, f"generated {new} tokens, asked for {args.eager_tokens}"
                        firsts.append(clock.times[1] - t0)
                        steps += [b - a for a, b in zip(clock.times[1:], clock.times[2:])]
                    if method == "antkv-cache":
                        assert isinstance(cache.layers[0].keys, VQTensor), type(cache.layers[0].keys)
                        rec["cache_bytes"] = cache_nbytes(cache, exclude=books.tensors())
                    else:
                        rec["cache_bytes"] = cache_nbytes(cache)
                    total = statistics.median(totals)
                    rec.update(value=total / args.eager_tokens * 1e3, total_s=total, step_ms=statistics.median(steps) * 1e3,
                               first_token_ms=statistics.median(firsts) * 1e3, final_context=int(cache.get_seq_length()))
                    if method == "antkv-cache":
                        rec["notes"] = "; ".join(x for x in (note, "1-bit random codebooks with a random key basis", f"window {args.window}") if x)
                    if method == "fp-dynamiccache":
                        fp = rec["value"]
                    rec["ratio_vs_dense"] = rec["value"] / fp if fp else None
            except Exception as exc:
                traceback.print_exc()
                rec["error"] = f"{type(exc).__name__}: {exc}"
            records.append(rec)
            progress()
            bar.update()
            _free()
    bar.close()


# --- part 3: memory ------------------------------------------------------------------------------

class MemoryMethod:
    """Builds a real 30-layer cache of T tokens and measures the bytes it holds."""

    def __init__(self, name: str, bits: float, window: int, anchor_frac: float, config):
        self.name, self.bits, self.config = name, bits, config
        self.settings = CacheSettings(window=window, anchor_frac=anchor_frac)
        self.books = None if bits >= 16 else random_codebooks(config, bits, torch.Generator().manual_seed(2))

    def build(self, T: int):
        from transformers import DynamicCache

        if self.books is None:  # the real DynamicCache path: update() concatenates onto an empty layer
            cache = DynamicCache(config=self.config)
            for i in range(LAYERS):
                k = torch.zeros(1, KV_HEADS, T, HEAD_DIM, dtype=torch.float16)
                cache.update(k, torch.zeros_like(k), i)
                del k
            return cache
        cache = ak.AntKVCache(self.books, settings=self.settings)
        for layer, book in zip(cache.layers, self.books.layers):
            layer.dtype, layer.device = torch.float16, torch.device("cpu")
            layer.keys = synthetic_side(T, book, "key", self.settings, torch.float16, None, fill="zeros")
            layer.values = synthetic_side(T, book, "value", self.settings, torch.float16, None, fill="zeros")
            layer.is_initialized = True
        return cache

    def measure(self, T: int) -> dict:
        """Allocate, measure (storages, each once; codebooks excluded), free."""
        import weakref

        rss0 = _rss()
        cache = self.build(T)
        held = cache_nbytes(cache, exclude=self.books.tensors() if self.books else ())
        rss = _rss() - rss0
        nominal = cache.cache_nbytes() if self.books else None
        layer = cache.layers[-1]
        probe = weakref.ref(layer.keys.codes if self.books else layer.keys)
        del cache, layer
        if probe() is not None:  # freed by reference counting, unless something holds a cycle
            _free()
        assert probe() is None, "a measured cache is still alive"
        return {"bytes": held, "rss_delta": rss, "nominal": nominal}


def longest_context(method: MemoryMethod, budget: int, probes: dict[int, int], bar) -> tuple[int, int, int, int, list]:
    """Longest T whose measured cache fits `budget`: predicted from the two longest probes, then
    bracketed and bisected by real allocations (never allocating more than ~1.05 x budget).
    Returns (T, bytes(T), bytes(T + 1), rss of the allocation at T, trace of (T, bytes))."""
    (t1, b1), (t2, b2) = sorted(probes.items())[-2:]
    slope = (b2 - b1) / (t2 - t1)
    pred = max(1, int(t2 + (budget - b2) / slope))
    trace, measured = [], {}

    def bytes_at(T):
        if T not in measured:
            m = method.measure(T)
            measured[T] = m
            trace.append((T, m["bytes"]))
            bar.set_postfix_str(f"{method.name} T={T:,} {m['bytes'] / GIB:.3f} GiB")
        return measured[T]["bytes"]

    lo, hi = pred, pred + 1
    # The bytes step up by one anchor row per layer side every 1 / anchor_frac tokens: the prediction
    # is within about that many tokens.
    step = max(4, math.ceil(1 / method.settings.anchor_frac)) if method.books and method.settings.anchor_frac > 0 else 4
    while bytes_at(lo) > budget:  # walk down until it fits
        hi, lo, step = lo, max(1, lo - step), step * 2
    while bytes_at(hi) <= budget:  # walk up until it does not (a step is ~0.1% of the budget)
        lo, hi, step = hi, hi + step, step * 2
        if (hi - lo) * slope > 0.05 * budget:
            hi = lo + max(1, int(0.05 * budget / slope))
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if bytes_at(mid) <= budget:
            lo = mid
        else:
            hi = mid
    return lo, measured[lo]["bytes"], bytes_at(lo + 1), measured[lo]["rss_delta"], trace


def run_memory(args, records: list, progress) -> None:
    config = _smollm2_config()
    budget = int(args.budget_gib * GIB)
    methods = [MemoryMethod("dense-fp16", 16.0, args.window, args.anchor_frac, config)]
    methods += [MemoryMethod(f"vq-{b:g}bit", b, args.window, args.anchor_frac, config) for b in args.bits]
    checks = {m.name: check_synthetic(m.books[0], m.settings, torch.float16) for m in methods if m.books}
    bar = tqdm(total=len(methods), desc="memory", unit="method")
    dense_max = None
    for m in methods:
        bar.set_postfix_str(m.name)
        try:
            probes = {}
            for T in args.mem_probes:
                meas = m.measure(T)
                probes[T] = meas["bytes"]
                bpt = meas["bytes"] / T
                records.append(dict(kind="memory", metric="cache_bytes", method=m.name, bits=m.bits, context=T,
                                    value=meas["bytes"], unit="bytes", bytes_per_token=bpt,
                                    ratio_vs_dense=None, rss_delta=meas["rss_delta"], nominal_bytes=meas["nominal"],
                                    codebook_bytes=m.books.nbytes if m.books else 0, check=checks.get(m.name),
                                    error=None))
            t0 = time.perf_counter()
            T, b, b_next, rss, trace = longest_context(m, budget, probes, bar)
            if m.name == "dense-fp16":
                dense_max = T
            records.append(dict(kind="memory", metric="max_context", method=m.name, bits=m.bits, context=T, value=T,
                                unit="tokens", budget_bytes=budget, bytes_at_max=b, bytes_at_max_plus_1=b_next,
                                rss_delta_at_max=rss, allocations=len(trace), search_seconds=time.perf_counter() - t0,
                                ratio_vs_dense=T / dense_max if dense_max else None, peak_rss_so_far=_peak_rss(), error=None))
        except Exception as exc:
            traceback.print_exc()
            records.append(dict(kind="memory", metric="max_context", method=m.name, bits=m.bits, context=None, value=None,
                                unit="tokens", ratio_vs_dense=None, error=f"{type(exc).__name__}: {exc}"))
        progress()
        bar.update()
        _free()
    bar.close()
    by_len = {r["context"]: r["value"] for r in records if r["kind"] == "memory" and r["metric"] == "cache_bytes" and r["method"] == "dense-fp16"}
    for r in records:
        if r["kind"] == "memory" and r["metric"] == "cache_bytes" and by_len.get(r["context"]):
            r["ratio_vs_dense"] = r["value"] / by_len[r["context"]]


def _smollm2_config():
    """The SmolLM2-135M config (shapes only) without loading the weights."""
    from transformers import LlamaConfig

    return LlamaConfig(num_hidden_layers=LAYERS, num_attention_heads=Q_HEADS, num_key_value_heads=KV_HEADS,
                       hidden_size=Q_HEADS * HEAD_DIM, head_dim=HEAD_DIM, intermediate_size=1536, vocab_size=49152)


# --- part 4: the CPU implementations compared ---------------------------------------------------

def run_impl(args, records: list, progress) -> None:
    """Dense fp32 SDPA, then each CPU implementation of antkv::attention on the same caches."""
    from antkv_compile import ops
    from antkv_compile.ops import cpu

    gen = torch.Generator().manual_seed(0)
    settings = CacheSettings(window=args.window, anchor_frac=args.anchor_frac)
    T = args.impl_context
    q = torch.randn(1, Q_HEADS, 1, HEAD_DIM, generator=gen)
    impls = {
        "reference, eager PyTorch": ops.attention_reference,
        "reference through torch.compile (Inductor)": torch.compile(ops.attention_reference, dynamic=False),
        "C++ kernel (antkv_compile/ops/cpu)": cpu.attention,
    }
    bar = tqdm(total=len(args.impl_bits) * (1 + len(impls)), desc="impl", unit="setting")
    for bits in args.impl_bits:
        spec = spec_for_bits(bits)
        S = HEAD_DIM // spec.sub_dim
        K, V = (synthetic_vq(T, CodebookSide(spec, torch.randn(KV_HEADS, S, spec.num_centroids, spec.sub_dim, generator=gen),
                                             torch.ones(KV_HEADS)), settings, torch.float32, gen) for _ in range(2))
        op_args = (q, K.side, V.side, None, False, None)  # the implementations take state.Side records
        kd, vd = K.dequantize(), V.dequantize()
        cases = {"dense fp32 SDPA (same tokens, dequantized)": lambda: F.scaled_dot_product_attention(q, kd, vd, enable_gqa=True)}
        cases.update({name: (lambda fn=fn: fn(*op_args)[0]) for name, fn in impls.items()})
        dense_ms, want = None, None
        for name, fn in cases.items():
            bar.set_postfix_str(f"{bits:g} bit: {name}")
            rec = dict(kind="cpu_impl", metric="latency", method=name, bits=bits, context=T, value=None, unit="ms",
                       ratio_vs_dense=None, first_call_s=None, check=None, error=None)
            try:
                with torch.inference_mode():
                    t0 = time.perf_counter()
                    out = fn()  # the first call compiles the torch.compile case
                    rec["first_call_s"] = time.perf_counter() - t0
                    want = out if want is None else want
                    torch.testing.assert_close(out, want, atol=1e-4, rtol=1e-3)
                    rec["check"] = f"max |out - dense| {(out - want).abs().max().item():.2e}"
                    t = time_fn(fn, args.min_time)
                rec.update(value=t["median"] * 1e3, q1=t["q1"] * 1e3, q3=t["q3"] * 1e3, reps=t["reps"])
                dense_ms = dense_ms or rec["value"]
                rec["ratio_vs_dense"] = rec["value"] / dense_ms
            except Exception as exc:
                traceback.print_exc()
                rec["error"] = f"{type(exc).__name__}: {exc}"
            records.append(rec)
            progress()
            bar.update()
    bar.close()


# --- part 4b: the write (quantize-on-write) per call ---------------------------------------------

def run_write(args, records: list, progress) -> None:
    """antkv::append of one decode token onto a synthetic cache: reference, kernel, op, codes cat,
    and the in-place write into preallocated buffers (antkv::append_, what eager appends run)."""
    from antkv_compile import ops, state
    from antkv_compile.cache import Buffers
    from antkv_compile.ops import cpu

    gen = torch.Generator().manual_seed(0)
    settings = CacheSettings(window=args.window, anchor_frac=args.anchor_frac)
    book = random_codebooks(_smollm2_config(), 1.0, gen).layers[0]
    bar = tqdm(total=len(args.write_contexts) * 2 * 6, desc="write", unit="setting")
    for T in args.write_contexts:
        for side_name in ("key", "value"):
            side = synthetic_side(T, book, side_name, settings, torch.float32, gen).side
            side = side._replace(window_score=torch.rand(side.window_score.shape, generator=gen))  # as attention leaves them
            new = torch.randn(1, KV_HEADS, 1, HEAD_DIM, generator=gen)
            op_args = (list(side), new, *ops.settings_args(settings))
            A = side.anchor_pos.shape[2]
            buffers, rest = ops.split_buffers(side._replace(**Buffers(side, T + 16, A + 16).tensors))  # each rep writes token T again
            cases = {
                "reference: state.append (eager PyTorch)": lambda: state.append(side, new, settings),
                "C++ kernel (ops/cpu/write.cpp), direct": lambda: cpu.append(side, new, *ops.settings_args(settings)[:3]),
                "C++ kernel through torch.ops.antkv.append": lambda: torch.ops.antkv.append(*op_args),
                "C++ kernel in place (cpu.append_), direct: what eager appends run (ops.direct)":
                    lambda: cpu.append_(ops.join_buffers(buffers, rest), T, A, new, *ops.settings_args(settings)[:3]),
                "C++ kernel in place through torch.ops.antkv.append_ (preallocated)":
                    lambda: torch.ops.antkv.append_(buffers, rest, T, A, new, *ops.settings_args(settings)),
                "codes torch.cat alone (the O(T) copy)": lambda: torch.cat([side.codes, side.codes[:, :, :1]], 2),
            }
            ref = state.append(side, new, settings)
            for name, fn in cases.items():
                bar.set_postfix_str(f"{_ctx(T)} {side_name}: {name}")
                rec = dict(kind="cpu_write", metric="latency", method=name, bits=1.0, context=T, side=side_name, value=None,
                           unit="us", ratio_vs_dense=None, check=None, error=None)
                try:
                    with torch.inference_mode():
                        out = fn()
                        if "in place" in name:  # the new codes and window (tests/test_preallocated.py checks it in depth)
                            same = torch.equal(buffers[0][:, :, : T + 1], ref.codes) and torch.allclose(out[0], ref.window, rtol=0, atol=1e-5)
                            rec["check"] = "codes equal to the reference, window within 1e-5" if same else None
                            if not same:
                                raise AssertionError("in-place write differs from state.append")
                        elif "kernel" in name:  # the same state as the reference (tests/test_write_kernel.py checks it in depth)
                            got = dict(zip(state.STATE_FIELDS, out))
                            same = [f for f in state.STATE_FIELDS if torch.equal(got[f], getattr(ref, f))]
                            rec["check"] = f"equal to the reference: {', '.join(same)}"
                            if not {"codes", "anchor_pos"} <= set(same):
                                raise AssertionError(f"kernel state differs from state.append: only {same} equal")
                        t = time_fn(fn, args.min_time)
                    rec.update(value=t["median"] * 1e6, q1=t["q1"] * 1e6, q3=t["q3"] * 1e6, reps=t["reps"])
                except Exception as exc:
                    traceback.print_exc()
                    rec["error"] = f"{type(exc).__name__}: {exc}"
                records.append(rec)
                progress()
                bar.update()
    bar.close()


# --- part 5: GPU bandwidth bound (on paper) ------------------------------------------------------

def gpu_bytes_per_layer(method: str, bits: float, T: int, window: int, anchor_frac: float) -> dict:
    """HBM bytes one decode step (one query token) reads and writes in one layer's attention.

    Dense fp16: all of K and V, plus q, out and the new token's K/V. VQ: codes of every token (K and
    V), anchors (fp16 rows + int32 positions), window (fp16 rows + fp32 error), codebooks (fp32
    centroids of K and V, read once per step and layer; the per-query look-up table
    q . centroid is built from them on chip and not counted), q, out, and the appended token (codes,
    window row). Anchor Score bookkeeping (fp32 per window token) included."""
    q_out = 2 * Q_HEADS * HEAD_DIM * 2
    if method == "dense-fp16":
        kv = 2 * KV_HEADS * T * HEAD_DIM * 2
        new = 2 * KV_HEADS * HEAD_DIM * 2
        return {"kv": kv, "codes": 0, "anchors": 0, "window": 0, "codebooks": 0, "lut_on_chip": 0, "io": q_out + new,
                "total": kv + q_out + new}
    spec = spec_for_bits(bits)
    S, K = HEAD_DIM // spec.sub_dim, spec.num_centroids
    Tw = window_len(window)
    A = math.ceil(anchor_frac * (T - Tw))
    codes = 2 * KV_HEADS * T * S * (1 if K <= 256 else 2)
    anchors = 2 * KV_HEADS * A * (HEAD_DIM * 2 + 4)
    win = 2 * KV_HEADS * Tw * (HEAD_DIM * 2 + 4 + 4)
    books = 2 * KV_HEADS * S * K * spec.sub_dim * 4
    lut = Q_HEADS * S * K * 4
    new = 2 * KV_HEADS * (S + HEAD_DIM * 2 + 8)
    total = codes + anchors + win + books + q_out + new
    return {"kv": 0, "codes": codes, "anchors": anchors, "window": win, "codebooks": books, "lut_on_chip": lut,
            "io": q_out + new, "total": total}


def run_gpu(args, records: list, progress) -> None:
    weights = PARAMS * 2
    for T in args.gpu_contexts:
        dense = None
        for method, bits in [("dense-fp16", 16.0)] + [(f"vq-{b:g}bit", b) for b in args.bits]:
            by = gpu_bytes_per_layer(method, bits, T, args.window, args.anchor_frac)
            attn_s = LAYERS * by["total"] / H100_BYTES_PER_S
            step_s = (LAYERS * by["total"] + weights) / H100_BYTES_PER_S
            rec = dict(kind="gpu_bound", metric="attention_time_bound", method=method, bits=bits, context=T,
                       value=attn_s * 1e6, unit="us per decode step (30 layers, bound)", bytes_per_layer=by["total"],
                       breakdown=by, step_bound_us=step_s * 1e6, step_tokens_per_s_bound=1 / step_s,
                       weights_bytes=weights, ratio_vs_dense=None, step_ratio_vs_dense=None,
                       notes="on paper: HBM bytes / 3.35 TB/s (H100 SXM), not a measurement", error=None)
            if method == "dense-fp16":
                dense = rec
            rec["ratio_vs_dense"] = rec["value"] / dense["value"]
            rec["step_ratio_vs_dense"] = rec["step_bound_us"] / dense["step_bound_us"]
            records.append(rec)
    progress()


# --- reporting -----------------------------------------------------------------------------------

def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _ctx(T) -> str:
    if T is None:
        return "-"
    if T >= 1 << 20 and T % (1 << 20) == 0:
        return f"{T >> 20}M"
    return f"{T >> 10}K" if T % 1024 == 0 and T >= 1024 else f"{T:,}"


def write_markdown(path: Path, records: list[dict], header: dict) -> None:
    L = ["# Speed: decode attention latency, end-to-end decode, cache memory, GPU bandwidth bound", ""]
    L += [f"- {k}: {v}" for k, v in header.items()]
    crashed = [r for r in records if r.get("metric") is None]  # a part that crashed before its first figure
    records = [r for r in records if r.get("metric") is not None]
    if crashed:
        L += ["", "## Parts that crashed", ""] + [f"- {r['kind']}: {r['error']}" for r in crashed]
    att = [r for r in records if r["kind"] == "attention"]
    if att:
        L += ["", "## 1. Decode attention latency (measured, CPU)", "",
              "One query token, B=1, 9 query heads, 3 kv heads, D=64. Median ms per call (quartiles in the JSON); "
              "ratio = latency / dense fp32 SDPA latency at the same context in the same run (< 1 is faster). "
              "VQ: `torch.ops.antkv.attention`, window 32 (+1 decode token), anchors 1%, fp32 anchors/window.", ""]
        methods = list(dict.fromkeys(r["method"] for r in att))
        L += ["| context | " + " | ".join(methods) + " |", "|---|" + "---|" * len(methods)]
        for T in sorted({r["context"] for r in att}):
            cells = []
            for m in methods:
                r = next((r for r in att if r["context"] == T and r["method"] == m), None)
                if r is None:
                    cells.append("")
                elif r["error"]:
                    cells.append(f"error: {r['error'][:80]}")
                else:
                    cells.append(f"{r['value']:.3f} ({_fmt(r['ratio_vs_dense'], '.2f')}x)")
            L.append(f"| {_ctx(T)} | " + " | ".join(cells) + " |")
        paths = sorted({r["path"] for r in att if r.get("path")})
        if paths:
            L += ["", "VQ attention ran through: " + "; ".join(f"{p} ({sum(r.get('path') == p for r in att)} settings)" for p in paths) + "."]
        checks = [f"{r['method']} @ {_ctx(r['context'])}: {r['check']}" for r in att if r.get("check")]
        if checks:
            worst = max((r for r in att if r.get("check") and r["method"].startswith("vq")),
                        key=lambda r: float(r["check"].split()[-1]), default=None)
            if worst:
                L += ["", f"Sanity: every VQ setting matched dense SDPA on its dequantized cache (atol 1e-4, rtol 1e-3); "
                          f"largest difference {worst['check'].split()[-1]} ({worst['method']} @ {_ctx(worst['context'])})."]
    e2e = [r for r in records if r["kind"] == "e2e"]
    if e2e:
        L += ["", "## 2. End-to-end decode (measured, CPU)", "",
              "Greedy decode of SmolLM2-135M-Instruct (fp32 weights) from a synthetic context of T tokens in the cache. "
              "tokens/s = 1 / median decode-step time over the timed steps, after warm-up. Baseline = the faster FP cache at "
              "that context (fp-dynamiccache: DynamicCache, torch.compile(model); fp-staticcache: HF StaticCache, "
              "torch.compile(model, dynamic=False), GQA inside SDPA; fp-staticcache-hf-sdpa: the same with HF's default "
              "sdpa attention, which copies K and V per query head under torch.compile, see the comment in speed.py); "
              "ratio = tokens/s / baseline's (> 1 is faster). Compile = first call minus the median step, where the first call "
              "compiled (Inductor caches as the JSON's compile_cache says: cold in the full run; a static cache compiles a graph per "
              "max_cache_len); graphs = Dynamo graphs compiled during that context. append / attention = share of the profiled "
              "steps' wall time inside antkv::append (quantize-on-write) and antkv::attention (torch.profiler).", "",
              "| method | bits | context | tokens/s | ms / step (q1-q3) | ratio vs baseline | baseline | compile s | graphs | append | attention | notes |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in e2e:
            if r["error"]:
                L.append(f"| {r['method']} | {_fmt(r['bits'], 'g')} | {_ctx(r['context'])} | error: {r['error'][:200]} | | | | | | | | |")
                continue
            share = lambda k: "-" if r.get(k) is None else f"{r[k]:.0%}"  # noqa: E731
            L.append(f"| {r['method']} | {r['bits']:g} | {_ctx(r['context'])} | {r['value']:.2f} | {r['ms_per_step']:.1f} "
                     f"({r['q1_ms']:.1f}-{r['q3_ms']:.1f}) | {_fmt(r['ratio_vs_dense'], '.2f')} | {r.get('baseline') or '-'} "
                     f"| {_fmt(r['compile_s'], '.1f')} | {r['graphs']} | {share('append_share')} | {share('attention_share')} | {r.get('notes', '')} |")
        checks = [f"{r['method']} @ {_ctx(r['context'])}: {r['check']}" for r in e2e if r.get("check")]
        if checks:
            L += ["", "Sanity: " + "; ".join(checks) + "."]
        for r in e2e:
            if r.get("profile_top_self_ms_per_step"):
                top = ", ".join(f"{k} {v:.1f}" for k, v in list(r["profile_top_self_ms_per_step"].items())[:8])
                ours = (f"antkv::append {r['append_ms_per_step']:.1f} ms / step, antkv::attention {r['attention_ms_per_step']:.1f} ms / step "
                        f"(inclusive); " if r.get("append_ms_per_step") is not None else "")
                L += ["", f"Profile of {r['method']} @ {_ctx(r['context'])} (torch.profiler, {r['profile_steps']} steps): {ours}"
                          f"top self time, ms / step: {top}."]
    eager = [r for r in records if r["kind"] == "eager"]
    if eager:
        L += ["", "## 2b. Eager generation, the README demo path (measured, CPU)", "",
              "model.generate (greedy, min_new_tokens = max_new_tokens) of SmolLM2-135M-Instruct (fp32) from each prompt of "
              "examples/demo.py, after ak.use_antkv_attention(model): FP DynamicCache against ak.AntKVCache preallocated for prompt + new tokens (max_cache_len, as the demo; 1-bit codebooks of "
              "random centroids with a random key basis; speed does not depend on their values). ms / token = generate's wall "
              "time / new tokens (median over the timed calls, after one warm-up call; the prompt's prefill included); step = "
              "median interval between consecutive new tokens (decode steps only); ratio = ours / FP for the same prompt "
              "(issue 11's target: at most 1.5).", "",
              "| prompt | prompt tokens | method | new tokens | ms / token | ratio vs FP | step ms | first token ms | cache bytes | notes |",
              "|---|---|---|---|---|---|---|---|---|---|"]
        for r in eager:
            if r["error"]:
                L.append(f"| {r['prompt']!r} | {r['context']} | {r['method']} | {r['new_tokens']} | error: {r['error'][:200]} | | | | | |")
                continue
            L.append(f"| {r['prompt']!r} | {r['context']} | {r['method']} | {r['new_tokens']} | {r['value']:.1f} | {_fmt(r['ratio_vs_dense'], '.2f')} "
                     f"| {r['step_ms']:.1f} | {r['first_token_ms']:.1f} | {r['cache_bytes']:,} | {r.get('notes', '')} |")
    impl = [r for r in records if r["kind"] == "cpu_impl"]
    if impl:
        L += ["", f"## Why the CPU kernel is C++ (measured, CPU, {_ctx(impl[0]['context'])} tokens)", "",
              "One decode query (SmolLM2 shapes) over the same compressed cache: dense fp32 SDPA over its dequantized "
              "tokens for scale, then each CPU implementation of antkv::attention. Median ms per call; the first call "
              "(which compiles the torch.compile case) apart. Every output checked against the dense one (atol 1e-4).", "",
              "| bits | implementation | ms / call | vs dense | first call s |", "|---|---|---|---|---|"]
        for r in impl:
            if r["error"]:
                L.append(f"| {_fmt(r['bits'], 'g')} | {r['method']} | error: {r['error'][:120]} | | |")
            else:
                L.append(f"| {r['bits']:g} | {r['method']} | {r['value']:.2f} | {r['ratio_vs_dense']:.2f}x | {r['first_call_s']:.1f} |")
    write = [r for r in records if r["kind"] == "cpu_write"]
    if write:
        L += ["", "## The write: antkv::append per call (measured, CPU)", "",
              "Quantize-on-write of one decode token onto one cache side (SmolLM2 shapes: B=1, 3 kv heads, D=64; 1 bit; window "
              "32 + 1, so each call flushes one token; anchors 1%; keys with a random orthogonal basis, values without). Median "
              "microseconds per call. A decode step of SmolLM2 does 60 of them (30 layers x K and V). The codes cat is the "
              "O(T) copy every implementation pays while the op returns a new codes tensor.", "",
              "| context | side | implementation | us / call (q1-q3) | check |", "|---|---|---|---|---|"]
        for r in write:
            if r["error"]:
                L.append(f"| {_ctx(r['context'])} | {r['side']} | {r['method']} | error: {r['error'][:120]} | |")
            else:
                L.append(f"| {_ctx(r['context'])} | {r['side']} | {r['method']} | {r['value']:.1f} ({r['q1']:.1f}-{r['q3']:.1f}) "
                         f"| {r.get('check') or ''} |")
    mem = [r for r in records if r["kind"] == "memory"]
    if mem:
        L += ["", "## 3. Cache memory (measured allocations, all 30 layers, K and V)", "",
              "Bytes = untyped storage of every tensor the cache holds, each storage once (codebooks excluded, listed "
              "apart). fp16 dense: DynamicCache filled through update(). Ours: AntKVCache layers of VQTensors in the "
              "state a decode step leaves (window 32 + 1, anchors ceil(1% of encoded tokens), fp16 anchors/window). "
              "Longest context: the largest T whose allocated cache is <= the budget while T + 1 is over it, both "
              "allocated and measured.", ""]
        rows = [r for r in mem if r["metric"] == "max_context"]
        L += ["| method | bits | bytes / token (at longest probe) | ratio vs fp16 | longest context in budget | x fp16 | bytes at it | bytes at +1 | codebook bytes | allocations |",
              "|---|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            probes = [p for p in mem if p["metric"] == "cache_bytes" and p["method"] == r["method"]]
            p = max(probes, key=lambda p: p["context"]) if probes else None
            if r["error"]:
                L.append(f"| {r['method']} | {_fmt(r['bits'], 'g')} | {_fmt(p and p['bytes_per_token'], ',.1f')} | | error: {r['error'][:200]} | | | | | |")
                continue
            L.append(f"| {r['method']} | {r['bits']:g} | {_fmt(p and p['bytes_per_token'], ',.1f')} | {_fmt(p and p['ratio_vs_dense'], '.4f')} "
                     f"| {r['value']:,} | {_fmt(r['ratio_vs_dense'], '.2f')} | {r['bytes_at_max']:,} | {r['bytes_at_max_plus_1']:,} "
                     f"| {_fmt(p and p['codebook_bytes'], ',d')} | {r['allocations']} |")
        budget = next((r["budget_bytes"] for r in rows if r.get("budget_bytes")), None)
        peak = max((r.get("peak_rss_so_far") or 0 for r in rows), default=0)
        if budget:
            L += ["", f"Budget: {budget:,} bytes ({budget / GIB:g} GiB). Caches are allocated one at a time and freed between "
                      f"allocations; peak RSS of the process {peak / GIB:.2f} GiB. The JSON also has the RSS growth at each "
                      f"allocation (indicative only: the allocator reuses freed memory)."]
        probes = [r for r in mem if r["metric"] == "cache_bytes"]
        L += ["", "Probe allocations: bytes held (bytes per token).", "",
              "| method | " + " | ".join(_ctx(T) for T in sorted({p['context'] for p in probes})) + " |",
              "|---|" + "---|" * len({p['context'] for p in probes})]
        for m in dict.fromkeys(p["method"] for p in probes):
            cells = [next((f"{p['value']:,} ({p['bytes_per_token']:.1f})" for p in probes if p["method"] == m and p["context"] == T), "")
                     for T in sorted({p['context'] for p in probes})]
            L.append(f"| {m} | " + " | ".join(cells) + " |")
        chk = sorted({p["check"] for p in probes if p.get("check")})
        if chk:
            L += ["", "Sanity: " + "; ".join(f"{p['method']}: {p['check']}" for p in probes if p.get("check") and p["context"] == min(q["context"] for q in probes)) + "."]
    gpu = [r for r in records if r["kind"] == "gpu_bound"]
    if gpu:
        L += ["", "## 4. GPU decode on paper: HBM bytes and the H100 bandwidth bound (NOT measured)", "",
              "Bytes one decode step must move per layer, and the time that implies at 3.35 TB/s (H100 SXM HBM3): a lower "
              "bound, not a measurement. Dense fp16 reads all of K and V; VQ reads the codes of every token, the anchors "
              "(fp16 rows + int32 positions), the window (fp16 rows + fp32 error), and the fp32 codebooks of K and V once "
              "per layer; the per-query look-up table (q . centroid) is assumed built on chip (its size is listed, not "
              "counted). Step bound adds the fp16 weights (134.5M parameters, 269 MB) read once per step. For scale only: AnTKV "
              "reports up to 3.5x decode throughput over FP16, measured on GPUs with larger models (arXiv 2506.19505).", "",
              "| context | method | bytes / layer | codes | anchors | window | codebooks | LUT (on chip) | attention bound (30 layers) | x dense | step bound | step tokens/s bound | x dense |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in gpu:
            b = r["breakdown"]
            L.append(f"| {_ctx(r['context'])} | {r['method']} | {r['bytes_per_layer']:,} | {b['codes']:,} | {b['anchors']:,} "
                     f"| {b['window']:,} | {b['codebooks']:,} | {b['lut_on_chip']:,} | {r['value']:.1f} us | {r['ratio_vs_dense']:.3f} "
                     f"| {r['step_bound_us']:.1f} us | {r['step_tokens_per_s_bound']:,.0f} | {r['step_ratio_vs_dense']:.3f} |")
    L += ["", "Files: speed.json (one record per figure above: kind, metric, method, bits, context, value, unit, "
          "ratio_vs_dense, details), speed.png."]
    path.write_text("\n".join(L) + "\n")


def write_plot(path: Path, records: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = [k for k in ("attention", "e2e", "eager", "memory", "gpu_bound") if any(r["kind"] == k and r.get("value") is not None for r in records)]
    if not kinds:
        return
    cols = min(2, len(kinds))
    rows = math.ceil(len(kinds) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6.4 * cols, 4.6 * rows), squeeze=False)
    for ax in axes.flat[len(kinds):]:
        ax.set_visible(False)
    for ax, kind in zip(axes.flat, kinds):
        rs = [r for r in records if r["kind"] == kind and r.get("value") is not None]
        if kind == "attention":
            for m in dict.fromkeys(r["method"] for r in rs):
                pts = sorted((r["context"], r["value"]) for r in rs if r["method"] == m)
                ax.plot(*zip(*pts), marker="o" if m.startswith("vq") else "s", linestyle="-" if m.startswith("vq") else "--", label=m)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("cache length (tokens)")
            ax.set_ylabel("ms per decode attention call (median)")
            ax.set_title("1. decode attention, CPU (measured)", fontsize=9)
        elif kind == "e2e":
            ctxs = sorted({r["context"] for r in rs})
            methods = list(dict.fromkeys(r["method"] for r in rs))
            width = 0.8 / len(methods)
            for i, m in enumerate(methods):
                vals = [next((r["value"] for r in rs if r["method"] == m and r["context"] == T), 0) for T in ctxs]
                ax.bar([j + i * width for j in range(len(ctxs))], vals, width, label=m)
            ax.set_xticks([j + width * (len(methods) - 1) / 2 for j in range(len(ctxs))], [_ctx(T) for T in ctxs])
            ax.set_xlabel("context (tokens)")
            ax.set_ylabel("decode tokens/s")
            ax.set_title("2. SmolLM2-135M decode, CPU (measured)", fontsize=9)
        elif kind == "eager":
            prompts = list(dict.fromkeys(r["prompt"] for r in rs))
            methods = list(dict.fromkeys(r["method"] for r in rs))
            width = 0.8 / len(methods)
            for i, m in enumerate(methods):
                vals = [next((r["value"] for r in rs if r["method"] == m and r["prompt"] == p), 0) for p in prompts]
                ax.bar([j + i * width for j in range(len(prompts))], vals, width, label=m)
            ax.set_xticks([j + width * (len(methods) - 1) / 2 for j in range(len(prompts))], [p[:18] + "..." for p in prompts], fontsize=7)
            ax.set_ylabel("ms per generated token (median)")
            ax.set_title("2b. eager generate, demo prompts, CPU (measured)", fontsize=9)
        elif kind == "memory":
            rs = [r for r in rs if r["metric"] == "max_context"]
            ax.bar([r["method"] for r in rs], [r["value"] for r in rs], color=["tab:gray"] + ["tab:red"] * (len(rs) - 1))
            for i, r in enumerate(rs):
                ax.annotate(f"{r['value']:,}", (i, r["value"]), ha="center", va="bottom", fontsize=7)
            ax.set_yscale("log")
            budget = rs[0].get("budget_bytes") if rs else None
            ax.set_ylabel(f"longest context in {budget / GIB:g} GiB (tokens)" if budget else "longest context (tokens)")
            ax.set_title("3. cache memory (measured allocations)", fontsize=9)
            ax.tick_params(axis="x", labelsize=7)
        else:
            for m in dict.fromkeys(r["method"] for r in rs):
                pts = sorted((r["context"], r["value"]) for r in rs if r["method"] == m)
                ax.plot(*zip(*pts), marker="o", label=m)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("cache length (tokens)")
            ax.set_ylabel("us per decode step, attention of 30 layers")
            ax.set_title("4. H100 bandwidth BOUND (on paper, not measured)", fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        if kind != "memory":
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


# --- CLI -----------------------------------------------------------------------------------------

def _ints(s: str) -> list[int]:
    out = []
    for x in s.split(","):
        x = x.strip().upper()
        mult = 1 << 20 if x.endswith("M") else 1 << 10 if x.endswith("K") else 1
        out.append(int(float(x.rstrip("KM")) * mult))
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma list of {', '.join(PARTS)} (default: all)")
    p.add_argument("--quick", action="store_true", help="smoke test: small sizes, 2-layer model for e2e, temp output dir")
    p.add_argument("--out", type=Path, help=f"output directory (default: {RESULTS_DIR}; a temp dir with --quick)")
    p.add_argument("--merge", action="store_true", help="keep the records of an earlier speed.json in --out that this run does not recompute (same part, method, bits, context)")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch.set_num_threads (default: CPU count)")
    p.add_argument("--bits", default=",".join(f"{b:g}" for b in VQ_BITS), help="VQ settings, bits per element (default: 4,2,1,0.5)")
    p.add_argument("--window", type=int, default=32)
    p.add_argument("--anchor-frac", type=float, default=0.01)
    p.add_argument("--attn-contexts", type=_ints, help="cache lengths of the attention part, e.g. 1K,4K (default: 1K..128K, powers of 2)")
    p.add_argument("--min-time", type=float, help="seconds of timed calls per attention setting (default 1.0)")
    p.add_argument("--e2e-contexts", type=_ints, help="contexts of the e2e part (default: 1K,4K,16K,32K)")
    p.add_argument("--e2e-methods", help=f"comma list of {', '.join(E2E_METHODS)} (default: all)")
    p.add_argument("--e2e-steps", type=int, help="timed decode steps per context (default 16)")
    p.add_argument("--e2e-warmup", type=int, help="decode steps before timing, the first compiles (default 3)")
    p.add_argument("--e2e-layers", type=int, help=argparse.SUPPRESS)
    p.add_argument("--profile-steps", type=int, help="decode steps under torch.profiler per context, ours (default 3; 0: none)")
    p.add_argument("--eager-prompts", type=int, help=f"how many of the demo's {len(DEMO_PROMPTS)} prompts the eager part runs (default all)")
    p.add_argument("--eager-tokens", type=int, help="new tokens per generate call in the eager part (default 48, the demo's)")
    p.add_argument("--eager-reps", type=int, help="timed generate calls per prompt and cache (default 3; median)")
    p.add_argument("--eager-layers", type=int, help=argparse.SUPPRESS)
    p.add_argument("--compile-cache", choices=tuple(COMPILE_CACHES),
                   help="; ".join(f"{k}: {v}" for k, v in COMPILE_CACHES.items()) + " (default: cold; kernels with --quick)")
    p.add_argument("--warm-compile-cache", dest="compile_cache", action="store_const", const="warm", help=argparse.SUPPRESS)
    p.add_argument("--codebooks", choices=("random", "calibrate"), default="random",
                   help="e2e codebooks: random centroids (default) or ak.calibrate on 512 WikiText-2 tokens")
    p.add_argument("--data", help="path to wiki.test.raw (--codebooks calibrate)")
    p.add_argument("--mem-probes", type=_ints, help="cache lengths allocated and measured (default: 1K,4K,16K,64K)")
    p.add_argument("--budget-gib", type=float, help="cache budget for the longest context (default 8)")
    p.add_argument("--impl-context", type=int, help="cache length of the impl part (default 65536)")
    p.add_argument("--impl-bits", help="bits per element of the impl part's caches (default 1,4)")
    p.add_argument("--write-contexts", type=_ints, help="cache lengths of the write part (default: 4K,32K)")
    p.add_argument("--gpu-contexts", type=_ints, help="contexts of the on-paper GPU bound (default: 4K,32K,128K,1M)")
    args = p.parse_args(argv)
    args.parts = [x.strip() for x in args.parts.split(",") if x.strip()]
    bad = [x for x in args.parts if x not in PARTS]
    if bad:
        p.error(f"--parts: unknown {', '.join(bad)}; parts: {', '.join(PARTS)}")
    args.bits = [float(b) for b in args.bits.split(",")]
    defaults = QUICK if args.quick else FULL
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    methods = [x.strip() for x in args.e2e_methods.split(",") if x.strip()]
    bad = [x for x in methods if x not in E2E_METHODS]
    if bad:
        p.error(f"--e2e-methods: unknown {', '.join(bad)}; methods: {', '.join(E2E_METHODS)}")
    args.e2e_methods = [m for m in E2E_METHODS if m in methods]  # FP first: ours patches the model in place
    args.impl_bits = [float(b) for b in args.impl_bits.split(",")]
    if args.quick:
        args.out = args.out or Path(tempfile.gettempdir()) / "antkv-speed-quick"
    args.out = args.out or RESULTS_DIR
    return args


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    configure_compile_caches(args.compile_cache)
    command = shlex.join(["python", *sys.argv]) if argv is None else shlex.join(["python", "benchmarks/speed.py", *argv])
    start_date, t_start, code = _now(), time.perf_counter(), code_version()
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    records: list[dict] = []
    timings: dict[str, float] = {}
    args.out.mkdir(parents=True, exist_ok=True)

    def progress():  # results so far, in case a later part crashes or is interrupted
        (args.out / "speed.partial.json").write_text(json.dumps(records, indent=2) + "\n")

    runners = {"attention": run_attention, "e2e": run_e2e, "eager": run_eager, "memory": run_memory, "impl": run_impl,
               "write": run_write, "gpu": run_gpu}
    cpu_times: dict[str, float] = {}
    for part in args.parts:
        t0, c0 = time.perf_counter(), _cpu_seconds()
        try:
            runners[part](args, records, progress)
        except Exception as exc:  # a crashing part is a result too; the other parts still run
            traceback.print_exc()
            records.append(dict(kind=PART_KIND.get(part, part), metric=None, method=None, bits=None, context=None,
                                value=None, unit=None, ratio_vs_dense=None, error=f"{type(exc).__name__}: {exc}"))
        timings[part], cpu_times[part] = time.perf_counter() - t0, _cpu_seconds() - c0
        if not {"e2e", "eager"} & set(args.parts[args.parts.index(part) + 1:]):
            _loaded.cache_clear()  # no later part needs the model
        print(f"{part}: {timings[part]:.0f} s ({cpu_times[part]:.0f} s CPU)", flush=True)
    machine = f"{platform.platform()}, {os.cpu_count()} CPUs, torch {torch.__version__}"
    for r in records:
        r.update(command=command, date=start_date, machine=machine, threads=torch.get_num_threads(), code=code)

    if args.merge and (args.out / "speed.json").exists():
        key = lambda r: tuple(r.get(f) for f in ("kind", "metric", "method", "bits", "context", "side", "prompt"))  # noqa: E731
        fresh = {key(r) for r in records}
        kept = [r for r in json.loads((args.out / "speed.json").read_text()) if key(r) not in fresh]
        order = ["attention", "e2e", "eager", "memory", "cpu_impl", "cpu_write", "gpu_bound"]
        records = sorted(kept + records, key=lambda r: order.index(r["kind"]) if r["kind"] in order else len(order))
    runs: dict[str, str] = {}  # command -> date and code version of the run (merged parts keep theirs)
    for r in records:
        runs.setdefault(r.get("command", "?"), f"{r.get('date', '?')}, {r.get('code', '?')}")
    import transformers

    header = {
        "runs": "; ".join(f"`{cmd}` ({date})" for cmd, date in runs.items()),
        "machine": f"{platform.platform()}, {_cpu_name()}, {os.cpu_count()} CPUs, "
                   f"torch {torch.__version__}, transformers {transformers.__version__}, torch threads {torch.get_num_threads()}"
                   + (f", load average (1 min) at start {load[0]:.2f}, at end {os.getloadavg()[0]:.2f}" if load else ""),
        "compile caches": COMPILE_CACHES[args.compile_cache],
        "wall time of this run": ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()) + f"; total {time.perf_counter() - t_start:.0f} s "
                                 f"(CPU time, this process and its compile workers: "
                                 + ", ".join(f"{k} {v:.0f} s" for k, v in cpu_times.items()) + f"; total {_cpu_seconds():.0f} s)",
    }
    if args.quick:
        header["quick"] = f"smoke test: small sizes, e2e and eager on the first {args.e2e_layers} and {args.eager_layers} of 30 layers; not results"
    (args.out / "speed.json").write_text(json.dumps(records, indent=2) + "\n")
    write_markdown(args.out / "speed.md", records, header)
    write_plot(args.out / "speed.png", records)
    (args.out / "speed.partial.json").unlink(missing_ok=True)
    print((args.out / "speed.md").read_text())
    print(f"wrote {args.out / 'speed.md'}, speed.json, speed.png")
    return records


if __name__ == "__main__":
    main()
