"""Inductor lowering of `torch.ops.antkv.attention` to the VQ attention Triton templates.

On CUDA inputs with few queries (decode, L <= 16) Inductor emits, instead of a call to the op's
PyTorch implementation:

1. preprocessing as Inductor IR (fused into Inductor's own kernels): the query mapped into the
   key basis (q A^-T, when the codebook has one), the per-row key look-up
   table LUT[b, h, g*L + i, s*K + k] = scale * q_s . centroid[h, s, k], the position -> anchor slot
   maps of keys and values (a scatter), the additive float mask viewed as [B, Hq, L, T];
2. `antkv_vq_decode`, a TritonTemplate (attention_template.py, which calls the device functions
   of the standalone `vq_decode_kernel` of ops/triton/attention.py) chosen by `autotune_select_algorithm` among a
   few configurations (sequence splits, BLOCK_T, num_warps, num_stages). Its output is the
   per-split partial output [B, Hq, L, MAX_SPLITS + 1, Dv]; the per-split log-sum-exp is a second
   buffer the template writes as a mutated input (as flex decoding writes its row max and sum);
3. the flash-decoding merge of the splits by their log-sum-exp, as Inductor IR (a reduction);
4. `antkv_vq_window_scores`, a second TritonTemplate (the device function of the standalone
   `vq_window_scores_kernel`) whose output is the op's second output, the Anchor Score of the
   window tokens: k_window_err * S1 + v_window_err * S0.

On any other device, and on CUDA for prefill (L > 16, not statically small), the lowering
returns None and Inductor lowers the op as it would without us (the implicit fallback to the
op's kernel), so CPU results are untouched. It is registered in Inductor's `user_lowerings`
(checked before the built-in lowerings, a None result falls through to them) by importing this
module, which the backend does right before it calls Inductor (not at `import antkv_compile`:
this module pulls in Inductor's lowering machinery, ~2 s of start-up eager users need not pay).
"""

from __future__ import annotations

import math

import sympy
import torch
from torch._inductor import ir
from torch._inductor.lowering import lowerings, register_lowering, user_lowerings
from torch._inductor.select_algorithm import (
    SymbolicGridFn,
    TritonTemplate,
    autotune_select_algorithm,
    realize_inputs,
)
from torch._inductor.virtualized import V, ops

from .. import ops as _ops  # noqa: F401  (defines torch.ops.antkv.attention)
from ..ops.triton.attention import MAX_DECODE_QUERIES, decode_config, window_scores_config
from ..state import Side
from .attention_template import (  # noqa: F401  (the *_INPUTS orders are the contract)
    DECODE_INPUTS,
    DECODE_TEMPLATE,
    WINDOW_SCORES_INPUTS,
    WINDOW_SCORES_TEMPLATE,
)

aten = torch.ops.aten
prims = torch.ops.prims
OP = torch.ops.antkv.attention.default


@SymbolicGridFn
def decode_grid(B, Hkv, meta):
    return (B * Hkv, meta["NUM_SPLITS"] + 1, 1)


@SymbolicGridFn
def window_scores_grid(B, Hkv, Tw, meta, *, cdiv):
    return (B * Hkv, cdiv(Tw, meta["BLOCK_W"]), 1)


decode_template = TritonTemplate(
    name="antkv_vq_decode", grid=decode_grid, source=DECODE_TEMPLATE, always_freeze_layout=True
)
window_scores_template = TritonTemplate(
    name="antkv_vq_window_scores", grid=window_scores_grid, source=WINDOW_SCORES_TEMPLATE,
    always_freeze_layout=True,
)


# --- autotune configurations ---------------------------------------------------------------------


