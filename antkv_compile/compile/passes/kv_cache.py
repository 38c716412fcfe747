"""The graph pass: KV-cache concatenation + SDPA -> quantize-on-write + VQ attention.

On a Dynamo FX graph it finds every `scaled_dot_product_attention` and, for key and value, walks
back from the SDPA operand to `k = torch.cat([k_past, k_new], dim=2)` (or dim=1 for a [B, T, H, D]
cache) through pure data movement (`repeat_kv`'s expand + reshape, `repeat_interleave`,
`transpose`, `contiguous`, ...). A site is rewritten when replaying the walk on a probe shows it
only brings the cache to [B, H, T, D] and repeats kv heads for GQA, the concatenation is also a
graph output (the value written back to the cache) and nothing else reads it but size queries.
The rewrite:

    k_state = antkv.append([k_past's Side fields], k_new, *settings)   # or antkv.start(k_past, k_new, [codebook], *settings)
    v_state = antkv.append([v_past's Side fields], v_new, *settings)
    out, score = antkv.attention(q, [k_state + codebook], [v_state + codebook], attn_mask, is_causal, scale)
    k_state.window_score += score;  v_state.window_score += score

(the ops map keys and queries into the key basis themselves) and the output that was `k`
becomes the inner tensors of the new cache (the fields of `state.Side`), which the backend wraps
back into a `VQTensor`. A past that is already a `VQTensor` arrives as its inner tensors (the
backend flattens it), so no dense K or V of the full length exists in the graph.

Anything not provably equivalent is left as it is and reported with the reason.
"""

from __future__ import annotations

import math
import operator
import re
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch._dynamo.source import AttrSource
from torch.fx.experimental.symbolic_shapes import optimization_hint as hint_int

from ... import state
from ...cache import StaticVQTensor, VQTensor
from ...ops import settings_args
from ...quant.basis import is_identity
from ...quant.pq import PQSpec
from ...settings import CacheSettings
from ...state import BOOK_FIELDS, STATE_FIELDS, STATIC_BUFFERS, Side

SDPA = (F.scaled_dot_product_attention, torch._C._nn.scaled_dot_product_attention)
SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
SDPA_DEFAULTS = {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None, "enable_gqa": False}

# Pure data movement a cache may go through on its way to SDPA; the probe below checks what it does.
MOVES_METHODS = {"expand", "reshape", "view", "contiguous", "transpose", "repeat_interleave", "unsqueeze", "clone"}
MOVES_FUNCTIONS = {torch.repeat_interleave, torch.reshape, torch.transpose, torch.unsqueeze, operator.getitem}


class Decline(Exception):
    """A site the pass leaves as it is; the message is the reason shown by explain()."""


@dataclass
class Site:
    """One attention call found in a graph, rewritten or declined."""

    graph: int
    sdpa: str
    rewritten: bool
    detail: str
    layer: int | None = None

    def __str__(self):
        layer = "" if self.layer is None else f" layer {self.layer}"
        verdict = "rewritten" if self.rewritten else "declined"
        return f"graph {self.graph} {self.sdpa}{layer}: {verdict}: {self.detail}"


@dataclass
class CacheSide:
    """The key (or value) half of a site: where the cache comes from and how it reaches SDPA."""

    cat: fx.Node
    past: fx.Node
    new: fx.Node
    chain: list[fx.Node]
    groups: int
    past_is_vq: bool
    seq_dim: int  # 2: the cache is [B, H, T, D]; 1: [B, T, H, D], transposed on its way to SDPA
    chain_queries: dict = field(default_factory=dict)  # size query on a chain node -> its layout

    @property
    def bhtd(self) -> tuple:
        shape = tuple(_val(self.cat).shape)
        return shape if self.seq_dim == 2 else (shape[0], shape[2], shape[1], shape[3])


@dataclass
class StaticSide:
    """The key (or value) half of a site over a static compressed cache (`StaticVQTensor`): the
    buffer, its one in-place write (`index_copy_` along the sequence, or `buf[:, :, pos] = new`), and
    how it reaches SDPA."""

    buffer: fx.Node  # the placeholder
    write: fx.Node
    new: fx.Node
    pos: fx.Node
    chain: list[fx.Node]
    groups: int
    seq_dim: int = 2
    past_is_vq: bool = True

    @property
    def bhtd(self) -> tuple:
        return tuple(_val(self.buffer).shape)

    @property
    def past(self) -> fx.Node:  # where the cache comes from, as CacheSide.past
        return self.buffer


