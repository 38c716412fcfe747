"""The compressed KV cache: a tensor that *is* the dense K (or V) it encodes.

`VQTensor` is a traceable wrapper subclass of shape [B, Hkv, T, D] and the model's dtype. It holds

- `codes` [B, Hkv, T, S]: the product-VQ code of every token, written once when the token arrives
  (quantize-on-write) and never re-encoded;
- anchors: exact rows [B, Hkv, A, D] of the ~1% tokens with the highest Anchor Score, their
  positions [B, Hkv, A] (int32, -1 = empty slot) and scores;
- `window`: the most recent tokens, exact, with their actual quantization error and the Anchor
  Score accumulated from the queries that attended to them;
- the layer's codebook (centroids and expected error per head), shared, not counted as cache bytes;
- the key basis of that codebook (quant/basis.py), if it has one: every stored row, codes, anchors
  and window, is k A, queries are mapped by A^-T before attention and `dequantize` maps back.
  Empty ([H, 0, 0]) for values and for codebooks without one.

Appending (`torch.cat([cache, new], dim=-2)`) first flushes the window down to `window` tokens:
the oldest leave it, and the best of (current anchors + leavers) by score stay exact as anchors,
the rest fall back to their codes. Then the new tokens join the window whole, so the tokens of
the current call (a decode step, a prefill, a chunk) are always attended exactly and are scored
by the queries that attend to them before they are encoded.

Semantics: every op equals the same op on `dequantize(x)`. `cat` appends, SDPA runs VQ attention
(attention.py), batch `index_select` and sequence crops act on the codes directly, and any other op
falls back to dequantize-then-run, so nothing is ever silently wrong.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.fx.experimental.symbolic_shapes import guard_or_false
from torch.utils._pytree import tree_map_only

from . import ops
from .attention import VQParts
from .quant.basis import from_basis, identity, is_identity, query_to_basis, to_basis
from .quant.pq import SUPPORTED_DTYPES, check_dtype, decode, encode

aten = torch.ops.aten


@dataclass(frozen=True)
class CacheSettings:
    """window: exact recent tokens kept after a flush; anchor_frac: share of the flushed tokens kept
    exact; error: Anchor Score with each token's 'actual' quantization error or the per-head
    'expected' one; seq_dim: the sequence axis of the tensor the cache is, 2 for [B, H, T, D]
    (SDPA's layout) or 1 for [B, T, H, D] (a model that transposes its cache before SDPA);
    exact_dtype: dtype the exact rows (anchors, window) are stored in, None for the model's. In a
    float32 model, float16 halves their bytes, as a float16 KV cache (llama.cpp's default) does."""

    window: int = 32
    anchor_frac: float = 0.01
    error: str = "actual"
    seq_dim: int = 2
    exact_dtype: torch.dtype | None = None

    def __post_init__(self):
        if self.window < 0 or not 0 <= self.anchor_frac <= 1 or self.error not in ("actual", "expected") or self.seq_dim not in (1, 2):
            raise ValueError(
                f"invalid cache settings {self}: need window >= 0, 0 <= anchor_frac <= 1, error 'actual' or 'expected', seq_dim 1 or 2"
            )
        if self.exact_dtype is not None and self.exact_dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"exact_dtype must be None or one of {', '.join(map(str, SUPPORTED_DTYPES))}, got {self.exact_dtype}")


# What the ops (ops.py) take; the key basis is applied around them (to `new` and the query).
_OP_INNER = ("codes", "anchor_rows", "anchor_pos", "anchor_score", "window", "window_err", "window_score", "centroids", "expected_err")
_INNER = (*_OP_INNER, "basis", "basis_inv")
_CODEBOOK = ("centroids", "expected_err", "basis", "basis_inv")


class VQTensor(torch.Tensor):
    codes: torch.Tensor
    anchor_rows: torch.Tensor
    anchor_pos: torch.Tensor
    anchor_score: torch.Tensor
    window: torch.Tensor
    window_err: torch.Tensor
    window_score: torch.Tensor
    centroids: torch.Tensor
    expected_err: torch.Tensor
    basis: torch.Tensor
    basis_inv: torch.Tensor
    settings: CacheSettings

    @staticmethod
    def __new__(cls, codes, anchor_rows, anchor_pos, anchor_score, window, window_err, window_score, centroids, expected_err, basis, basis_inv, settings, dtype=None):
        """`dtype`: of the dense tensor the cache is; None for the window's (exact rows stored as is)."""
        B, H, T, _ = codes.shape
        shape = (B, H, T, window.shape[-1]) if settings.seq_dim == 2 else (B, T, H, window.shape[-1])
        dtype = window.dtype if dtype is None else dtype
        return torch.Tensor._make_wrapper_subclass(cls, shape, dtype=dtype, device=codes.device, requires_grad=False)

    def __init__(self, codes, anchor_rows, anchor_pos, anchor_score, window, window_err, window_score, centroids, expected_err, basis, basis_inv, settings, dtype=None):
        self.codes, self.anchor_rows, self.anchor_pos, self.anchor_score = codes, anchor_rows, anchor_pos, anchor_score
        self.window, self.window_err, self.window_score = window, window_err, window_score
        self.centroids, self.expected_err, self.basis, self.basis_inv, self.settings = centroids, expected_err, basis, basis_inv, settings

    # --- construction -------------------------------------------------------------------------

    @classmethod
    def empty(cls, batch, centroids, expected_err, settings=CacheSettings(), dtype=torch.float32, device=None, basis=None, basis_inv=None):
        """A cache of 0 tokens for `batch` sequences, ready to be appended to. `basis`, `basis_inv`:
        the codebook's key basis A and A^-1 [H, D, D] (None: none)."""
        H, S, K, d = centroids.shape
        device = centroids.device if device is None else device
        if (basis is None) != (basis_inv is None):
            raise ValueError("a key basis needs both A and its inverse (basis and basis_inv)")
        if basis is not None and tuple(basis.shape) != (H, S * d, S * d):
            raise ValueError(f"key basis of shape {tuple(basis.shape)} does not match the codebook [H={H}, D={S * d}]: want [{H}, {S * d}, {S * d}]")
        f32 = dict(dtype=torch.float32, device=device)
        exact = dict(dtype=settings.exact_dtype or dtype, device=device)
        return cls(
            torch.zeros(batch, H, 0, S, dtype=torch.uint8 if K <= 256 else torch.int16, device=device),
            torch.zeros(batch, H, 0, S * d, **exact),
            torch.zeros(batch, H, 0, dtype=torch.int32, device=device),
            torch.zeros(batch, H, 0, **f32),
            torch.zeros(batch, H, 0, S * d, **exact),
            torch.zeros(batch, H, 0, **f32),
            torch.zeros(batch, H, 0, **f32),
            centroids.to(device=device, dtype=torch.float32),
            expected_err.to(device=device, dtype=torch.float32),
            identity(H, device) if basis is None else basis.to(device=device, dtype=torch.float32),
            identity(H, device) if basis_inv is None else basis_inv.to(device=device, dtype=torch.float32),
            settings,
            dtype,
        )

    def _replace(self, **inner) -> "VQTensor":
        return VQTensor(**{n: inner.get(n, getattr(self, n)) for n in _INNER}, settings=self.settings, dtype=self.dtype)

    # --- tensor-subclass protocol -------------------------------------------------------------

    def __tensor_flatten__(self):
        return list(_INNER), (self.settings, self.dtype)

    @staticmethod
    def __tensor_unflatten__(inner, context, outer_size, outer_stride):
        settings, dtype = context
        return VQTensor(**inner, settings=settings, dtype=dtype)

    def __repr__(self):
        return (
            f"VQTensor(shape={tuple(self.shape)}, dtype={self.dtype}, window={self.window.shape[2]}, "
            f"anchors={int((self.anchor_pos >= 0).sum())}, codes={tuple(self.codes.shape)})"
        )

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            out = _sdpa(*args, **kwargs)
            if out is not NotImplemented:
                return out
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **kwargs)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        handler = _DIRECT.get(func)
        if handler is not None:
            out = handler(*args, **kwargs)
            if out is not NotImplemented:
                return out
        args, kwargs = tree_map_only(VQTensor, lambda t: t.dequantize(), (args, kwargs))
        return func(*args, **kwargs)

    # --- what the cache is --------------------------------------------------------------------

    @property
    def num_window(self) -> int:
        return self.window.shape[2]

    @property
    def bhtd(self) -> tuple:
        """[B, H, T, D] whatever the outer layout: the shape every inner tensor is indexed by."""
        return (*self.codes.shape[:3], self.window.shape[3])

    def parts(self) -> VQParts:
        return VQParts(self.codes, self.centroids, self.anchor_rows, self.anchor_pos, self.window)

    def dequantize(self) -> torch.Tensor:
        """The dense tensor this cache stands for: codes decoded, anchor and window rows exact."""
        dense = from_basis(ops.dequantize(self.codes, self.anchor_rows, self.anchor_pos, self.window, self.centroids, self.dtype), self.basis_inv)
        return dense if self.settings.seq_dim == 2 else dense.transpose(1, 2)

    def cache_nbytes(self) -> int:
        """Bytes this cache holds (every inner tensor but the shared codebook)."""
        return sum(getattr(self, n).numel() * getattr(self, n).element_size() for n in _INNER if n not in _CODEBOOK)

    # --- direct ops ---------------------------------------------------------------------------

    def append(self, new: torch.Tensor) -> "VQTensor":
        """Quantize-on-write: flush the window down to `settings.window`, then add `new` [B, H, n, D]
        (or [B, n, H, D] if the cache's seq_dim is 1)."""
        check_dtype(new)
        if self.settings.seq_dim == 1 and new.dim() == 4:
            new = new.transpose(1, 2)
        if new.shape[:2] != self.bhtd[:2] or new.shape[3] != self.bhtd[3]:
            raise ValueError(f"cannot append {tuple(new.shape)} to a cache of shape {tuple(self.shape)}")
        s = self.settings
        new = to_basis(new.to(self.dtype), self.basis)
        state = ops.append(*(getattr(self, n) for n in _OP_INNER), new, s.window, s.anchor_frac, s.error)
        return self._replace(**dict(zip(ops.STATE, state)))

    def append_eager(self, new: torch.Tensor) -> "VQTensor":
        """What `antkv::append` computes (ops.py), on a concrete cache; `new` is already in the basis.
        It is stored, and encoded, in the window's dtype (CacheSettings.exact_dtype): the one place
        new rows are rounded to it."""
        flushed = self._flush(self.num_window - self.settings.window)
        new = new.to(self.window.dtype)
        codes = encode(new, self.centroids)
        if self.settings.error == "actual":
            err = (new.float() - decode(codes, self.centroids)).norm(dim=-1)
        else:
            err = self.expected_err[None, :, None].expand(new.shape[0], -1, new.shape[2])
        return flushed._replace(
            codes=torch.cat([flushed.codes, codes], 2),
            window=torch.cat([flushed.window, new], 2),
            window_err=torch.cat([flushed.window_err, err], 2),
            window_score=torch.cat([flushed.window_score, err.new_zeros(err.shape)], 2),
        )

    def _flush(self, n_leave: int) -> "VQTensor":
        """Move the oldest `n_leave` window tokens out; the top scorers among them and the current
        anchors fill the anchor budget ceil(anchor_frac * encoded tokens)."""
        if n_leave <= 0:
            return self
        T, Tw = self.bhtd[2], self.num_window
        Tc = T - Tw + n_leave
        leave_pos = torch.arange(T - Tw, T - Tw + n_leave, dtype=torch.int32, device=self.device)
        cand_score = torch.cat([self.anchor_score, self.window_score[:, :, :n_leave]], 2)
        cand_pos = torch.cat([self.anchor_pos, leave_pos.expand(*self.bhtd[:2], -1)], 2)
        cand_rows = torch.cat([self.anchor_rows, self.window[:, :, :n_leave]], 2)
        budget = min(math.ceil(self.settings.anchor_frac * Tc), cand_score.shape[2])
        if budget == cand_score.shape[2]:  # every candidate stays: nothing to rank
            rows, pos, score = cand_rows, cand_pos, cand_score
        else:
            # Advanced indexing, not gather with an expanded index: half the time per decode step.
            score, idx = cand_score.topk(budget, dim=2)
            b = torch.arange(idx.shape[0], device=idx.device)[:, None, None]
            h = torch.arange(idx.shape[1], device=idx.device)[None, :, None]
            rows, pos = cand_rows[b, h, idx], cand_pos[b, h, idx]
        return self._replace(
            anchor_rows=rows,
            anchor_pos=pos,
            anchor_score=score,
            window=self.window[:, :, n_leave:],
            window_err=self.window_err[:, :, n_leave:],
            window_score=self.window_score[:, :, n_leave:],
        )

    def crop(self, end: int) -> "VQTensor":
        """The first `end` tokens (HF's cache crop): codes cut, later anchors emptied, window cut."""
        T, Tw = self.bhtd[2], self.num_window
        end = max(0, min(T, end if end >= 0 else T + end))
        keep_w = max(0, end - (T - Tw))
        gone = self.anchor_pos >= end
        return self._replace(
            codes=self.codes[:, :, :end],
            anchor_pos=self.anchor_pos.masked_fill(gone, -1),
            anchor_score=self.anchor_score.masked_fill(gone, float("-inf")),
            window=self.window[:, :, : keep_w],
            window_err=self.window_err[:, :, :keep_w],
            window_score=self.window_score[:, :, :keep_w],
        )

    def select_batch(self, index: torch.Tensor) -> "VQTensor":
        """Reorder / pick sequences (beam search) on every per-sequence inner tensor."""
        index = index.to(self.device).long()
        return self._replace(**{n: getattr(self, n).index_select(0, index) for n in _INNER if n not in _CODEBOOK})


