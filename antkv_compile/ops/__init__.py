"""The compressed cache's work as torch.library custom ops, so it can live inside a traced graph.

A cache side crosses every op as one `Tensor[]` argument: the fields of `state.Side`, in order
(`list(side)`), so no signature spells the layout out. The settings cross as the fields of
`CacheSettings` (`settings_args`). Every op returns new tensors, never views of its inputs.

    antkv::start(past, new, book, *settings)            -> the state after the first call (STATE_FIELDS)
    antkv::learn_start(past, new, sub_dim, code_bits, rotate, *settings, seed) -> state + a data-free Book
    antkv::append(side, new, *settings)                 -> the state after quantize-on-write of `new`
    antkv::append_(buffers, rest, length, anchors, new, *settings) -> the new window (codes, anchors in place)
    antkv::attention(q, key, value, attn_mask, is_causal, scale) -> (out, window Anchor Score)
    antkv::static_attention_(q, key, key_book, value, value_book, k_new, v_new, pos, mask, ...) -> out (static caches, in place)
    antkv::dequantize(side, dtype)                      -> the dense tensor

Each op's body is the function of state.py (or reference.py) it names; `append` and `start`
have a CPU kernel (cpu/write.cpp), `attention` a CPU kernel (cpu/attention.cpp) and a CUDA one
(the Triton kernels of triton/), and on CUDA the Inductor lowering
(inductor/) replaces it in compiled decode graphs. The fake kernels give output shapes without running the quantizer: the window and
anchor lengths after an append follow `state.flush_lengths` when sizes are concrete, and are fresh
unbacked sizes when they are symbolic, so a traced decode step never specializes on them and a
growing cache does not recompile it.

`VQTensor` (cache.py) calls these ops in eager mode; the graph pass (compile/passes/) puts them
in place of `cat` + `scaled_dot_product_attention` in a compiled model.
"""

from __future__ import annotations

import contextlib
import functools

import torch
from torch._library.fake_impl import allocate_size

from .. import state
from ..quant.basis import query_to_basis
from ..settings import CacheSettings
from ..state import BOOK_FIELDS, BUFFER_FIELDS, STATE_FIELDS, WINDOW_FIELDS, Book, Side
from .reference import vq_attention

_STATE = "(" + ", ".join("Tensor" for _ in STATE_FIELDS) + ")"
_SETTINGS = "int window, float anchor_frac, str error, ScalarType? exact_dtype"


_KERNELS: dict = {}  # (op, device type) -> its kernel, as registered with torch.library


def _kernel(op, device: str):
    """Register `fn` as `op`'s kernel for `device` and remember it for `direct`."""

    def register(fn):
        if isinstance(op, torch._ops.OpOverload):  # declared with torch.library.define
            torch.library.impl(op._schema.name, device.upper())(fn)
        else:
            op.register_kernel(device)(fn)
        _KERNELS[(op, device)] = fn
        return fn

    return register


def direct(op, device: torch.device, *args):
    """`op(*args)` for eager callers (VQTensor's appends and attention): the kernel registered for
    `device` called as a plain function, the op itself where none is. torch.library's dispatch of
    a Python custom op costs ~0.1-0.3 ms per call on this CPU (`python benchmarks/speed.py --parts
    write`: the kernel through the op vs direct), against 20-130 us for the in-place write itself,
    and a SmolLM2 decode step makes 90 such calls. Traced code calls the ops (graphs need them)."""
    kernel = _KERNELS.get((op, device.type))
    return kernel(*args) if kernel is not None and not torch.compiler.is_compiling() else op(*args)


def settings_args(s: CacheSettings) -> tuple:
    """CacheSettings as the ops' trailing arguments (the `_SETTINGS` part of their schemas)."""
    return (s.window, s.anchor_frac, s.error, s.exact_dtype)


def _fresh(outs, inputs):
    """Custom ops must not return views of their inputs: copy the ones that are."""
    seen = {t.untyped_storage().data_ptr() for t in inputs}
    fresh = []
    for t in outs:
        ptr = t.untyped_storage().data_ptr()
        fresh.append(t.clone() if ptr in seen or t.numel() == 0 else t)
        seen.add(ptr)
    return tuple(fresh)


