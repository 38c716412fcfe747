"""The CPU kernels of `antkv::attention` (attention.cpp: a C++ loop over the codes) and of
`antkv::append` / `antkv::start` (write.cpp: the quantize-on-write of `state.append` in one call).

Why C++ and not Inductor: the decode step is a gather of one look-up-table entry per (token,
subspace) summed into a score, then a scatter of each token's weight into a per-centroid
histogram. As tensor ops that is a [rows, tokens, subspaces] gather and a scatter_add, which
eager PyTorch and Inductor both materialize; the C++ loop keeps the table and the histogram in
cache and reads each code once per block of query rows. The three side by side (decode, SmolLM2
shapes, 65,536 tokens): `python benchmarks/speed.py --parts impl`, results in
benchmarks/results/speed.md (1 thread: 1 bit 34 / 23 / 2.9 ms, dense fp32 SDPA 19 ms).

The write kernel: a decode step's append is ~25 small PyTorch ops per layer and side (flush, anchor
top-k, basis map, encode, error, concatenations), each a few microseconds of dispatch for a few
hundred floats of work; write.cpp does the same in one pass over the side (`append` below).

Both are built on first use into one extension with torch.utils.cpp_extension (ninja; ~30 s),
cached in torch's extension directory; without a compiler the ops keep running the PyTorch
reference (with a warning).
"""

from __future__ import annotations

import functools
import hashlib
import math
import os
import warnings
import weakref
from pathlib import Path

import torch

from ... import state
from ...state import Side

# Query rows per kv head (G * L) the kernel takes. Measured (1 thread, CPU time, G = 3, 4096
# tokens, rows 96 / 192 / 384 / 768): 1 bit 6.4 / 12 / 24 / 46 ms vs the reference's 25 / 39 / 64 /
# 205 ms; 4 bit 19 / 38 / 97 / 181 vs 17 / 48 / 74 / 215. So it also serves prefill chunks; past
# that the decoded-keys matmul of the reference catches up at 4 bit.
MAX_ROWS = 128
# Shortest sequence chunk a thread works on (flash-decoding split of the sequence).
CHUNK_TOKENS = 2048


@functools.cache
def extension():
    """Build / load the kernels (registers torch.ops.antkv_cpu.vq_attention, vq_append, ... and
    antkv::static_attention_'s CPU kernel); False if they cannot be built here."""
    from torch.utils.cpp_extension import load

    flags = ["-O3"]
    # Vector width by what the running CPU has (not -march=native: the build cache may be shared).
    wide = torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
    if wide:
        flags += ["-mavx2", "-mfma"]
    sources = [os.path.join(os.path.dirname(__file__), f) for f in ("attention.cpp", "write.cpp")]
    # One build cache entry per version of the sources (their hash in the name): two checkouts or
    # installed versions never rebuild over each other's entry, nor load each other's library.
    header = os.path.join(os.path.dirname(__file__), "vq_attention.h")  # included by both
    digest = hashlib.sha256(b"".join(Path(f).read_bytes() for f in [*sources, header])).hexdigest()[:12]
    try:
        load(
            name=f"antkv_cpu_kernels_{digest}" + ("_avx2" if wide else ""),
            sources=sources,
            extra_cflags=flags,
            is_python_module=False,
        )
        torch.ops.antkv_cpu.vq_configure.default(MAX_ROWS, CHUNK_TOKENS)  # write.cpp's static step reads them
        return True
    except Exception as e:  # noqa: BLE001 - no compiler / ninja: the reference still works
        warnings.warn(f"antkv: CPU kernels (attention, write) not built ({e}); using the PyTorch reference", stacklevel=2)
        return False


