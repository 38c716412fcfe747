"""The state of one side (K or V) of one layer's compressed cache, and the pure functions on it.

`Side` is the one record of that state. Everything else is derived from its fields: the inner
tensors of the `VQTensor` subclass (cache.py) and its flatten order, the `Tensor[]` arguments of
the custom ops (ops/), the placeholders the graph pass adds for a compressed input and the
outputs it writes back (compile/passes/), the sizes the backend marks dynamic, the inputs of the
Inductor lowering (inductor/) and the arguments of the CPU kernel (ops/cpu/).

A side holds

- `codes` [B, H, T, S]: the product-VQ code of every token, written once when the token arrives
  (quantize-on-write), re-encoded only when online refinement switches codebooks (`refine`);
- anchors: exact rows [B, H, A, D] of the tokens with the highest Anchor Score, their positions
  [B, H, A] (int32, -1 = empty slot) and scores;
- the window: the most recent tokens [B, H, Tw, D], exact, with their actual quantization error
  and the Anchor Score accumulated from the queries that attended to them;
- the codebook it was encoded with (`BOOK_FIELDS`, shared by every sequence, not cache bytes):
  centroids [H, S, K, d], the expected error per head, and the key basis A, A^-1 [H, D, D]
  (quant/basis.py; [H, 0, 0] for none): every stored row, codes, anchors and window, is k A.

The functions here are the semantics: `append` flushes the window down to `settings.window`
(the oldest leave it; the best of current anchors + leavers by score stay exact as anchors,
ceil(anchor_frac x encoded tokens) in all, the rest fall back to their codes), then the new
tokens join the window whole, so the tokens of the current call are always attended exactly.
`flush_lengths` is that rule on sizes alone, for the ops' fake kernels. They run on concrete
tensors; the ops (ops/) wrap them for graphs, `VQTensor` (cache.py) for eager code.
"""

from __future__ import annotations

import math
import warnings
from typing import NamedTuple

import torch
from torch import Tensor

from .quant import datafree
from .quant.basis import from_basis, identity, to_basis
from .quant.pq import PQSpec, decode, encode
from .settings import CacheSettings


class Side(NamedTuple):
    """One side of one layer's compressed cache (see the module doc)."""

    codes: Tensor  # [B, H, T, S] uint8 / int16
    anchor_rows: Tensor  # [B, H, A, D] exact rows (in the exact-row dtype)
    anchor_pos: Tensor  # [B, H, A] int32 position < T - Tw, or -1 for an empty slot
    anchor_score: Tensor  # [B, H, A] float32
    window: Tensor  # [B, H, Tw, D] exact rows of positions T - Tw .. T - 1
    window_err: Tensor  # [B, H, Tw] float32 quantization error of each window token
    window_score: Tensor  # [B, H, Tw] float32 Anchor Score accumulated so far
    centroids: Tensor  # [H, S, K, d] float32
    expected_err: Tensor  # [H] float32 mean quantization error per head
    basis: Tensor  # [H, D, D] float32 key basis A, or [H, 0, 0]: none
    basis_inv: Tensor  # [H, D, D] float32 A^-1, or [H, 0, 0]


BOOK_FIELDS = ("centroids", "expected_err", "basis", "basis_inv")
# Per-sequence state, in `Side` order: what an append returns (the codebook never changes).
STATE_FIELDS = tuple(f for f in Side._fields if f not in BOOK_FIELDS)
# What a preallocated cache keeps in capacity buffers written in place (`append_into`): the codes
# (one row per token) and the anchor slots; the window (O(settings.window)) is written fresh.
BUFFER_FIELDS = ("codes", "anchor_rows", "anchor_pos", "anchor_score")
WINDOW_FIELDS = tuple(f for f in STATE_FIELDS if f not in BUFFER_FIELDS)
# Their dim 2 is a length: the tokens (codes: grows by every call), the anchors or the window
# (change with the flush, so traced graphs take them as unbacked sizes).
UNBACKED_FIELDS = tuple(f for f in STATE_FIELDS if f != "codes")
# What an unused slot of a capacity buffer holds (0 elsewhere): an empty anchor slot.
EMPTY_SLOT = {"anchor_pos": -1, "anchor_score": float("-inf")}


class Book(NamedTuple):
    """The codebook part of a `Side` (`BOOK_FIELDS`, same order)."""

    centroids: Tensor
    expected_err: Tensor
    basis: Tensor
    basis_inv: Tensor


assert Book._fields == BOOK_FIELDS