def _state(side: Side, inputs) -> tuple:
    return _fresh(tuple(getattr(side, f) for f in STATE_FIELDS), inputs)


# --- append / start --------------------------------------------------------------------------


@torch.library.custom_op("antkv::append", mutates_args=(), schema=f"(Tensor[] side, Tensor new, {_SETTINGS}) -> {_STATE}")
def append(side, new, window, anchor_frac, error, exact_dtype):
    """`state.append`: quantize-on-write of `new` [B, H, n, D] (the model's coordinates)."""
    side = Side(*side)
    return _state(state.append(side, new, CacheSettings(window, anchor_frac, error, exact_dtype)), side)


def _append_fake(st: Side, new, window, anchor_frac) -> tuple:
    B, H, T, S = st.codes.shape
    n, A, Tw = new.shape[2], st.anchor_rows.shape[2], st.window.shape[2]
    if all(isinstance(x, int) for x in (T, A, Tw, n)):
        A, Tw = state.flush_lengths(T, A, Tw, n, window, anchor_frac)
    else:
        # Symbolic: fresh unbacked sizes, allocated directly rather than by ctx.new_dynamic_size(),
        # which Dynamo only allows under capture_dynamic_output_shape_ops: they are sizes of
        # inner tensors of the cache, never data-dependent outputs the user sees.
        shape_env = torch.library.get_ctx()._shape_env
        A, Tw = allocate_size(shape_env), allocate_size(shape_env)
        torch._check(Tw >= n)
    length = {"codes": T + n, "window": Tw}
    return tuple(
        getattr(st, f).new_empty(B, H, length.get(f, Tw if f.startswith("window") else A), *getattr(st, f).shape[3:])
        for f in STATE_FIELDS
    )


@append.register_fake
def _(side, new, window, anchor_frac, error, exact_dtype):
    return _append_fake(Side(*side), new, window, anchor_frac)


@_kernel(append, "cpu")
def append_cpu(side, new, window, anchor_frac, error, exact_dtype):
    """On CPU: the C++ write kernel (cpu/write.cpp), one call for the whole of `state.append`. The
    reference (the op's body) runs instead when the extension cannot be built here, or for a side
    outside the Side contract's dtypes (`cpu.append_supported`: e.g. int64 anchor positions)."""
    from . import cpu

    s = Side(*side)
    if not cpu.append_supported(s, new):
        return _state(state.append(s, new, CacheSettings(window, anchor_frac, error, exact_dtype)), s)
    return cpu.append(s, new, window, anchor_frac, error)


def _triton_encoder(x, centroids, with_error):
    from .triton.encode import vq_encode  # Triton is imported only where a CUDA kernel runs

    return vq_encode(x.contiguous(), centroids)


@_kernel(append, "cuda")
def append_cuda(side, new, window, anchor_frac, error, exact_dtype):
    """On CUDA: `state.append` with its nearest-centroid search (and actual error) by the Triton
    kernel (triton/encode.py); the flush and concatenations stay PyTorch ops on the device. Tested
    in the Triton interpreter on CPU tensors (tests/test_triton_encode.py); not run on a GPU here."""
    s = Side(*side)
    return _state(state.append(s, new, CacheSettings(window, anchor_frac, error, exact_dtype), _triton_encoder), s)


_WINDOW = "(" + ", ".join("Tensor" for _ in WINDOW_FIELDS) + ")"
_REST = tuple(f for f in Side._fields if f not in BUFFER_FIELDS)  # what append_ reads but does not write


def split_buffers(side: Side) -> tuple[list, list]:
    """(the BUFFER_FIELDS tensors, the other fields in Side order): antkv::append_'s two lists."""
    return [getattr(side, f) for f in BUFFER_FIELDS], [getattr(side, f) for f in _REST]


def join_buffers(buffers, rest) -> Side:
    """The Side `split_buffers` split."""
    return Side(**dict(zip(BUFFER_FIELDS, buffers)), **dict(zip(_REST, rest)))