def supported(q: torch.Tensor, k: Side) -> bool:
    """Whether the kernel takes this call: at most MAX_ROWS query rows per kv head, and a
    buildable extension."""
    Hq, L, Hkv = q.shape[1], q.shape[2], k.codes.shape[1]
    return Hkv > 0 and Hq % Hkv == 0 and (Hq // Hkv) * L <= MAX_ROWS and extension()


def _side_args(side: Side) -> list:
    """The kernel's view of a side (the `Side` struct of attention.cpp): codes, centroids, anchor
    rows and positions, window, window error, in the dtypes and layouts it reads."""
    f32 = lambda t: t.to(torch.float32).contiguous()  # noqa: E731 - small tensors (no copy if already so)
    return [_codes(side.codes), f32(side.centroids), f32(side.anchor_rows), side.anchor_pos.to(torch.int32).contiguous(),
            f32(side.window), f32(side.window_err)]  # fmt: skip


def attention(q, k: Side, v: Side, attn_mask, is_causal, scale, chunk_tokens=None):
    """`antkv::attention` (ops/) on CPU tensors, q already in the key basis: (out [B, Hq, L, D] in
    q's dtype, score [B, Hkv, Tw]). `chunk_tokens` (default CHUNK_TOKENS) is the shortest sequence
    chunk of a task; tests make it small to exercise the merge of chunks."""
    B, Hq, L, D = q.shape
    Hkv, T = k.codes.shape[1], k.codes.shape[2]
    if v.window.shape[2] != k.window.shape[2] or v.codes.shape[2] != T:
        raise ValueError("key and value caches must hold the same tokens and the same window")
    G = Hq // Hkv
    scale = 1 / math.sqrt(D) if scale is None else scale
    qg = q.reshape(B, Hkv, G * L, D).to(torch.float32).contiguous()
    if attn_mask is not None:
        # Converted before broadcasting, so an expanded mask stays a view.
        attn_mask = attn_mask if attn_mask.dtype in (torch.bool, torch.float32) else attn_mask.float()
        attn_mask = attn_mask.expand(B, Hq, L, T)
    if not extension():
        raise RuntimeError("antkv: the CPU attention kernel could not be built (see the warning)")
    out, score = torch.ops.antkv_cpu.vq_attention(
        qg, *_side_args(k), *_side_args(v), attn_mask, bool(is_causal), float(scale), L,
        CHUNK_TOKENS if chunk_tokens is None else chunk_tokens,
    )  # fmt: skip
    return out.view(B, Hq, L, D).to(q.dtype), score


def _codes(codes: torch.Tensor) -> torch.Tensor:
    """Codes with the token-major inner layout the kernel reads (a crop's view already has it)."""
    T, S = codes.shape[2], codes.shape[3]
    if codes.dtype not in (torch.uint8, torch.int16):
        codes = codes.to(torch.int16)
    if (codes.stride(3) != 1 and S > 1) or (codes.stride(2) != S and T > 1):
        codes = codes.contiguous()
    return codes


# --- the write kernel (write.cpp) ---------------------------------------------------------------

_ROW_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def append_supported(side: Side, new: torch.Tensor) -> bool:
    """Whether write.cpp takes this append: the Side contract's dtypes (exact rows and new rows
    float32 / float16 / bfloat16, anchor positions int32, codes uint8 for up to 256 centroids,
    int16 above; the float32 rest is checked by the kernel) and a buildable extension. Anything
    else (e.g. a side built by hand with int64 positions) runs `state.append`."""
    K = side.centroids.shape[2]
    return (
        side.codes.dtype == (torch.uint8 if K <= 256 else torch.int16)
        and side.window.dtype in _ROW_DTYPES
        and side.anchor_rows.dtype == side.window.dtype
        and new.dtype in _ROW_DTYPES
        and side.anchor_pos.dtype == torch.int32
        and extension()
    )


def append(side: Side, new: torch.Tensor, window: int, anchor_frac: float, error: str) -> tuple:
    """`antkv::append` on CPU tensors: the STATE_FIELDS tensors of `state.append(side, new,
    settings)`, fresh (never views of the inputs), and the same warning for leaving rows with
    NaN / Inf entries. Differences from the reference, all within float32 rounding: write.cpp's top."""
    if not extension():
        raise RuntimeError("antkv: the CPU write kernel could not be built (see the warning)")
    T, A, Tw = side.codes.shape[2], side.anchor_pos.shape[2], side.window.shape[2]
    anchors, _ = state.flush_lengths(T, A, Tw, 0, window, anchor_frac)
    codes = _codes(side.codes)
    out, nonfinite = torch.ops.antkv_cpu.vq_append.default(
        codes, side.anchor_rows, side.anchor_pos, side.anchor_score, side.window, side.window_err, side.window_score,
        side.centroids, side.expected_err, side.basis, new, *prepared(side.centroids), window, anchors, error == "actual",
    )  # fmt: skip
    if nonfinite:
        state.warn_nonfinite(nonfinite, anchors)
    return tuple(out)


def append_(side: Side, length: int, anchors: int, new: torch.Tensor, window: int, anchor_frac: float, error: str) -> tuple:
    """`antkv::append_` on CPU tensors: write.cpp in place into the capacity buffers of `side`
    (its BUFFER_FIELDS, holding `length` tokens and `anchors` anchor slots); returns the new window
    fields (state.WINDOW_FIELDS). Same warning as `append` for leaving rows with NaN / Inf."""
    if not extension():
        raise RuntimeError("antkv: the CPU write kernel could not be built (see the warning)")
    A_out, _ = state.flush_lengths(length, anchors, side.window.shape[2], 0, window, anchor_frac)
    out, nonfinite = torch.ops.antkv_cpu.vq_append_.default(
        side.codes, side.anchor_rows, side.anchor_pos, side.anchor_score, length, anchors, side.window, side.window_err,
        side.window_score, side.centroids, side.expected_err, side.basis, new, *prepared(side.centroids), window, A_out,
        error == "actual",
    )  # fmt: skip
    if nonfinite:
        state.warn_nonfinite(nonfinite, A_out)
    return tuple(out)


# id(centroids) -> (weak reference, version counter, transposed codebook, |c|^2)
_PREPARED: dict[int, tuple] = {}


def prepared(centroids: torch.Tensor) -> tuple:
    """The codebook as write.cpp's encoder reads it (`vq_prepare`: transposed to [H, S, d, K]
    padded to a multiple of 8, and |c|^2), memoized per centroids tensor: a codebook does not
    change while a cache uses it, and transposing it is most of a decode step's append otherwise
    (measured: ~70% of the kernel's time at SmolLM2's 1-bit shapes). An entry is used only for the
    very tensor it was made from (weak reference, dropped when the tensor is freed) at the same
    version counter (an in-place change recomputes it). Inference-mode tensors have no version
    counter: prepared on every call, not memoized."""
    key = id(centroids)
    versioned = not centroids.is_inference()
    hit = _PREPARED.get(key)
    if versioned and hit is not None and hit[0]() is centroids and hit[1] == centroids._version:
        return hit[2], hit[3]
    ct, csq = torch.ops.antkv_cpu.vq_prepare.default(centroids)
    if versioned:
        ref = weakref.ref(centroids, lambda _, key=key: _PREPARED.pop(key, None))
        _PREPARED[key] = (ref, centroids._version, ct, csq)
    return ct, csq