@dataclass
class NewCache:
    """A compressed cache the rewritten graph computes: its Side fields as nodes, and what the
    backend needs to wrap them into a `VQTensor` again."""

    nodes: dict[str, fx.Node]  # Side field -> node
    settings: CacheSettings
    dtype: torch.dtype
    seq_dim: int


@dataclass
class VQOutput:
    """Graph output `index` was a cache: it is now the outputs `inner` (its Side fields, in order)."""

    index: int
    inner: list[int]
    settings: CacheSettings
    dtype: torch.dtype
    seq_dim: int


@dataclass
class PassResult:
    sites: list[Site] = field(default_factory=list)
    vq_inputs: set[str] = field(default_factory=set)  # placeholder names of compressed inputs
    vq_outputs: list[VQOutput] = field(default_factory=list)
    extra_inputs: list[torch.Tensor] = field(default_factory=list)  # codebooks, after the graph's inputs


def _val(node):
    return node.meta.get("example_value", node.meta.get("val")) if isinstance(node, fx.Node) else node


def _sdpa_args(node) -> dict:
    args = dict(SDPA_DEFAULTS)
    args.update(zip(SDPA_ARGS, node.args))
    args.update(node.kwargs)
    return args


def _size_query(user: fx.Node) -> tuple | None:
    """(what, *args) if `user` only reads the size of its input tensor: size(dim), shape, numel(),
    dim(), or an inner tensor Dynamo reads to bind unbacked sizes; None otherwise."""
    if user.op == "call_method" and user.target in ("size", "numel", "dim"):
        return (user.target, *user.args[1:])
    if user.op == "call_function" and user.target is getattr and (user.args[1] == "shape" or user.args[1] in Side._fields):
        return (user.args[1],)
    if user.op == "call_function" and user.target is torch.ops.aten.sym_size.int:
        return ("size", user.args[1])
    return None


def cache_size(codes: torch.Tensor, window: torch.Tensor, seq_dim: int, what: str, dim=None, layout=None):
    """A size query on a compressed cache of outer shape [B, H, T, D] (or [B, T, H, D]), from its
    inner tensors; with `layout`, on a view of it (each dim a constant or ("cache", i))."""
    B, H, T, D = (*codes.shape[:3], window.shape[3])
    size = (B, H, T, D) if seq_dim == 2 else (B, T, H, D)
    if layout is not None:
        size = tuple(size[x[1]] if isinstance(x, tuple) else x for x in layout)
    if what == "numel":
        return math.prod(size)  # not torch.Size.numel(), which specializes symbolic sizes
    if what == "dim":
        return 4
    return torch.Size(size) if dim is None else size[dim]


def _layout(view: torch.Tensor, cache: torch.Tensor) -> tuple | None:
    """The dims of a view of the cache as constants or ("cache", i) when it has the i-th cache
    dim's symbolic size; None if a symbolic size is neither."""
    cache_exprs = [getattr(c, "node", None) and c.node.expr for c in cache.shape]
    layout = []
    for size in view.shape:
        if not isinstance(size, torch.SymInt):
            layout.append(size)
        elif size.node.expr in cache_exprs:
            layout.append(("cache", cache_exprs.index(size.node.expr)))
        else:
            return None
    return tuple(layout)


def _is_move(node: fx.Node) -> bool:
    if node.op == "call_method":
        return node.target in MOVES_METHODS
    if node.op == "call_function" and node.target in MOVES_FUNCTIONS:
        if node.target is operator.getitem:  # only full slices and None (unsqueeze)
            idx = node.args[1] if isinstance(node.args[1], tuple) else (node.args[1],)
            return all(i is None or i is Ellipsis or i == slice(None) for i in idx)
        return True
    return False


def _concrete(x):
    """Replay value of a non-tensor argument: symbolic sizes at their hints."""
    if isinstance(x, fx.Node):
        v = _val(x)
        if isinstance(v, torch.SymInt):
            return hint_int(v)
        raise Decline(f"a data-movement op also reads the tensor {x.name}")
    if isinstance(x, (list, tuple)):
        return type(x)(_concrete(i) for i in x)
    return hint_int(x) if isinstance(x, torch.SymInt) else x