def decode_configs(G: int, L: int, D: int, DV: int) -> list[dict]:
    """A few decode configurations around the launcher's `decode_config`: sequence splits (16, 32,
    64: flash-decoding parallelism when B * Hkv is small), the launcher's BLOCK_T and half of it,
    num_warps 4 / 2, num_stages 1 / 2. BLOCK_T is never raised above the launcher's choice:
    tests/test_triton_sm90.py found larger tiles spilling at D = 128."""
    base = decode_config(G, L, D, DV)
    bt, half = base["BLOCK_T"], max(8, base["BLOCK_T"] // 2)
    tiles = dict(BLOCK_M=base["BLOCK_M"], BLOCK_D=base["BLOCK_D"], BLOCK_DV=base["BLOCK_DV"])
    out = []
    for splits, block_t, warps, stages in [(32, bt, 4, 1), (16, bt, 4, 2), (64, bt, 4, 2), (32, half, 2, 1), (64, half, 4, 1)]:
        out.append(dict(tiles, BLOCK_T=block_t, NUM_SPLITS=splits, num_warps=warps, num_stages=stages))
    return list({tuple(sorted(c.items())): c for c in out}.values())


def window_scores_configs(D: int, DV: int) -> list[dict]:
    """The launcher's `window_scores_config` with 4 and with 8 warps. (BLOCK_W stays 16: 32 spilled
    on sm_90 at D = 64, and tl.dot needs 16 or more columns.)"""
    base = dict(window_scores_config(D, DV), num_stages=3)
    return [base, dict(base, num_warps=8)]


# --- preprocessing as Inductor IR ----------------------------------------------------------------


def _static(x) -> int | None:
    try:
        return int(x)
    except TypeError:
        return None


def anchor_slots_ir(pos, t_enc):
    """`vq_attention._anchor_slots` in Inductor IR: slot[b, h, t] = a where pos[b, h, a] == t
    (< t_enc), else -1; int32 [B, H, t_enc]. Empty slots and window positions scatter into a dummy
    column t_enc that is cut off (duplicates land only there)."""
    B, H, A = pos.get_size()
    device = pos.get_device()
    load_pos = pos.make_loader()

    def scatter_index(i):  # pos if 0 <= pos < t_enc else t_enc (t_enc may be symbolic)
        p = load_pos(i)
        keep = ops.and_(ops.ge(p, ops.constant(0, torch.int32)), ops.lt(p, ops.index_expr(t_enc, torch.int32)))
        return ops.where(keep, ops.to_dtype(p, torch.int64), ops.index_expr(t_enc, torch.int64))

    idx = ir.TensorBox.create(ir.Pointwise.create(device=device, dtype=torch.int64, inner_fn=scatter_index,
                                                  ranges=[B, H, A]))
    src = lowerings[aten.expand](
        lowerings[aten.view](lowerings[prims.iota](A, start=0, step=1, dtype=torch.int32, device=device,
                                                   requires_grad=False), [1, 1, A]),
        [B, H, A],
    )
    slots = lowerings[aten.full]([B, H, t_enc + 1], -1, dtype=torch.int32, device=device)
    slots = lowerings[aten.scatter_reduce_.two](lowerings[aten.clone](slots), 2, idx, src, None)
    return lowerings[aten.slice](slots, 2, 0, t_enc)


def query_to_basis_ir(q, basis_inv):
    """`quant.basis.query_to_basis` in Inductor IR: q A^-T per kv head, in q's dtype; q itself when
    the basis is the empty [H, 0, 0] marker (a static shape, so no branch at run time)."""
    if _static(basis_inv.get_size()[-1]) == 0:
        return q
    B, Hq, L, D = q.get_size()
    Hkv = basis_inv.get_size()[0]
    G = Hq // Hkv
    qf = lowerings[aten.reshape](lowerings[prims.convert_element_type](q, torch.float32), [B, Hkv, G, L, 1, D])
    prod = lowerings[aten.mul](qf, lowerings[aten.view](basis_inv, [1, Hkv, 1, 1, D, D]))  # [.., e, d] = q_d A^-1[e, d]
    out = lowerings[aten.reshape](lowerings[aten.sum](prod, [5]), [B, Hq, L, D])
    return lowerings[prims.convert_element_type](out, q.get_dtype())


def lut_ir(q, k_centroids, scale):
    """LUT [B, Hkv, G*L, S*K] float32 = scale * q_s . centroid[h, s, k] (the launcher's einsum)."""
    B, Hq, L, D = q.get_size()
    Hkv, S, K, d = k_centroids.get_size()
    G = Hq // Hkv
    qf = lowerings[aten.mul](lowerings[prims.convert_element_type](q, torch.float32), scale)
    qf = lowerings[aten.reshape](qf, [B, Hkv, G * L, S, 1, d])
    prod = lowerings[aten.mul](qf, lowerings[aten.view](k_centroids, [1, Hkv, 1, S, K, d]))
    lut = lowerings[aten.sum](prod, [5])
    return lowerings[aten.reshape](lut, [B, Hkv, G * L, S * K])


def mask_ir(attn_mask, B, Hq, L, T):
    """The additive float mask (bool: True keeps) realized and viewed as [B, Hq, L, T]."""
    if attn_mask.get_dtype() == torch.bool:
        neg = lowerings[aten.full](list(attn_mask.get_size()), float("-inf"), dtype=torch.float32,
                                   device=attn_mask.get_device())
        attn_mask = lowerings[aten.where](attn_mask, 0.0, neg)
    m = realize_inputs(attn_mask)
    return ir.ExpandView.create(m, [B, Hq, L, T])


# --- the lowering --------------------------------------------------------------------------------


def _decode_supported(q, k_centroids, v_centroids) -> str | None:
    """Why the decode template cannot take these inputs (None: it can)."""
    device = q.get_device()
    if device is None or device.type != "cuda":
        return "not a CUDA tensor"
    B, Hq, L, D = q.get_size()
    Lc = _static(L)
    if Lc is None or Lc > MAX_DECODE_QUERIES:
        return f"{L} queries (the decode template takes at most {MAX_DECODE_QUERIES}, statically)"
    if any(_static(x) is None for x in (B, Hq, D, *k_centroids.get_size(), *v_centroids.get_size())):
        return "batch, heads, head_dim or codebook shapes are not static"
    if q.get_dtype() not in (torch.float32, torch.float16, torch.bfloat16):
        return f"query dtype {q.get_dtype()}"
    _, SV, _, DV_SUB = v_centroids.get_size()
    if int(SV) * int(DV_SUB) != int(D):
        return "value head_dim differs from the query's (the op's fake kernel gives out q's shape)"
    return None


def lower_decode(q, k: Side, v: Side, attn_mask, is_causal, scale):
    """(out, score) of the op as Inductor IR, through the two templates (see the module doc)."""
    q = query_to_basis_ir(q, k.basis_inv)
    B, Hq, L, D = (int(x) for x in q.get_size())
    Hkv, SK, KK, _ = (int(x) for x in k.centroids.get_size())
    _, SV, _, DV_SUB = (int(x) for x in v.centroids.get_size())
    DV = SV * DV_SUB
    G = Hq // Hkv
    T = k.codes.get_size()[2]
    Tw = k.window.get_size()[2]
    t_enc = T - Tw
    scale = 1 / math.sqrt(D) if scale is None else float(scale)
    device = q.get_device()
    has_mask = attn_mask is not None

    lut = lut_ir(q, k.centroids, scale)
    k_slots, v_slots = anchor_slots_ir(k.anchor_pos, t_enc), anchor_slots_ir(v.anchor_pos, t_enc)
    mask = [mask_ir(attn_mask, B, Hq, L, T)] if has_mask else []
    q, lut, k_slots, v_slots = realize_inputs(q, lut, k_slots, v_slots)
    read = ("codes", "centroids", "anchor_rows", "window", "window_err")  # what the templates read of a side
    k = k._replace(**dict(zip(read, realize_inputs(*(getattr(k, f) for f in read)))))
    v = v._replace(**dict(zip(read, realize_inputs(*(getattr(v, f) for f in read)))))

    configs = decode_configs(G, L, D, DV)
    max_splits = max(c["NUM_SPLITS"] for c in configs)
    part_shape = [B, Hq, L, max_splits + 1]
    lse_part = lowerings[aten.full](part_shape, float("-inf"), dtype=torch.float32, device=device)
    lse_part = realize_inputs(lse_part)
    out_layout = ir.FixedLayout(device, torch.float32, [*part_shape, DV],
                                ir.FlexibleLayout.contiguous_strides([*part_shape, DV]))
    # In DECODE_INPUTS order.
    inputs = [q, *mask, k.codes, k.centroids, k_slots, k.anchor_rows, k.window,
              v.codes, v.centroids, v_slots, v.anchor_rows, v.window, lut, lse_part]
    static = dict(SCALE=scale, KK=KK, DV_SUB=DV_SUB, BLOCK_SK=1 << max(SK - 1, 0).bit_length(),
                  HAS_MASK=has_mask, IS_CAUSAL=bool(is_causal))
    choices: list = []
    for cfg in configs:
        decode_template.maybe_append_choice(
            choices, input_nodes=inputs, layout=out_layout, mutated_inputs=[lse_part],
            call_sizes=[B, Hkv], **static, **cfg,
        )
    if not choices:
        raise RuntimeError("antkv: no decode template configuration rendered")
    o_part = autotune_select_algorithm("antkv_vq_decode", choices, inputs, out_layout)

    # Merge the splits by their log-sum-exp (slots a configuration did not write keep -inf).
    lse_part = lse_part if isinstance(lse_part, ir.TensorBox) else ir.TensorBox(lse_part)
    mx = lowerings[aten.amax](lse_part, [3], True)
    mx = lowerings[aten.where](lowerings[aten.eq](mx, float("-inf")), 0.0, mx)
    lse = lowerings[aten.add](lowerings[aten.log](lowerings[aten.sum](
        lowerings[aten.exp](lowerings[aten.sub](lse_part, mx)), [3], True)), mx)
    live = lowerings[aten.ne](lse_part, float("-inf"))
    weight = lowerings[aten.where](live, lowerings[aten.exp](lowerings[aten.sub](lse_part, lse)), 0.0)
    contrib = lowerings[aten.where](
        lowerings[aten.unsqueeze](live, 4),
        lowerings[aten.mul](lowerings[aten.unsqueeze](weight, 4), o_part), 0.0)
    out32 = lowerings[aten.sum](contrib, [3])  # [B, Hq, L, DV] float32
    lse = lowerings[aten.squeeze](lse, 3)
    out = lowerings[prims.convert_element_type](out32, q.get_dtype())

    # Anchor Score of the window tokens (the op's second output).
    out32, lse = realize_inputs(out32, lse)
    # In WINDOW_SCORES_INPUTS order.
    w_inputs = [q, *mask, k.codes, k.window, v.window, out32, lse, k.window_err, v.window_err]
    w_layout = ir.FixedLayout(device, torch.float32, [B, Hkv, Tw],
                              ir.FlexibleLayout.contiguous_strides([B, Hkv, Tw]))
    w_choices: list = []
    for cfg in window_scores_configs(D, DV):
        window_scores_template.maybe_append_choice(
            w_choices, input_nodes=w_inputs, layout=w_layout, call_sizes=[B, Hkv, Tw],
            SCALE=scale, HAS_MASK=has_mask, IS_CAUSAL=bool(is_causal), **cfg,
        )
    if not w_choices:
        raise RuntimeError("antkv: no window-score template configuration rendered")
    score = autotune_select_algorithm("antkv_vq_window_scores", w_choices, w_inputs, w_layout)
    return out, score


def attention_lowering(q, key, value, attn_mask=None, is_causal=False, scale=None):
    """The user lowering: the templates for CUDA decode, None (Inductor's usual fallback to the
    op's kernel) otherwise."""
    k, v = Side(*key), Side(*value)
    if _decode_supported(q, k.centroids, v.centroids) is not None:
        return None
    return lower_decode(q, k, v, attn_mask, is_causal, scale)


register_lowering(OP, type_promotion_kind=None, lowering_dict=user_lowerings)(attention_lowering)


def is_registered() -> bool:
    return OP in user_lowerings