@torch.library.custom_op(
    "antkv::append_", mutates_args=("buffers",),
    schema=f"(Tensor(a!)[] buffers, Tensor[] rest, int length, int anchors, Tensor new, {_SETTINGS}) -> {_WINDOW}",
)  # fmt: skip
def append_(buffers, rest, length, anchors, new, window, anchor_frac, error, exact_dtype):
    """`state.append_into`: quantize-on-write into a preallocated side. `buffers`: its
    BUFFER_FIELDS, capacity buffers holding `length` tokens and `anchors` anchor slots, into which
    the new codes and the flushed anchor slots are written (declared mutated); `rest`: its other
    fields (window, codebook: read only). Returns the new window fields (`split_buffers` makes the
    two lists). The anchor count afterwards is `state.flush_lengths(...)[0]`; the caller narrows."""
    return _append_into(buffers, rest, length, anchors, new, CacheSettings(window, anchor_frac, error, exact_dtype))


def _append_into(buffers, rest, length, anchors, new, settings, encoder=state.encode_with_error) -> tuple:
    out = state.append_into(join_buffers(buffers, rest), length, anchors, new, settings, encoder)
    return _fresh(tuple(getattr(out, f) for f in WINDOW_FIELDS), (*buffers, *rest))


@append_.register_fake
def _(buffers, rest, length, anchors, new, window, anchor_frac, error, exact_dtype):
    s = join_buffers(buffers, rest)
    _, Tw = state.flush_lengths(length, anchors, s.window.shape[2], new.shape[2], window, anchor_frac)
    return tuple(getattr(s, f).new_empty(*s.window.shape[:2], Tw, *getattr(s, f).shape[3:]) for f in WINDOW_FIELDS)


@_kernel(append_, "cpu")
def _(buffers, rest, length, anchors, new, window, anchor_frac, error, exact_dtype):
    """On CPU: write.cpp in place (`cpu.append_`), or the reference outside its dtypes."""
    from . import cpu

    s = join_buffers(buffers, rest)
    if not cpu.append_supported(s, new):
        return _append_into(buffers, rest, length, anchors, new, CacheSettings(window, anchor_frac, error, exact_dtype))
    return cpu.append_(s, length, anchors, new, window, anchor_frac, error)


@_kernel(append_, "cuda")
def _(buffers, rest, length, anchors, new, window, anchor_frac, error, exact_dtype):
    """On CUDA: `state.append_into` with the Triton encoder, as `append_cuda`."""
    settings = CacheSettings(window, anchor_frac, error, exact_dtype)
    return _append_into(buffers, rest, length, anchors, new, settings, _triton_encoder)


@torch.library.custom_op("antkv::start", mutates_args=(), schema=f"(Tensor past, Tensor new, Tensor[] book, {_SETTINGS}) -> {_STATE}")
def start(past, new, book, window, anchor_frac, error, exact_dtype):
    """`state.start`: a side from a dense `past` (empty, or [B, H, Tp, D]) and the call's `new`."""
    side = state.start(past, new, Book(*book), CacheSettings(window, anchor_frac, error, exact_dtype))
    return _state(side, (past, new, *book))


def _start_fake(past, new, bk: Book, window, anchor_frac, exact_dtype) -> tuple:
    st = state.empty(new.shape[0], bk, new.dtype, CacheSettings(exact_dtype=exact_dtype))
    Tp = past.shape[2] if past.dim() == 4 else 0
    if not (isinstance(Tp, int) and Tp == 0):
        st = st._replace(**dict(zip(STATE_FIELDS, _append_fake(st, past, window, anchor_frac))))
    return _append_fake(st, new, window, anchor_frac)


@start.register_fake
def _(past, new, book, window, anchor_frac, error, exact_dtype):
    return _start_fake(past, new, Book(*book), window, anchor_frac, exact_dtype)


def _write_cpu(side: Side, new, settings: CacheSettings) -> Side:
    """`state.append` by the write kernel (`append_cpu`), as the `write` of `state.start`."""
    out = append_cpu(list(side), new, *settings_args(settings))
    return Side(*out, *(getattr(side, f) for f in Book._fields))