def _replay(chain: list[fx.Node], probe: torch.Tensor) -> torch.Tensor:
    x = probe
    for node in chain:
        args = [x] + [_concrete(a) for a in node.args[1:]]
        kwargs = {k: _concrete(v) for k, v in node.kwargs.items()}
        x = getattr(x, node.target)(*args[1:], **kwargs) if node.op == "call_method" else node.target(*args, **kwargs)
    return x


def _groups(cat: fx.Node, chain: list[fx.Node], what: str, seq_dim: int) -> int:
    """Replay the chain on a probe whose every element is distinct: it must equal the cache in
    [B, H, T, D] with its kv heads repeated for GQA (repeat_interleave), nothing else. Returns the
    repeat factor."""
    if not chain and seq_dim == 2:
        return 1
    shape = [hint_int(s) for s in _val(cat).shape]
    probe = torch.arange(torch.Size(shape).numel(), dtype=torch.float64).view(shape)
    bhtd = probe if seq_dim == 2 else probe.transpose(1, 2)
    got = _replay(chain, probe)
    H = bhtd.shape[1]
    if got.dim() != 4 or got.shape[0] != bhtd.shape[0] or got.shape[2:] != bhtd.shape[2:] or got.shape[1] % H:
        raise Decline(f"the {what} cache reaches SDPA rearranged to {tuple(got.shape)}, not [B, H, T, D] with repeated heads")
    G = got.shape[1] // H
    if not torch.equal(got, bhtd.repeat_interleave(G, 1)):
        raise Decline(f"the {what} cache is rearranged by {', '.join(str(n.target) for n in chain)}: not a GQA head repeat")
    return G


# In-place writes into a preallocated cache: HF StaticCache (`keys.index_copy_(2, cache_position, k)`),
# gpt-fast (`k_cache[:, :, input_pos] = k`, an index_put_ / setitem), a plain copy_ into a slice.
IN_PLACE_WRITES = frozenset({"index_copy_", "index_put_", "__setitem__", "copy_", "scatter_", "index_fill_", "setitem"})


def _in_place_write(operand) -> str | None:
    """The in-place write op (see IN_PLACE_WRITES) of a preallocated buffer that `operand` reads,
    through data movement and slicing (the prefill of an empty static cache reads a slice), or None."""
    node = operand
    while isinstance(node, fx.Node) and (_is_move(node) or (node.op == "call_function" and node.target is operator.getitem)):
        node = node.args[0]
    if not isinstance(node, fx.Node):  # a graph input, or allocated in the graph (StaticCache's lazy init)
        return None
    for user in node.users:
        name = user.target if user.op == "call_method" else getattr(user.target, "__name__", "")
        if user.op in ("call_method", "call_function") and name in IN_PLACE_WRITES and user.args and user.args[0] is node:
            return str(name)
    return None


def keeps_kv_cache(gm: fx.GraphModule) -> bool:
    """Does `gm` keep a KV cache: an SDPA key that is a concatenation (through data movement) or a
    preallocated buffer written in place, or a concatenation written back (a graph output)? A
    forward without a cache (use_cache=False) has none of these: it has nothing to compress."""
    output = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    if any(_is_cat(n) for n in output.all_input_nodes):
        return True
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in SDPA:
            key = _sdpa_args(node)["key"]
            if _in_place_write(key) or _is_cat(_through_moves(key)[1]):
                return True
    return False


def _through_moves(operand) -> tuple[list, object]:
    """(the data-movement nodes from `operand` back to its source, first to last; the source)."""
    chain, node = [], operand
    while isinstance(node, fx.Node) and _is_move(node):
        chain.append(node)
        node = node.args[0]
    return chain[::-1], node


def _is_cat(node) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target is torch.cat


