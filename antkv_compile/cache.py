"""The compressed KV cache: a tensor that *is* the dense K (or V) it encodes.

`VQTensor` is a traceable wrapper subclass of shape [B, Hkv, T, D] (or [B, T, Hkv, D]: `seq_dim`
1, for a model that keeps its cache that way) and the model's dtype. Its inner tensors are the
fields of one `state.Side` (state.py: codes for every token, exact anchors, an exact window, the
codebook), its flatten context the settings, the dense dtype and the layout.

Semantics: every op equals the same op on `dequantize(x)`. `cat` along the sequence appends
(quantize-on-write, state.append), SDPA runs VQ attention (ops.attention), batch `index_select`
and sequence crops act on the codes directly, and any other op falls back to dequantize-then-run,
so nothing is ever silently wrong.

Preallocation (eager appends): the codes and anchor slots live in capacity buffers (`Buffers`),
the side's fields are views of their filled prefixes, and an append writes the new tokens' codes
and the anchor slots the flush changes in place (ops.append_, one kernel call): no decode step
copies the codes. Capacity: `capacity` tokens if the cache was made with one (AntKVCache's
max_cache_len), else grown by an eighth (at least 256 tokens) when full, one copy then. As with
HF's StaticCache, an append reuses the buffers of the state it appends to: that state is
superseded, and reading it afterwards raises instead of returning what the later append wrote
(`clone()` a state to keep it). Traced code (torch.compile) appends functionally (ops.append).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import is_fake
from torch.fx.experimental.symbolic_shapes import guard_or_false
from torch.utils._pytree import tree_map_only

from . import ops, state
from .quant.basis import is_identity
from .quant.pq import check_dtype
from .settings import CacheSettings
from .state import BUFFER_FIELDS, STATE_FIELDS, WINDOW_FIELDS, Side

aten = torch.ops.aten
GROWTH_TOKENS = 256  # least growth of a full codes buffer (tokens); it grows by an eighth otherwise


class Buffers:
    """The capacity buffers of a chain of eager appends: the BUFFER_FIELDS of a side, each
    [B, H, capacity, ...], the side's filled prefix copied in, empty anchor slots -1 / -inf; and
    `owner`, the token of the one state that is current (may be read and appended to in place)."""

    def __init__(self, side: Side, tokens: int, anchors: int):
        self.tensors = {f: with_capacity(getattr(side, f), tokens if f == "codes" else anchors, state.EMPTY_SLOT.get(f, 0))
                        for f in BUFFER_FIELDS}  # fmt: skip
        self.owner = None

    def fits(self, tokens: int, anchors: int) -> bool:
        return self.tensors["codes"].shape[2] >= tokens and self.tensors["anchor_pos"].shape[2] >= anchors

    def prefix(self, tokens: int, anchors: int) -> dict:
        """The BUFFER_FIELDS of a state holding `tokens` tokens and `anchors` anchor slots: views."""
        return state.filled(self.tensors, tokens, anchors)


def with_capacity(t: torch.Tensor, capacity: int, fill=0) -> torch.Tensor:
    """t [B, H, T, ...] copied into the first T slots of a new [B, H, capacity, ...] buffer, the
    rest `fill`: the one way a capacity buffer is made (the cache's buffers, the refinement sample)."""
    out = t.new_full((*t.shape[:2], capacity, *t.shape[3:]), fill)
    out[:, :, : t.shape[2]] = t
    return out


_SUPERSEDED = (
    "antkv: this compressed cache state was superseded: a later append wrote its buffers in place (as HF's "
    "StaticCache does), so it no longer holds what it held. Use the tensor the append returned, or clone() a "
    "state before appending to it to keep both."
)


class VQTensor(torch.Tensor):
    """A compressed cache side; `x.side` is its `state.Side`, each field also an attribute."""

    graph_fields = Side._fields  # what a compiled graph takes for it, in order: its inner tensors
    inner_fields = Side._fields  # its inner tensors (__tensor_flatten__): what Dynamo passes and guards
    settings: CacheSettings
    seq_dim: int
    capacity: int | None = None  # preallocate codes for this many tokens (eager appends); None: grow
    _buffers: Buffers | None = None  # eager states only: the buffers its BUFFER_FIELDS are views of
    _token: object = None  # the buffers' owner token when this state was made
    _writable = False  # made by an append (not derived by a crop / alias): may append in place

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
    def empty(cls, batch: int, codebook, settings: CacheSettings = CacheSettings(), dtype=torch.float32, device=None, seq_dim: int = 2,
              capacity: int | None = None) -> "VQTensor":  # fmt: skip
        """A cache of 0 tokens for `batch` sequences, ready to be appended to; `codebook` a
        `CodebookSide` (quant/codebook.py) or a `state.Book`; `capacity`: tokens to preallocate
        at the first eager append (None: grow as needed)."""
        bk = codebook if isinstance(codebook, state.Book) else state.book(codebook)
        if device is not None:
            bk = state.Book(*(t.to(device) for t in bk))
        out = cls(state.empty(batch, bk, dtype, settings), settings, dtype, seq_dim)
        out.capacity = capacity
        return out

    @property
    def side(self) -> Side:
        if self._buffers is not None and self._buffers.owner is not self._token:
            raise RuntimeError(_SUPERSEDED)
        return Side(*(getattr(self, f) for f in Side._fields))

    def _with(self, side: Side, view: bool = False) -> "VQTensor":
        """A cache of `side`, same settings; `view`: its tensors may be views of this one's buffers
        (a crop, an alias), so it is superseded with this state (and appends by copying first)."""
        out = VQTensor(side, self.settings, self.dtype, self.seq_dim)
        out.capacity = self.capacity
        if view:
            out._buffers, out._token = self._buffers, self._token
        return out

    # --- tensor-subclass protocol -------------------------------------------------------------

    def __tensor_flatten__(self):
        return list(self.inner_fields), (self.settings, self.dtype, self.seq_dim)

    @staticmethod
    def __tensor_unflatten__(inner, context, outer_size, outer_stride):
        settings, dtype, seq_dim = context
        return VQTensor(Side(**inner), settings, dtype, seq_dim)

    def __getstate__(self):
        """What pickling (torch.save) keeps: the state itself, compact (a view of capacity buffers
        is saved as its own copy, not the buffers'), without the in-place bookkeeping."""
        st = {k: v for k, v in self.__dict__.items() if k not in ("_buffers", "_token", "_writable")}
        if self._buffers is not None:
            st.update({f: getattr(self, f).clone(memory_format=torch.contiguous_format) for f in BUFFER_FIELDS})
        return st

    def __repr__(self):
        return (
            f"VQTensor(shape={tuple(self.shape)}, dtype={self.dtype}, window={self.window.shape[2]}, "
            f"anchors={int((self.anchor_pos >= 0).sum())}, codes={tuple(self.codes.shape)})"
        )

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        return _torch_function(_sdpa, func, args, kwargs)

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
        """Bytes this cache holds (every per-sequence inner tensor, its capacity buffers whole; the
        codebook is shared)."""
        held = {f: getattr(self, f) for f in STATE_FIELDS}
        if self._buffers is not None:
            held.update(self._buffers.tensors)
        return sum(t.numel() * t.element_size() for t in held.values())

    # --- direct ops ---------------------------------------------------------------------------

    def append(self, new: torch.Tensor) -> "VQTensor":
        """Quantize-on-write: flush the window down to `settings.window`, then add `new` [B, H, n, D]
        (or [B, n, H, D] if the cache's seq_dim is 1)."""
        check_dtype(new)
        if self.seq_dim == 1 and new.dim() == 4:
            new = new.transpose(1, 2)
        if new.dim() != 4 or new.shape[:2] != self.bhtd[:2] or new.shape[3] != self.bhtd[3]:
            raise ValueError(f"cannot append {tuple(new.shape)} to a cache of shape {tuple(self.shape)}")
        new = new.to(self.dtype)
        if torch.compiler.is_compiling():  # traced: the functional op (the graph owns the buffers)
            new_state = ops.append(list(self.side), new, *ops.settings_args(self.settings))
            return self._with(self.side._replace(**dict(zip(STATE_FIELDS, new_state))))
        return self._append_in_place(new)

    def _append_in_place(self, new: torch.Tensor) -> "VQTensor":
        """Eager append into this state's capacity buffers (see the module doc); new ones, with
        this state copied in, when it has none, is not the owner of its buffers or they are full."""
        side, s = self.side, self.settings
        T, A, Tw, n = side.codes.shape[2], side.anchor_pos.shape[2], side.window.shape[2], new.shape[2]
        A_out, _ = state.flush_lengths(T, A, Tw, n, s.window, s.anchor_frac)
        buf = self._buffers
        if buf is None or not self._writable or not buf.fits(T + n, max(A, A_out)):
            tokens = self.capacity if self.capacity and self.capacity >= T + n else T + n + max(GROWTH_TOKENS, (T + n) // 8)
            buf = Buffers(side, tokens, max(A, A_out, math.ceil(s.anchor_frac * tokens)))
        window = ops.direct(ops.append_, new.device, *ops.split_buffers(side._replace(**buf.tensors)), T, A, new, *ops.settings_args(s))
        out = self._with(side._replace(**buf.prefix(T + n, A_out), **dict(zip(WINDOW_FIELDS, window))))
        out._buffers, out._token, out._writable = buf, object(), True
        buf.owner = out._token
        return out

    def crop(self, end: int) -> "VQTensor":
        """The first `end` tokens (HF's cache crop)."""
        return self._with(state.crop(self.side, end), view=True)

    def select_batch(self, index: torch.Tensor) -> "VQTensor":
        """Reorder / pick sequences (beam search)."""
        return self._with(state.select_batch(self.side, index))


def _torch_function(sdpa, func, args, kwargs):
    """The cache subclasses' __torch_function__: SDPA by `sdpa` where it takes the call (else
    NotImplemented), every other function as on a plain tensor (then __torch_dispatch__)."""
    kwargs = kwargs or {}
    if func is F.scaled_dot_product_attention:
        out = sdpa(*args, **kwargs)
        if out is not NotImplemented:
            return out
    with torch._C.DisableTorchFunctionSubclass():
        return func(*args, **kwargs)


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
    return x._with(Side(*(t.detach() for t in x.side)), view=True)


def _clone(x, **kwargs):
    return x._with(x.side._replace(**{f: getattr(x, f).clone(memory_format=torch.contiguous_format) for f in STATE_FIELDS}))


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
    out, score = ops.direct(ops.attention, query.device, query, list(key.side), list(value.side), attn_mask, is_causal, scale)
    add_window_score(key, value, score)
    return out


def add_window_score(key: VQTensor, value: VQTensor, score: torch.Tensor) -> None:
    """Add an attention call's Anchor Score of the window tokens [B, Hkv, Tw] to both sides'
    window_score (once where they share it): the flush picks its anchors by it."""
    with torch.no_grad():
        key.window_score.add_(score)
        if value.window_score is not key.window_score:
            value.window_score.add_(score)


# --- the static compressed cache ----------------------------------------------------------------


class SharedBook:
    """A static cache side's codebook (`state.Book`) in its `__tensor_flatten__` context rather
    than among its inner tensors: Dynamo guards every inner tensor of a graph input on every call
    (4 of a side's 12, 240 guards per SmolLM2 step), while the context is compared with `==`, which
    compares the book's layout here (shapes, dtypes, devices), not its values: the compiled graph
    takes the book as inputs that the backend reads from the cache at every call
    (`StaticVQTensor.graph_fields`), so one graph serves every cache of that layout (a new
    generation's, a data-free book fitted to its prompt). deepcopy (Dynamo's saved context) keeps it."""

    __slots__ = ("book",)

    def __init__(self, book: state.Book):
        self.book = book

    def _layout(self) -> tuple:
        return tuple((tuple(t.shape), t.dtype, t.device) for t in self.book)

    def __eq__(self, other):
        return isinstance(other, SharedBook) and self._layout() == other._layout()

    __hash__ = None

    def __deepcopy__(self, memo):
        return self


class StaticVQTensor(torch.Tensor):
    """A compressed cache side preallocated for `capacity` tokens, for the static-cache pattern
    (HF StaticCache, gpt-fast's KVCache): the dense [B, H, capacity, D] buffer such a model writes in
    place (`index_copy_` along the sequence, or `buf[:, :, pos] = new`) and hands whole to SDPA
    with a mask hiding the unfilled slots. Its inner tensors are `state.STATIC_BUFFERS` (fixed
    shapes: one compiled graph serves every decode step; the book is in the context, `SharedBook`);
    the graph pass rewrites the write + SDPA into `ops.static_attention_`.

    Eagerly, a write records the new tokens (they must be the next positions) and the SDPA that
    reads the cache runs `ops.static_attention_` on them (one kernel call per layer: encode, attend,
    flush). The dense tensor it stands for: the held tokens dequantized, pending writes exact, zeros
    past them; any op the cache does not run itself sees that (dequantize-then-run). `zero_()` (HF's
    `cache.reset()`) empties it."""

    settings: CacheSettings
    # What a compiled graph takes for it, in order (the pass's placeholders, the backend's
    # arguments): its buffers, then its book, which is no inner tensor (SharedBook).
    graph_fields = (*state.STATIC_BUFFERS, *state.BOOK_FIELDS)
    inner_fields = state.STATIC_BUFFERS  # the backend passes the book itself (fakes while compiling)

    @staticmethod
    def __new__(cls, fields: dict, settings: CacheSettings = CacheSettings(), dtype: torch.dtype = torch.float32):
        B, H, capacity, _ = fields["codes"].shape
        shape = (B, H, capacity, fields["window"].shape[3])
        return torch.Tensor._make_wrapper_subclass(cls, shape, dtype=dtype, device=fields["codes"].device, requires_grad=False)

    def __init__(self, fields: dict, settings: CacheSettings = CacheSettings(), dtype: torch.dtype = torch.float32):
        for name in state.STATIC_FIELDS:
            setattr(self, name, fields[name])
        self.settings, self._pending = settings, None
        book = fields.get("_book")  # a clone / unflatten keeps the original's, so its guard still holds
        self._book = book if book is not None else SharedBook(state.Book(*(fields[f] for f in state.BOOK_FIELDS)))

    @classmethod
    def empty(cls, batch: int, codebook, capacity: int, settings: CacheSettings = CacheSettings(), dtype=torch.float32, device=None):
        """An empty static cache side for `batch` sequences of up to `capacity` tokens; `codebook` a
        `CodebookSide` (quant/codebook.py) or a `state.Book`."""
        bk = codebook if isinstance(codebook, state.Book) else state.book(codebook, device)
        return cls(state.static_empty(batch, bk, dtype, capacity, settings), settings, dtype)

    @classmethod
    def from_cache(cls, cache: "VQTensor", capacity: int) -> "StaticVQTensor":
        """The static cache holding what the growing `cache` holds, with room for `capacity` tokens."""
        if cache.seq_dim != 2:
            raise ValueError("a static compressed cache is [B, H, T, D] (seq_dim 2)")
        return cls(state.static_from_side(cache.side, capacity, cache.settings), cache.settings, cache.dtype)

    def op_args(self) -> tuple[list, list]:
        """(its STATIC_BUFFERS, its book): the two lists `ops.static_attention_` takes per side."""
        return [getattr(self, f) for f in state.STATIC_BUFFERS], [getattr(self, f) for f in state.BOOK_FIELDS]

    @property
    def side(self) -> Side:
        """The held tokens as a `Side` (views of the buffers' filled prefixes)."""
        return state.static_side({f: getattr(self, f) for f in state.STATIC_FIELDS})

    def __tensor_flatten__(self):
        """Inner tensors: the STATIC_BUFFERS only; the book travels in the context (SharedBook)."""
        return list(self.inner_fields), (self.settings, self.dtype, self._book)

    @staticmethod
    def __tensor_unflatten__(inner, context, outer_size, outer_stride):
        settings, dtype, book = context
        return StaticVQTensor({**inner, **book.book._asdict(), "_book": book}, settings, dtype)

    def __repr__(self):
        return f"StaticVQTensor(shape={tuple(self.shape)}, dtype={self.dtype}, held={self.lengths.tolist()[0]})"

    def cache_nbytes(self) -> int:
        """Bytes of its per-sequence buffers, whole (the codebook is shared)."""
        return sum(getattr(self, f).numel() * getattr(self, f).element_size() for f in state.STATIC_BUFFERS)

    def dequantize(self) -> torch.Tensor:
        """The dense [B, H, capacity, D] tensor (see the class doc)."""
        if is_fake(self.lengths):  # traced (shapes only): the lengths are not known; the pass replaces what reads this
            return torch.empty(self.shape, dtype=self.dtype, device=self.device)
        side = self.side
        dense = torch.zeros(self.shape, dtype=self.dtype, device=self.device)
        T = side.codes.shape[2]
        dense[:, :, :T] = ops.dequantize(list(side), self.dtype)
        if self._pending is not None:
            pos, new = self._pending
            dense[:, :, T : T + new.shape[2]] = new
        return dense

    def write(self, pos: torch.Tensor, new: torch.Tensor) -> "StaticVQTensor":
        """Record `new` [B, H, n, D] for positions `pos` (checked by the attention call that follows)."""
        check_dtype(new)
        want = (*self.shape[:2], pos.numel(), self.shape[3])
        try:  # index_put_ hands `buf[:, :, pos] = new` its values with leading 1-dims dropped
            new = torch.broadcast_to(new, want)
        except RuntimeError:
            raise ValueError(f"cannot write {tuple(new.shape)} at {pos.numel()} positions of a static cache of shape {tuple(self.shape)}") from None
        if self._pending is not None:
            raise RuntimeError(
                "antkv static cache: two writes without an attention call reading it between them. Eagerly, the static "
                "compressed cache encodes a call's tokens when scaled_dot_product_attention reads the cache itself (write, "
                "then attend, once per layer and call): repeat kv heads with enable_gqa=True, not repeat_interleave / "
                "repeat_kv (compiled with antkv_backend, the pass takes either)"
            )
        self._pending = (pos, new.to(self.dtype))
        return self

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        return _torch_function(_static_sdpa, func, args, kwargs)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is aten.index_copy_.default and args[1] % 4 == 2:
            return args[0].write(args[2], args[3])
        if func is aten.index_put_.default and len(args[1]) == 3 and args[1][0] is None and args[1][1] is None and not kwargs.get("accumulate"):
            return args[0].write(args[1][2], args[2])
        if func is aten.zero_.default:
            self = args[0]
            fresh = state.static_empty(self.codes.shape[0], state.Book(*(getattr(self, f) for f in state.BOOK_FIELDS)), self.dtype,
                                       self.codes.shape[2], self.settings)  # fmt: skip
            for f in state.STATIC_BUFFERS:
                getattr(self, f).copy_(fresh[f])
            self._pending = None
            return self
        if func in (aten.detach.default, aten.alias.default):
            return args[0]
        if func is aten.clone.default:
            self = args[0]
            return StaticVQTensor({**{f: getattr(self, f).clone() for f in state.STATIC_BUFFERS}, **self._book.book._asdict(),
                                   "_book": self._book}, self.settings, self.dtype)  # fmt: skip
        if func._schema.is_mutable:
            raise RuntimeError(
                f"antkv static cache: {func} would write into the compressed cache; it supports index_copy_ along the "
                "sequence, buf[:, :, pos] = new and zero_() (reset)"
            )
        args, kwargs = tree_map_only(StaticVQTensor, lambda t: t.dequantize(), (args, kwargs))
        return func(*args, **kwargs)


def _static_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """ops.static_attention_ on a call's pending writes when K and V are both static caches."""
    if not (isinstance(key, StaticVQTensor) and isinstance(value, StaticVQTensor)) or dropout_p > 0:
        return NotImplemented
    if torch.compiler.is_compiling():  # traced: an SDPA node, which the pass rewrites
        return NotImplemented
    if (key._pending is None) != (value._pending is None):
        raise RuntimeError("antkv static cache: only one of key and value was written before attention")
    if key._pending is None:  # attention without a write: n = 0 new tokens
        empty = query.new_empty(*key.shape[:2], 0, key.shape[3], dtype=key.dtype)
        key._pending = value._pending = (torch.arange(0, device=query.device), empty)
    (pos, k_new), (_, v_new) = key._pending, value._pending
    key._pending = value._pending = None
    return ops.static_attention_(query, *key.op_args(), *value.op_args(), k_new, v_new, pos, attn_mask,
                                 is_causal, scale, *ops.settings_args(key.settings))  # fmt: skip