def dequantize(x: torch.Tensor) -> torch.Tensor:
    """The dense tensor: `x` itself if it is not compressed."""
    return x.dequantize() if isinstance(x, VQTensor) else x


# --- dispatch handlers: ops computed on the compressed form ------------------------------------


def _cat(tensors, dim=0):
    if len(tensors) != 2 or not isinstance(tensors[0], VQTensor) or isinstance(tensors[1], VQTensor):
        return NotImplemented
    cache, new = tensors
    if dim % 4 != cache.settings.seq_dim or new.dim() != 4 or new.dtype != cache.dtype:
        return NotImplemented
    return cache.append(new)


def _slice(x, dim=0, start=None, end=None, step=1):
    size = x.shape[dim]
    start = 0 if start is None else start
    end = size if end is None or end > size else end
    if step != 1 or start != 0:
        return NotImplemented
    if end == size:
        return x
    return x.crop(end) if dim % 4 == x.settings.seq_dim else NotImplemented


def _index_select(x, dim, index):
    return x.select_batch(index) if isinstance(x, VQTensor) and dim % 4 == 0 else NotImplemented


def _index(x, indices):
    if not isinstance(x, VQTensor) or len(indices) != 1 or indices[0] is None or indices[0].dtype == torch.bool:
        return NotImplemented
    return x.select_batch(indices[0])