def _static_write(buffer: fx.Node, what: str) -> tuple[fx.Node, fx.Node, fx.Node]:
    """(the write node, the new tokens, their positions) of the one in-place write into a static
    compressed cache: `buf.index_copy_(2, pos, new)` (HF StaticCache) or `buf[:, :, pos] = new`
    (gpt-fast's KVCache)."""
    writes = []
    for user in buffer.users:
        name = user.target if user.op == "call_method" else getattr(user.target, "__name__", "")
        if name == "index_copy_" and user.args[0] is buffer:
            dim = user.args[1] if len(user.args) > 1 else user.kwargs.get("dim")
            if dim not in (2, -2):
                raise Decline(f"the static {what} cache is written along dim {dim}, not the sequence (dim 2)")
            writes.append((user, user.args[3], user.args[2]))
        elif name in ("setitem", "__setitem__", "index_put_") and user.args[0] is buffer:
            idx = user.args[1]
            if not (isinstance(idx, (tuple, list)) and len(idx) == 3 and all(i is None or i == slice(None) for i in idx[:2])):
                raise Decline(f"the static {what} cache is written at {idx}, not [:, :, positions]")
            writes.append((user, user.args[2], idx[2]))
    if len(writes) != 1:
        raise Decline(f"the static {what} cache has {len(writes)} in-place writes in this graph, not one before its attention")
    return writes[0]


def _trace_static(sdpa: fx.Node, buffer: fx.Node, chain: list, what: str) -> StaticSide:
    write, new, pos = _static_write(buffer, what)
    if not isinstance(new, fx.Node) or _val(new).dim() != 4 or not isinstance(pos, fx.Node):
        raise Decline(f"the new {what} tokens written into the static cache are not a [B, H, n, D] tensor at tensor positions")
    if _val(new).dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise Decline(f"the new {what} tokens are {_val(new).dtype}: not quantized (float32/16, bfloat16 only)")
    order = {n: i for i, n in enumerate(buffer.graph.nodes)}
    if order[write] > order[sdpa]:
        raise Decline(f"the static {what} cache is written after its attention")
    for i, link in enumerate([buffer] + chain):
        nxt = chain[i] if i < len(chain) else sdpa
        for user in link.users:
            if user is nxt or user is write or _size_query(user):
                continue
            raise Decline(f"the static {what} cache is also read by `{getattr(user.target, '__name__', user.target)}`")
    return StaticSide(buffer, write, new, pos, chain, _groups(buffer, chain, what, 2))


def _trace_side(sdpa: fx.Node, operand: fx.Node, what: str, outputs: set) -> CacheSide | StaticSide:
    chain, node = _through_moves(operand)
    if isinstance(node, fx.Node) and node.op == "placeholder" and isinstance(_val(node), StaticVQTensor):
        return _trace_static(sdpa, node, chain, what)
    if not _is_cat(node):
        if write := _in_place_write(operand):
            raise Decline(
                f"the {what} cache is a dense preallocated buffer written in place (`{write}`: HF StaticCache, gpt-fast): "
                "make it compressed (ak.AntKVStaticCache for HF models, or a StaticVQTensor.empty(...) buffer in place of "
                "the dense one; patch() converts generate(cache_implementation='static') itself), or use the growing cache"
            )
        if isinstance(node, fx.Node) and node.op in ("call_function", "call_method"):
            name = getattr(node.target, "__name__", node.target)
            raise Decline(f"the {what} reaches SDPA through `{name}` (a score or key modification, or not a cache)")
        raise Decline(f"the {what} is not a KV-cache concatenation")
    cat = node
    tensors = cat.args[0]
    dim = cat.args[1] if len(cat.args) > 1 else cat.kwargs.get("dim", 0)
    out = _val(cat)
    if len(tensors) != 2:
        raise Decline(f"the {what} cache concatenates {len(tensors)} tensors, not [past, new]")
    if out.dim() != 4 or dim % 4 not in (1, 2):
        raise Decline(f"the {what} cache is concatenated on dim {dim} of a rank-{out.dim()} tensor: the compressed cache is [B, H, T, D] or [B, T, H, D]")
    seq_dim = dim % 4
    past, new = tensors
    past_val, new_val = _val(past), _val(new)
    if isinstance(new_val, VQTensor) or new_val.dim() != 4:
        raise Decline(f"the new {what} tokens are not a [B, H, n, D] tensor")
    past_is_vq = isinstance(past_val, VQTensor)
    if past_is_vq and past.op != "placeholder":
        raise Decline(f"the compressed {what} cache is computed inside the graph, not read from the cache")
    if past_is_vq and new_val.dtype != past_val.dtype:
        raise Decline(f"the new {what} tokens are {new_val.dtype}, the compressed cache {past_val.dtype}")
    if past_is_vq and past_val.seq_dim != seq_dim:
        raise Decline(f"the compressed {what} cache has its sequence at dim {past_val.seq_dim}, the model concatenates on dim {seq_dim}")
    if not past_is_vq and not (past_val.dim() == 4 or (past_val.dim() == 1 and past_val.numel() == 0)):
        raise Decline(f"the past {what} has shape {tuple(past_val.shape)}")
    if new_val.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise Decline(f"the {what} dtype {new_val.dtype} is not quantized (float32/16, bfloat16 only)")
    if cat not in outputs:
        raise Decline(f"the concatenated {what} is not written back as is (e.g. sliced for a sliding window)")
    chain_queries = {}
    for i, link in enumerate([cat] + chain):
        nxt = chain[i] if i < len(chain) else sdpa
        for user in link.users:
            if user is nxt or (link is cat and user.op == "output") or (link is cat and _size_query(user)):
                continue
            if _size_query(user) and (layout := _layout(_val(link), out)) is not None:
                chain_queries[user] = layout
                continue
            raise Decline(f"the concatenated {what} is also read by `{getattr(user.target, '__name__', user.target)}`")
    return CacheSide(cat, past, new, chain, _groups(cat, chain, what, seq_dim), past_is_vq, seq_dim, chain_queries)