def book(cb, device=None) -> Book:
    """The tensors a side carries for a `CodebookSide` `cb` (quant/codebook.py): float32 on
    `device` (default: the centroids'), the empty [H, 0, 0] marker for no basis."""
    centroids, expected_err, basis, basis_inv = cb.centroids, cb.error, cb.basis, cb.basis_inv
    H, S, _, d = centroids.shape
    device = centroids.device if device is None else device
    if (basis is None) != (basis_inv is None):
        raise ValueError("a key basis needs both A and its inverse (basis and basis_inv)")
    if basis is not None and (tuple(basis.shape) != (H, S * d, S * d) or tuple(basis_inv.shape) != (H, S * d, S * d)):
        raise ValueError(
            f"key basis of shape {tuple(basis.shape)} / inverse {tuple(basis_inv.shape)} does not match the codebook "
            f"[H={H}, D={S * d}]: want [{H}, {S * d}, {S * d}] each"
        )
    f32 = dict(device=device, dtype=torch.float32)
    return Book(*(t.to(**f32).contiguous() for t in (
        centroids, expected_err,
        identity(H, device) if basis is None else basis,
        identity(H, device) if basis_inv is None else basis_inv,
    )))  # fmt: skip


def empty(batch: int, bk: Book, dtype: torch.dtype, settings: CacheSettings = CacheSettings()) -> Side:
    """A side of 0 tokens for `batch` sequences of a model of `dtype`, exact rows stored in
    `settings.exact_dtype` (None: the model's)."""
    H, S, K, d = bk.centroids.shape
    device = bk.centroids.device
    f32 = dict(dtype=torch.float32, device=device)
    exact = dict(dtype=settings.exact_dtype or dtype, device=device)
    return Side(
        torch.zeros(batch, H, 0, S, dtype=torch.uint8 if K <= 256 else torch.int16, device=device),
        torch.zeros(batch, H, 0, S * d, **exact),
        torch.zeros(batch, H, 0, dtype=torch.int32, device=device),
        torch.zeros(batch, H, 0, **f32),
        torch.zeros(batch, H, 0, S * d, **exact),
        torch.zeros(batch, H, 0, **f32),
        torch.zeros(batch, H, 0, **f32),
        *bk,
    )


def bhtd(side: Side) -> tuple:
    """[B, H, T, D] of the dense tensor a side stands for."""
    return (*side.codes.shape[:3], side.window.shape[3])


def flush_lengths(T, A, Tw, n, window: int, anchor_frac: float) -> tuple:
    """(anchors, window) lengths after appending n tokens to a side of T tokens, A anchor slots and
    Tw window tokens: the flush rule of `append` on sizes alone."""
    n_leave = Tw - window
    if n_leave <= 0:
        return A, Tw + n
    return min(math.ceil(anchor_frac * (T - Tw + n_leave)), A + n_leave), window + n


def _nan_loses(score: Tensor) -> Tensor:
    return score.masked_fill(score.isnan(), float("-inf"))


def warn_nonfinite(count: int, anchors: int) -> None:
    """The warning of a flush that moved `count` rows with NaN / Inf entries out of the window
    (`_flush`, and the CPU write kernel's wrapper, ops/cpu/)."""
    warnings.warn(
        f"antkv: {count} cache rows with NaN / Inf left the exact window: they stay exact as anchors "
        f"(attention output non-finite, as with a dense cache) while the anchor budget ({anchors} per head) allows, "
        "beyond it they are encoded to finite codes. Check the model's keys and values (overflow in float16?).",
        stacklevel=3,
    )