@_kernel(start, "cpu")
def _(past, new, book, window, anchor_frac, error, exact_dtype):
    """On CPU: `state.start` with each of its two appends (past, then new) by the write kernel
    (`append_cpu`, which falls back to the reference itself)."""
    side = state.start(past, new, Book(*book), CacheSettings(window, anchor_frac, error, exact_dtype), _write_cpu)
    return _state(side, (past, new, *book))


@_kernel(start, "cuda")
def start_cuda(past, new, book, window, anchor_frac, error, exact_dtype):
    """On CUDA: `state.start` with the Triton encoder, as `append_cuda`."""
    write = functools.partial(state.append, encoder=_triton_encoder)
    side = state.start(past, new, Book(*book), CacheSettings(window, anchor_frac, error, exact_dtype), write)
    return _state(side, (past, new, *book))


_LEARNED = "(" + ", ".join("Tensor" for _ in STATE_FIELDS + Book._fields) + ")"


@torch.library.custom_op(
    "antkv::learn_start", mutates_args=(),
    schema=f"(Tensor past, Tensor new, int sub_dim, int code_bits, bool rotate, {_SETTINGS}, int seed) -> {_LEARNED}",
)
def learn_start(past, new, sub_dim, code_bits, rotate, window, anchor_frac, error, exact_dtype, seed):
    """`start` with a data-free codebook fitted to these tokens (`state.learn_book`, no calibration
    data): the state, then the Book."""
    bk = state.learn_book(torch.cat([past.to(new.dtype), new], 2) if past.numel() else new, sub_dim, code_bits, rotate, seed)
    side = state.start(past, new, bk, CacheSettings(window, anchor_frac, error, exact_dtype))
    return _fresh((*(getattr(side, f) for f in STATE_FIELDS), *bk), (past, new))