def _check_site(sdpa: fx.Node, args: dict, k: CacheSide, v: CacheSide, codebook, online: PQSpec | None) -> None:
    if args["dropout_p"] != 0.0:
        raise Decline(f"dropout_p={args['dropout_p']}: VQ attention has no dropout")
    if torch.is_grad_enabled() and any(getattr(_val(n), "requires_grad", False) for n in (args["query"], k.new, v.new)):
        raise Decline("grad is enabled: quantize-on-write is not differentiable (run under torch.no_grad())")
    mask = args["attn_mask"]
    if mask is not None:
        mval = _val(mask)
        if not isinstance(mval, torch.Tensor) or isinstance(mval, VQTensor) or not (mval.dtype == torch.bool or mval.is_floating_point()):
            raise Decline(f"unsupported attn_mask {type(mval).__name__} {getattr(mval, 'dtype', '')}")
    if not isinstance(args["is_causal"], bool) or not (args["scale"] is None or isinstance(args["scale"], (int, float))):
        raise Decline("is_causal / scale are not constants of the graph")
    if isinstance(k, StaticSide) != isinstance(v, StaticSide):
        raise Decline("only one of key and value is a static compressed cache")
    if isinstance(k, StaticSide) and (k.bhtd[2] != v.bhtd[2] or _val(k.buffer).settings != _val(v.buffer).settings):
        raise Decline("the static key and value caches differ in capacity or settings")
    if k.past_is_vq != v.past_is_vq:
        raise Decline("only one of key and value is compressed")
    kv, qv = k.bhtd, _val(args["query"])
    if v.bhtd[1] != kv[1] or k.groups != v.groups or k.seq_dim != v.seq_dim:
        raise Decline("key and value have different kv heads or layouts")
    Hq, Hkv = qv.shape[1], kv[1]
    if Hq != Hkv * k.groups and not (args["enable_gqa"] and Hq % (Hkv * k.groups) == 0):
        raise Decline(f"{Hq} query heads do not share {Hkv} kv heads")
    if v.past_is_vq and not is_identity(_val(v.past).basis):
        raise Decline("the compressed value cache has a basis: VQ attention would return its output in that basis")
    if k.past_is_vq:
        return
    D = kv[3]
    if codebook is None and online is None:
        raise Decline("no codebook for this layer (pass codebooks=..., or calibrate them)")
    if codebook is None:
        if D % online.sub_dim:
            raise Decline(f"head_dim {D} is not divisible by the sub-vector size {online.sub_dim} of {online.bits:g} bits")
        return
    for what, side in codebook.sides().items():
        H, S, _, d = side.centroids.shape
        if D % d:
            raise Decline(f"head_dim {D} is not divisible by the {what} sub-vector size {d}")
        if (H, S * d) != (Hkv, D):
            raise Decline(f"the {what} codebook is for {H} kv heads of dim {S * d}, the model has {Hkv} of dim {D}")