def _flush(side: Side, n_leave: int, anchor_frac: float) -> Side:
    """Move the oldest `n_leave` window tokens out; the top scorers among them and the current
    anchors fill the anchor budget ceil(anchor_frac * encoded tokens).

    Non-finite input: a NaN score never wins a slot (topk would rank it first, and one NaN key or
    value makes every score of the queries that saw it NaN: they would hold the slots for ever). A
    leaving row with a NaN / Inf entry scores +inf instead: it stays exact as an anchor, so attention
    sees it as the dense cache would (its outputs non-finite), while the anchor budget allows; beyond
    the budget such rows fall back to their codes, which are finite (a warning says so, outside
    compiled graphs)."""
    if n_leave <= 0:
        return side
    B, H, T, _ = bhtd(side)
    Tw = side.window.shape[2]
    A, _ = flush_lengths(T, side.anchor_pos.shape[2], Tw, 0, Tw - n_leave, anchor_frac)
    leave_pos = torch.arange(T - Tw, T - Tw + n_leave, dtype=torch.int32, device=side.codes.device)
    leave_score = _nan_loses(side.window_score[:, :, :n_leave])
    nonfinite = ~torch.isfinite(side.window[:, :, :n_leave]).all(-1)
    leave_score = leave_score.masked_fill(nonfinite, float("inf"))
    if not torch.compiler.is_compiling() and bool(nonfinite.any()):
        warn_nonfinite(int(nonfinite.sum()), A)
    cand_score = torch.cat([_nan_loses(side.anchor_score), leave_score], 2)
    cand_pos = torch.cat([side.anchor_pos, leave_pos.expand(B, H, -1)], 2)
    cand_rows = torch.cat([side.anchor_rows, side.window[:, :, :n_leave]], 2)
    if A == cand_score.shape[2]:  # every candidate stays: nothing to rank
        rows, pos, score = cand_rows, cand_pos, cand_score
    else:
        # Advanced indexing, not gather with an expanded index: half the time per decode step.
        score, idx = cand_score.topk(A, dim=2)
        b = torch.arange(B, device=idx.device)[:, None, None]
        h = torch.arange(H, device=idx.device)[None, :, None]
        rows, pos = cand_rows[b, h, idx], cand_pos[b, h, idx]
    return side._replace(
        anchor_rows=rows,
        anchor_pos=pos,
        anchor_score=score,
        window=side.window[:, :, n_leave:],
        window_err=side.window_err[:, :, n_leave:],
        window_score=side.window_score[:, :, n_leave:],
    )


def encode_with_error(x: Tensor, centroids: Tensor, with_error: bool) -> tuple[Tensor, Tensor | None]:
    """The nearest-centroid codes of x [B, H, n, D] (quant/pq.py) and, if asked, each token's actual
    error ||x - decode(codes)||: the encoder `append` uses unless a device kernel passes its own."""
    codes = encode(x, centroids)
    return codes, (x.float() - decode(codes, centroids)).norm(dim=-1) if with_error else None


def append(side: Side, new: Tensor, settings: CacheSettings, encoder=encode_with_error) -> Side:
    """Quantize-on-write of `new` [B, H, n, D] (the model's coordinates): mapped to the side's
    basis, rounded to the exact-row dtype (the one place new rows are), flush, encode, join the
    window. `encoder(x, centroids, with_error) -> (codes, error or None)`: the nearest-centroid
    search (`encode_with_error`; the CUDA kernel passes the Triton one, ops/triton/encode.py)."""
    s = _flush(side, side.window.shape[2] - settings.window, settings.anchor_frac)
    new = to_basis(new, s.basis).to(s.window.dtype)
    codes, err = encoder(new, s.centroids, settings.error == "actual")
    if settings.error != "actual":
        err = s.expected_err[None, :, None].expand(new.shape[0], -1, new.shape[2])
    return s._replace(
        codes=torch.cat([s.codes, codes], 2),
        window=torch.cat([s.window, new], 2),
        window_err=torch.cat([s.window_err, err], 2),
        window_score=torch.cat([s.window_score, err.new_zeros(err.shape)], 2),
    )


def filled(buffers: dict, tokens: int, anchors: int) -> dict:
    """The BUFFER_FIELDS views a state of `tokens` tokens and `anchors` anchor slots holds in
    capacity buffers (`buffers`: those fields by name, [B, H, capacity, ...] each)."""
    return {f: buffers[f][:, :, : tokens if f == "codes" else anchors] for f in BUFFER_FIELDS}


def append_into(buffers: Side, length: int, anchors: int, new: Tensor, settings: CacheSettings, encoder=encode_with_error) -> Side:
    """`append` written in place into capacity buffers: `buffers` is a side whose BUFFER_FIELDS
    have room for more tokens / anchor slots than they hold (codes [B, H, Tc, S] holding `length`
    tokens, anchor slots [B, H, Ac, ...] holding `anchors`), its window fields the side's own. Writes
    the new codes at [length, length + n) and the anchor slots [0, A') of the flushed state; returns
    the state as views of the buffers ([:length + n], [:A']) with the new window (fresh tensors).
    The reference of the CPU kernel (ops/cpu/write.cpp), which keeps a kept anchor in its slot
    where this one writes the anchors in score order: the same set of anchors."""
    n = new.shape[2]
    Tc, Ac = buffers.codes.shape[2], buffers.anchor_pos.shape[2]
    A_out, _ = flush_lengths(length, anchors, buffers.window.shape[2], n, settings.window, settings.anchor_frac)
    if length + n > Tc or max(anchors, A_out) > Ac:
        raise ValueError(f"capacity buffers too small: {length} + {n} tokens in {Tc}, {A_out} anchors in {Ac} slots")
    full = buffers._asdict()
    out = append(buffers._replace(**filled(full, length, anchors)), new, settings, encoder)
    buffers.codes[:, :, length : length + n] = out.codes[:, :, length:]
    for f in BUFFER_FIELDS[1:]:
        getattr(buffers, f)[:, :, :A_out] = getattr(out, f)
    return out._replace(**filled(full, length + n, A_out))