@learn_start.register_fake
def _(past, new, sub_dim, code_bits, rotate, window, anchor_frac, error, exact_dtype, seed):
    H, D = new.shape[1], new.shape[3]
    B = D if rotate else 0  # the basis: a rotation, or the empty marker
    bk = Book(new.new_empty(H, D // sub_dim, 1 << code_bits, sub_dim, dtype=torch.float32),
              new.new_empty(H, dtype=torch.float32), new.new_empty(H, B, B, dtype=torch.float32),
              new.new_empty(H, B, B, dtype=torch.float32))  # fmt: skip
    return (*_start_fake(past, new, bk, window, anchor_frac, exact_dtype), *bk)


# --- attention -------------------------------------------------------------------------------


@torch.library.custom_op(
    "antkv::attention", mutates_args=(),
    schema="(Tensor q, Tensor[] key, Tensor[] value, Tensor? attn_mask, bool is_causal, float? scale) -> (Tensor, Tensor)",
)  # fmt: skip
def attention(q, key, value, attn_mask, is_causal, scale):
    """SDPA of q [B, Hq, L, D] (the model's coordinates) over a compressed K and V (GQA when q
    has more heads). Returns (out, score): `score` [B, Hkv, Tw] is this call's Anchor Score of the
    window tokens, which the caller adds to both sides' window_score. This body (the PyTorch
    reference, reference.py) runs on every device but CPU, whose kernel is registered below."""
    return attention_reference(q, Side(*key), Side(*value), attn_mask, is_causal, scale)


def attention_reference(q, k: Side, v: Side, attn_mask, is_causal, scale):
    out, s1, s0 = vq_attention(query_to_basis(q, k.basis_inv), k, v, attn_mask, is_causal, scale)
    if s1 is None:
        return out, k.window_err.new_zeros(k.window_err.shape)
    return out, k.window_err * s1 + v.window_err * s0


@_kernel(attention, "cpu")
def _(q, key, value, attn_mask, is_causal, scale):
    """On CPU: the C++ kernel (cpu/attention.cpp) for decode and chunks of up to cpu.MAX_ROWS
    query rows per kv head; the reference for larger calls or where it cannot be built."""
    from . import cpu

    k, v = Side(*key), Side(*value)
    if not cpu.supported(q, k):
        return attention_reference(q, k, v, attn_mask, is_causal, scale)
    return cpu.attention(query_to_basis(q, k.basis_inv), k, v, attn_mask, is_causal, scale)


@_kernel(attention, "cuda")
def attention_cuda(q, key, value, attn_mask, is_causal, scale):
    """On CUDA outside compiled graphs (eager, or shapes the Inductor lowering does not take): the
    standalone Triton kernels of triton/attention.py, decode (<= MAX_DECODE_QUERIES queries) or
    prefill, then the window's Anchor Score. Checked in the Triton interpreter on CPU tensors
    (tests/test_triton_attention.py calls this function directly); never run on a GPU here."""
    from .triton import attention as kernels

    k, v = Side(*key), Side(*value)
    qb = query_to_basis(q, k.basis_inv)
    if qb.shape[2] <= kernels.MAX_DECODE_QUERIES:
        out, lse = kernels.vq_decode_attention(qb, k, v, attn_mask, scale, is_causal)
        s0, s1 = kernels.vq_window_scores(qb, k, v, out, lse, attn_mask, scale, is_causal)
    else:
        out, _, s0, s1 = kernels.vq_prefill_attention(qb, k, v, attn_mask, scale, is_causal)
    return out, k.window_err * s1 + v.window_err * s0


@attention.register_fake
def _(q, key, value, attn_mask, is_causal, scale):
    return torch.empty_like(q, memory_format=torch.contiguous_format), torch.empty_like(key[Side._fields.index("window_err")])


# --- the static-cache step ---------------------------------------------------------------------


# Declared with torch.library.define, not custom_op: custom_op wraps a mutating op's every call in
# three Python layers (autograd, version bump, backend select), ~0.2 ms per call measured in a
# SmolLM2 decode step (speed.md profile, antkv-static @ 4K: 6.3 ms self time for 30 calls), more
# than the C++ step itself at 1K. Here the dispatcher's own C++ fallbacks run those keys, and on CPU
# the kernel is C++ too (write.cpp registers it): no Python hop at all (a Python CPU kernel cost
# 1.4-1.6 ms per step, its argument checks and the boxing of ~30 tensors into Python and back).
# No autograd: the cache is written under no_grad.
_STATIC_SCHEMA = (
    "(Tensor q, Tensor(a!)[] key, Tensor[] key_book, Tensor(b!)[] value, Tensor[] value_book, Tensor k_new, Tensor v_new, "
    f"Tensor pos, Tensor? attn_mask, bool is_causal, float? scale, {_SETTINGS}) -> Tensor"
)
torch.library.define("antkv::static_attention_", _STATIC_SCHEMA)
static_attention_ = torch.ops.antkv.static_attention_.default
"""One call of a layer over a static cache: each side as its `state.STATIC_BUFFERS` (fixed-capacity
buffers and their `lengths`, declared mutated) and its book (read only: declared mutated, its
version counter would change every call and the CPU encoder's prepared codebook with it). `k_new`
/ `v_new` [B, H, n, D] written at positions `pos` (which must be the next n: the static cache is
written in order), then SDPA of q over the filled length: the cache stands for its filled prefix
(an attn_mask's columns past it must mask them out; with none, as HF passes for one query, the
prefix is attended), then the window flushed down to `window` rows. Returns the attention output.
Kernels: write.cpp's `static_attention_cpu` on CPU (the whole call in C++), `static_step_composed`
(the op's body: the device kernels of `append_` and `attention` composed) on every other device
and for the CPU calls write.cpp does not take."""
torch.library.define("antkv::static_step_composed", _STATIC_SCHEMA)
static_step_composed = torch.ops.antkv.static_step_composed.default
"""`static_attention_` composed from the device kernels (`_static_step`); write.cpp's CPU kernel
calls it for what it does not take (dtypes, query rows)."""


def _static_step(q, key, key_book, value, value_book, k_new, v_new, pos, attn_mask, is_causal, scale, window, anchor_frac, error,
                 exact_dtype):  # fmt: skip
    settings = CacheSettings(window, anchor_frac, error, exact_dtype)
    ks = {**dict(zip(state.STATIC_BUFFERS, key)), **dict(zip(BOOK_FIELDS, key_book))}
    vs = {**dict(zip(state.STATIC_BUFFERS, value)), **dict(zip(BOOK_FIELDS, value_book))}
    T, A, Tw = ks["lengths"].tolist()
    n, capacity = k_new.shape[2], ks["codes"].shape[2]
    if T + n > capacity:
        raise ValueError(f"antkv static cache full: {T} tokens held + {n} new > max_cache_len {capacity}; make the cache larger")
    if pos.numel() != n or (n and not torch.equal(pos.reshape(-1).to(torch.int64), torch.arange(T, T + n, device=pos.device))):
        raise ValueError(
            f"antkv static cache: the {n} new tokens must be written at positions {T}..{T + n - 1} (right after the "
            f"{T} held, in order), got {pos.reshape(-1).tolist()[:8]}: a static compressed cache cannot overwrite or skip slots"
        )
    if attn_mask is not None:
        rest = attn_mask[..., T + n :]
        if (rest.any() if rest.dtype == torch.bool else (rest != float("-inf")).any()):
            raise ValueError(f"antkv static cache: attn_mask lets queries attend to the unfilled slots past {T + n}; mask them out")
        attn_mask = attn_mask[..., : T + n]
    dev = q.device
    sides = []
    with _profiled("antkv::static_write"):
        for fields, new in ((ks, k_new), (vs, v_new)):  # encode the new tokens: codes in place, window Tw + n (Tw <= window: no flush)
            held = state.static_side(fields, (T, A, Tw))
            full = held._replace(**{f: fields[f] for f in BUFFER_FIELDS})
            win = direct(append_, dev, *split_buffers(full), T, A, new, *settings_args(settings))
            sides.append(held._replace(codes=fields["codes"][:, :, : T + n], **dict(zip(WINDOW_FIELDS, win))))
    out, score = direct(attention, dev, q, list(sides[0]), list(sides[1]), attn_mask, is_causal, scale)
    A2, Tw2 = state.flush_lengths(T + n, A, Tw + n, 0, window, anchor_frac)
    with _profiled("antkv::static_flush"):
        for fields, side in zip((ks, vs), sides):  # the flush: the leavers' anchor slots in place, the window stored back
            full = side._replace(window_score=side.window_score + score, **{f: fields[f] for f in BUFFER_FIELDS})
            win = direct(append_, dev, *split_buffers(full), T + n, A, k_new[:, :, :0], *settings_args(settings))
            for f, t in zip(WINDOW_FIELDS, win):
                fields[f][:, :, :Tw2] = t
            fields["lengths"].copy_(torch.tensor([T + n, A2, Tw2]))
    return out


def _profiled(name: str):
    """A torch.profiler range while a profiler runs (benchmarks/speed.py's write share), else nothing."""
    return torch.profiler.record_function(name) if torch.autograd.profiler._is_profiler_enabled else contextlib.nullcontext()


torch.library.impl("antkv::static_step_composed", "CompositeExplicitAutograd")(_static_step)


@torch.library.impl("antkv::static_attention_", "CompositeExplicitAutograd")
def _(q, *args):
    """Every device without a kernel of its own runs the body. On CPU this runs until write.cpp's
    kernel is registered, which happens when the extension loads: load it, dispatch again."""
    from . import cpu

    if q.device.type == "cpu" and cpu.extension() and torch._C._dispatch_has_kernel_for_dispatch_key(static_attention_.name(), "CPU"):
        return static_attention_(q, *args)
    return static_step_composed(q, *args)


for _name in ("antkv::static_attention_", "antkv::static_step_composed"):
    @torch.library.register_fake(_name)
    def _(q, key, key_book, value, value_book, k_new, v_new, pos, attn_mask, is_causal, scale, window, anchor_frac, error, exact_dtype):
        return torch.empty_like(q, memory_format=torch.contiguous_format)


# --- dequantize ------------------------------------------------------------------------------


@torch.library.custom_op("antkv::dequantize", mutates_args=(), schema="(Tensor[] side, ScalarType dtype) -> Tensor")
def dequantize(side, dtype):
    """`state.dequantize`: the dense [B, H, T, D] tensor a side stands for, in `dtype` (the
    fallback of every op VQTensor does not run on the codes)."""
    return state.dequantize(Side(*side), dtype)


@dequantize.register_fake
def _(side, dtype):
    s = Side(*side)
    return s.window.new_empty(*state.bhtd(s), dtype=dtype)