def _same(x, *args, **kwargs):
    return x._replace(**{n: getattr(x, n).detach() for n in _INNER})


def _clone(x, **kwargs):
    return x._replace(**{n: getattr(x, n).clone() for n in _INNER if n not in _CODEBOOK})


_DIRECT = {
    aten.cat.default: _cat,
    aten.slice.Tensor: _slice,
    aten.index_select.default: _index_select,
    aten.index.Tensor: _index,
    aten.detach.default: _same,
    aten.alias.default: _same,
    aten.clone.default: _clone,
}


# --- SDPA ---------------------------------------------------------------------------------------


def _sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """VQ attention when K and V are both compressed; NotImplemented (-> dense fallback) otherwise."""
    if not (isinstance(key, VQTensor) and isinstance(value, VQTensor)) or isinstance(query, VQTensor):
        return NotImplemented
    if key.settings.seq_dim != 2 or value.settings.seq_dim != 2:
        return NotImplemented
    if dropout_p > 0 or isinstance(attn_mask, VQTensor) or guard_or_false(key.num_window != value.num_window):
        return NotImplemented
    if not is_identity(value.basis):  # the output would be in the value basis: let the dense path run
        return NotImplemented
    Hq, Hkv = query.shape[1], key.shape[1]
    if Hq != Hkv and not (enable_gqa and Hq % Hkv == 0):
        raise RuntimeError(
            f"scaled_dot_product_attention: {Hq} query heads and {Hkv} kv heads need enable_gqa=True "
            f"(and a multiple), as for dense tensors"
        )
    k, v = key.parts(), value.parts()
    query = query_to_basis(query, key.basis_inv)
    out, score = ops.attention(query, *k, key.window_err, *v, value.window_err, attn_mask, is_causal, scale)
    with torch.no_grad():
        key.window_score.add_(score)
        if value.window_score is not key.window_score:
            value.window_score.add_(score)
    return out