def start(past: Tensor, new: Tensor, bk: Book, settings: CacheSettings, write=append) -> Side:
    """A side from a dense `past` (empty, or [B, H, Tp, D]) and the call's `new` tokens.
    `write(side, x, settings) -> Side`: the append (`append`; a device kernel passes its own)."""
    side = empty(new.shape[0], bk, new.dtype, settings)
    if past.numel():
        side = write(side, past.to(new.dtype), settings)
    return write(side, new, settings)


def dequantize(side: Side, dtype: torch.dtype) -> Tensor:
    """The dense [B, H, T, D] tensor a side stands for, in `dtype` (the model's, which may be wider
    than the exact rows'): codes decoded, anchor and window rows exact, mapped out of the basis."""
    B, H, T, D = bhtd(side)
    Tc = T - side.window.shape[2]
    dense = torch.cat([decode(side.codes[:, :, :Tc], side.centroids), side.window.float()], 2)
    dense = torch.cat([dense, dense.new_zeros(B, H, 1, D)], 2)  # dummy row for empty anchor slots
    idx = torch.where(side.anchor_pos >= 0, side.anchor_pos.long(), T)[..., None].expand(-1, -1, -1, D)
    dense.scatter_(2, idx, side.anchor_rows.float())
    return from_basis(dense[:, :, :T], side.basis_inv).to(dtype).contiguous()


def crop(side: Side, end: int) -> Side:
    """The first `end` tokens (HF's cache crop): codes cut, later anchors emptied, window cut."""
    T, Tw = side.codes.shape[2], side.window.shape[2]
    end = max(0, min(T, end if end >= 0 else T + end))
    keep_w = max(0, end - (T - Tw))
    gone = side.anchor_pos >= end
    return side._replace(
        codes=side.codes[:, :, :end],
        anchor_pos=side.anchor_pos.masked_fill(gone, -1),
        anchor_score=side.anchor_score.masked_fill(gone, float("-inf")),
        window=side.window[:, :, :keep_w],
        window_err=side.window_err[:, :, :keep_w],
        window_score=side.window_score[:, :, :keep_w],
    )


def select_batch(side: Side, index: Tensor) -> Side:
    """Reorder / pick sequences (beam search) on every per-sequence tensor."""
    index = index.to(side.codes.device).long()
    return side._replace(**{f: getattr(side, f).index_select(0, index) for f in STATE_FIELDS})


def learn_book(x: Tensor, sub_dim: int, code_bits: int, rotate: bool, seed: int) -> Book:
    """A data-free codebook for tokens like x [B, H, T, D] (quant/datafree.py: a fixed Gaussian
    codebook placed and scaled by x's moments; keys rotated by a random orthogonal basis)."""
    return book(datafree.fit_side(x, PQSpec(sub_dim, code_bits), rotate, seed))