def _describe(args: dict, k: CacheSide, L) -> str:
    parts = ["decode" if L == 1 else "prefill/chunk"]
    if k.groups > 1:
        names = [getattr(n.target, "__name__", n.target) for n in k.chain]
        how = " + ".join(n for n in names if n in ("expand", "reshape", "view", "repeat_interleave"))
        parts.append(f"GQA x{k.groups} by {how}")
    elif args["enable_gqa"]:
        parts.append("GQA by enable_gqa")
    if args["is_causal"]:
        parts.append("is_causal")
    if args["attn_mask"] is not None:
        parts.append(f"{'bool' if _val(args['attn_mask']).dtype == torch.bool else 'additive'} mask")
    if k.seq_dim == 1:
        parts.append("cache [B, T, H, D] transposed for SDPA")
    parts.append("past compressed" if k.past_is_vq else "past dense (compressed from here on)")
    return ", ".join(parts)


class _Rewriter:
    def __init__(self, gm: fx.GraphModule, settings: CacheSettings, result: PassResult):
        self.gm, self.graph, self.settings, self.result = gm, gm.graph, settings, result
        self.inner: dict[fx.Node, dict[str, fx.Node]] = {}

    def inner_of(self, placeholder: fx.Node) -> dict[str, fx.Node]:
        """Placeholders for what the graph takes for a compressed input (its `graph_fields`: Side
        fields, or a static cache's buffers and book), before it."""
        if placeholder not in self.inner:
            val = _val(placeholder)
            nodes = {}
            with self.graph.inserting_before(placeholder):
                for name in type(val).graph_fields:
                    node = self.graph.placeholder(f"{placeholder.name}_{name}")
                    node.meta["example_value"] = node.meta["val"] = getattr(val, name)
                    source = getattr(placeholder, "_dynamo_source", None)
                    # for AOTAutograd; a static cache's book is no inner tensor, so no Dynamo source
                    node._dynamo_source = (source and AttrSource(source, name)) if name in val.inner_fields else None
                    nodes[name] = node
            self.inner[placeholder] = nodes
            self.result.vq_inputs.add(placeholder.name)
        return self.inner[placeholder]

    def constant(self, name: str, tensor: torch.Tensor) -> fx.Node:
        """A codebook tensor, as an extra input after the graph's own (the backend passes it)."""
        last = [n for n in self.graph.nodes if n.op == "placeholder"][-1]
        with self.graph.inserting_after(last):
            node = self.graph.placeholder(name)
        node.meta["example_value"] = node.meta["val"] = tensor
        node._dynamo_source = None  # not a Dynamo input: AOTAutograd accepts no source
        self.result.extra_inputs.append(tensor)
        return node

    def _items(self, call: fx.Node, names, first: int = 0) -> dict[str, fx.Node]:
        return {n: self.graph.call_function(operator.getitem, (call, first + i)) for i, n in enumerate(names)}

    def append(self, side: CacheSide, codebook, tag: str, online: PQSpec | None, seed: int, rotate: bool) -> NewCache:
        """The new cache of one side: antkv::append onto a compressed past, antkv::start from a
        dense one with the layer's codebook, or antkv::learn_start with a data-free codebook fitted
        to the call's tokens (`rotate`: keys, in a random rotation)."""
        with self.graph.inserting_before(side.cat):
            new, past = side.new, side.past
            if side.seq_dim == 1:  # the ops take [B, H, T, D]
                new = self.graph.call_method("transpose", (new, 1, 2))
                if not side.past_is_vq and _val(past).dim() == 4:
                    past = self.graph.call_method("transpose", (past, 1, 2))
            if side.past_is_vq:
                inner, pv = self.inner_of(side.past), _val(side.past)
                settings, dtype = pv.settings, pv.dtype
                call = self.graph.call_function(
                    torch.ops.antkv.append.default, ([inner[f] for f in Side._fields], new, *settings_args(settings))
                )
                book = {f: inner[f] for f in BOOK_FIELDS}
            elif codebook is None:
                settings, dtype = self.settings, _val(side.new).dtype
                call = self.graph.call_function(
                    torch.ops.antkv.learn_start.default,
                    (past, new, online.sub_dim, online.code_bits, rotate, *settings_args(settings), seed),
                )
                book = self._items(call, BOOK_FIELDS, len(STATE_FIELDS))
            else:
                settings, dtype = self.settings, _val(side.new).dtype
                book = {f: self.constant(f"{tag}_{f}", t) for f, t in zip(BOOK_FIELDS, state.book(codebook))}
                call = self.graph.call_function(
                    torch.ops.antkv.start.default, (past, new, [book[f] for f in BOOK_FIELDS], *settings_args(settings))
                )
            nodes = {**self._items(call, STATE_FIELDS), **book}
        return NewCache(nodes, settings, dtype, side.seq_dim)

    def rewrite_static(self, sdpa: fx.Node, args: dict, k: StaticSide, v: StaticSide) -> None:
        """write + SDPA over static caches -> antkv::static_attention_ (which mutates their buffers)."""
        kin, vin = self.inner_of(k.buffer), self.inner_of(v.buffer)
        kbook, vbook = [kin[f] for f in BOOK_FIELDS], [vin[f] for f in BOOK_FIELDS]
        with self.graph.inserting_before(sdpa):
            out = self.graph.call_function(
                torch.ops.antkv.static_attention_.default,
                (args["query"], [kin[f] for f in STATIC_BUFFERS], kbook,
                 [vin[f] for f in STATIC_BUFFERS], vbook, k.new, v.new, k.pos,
                 args["attn_mask"], args["is_causal"], args["scale"], *settings_args(_val(k.buffer).settings)),
            )  # fmt: skip
        sdpa.replace_all_uses_with(out)
        for node in [sdpa, *reversed(k.chain), *reversed(v.chain), k.write, v.write]:
            for user in list(node.users):  # a write's own result (index_copy_ returns the buffer) read only by size queries
                self._replace_query(user, kin if node is k.write else vin, 2)
            self.graph.erase_node(node)

    def rewrite(self, sdpa: fx.Node, args: dict, k: CacheSide, v: CacheSide, book, layer: int, online: PQSpec | None) -> None:
        ks = self.append(k, book and book.key, f"_antkv_{layer}_key", online, 2 * layer, rotate=True)
        vs = self.append(v, book and book.value, f"_antkv_{layer}_value", online, 2 * layer + 1, rotate=False)
        with self.graph.inserting_before(sdpa):
            call = self.graph.call_function(
                torch.ops.antkv.attention.default,
                (args["query"], [ks.nodes[f] for f in Side._fields], [vs.nodes[f] for f in Side._fields],
                 args["attn_mask"], args["is_causal"], args["scale"]),
            )  # fmt: skip
            out = self.graph.call_function(operator.getitem, (call, 0))
            score = self.graph.call_function(operator.getitem, (call, 1))
            for new in (ks, vs):
                new.nodes["window_score"] = self.graph.call_function(operator.add, (new.nodes["window_score"], score))
        sdpa.replace_all_uses_with(out)
        for side, new in ((k, ks), (v, vs)):
            for user, layout in side.chain_queries.items():
                self._replace_query(user, new.nodes, side.seq_dim, layout)
        for node in [sdpa, *reversed(k.chain), *reversed(v.chain)]:
            self.graph.erase_node(node)
        for side, new in ((k, ks), (v, vs)):
            self._retarget_queries(side.cat, new.nodes, side.seq_dim)
            side.cat.meta["antkv_cache"] = new

    def _retarget_queries(self, node: fx.Node, nodes: dict, seq_dim: int) -> None:
        """Size queries on a cache that is now inner tensors read them instead (and so do Dynamo's
        reads of inner tensors that bind unbacked sizes)."""
        for user in list(node.users):
            query = _size_query(user)
            if query is None:
                continue
            if query[0] in Side._fields:
                user.replace_all_uses_with(nodes[query[0]])
                self.graph.erase_node(user)
            else:
                self._replace_query(user, nodes, seq_dim)

    def _replace_query(self, user: fx.Node, nodes: dict, seq_dim: int, layout=None) -> None:
        with self.graph.inserting_before(user):
            args = (nodes["codes"], nodes["window"], seq_dim, *_size_query(user))
            size = self.graph.call_function(cache_size, args, {"layout": layout})
        user.replace_all_uses_with(size)
        self.graph.erase_node(user)

    def finish_outputs(self) -> None:
        """Outputs that were a concatenation become its new cache's inner tensors (appended at the end)."""
        output = next(n for n in reversed(self.graph.nodes) if n.op == "output")
        outs = list(output.args[0]) if isinstance(output.args[0], (tuple, list)) else [output.args[0]]
        extra = []
        for i, node in enumerate(outs):
            new = isinstance(node, fx.Node) and node.meta.get("antkv_cache")
            if not new:
                continue
            start = len(outs) + len(extra)
            extra += [new.nodes[f] for f in Side._fields]
            self.result.vq_outputs.append(VQOutput(i, list(range(start, start + len(Side._fields))), new.settings, new.dtype, new.seq_dim))
            outs[i] = None
        output.args = (tuple(outs + extra),)
        for node in reversed(list(self.graph.nodes)):
            if node.meta.get("antkv_cache") and not node.users:
                self.graph.erase_node(node)
        for ph, inner in list(self.inner.items()):
            self._retarget_queries(ph, inner, getattr(_val(ph), "seq_dim", 2))
            if not ph.users:
                self.graph.erase_node(ph)


