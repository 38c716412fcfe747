"""The compressed KV cache: a tensor that *is* the dense K (or V) it encodes.

`VQTensor` is a traceable wrapper subclass of shape [B, Hkv, T, D] (or [B, T, Hkv, D]: `seq_dim`
1, for a model that keeps its cache that way) and the model's dtype. Its inner tensors are the
fields of one `state.Side` (state.py: codes for every token, exact anchors, an exact window, the
codebook), its flatten context the settings, the dense dtype and the layout.

Semantics: every op equals the same op on `dequantize(x)`. `cat` along the sequence appends
(quantize-on-write, state.append), SDPA runs VQ attention (ops.attention), batch `index_select`
and sequence crops act on the codes directly, and any other op falls back to dequantize-then-run,
so nothing is ever silently wrong.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.fx.experimental.symbolic_shapes import guard_or_false
from torch.utils._pytree import tree_map_only

from . import ops, state
from .quant.basis import is_identity
from .quant.pq import check_dtype
from .settings import CacheSettings
from .state import STATE_FIELDS, Side

aten = torch.ops.aten


class VQTensor(torch.Tensor):
    """A compressed cache side; `x.side` is its `state.Side`, each field also an attribute."""

    settings: CacheSettings
    seq_dim: int

    @staticmethod
    def __new__(cls, side: Side, settings: CacheSettings = CacheSettings(), dtype: torch.dtype | None = None, seq_dim: int = 2):
        """`dtype`: of the dense tensor the cache is; None for the window's (exact rows stored as is)."""
        B, H, T, D = state.bhtd(side)
        shape = (B, H, T, D) if seq_dim == 2 else (B, T, H, D)
        dtype = side.window.dtype if dtype is None else dtype
        return torch.Tensor._make_wrapper_subclass(cls, shape, dtype=dtype, device=side.codes.device, requires_grad=False)

    def __init__(self, side: Side, settings: CacheSettings = CacheSettings(), dtype: torch.dtype | None = None, seq_dim: int = 2):
        if seq_dim not in (1, 2):
            raise ValueError(f"seq_dim must be 2 ([B, H, T, D]) or 1 ([B, T, H, D]), got {seq_dim}")
        for name, t in zip(Side._fields, side):
            setattr(self, name, t)
        self.settings, self.seq_dim = settings, seq_dim

    # --- construction -------------------------------------------------------------------------

    @classmethod
    def empty(cls, batch: int, codebook, settings: CacheSettings = CacheSettings(), dtype=torch.float32, device=None, seq_dim: int = 2) -> "VQTensor":
        """A cache of 0 tokens for `batch` sequences, ready to be appended to; `codebook` a
        `CodebookSide` (quant/codebook.py) or a `state.Book`."""
        bk = codebook if isinstance(codebook, state.Book) else state.book(codebook)
        if device is not None:
            bk = state.Book(*(t.to(device) for t in bk))
        return cls(state.empty(batch, bk, dtype, settings), settings, dtype, seq_dim)

    @property
    def side(self) -> Side:
        return Side(*(getattr(self, f) for f in Side._fields))

    def _with(self, side: Side) -> "VQTensor":
        return VQTensor(side, self.settings, self.dtype, self.seq_dim)

    # --- tensor-subclass protocol -------------------------------------------------------------

    def __tensor_flatten__(self):
        return list(Side._fields), (self.settings, self.dtype, self.seq_dim)

    @staticmethod
    def __tensor_unflatten__(inner, context, outer_size, outer_stride):
        settings, dtype, seq_dim = context
        return VQTensor(Side(**inner), settings, dtype, seq_dim)

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
        return state.bhtd(self.side)

    def dequantize(self) -> torch.Tensor:
        """The dense tensor this cache stands for: codes decoded, anchor and window rows exact."""
        dense = ops.dequantize(list(self.side), self.dtype)
        return dense if self.seq_dim == 2 else dense.transpose(1, 2)

    def cache_nbytes(self) -> int:
        """Bytes this cache holds (every per-sequence inner tensor; the codebook is shared)."""
        return sum(getattr(self, f).numel() * getattr(self, f).element_size() for f in STATE_FIELDS)

    # --- direct ops ---------------------------------------------------------------------------

    def append(self, new: torch.Tensor) -> "VQTensor":
        """Quantize-on-write: flush the window down to `settings.window`, then add `new` [B, H, n, D]
        (or [B, n, H, D] if the cache's seq_dim is 1)."""
        check_dtype(new)
        if self.seq_dim == 1 and new.dim() == 4:
            new = new.transpose(1, 2)
        if new.dim() != 4 or new.shape[:2] != self.bhtd[:2] or new.shape[3] != self.bhtd[3]:
            raise ValueError(f"cannot append {tuple(new.shape)} to a cache of shape {tuple(self.shape)}")
        new_state = ops.append(list(self.side), new.to(self.dtype), *ops.settings_args(self.settings))
        return self._with(self.side._replace(**dict(zip(STATE_FIELDS, new_state))))

    def crop(self, end: int) -> "VQTensor":
        """The first `end` tokens (HF's cache crop)."""
        return self._with(state.crop(self.side, end))

    def select_batch(self, index: torch.Tensor) -> "VQTensor":
        """Reorder / pick sequences (beam search)."""
        return self._with(state.select_batch(self.side, index))


def dequantize(x: torch.Tensor) -> torch.Tensor:
    """The dense tensor: `x` itself if it is not compressed."""
    return x.dequantize() if isinstance(x, VQTensor) else x


# --- dispatch handlers: ops computed on the compressed form ------------------------------------


def _cat(tensors, dim=0):
    if len(tensors) != 2 or not isinstance(tensors[0], VQTensor) or isinstance(tensors[1], VQTensor):
        return NotImplemented
    cache, new = tensors
    if dim % 4 != cache.seq_dim or new.dim() != 4 or new.dtype != cache.dtype:
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
    return x.crop(end) if dim % 4 == x.seq_dim else NotImplemented


def _index_select(x, dim, index):
    return x.select_batch(index) if isinstance(x, VQTensor) and dim % 4 == 0 else NotImplemented


def _index(x, indices):
    if not isinstance(x, VQTensor) or len(indices) != 1 or indices[0] is None or indices[0].dtype == torch.bool:
        return NotImplemented
    return x.select_batch(indices[0])


def _same(x, *args, **kwargs):
    return x._with(Side(*(t.detach() for t in x.side)))


def _clone(x, **kwargs):
    return x._with(x.side._replace(**{f: getattr(x, f).clone() for f in STATE_FIELDS}))


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
    if key.seq_dim != 2 or value.seq_dim != 2:
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
    out, score = ops.attention(query, list(key.side), list(value.side), attn_mask, is_causal, scale)
    with torch.no_grad():
        key.window_score.add_(score)
        if value.window_score is not key.window_score:
            value.window_score.add_(score)
    return out