def refine(side: Side, rows: Tensor, settings: CacheSettings, iters: int, init: str = "held", fit_rows: Tensor | None = None) -> Side:
    """The side re-written with a codebook refined on its own tokens (online refinement).

    rows [B, H, T, D]: the stored row of each of the side's T tokens, in its basis and exact-row
    dtype: what `append` encoded (the window keeps the newest of them). The key basis stays; the
    centroids are `iters` Lloyd iterations on these rows from the side's own (quant/datafree.refine).
    Every token's code is re-encoded from its row, the window's errors and the per-head expected
    error recomputed: the side then stands for the same tokens under the new codebook, as if it had
    been written with it from the start (anchor and window rows, positions, scores stay as they are).
    fit_rows [B', H, T', D] (default: rows): the rows the codebook is fitted to, when they are more
    than the side's own (quant/rope.augment: its keys at later positions too); only `rows` are encoded."""
    if tuple(rows.shape) != tuple(bhtd(side)):
        raise ValueError(f"refine needs one row per token of the side {tuple(bhtd(side))}, got {tuple(rows.shape)}")
    centroids = side.centroids
    fit_rows = rows if fit_rows is None else fit_rows
    if init in ("moments", "covariance"):
        K, d = centroids.shape[-2:]
        centroids = datafree.place(fit_rows, PQSpec(d, K.bit_length() - 1), full=init == "covariance").to(centroids.dtype).contiguous()
    elif init != "held":
        raise ValueError(f"refine init must be 'held', 'moments' or 'covariance', got {init!r}")
    if iters > 0:
        centroids = datafree.refine(fit_rows, centroids, iters).to(side.centroids.dtype).contiguous()
    codes, err = encode_with_error(rows, centroids, True)  # err [B, H, T]
    expected = err.mean((0, 2))
    Tw = side.window.shape[2]
    if settings.error == "actual":
        window_err = err[:, :, err.shape[2] - Tw :]
    else:
        window_err = expected[None, :, None].expand(err.shape[0], -1, Tw)
    return side._replace(codes=codes, window_err=window_err.contiguous(), centroids=centroids, expected_err=expected)


# --- static sides: the same state at a fixed capacity ------------------------------------------
#
# A static side is a side preallocated for the static-cache pattern (HF StaticCache, gpt-fast: one
# buffer per layer written in place, one compiled graph for every decode step): every STATE_FIELDS
# tensor at a fixed capacity (codes: `capacity` tokens; anchor slots: ceil(anchor_frac x capacity);
# window fields: settings.window rows), the book fields as in a Side, and `lengths` (int64 [3]: the
# tokens, anchor slots and window rows held). No shape ever changes; the kernels read the lengths.
# A call (ops.static_attention_) is the growing side's append + attention with the flush moved to
# the end of the call: the call's tokens are encoded and attended exactly beside the stored window,
# then the window is flushed down to settings.window rows. The tokens that leave are the ones the
# growing side would flush at the start of the next call, with the same scores, so the outputs are
# the growing side's (tests/test_static.py).
STATIC_FIELDS = (*Side._fields, "lengths")
STATIC_BUFFERS = (*STATE_FIELDS, "lengths")  # what a call writes (the book is only read)


def static_empty(batch: int, bk: Book, dtype: torch.dtype, capacity: int, settings: CacheSettings = CacheSettings()) -> dict:
    """The STATIC_FIELDS tensors of an empty static side for `capacity` tokens."""
    side = empty(batch, bk, dtype, settings)
    rows = {**dict.fromkeys(BUFFER_FIELDS, math.ceil(settings.anchor_frac * capacity)), "codes": capacity,
            **dict.fromkeys(WINDOW_FIELDS, settings.window)}  # fmt: skip
    out = {}
    for f in STATE_FIELDS:
        t = getattr(side, f)
        out[f] = t.new_full((*t.shape[:2], rows[f], *t.shape[3:]), EMPTY_SLOT.get(f, 0))
    out.update(zip(BOOK_FIELDS, bk))
    out["lengths"] = torch.zeros(3, dtype=torch.int64, device=side.codes.device)
    return out


def static_from_side(side: Side, capacity: int, settings: CacheSettings) -> dict:
    """The static side holding what `side` holds (its window flushed down to settings.window rows
    first, as a static side keeps it between calls), with room for `capacity` tokens."""
    T, Tw = side.codes.shape[2], side.window.shape[2]
    if T > capacity:
        raise ValueError(f"a side of {T} tokens does not fit a static side of {capacity}")
    side = _flush(side, Tw - settings.window, settings.anchor_frac)
    out = static_empty(side.codes.shape[0], Book(*(getattr(side, f) for f in BOOK_FIELDS)), side.window.dtype, capacity, settings)
    for f in STATE_FIELDS:
        t = getattr(side, f)
        out[f][:, :, : t.shape[2]] = t
    out["lengths"].copy_(torch.tensor([T, side.anchor_pos.shape[2], side.window.shape[2]]))
    return out


def static_side(fields: dict, lengths: tuple | None = None) -> Side:
    """The Side a static side holds: views of its filled prefixes (`lengths`: (tokens, anchors,
    window) if already read, else read from the tensor)."""
    T, A, Tw = fields["lengths"].tolist() if lengths is None else lengths
    return Side(**{f: fields[f] for f in BOOK_FIELDS}, **filled(fields, T, A), **{f: fields[f][:, :, :Tw] for f in WINDOW_FIELDS})