def _layer_index(past: fx.Node, ordinal: int) -> int:
    """Which codebook a site uses: the layer of the cache it reads when Dynamo's source names one
    (`past_key_values.layers[i]`, `past[i][0]`), else its order among the graph's SDPA calls."""
    source = getattr(past, "_dynamo_source", None)
    match = source and re.search(r"layers\[(\d+)\]|\[(\d+)\]\[[01]\]$", source.name)
    return int(match.group(1) or match.group(2)) if match else ordinal


def copy_graph_module(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of a Dynamo graph module to rewrite (Dynamo still reads the original's placeholders),
    with the metadata AOTAutograd expects of a Dynamo graph."""
    graph, nodes = fx.Graph(), {}
    graph.output(graph.graph_copy(gm.graph, nodes))
    for old, new in nodes.items():
        if hasattr(old, "_dynamo_source"):
            new._dynamo_source = old._dynamo_source
    copy = fx.GraphModule(gm, graph)
    copy.meta.update(gm.meta)
    if hasattr(gm, "_param_name_to_source"):
        copy._param_name_to_source = gm._param_name_to_source
    return copy


def kv_cache_pass(
    gm: fx.GraphModule, codebooks=None, settings: CacheSettings = CacheSettings(), graph_id: int = 0, online: PQSpec | None = None
) -> PassResult:
    """Rewrite every provable cat + SDPA site of `gm` in place; report every SDPA site found.
    `online`: without a codebook for a layer, fit a data-free one of this spec (quant/datafree.py)
    to the layer's first call's keys and values."""
    result = PassResult()
    rewriter = _Rewriter(gm, settings, result)
    outputs = {n for n in next(n for n in reversed(gm.graph.nodes) if n.op == "output").all_input_nodes}
    for ordinal, sdpa in enumerate([n for n in gm.graph.nodes if n.op == "call_function" and n.target in SDPA]):
        args = _sdpa_args(sdpa)
        layer = None
        try:
            k = _trace_side(sdpa, args["key"], "key", outputs)
            layer = _layer_index(k.past, ordinal)
            v = _trace_side(sdpa, args["value"], "value", outputs)
            book = codebooks[layer] if codebooks is not None and layer < len(codebooks) else None
            _check_site(sdpa, args, k, v, book, online)
        except Decline as why:
            result.sites.append(Site(graph_id, sdpa.name, False, str(why), layer))
            continue
        detail = _describe(args, k, _val(args["query"]).shape[2])
        if isinstance(k, StaticSide):
            rewriter.rewrite_static(sdpa, args, k, v)
            result.sites.append(Site(graph_id, sdpa.name, True, detail.replace("past compressed", "static compressed cache"), layer))
            continue
        if book is None and not k.past_is_vq:
            detail += f", data-free codebook ({online.bits:g} bits) fitted to this call's tokens"
        rewriter.rewrite(sdpa, args, k, v, book, layer, online)
        result.sites.append(Site(graph_id, sdpa.name, True, detail, layer))
    rewriter.finish_outputs()
    gm.graph.lint()
    gm.recompile()
    return result
