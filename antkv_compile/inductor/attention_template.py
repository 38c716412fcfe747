"""Inductor template sources (jinja, TritonTemplate style) for the VQ attention kernels.

The template kernels hold no attention code of their own: their bodies read Inductor's sizes and
strides, call the very @triton.jit device functions the standalone kernels of `ops/triton/attention.py`
call (`vq_decode_program`, `vq_window_scores_program` and the helpers under them), and store the
result through Inductor's `store_output`. The source of those device functions is appended to the
template verbatim (`inspect.getsource`), so the generated module defines them next to the template
kernel, the template hash (Inductor's code cache key) changes whenever they change, and what
tests/test_triton_attention.py checks in the interpreter is the code the lowering emits.

The lowering itself (IR preprocessing, autotune configs, the split merge) is in
inductor/attention.py, as torch keeps flex attention's templates apart from its lowering.
"""

from __future__ import annotations

import inspect

from ..ops.triton import attention as _k

# Device functions the templates call, callees first (the order only matters for readability:
# Triton resolves a jit function's globals when the kernel is compiled).
SHARED_DEVICE_FUNCTIONS = (
    _k._mm,
    _k._mask_scores,
    _k._online_softmax,
    _k._decode_tile,
    _k._dense_rows_attention,
    _k._decode_codes_split,
    _k.vq_decode_program,
    _k.vq_window_scores_program,
)


def shared_source() -> str:
    """The source text of the shared device functions, decorators included, as a jinja raw block."""
    parts = [inspect.getsource(fn.fn) for fn in SHARED_DEVICE_FUNCTIONS]
    return "\n{% raw %}\n\n" + "\n\n".join(parts) + "\n{% endraw %}\n"


# Operand names of the templates, in the order the lowering passes its input nodes (MASK only
# when the op has a mask).
DECODE_INPUTS = ("Q", "MASK", "KC", "KCENT", "KSLOT", "KROWS", "KWIN", "VC", "VCENT", "VSLOT", "VROWS", "VWIN", "LUT", "LSE")
WINDOW_SCORES_INPUTS = ("Q", "MASK", "KC", "KWIN", "VWIN", "OUT", "LSE", "KERR", "VERR")

# Mask operands: with HAS_MASK the lowering passes MASK (an additive float mask viewed as
# [B, Hq, L, T], zero strides where it broadcasts); without it the device functions never read it
# and Q stands in for the pointer, as the standalone launchers do.
_MASK_STRIDES = """\
{%- if HAS_MASK %}
    stride_mb, stride_mh, stride_ml, stride_mt = {{stride("MASK")}}
    mask_ptr = MASK
{%- else %}
    stride_mb, stride_mh, stride_ml, stride_mt = 0, 0, 0, 0
    mask_ptr = Q
{%- endif %}
"""

# Grid (B * Hkv, NUM_SPLITS + 1); output OUT [B, Hq, L, MAX_SPLITS + 1, DV] float32 (this config
# writes slots 0 .. NUM_SPLITS, slot NUM_SPLITS being the exact window); LSE [B, Hq, L,
# MAX_SPLITS + 1] is a mutated input the lowering fills with -inf, so unwritten slots weigh 0.
DECODE_TEMPLATE = (
    """\
{%- if HAS_MASK %}
{{def_kernel("Q", "MASK", "KC", "KCENT", "KSLOT", "KROWS", "KWIN", "VC", "VCENT", "VSLOT", "VROWS", "VWIN", "LUT", "LSE")}}
{%- else %}
{{def_kernel("Q", "KC", "KCENT", "KSLOT", "KROWS", "KWIN", "VC", "VCENT", "VSLOT", "VROWS", "VWIN", "LUT", "LSE")}}
{%- endif %}
    stride_qb, stride_qh, stride_ql, stride_qd = {{stride("Q")}}
"""
    + _MASK_STRIDES
    + """\
    stride_kcb, stride_kch, stride_kct, stride_kcs = {{stride("KC")}}
    stride_kch2, stride_kcs2, stride_kck, stride_kcd = {{stride("KCENT")}}
    stride_kslb, stride_kslh, stride_kslt = {{stride("KSLOT")}}
    stride_krb, stride_krh, stride_kra, stride_krd = {{stride("KROWS")}}
    stride_kwb, stride_kwh, stride_kwt, stride_kwd = {{stride("KWIN")}}
    stride_vcb, stride_vch, stride_vct, stride_vcs = {{stride("VC")}}
    stride_vch2, stride_vcs2, stride_vck, stride_vcd = {{stride("VCENT")}}
    stride_vslb, stride_vslh, stride_vslt = {{stride("VSLOT")}}
    stride_vrb, stride_vrh, stride_vra, stride_vrd = {{stride("VROWS")}}
    stride_vwb, stride_vwh, stride_vwt, stride_vwd = {{stride("VWIN")}}
    stride_lutb, stride_luth, stride_lutm, stride_lutc = {{stride("LUT")}}
    stride_lb, stride_lh, stride_ll, stride_ls = {{stride("LSE")}}

    Hq = {{size("Q", 1)}}
    L = {{size("Q", 2)}}
    D = {{size("Q", 3)}}
    Hkv = {{size("KC", 1)}}
    T = {{size("KC", 2)}}
    SK = {{size("KC", 3)}}
    Tw = {{size("KWIN", 2)}}
    DV = {{size("VWIN", 3)}}
    G = Hq // Hkv
    T_enc = T - Tw
    # The launcher's split rule, on device: NUM_SPLITS slices of whole BLOCK_T tiles; splits past
    # the end are empty (lse -inf, weight 0 in the merge).
    split_len = tl.cdiv(tl.cdiv(T_enc, NUM_SPLITS), BLOCK_T) * BLOCK_T

    split = tl.program_id(1)
    out, lse, b, row_hq, row_i, row_ok = vq_decode_program(
        tl.program_id(0), split,
        Q, stride_qb, stride_qh, stride_ql, stride_qd,
        mask_ptr, stride_mb, stride_mh, stride_ml, stride_mt,
        KC, stride_kcb, stride_kch, stride_kct, stride_kcs,
        KCENT, stride_kch2, stride_kcs2, stride_kck, stride_kcd,
        KSLOT, stride_kslb, stride_kslh, stride_kslt,
        KROWS, stride_krb, stride_krh, stride_kra, stride_krd,
        KWIN, stride_kwb, stride_kwh, stride_kwt, stride_kwd,
        VC, stride_vcb, stride_vch, stride_vct, stride_vcs,
        VCENT, stride_vch2, stride_vcs2, stride_vck, stride_vcd,
        VSLOT, stride_vslb, stride_vslh, stride_vslt,
        VROWS, stride_vrb, stride_vrh, stride_vra, stride_vrd,
        VWIN, stride_vwb, stride_vwh, stride_vwt, stride_vwd,
        LUT, stride_lutb, stride_luth, stride_lutm, stride_lutc,
        SCALE, Hkv, G, L, T_enc, Tw, split_len, NUM_SPLITS, D, DV, SK,
        KK, DV_SUB, BLOCK_M, BLOCK_D, BLOCK_DV, BLOCK_SK, BLOCK_T, HAS_MASK, IS_CAUSAL,
    )
    tl.store(LSE + b * stride_lb + row_hq * stride_lh + row_i * stride_ll + split * stride_ls,
             lse, mask=row_ok)

    idx_b = b
    idx_h = row_hq[:, None]
    idx_l = row_i[:, None]
    idx_s = split
    idx_d = tl.arange(0, BLOCK_DV)[None, :]
    omask = row_ok[:, None] & (idx_d < DV)
    {{store_output(("idx_b", "idx_h", "idx_l", "idx_s", "idx_d"), "out", "omask", val_shape=("BLOCK_M", "BLOCK_DV"))}}
"""
    + shared_source()
)

# Grid (B * Hkv, cdiv(Tw, BLOCK_W)); output SCORE [B, Hkv, Tw] float32, the op's second output:
# KERR * S1 + VERR * S0 (the window errors of keys and values times this call's sums).
WINDOW_SCORES_TEMPLATE = (
    """\
{%- if HAS_MASK %}
{{def_kernel("Q", "MASK", "KC", "KWIN", "VWIN", "OUT", "LSE", "KERR", "VERR")}}
{%- else %}
{{def_kernel("Q", "KC", "KWIN", "VWIN", "OUT", "LSE", "KERR", "VERR")}}
{%- endif %}
    stride_qb, stride_qh, stride_ql, stride_qd = {{stride("Q")}}
"""
    + _MASK_STRIDES
    + """\
    stride_kwb, stride_kwh, stride_kwt, stride_kwd = {{stride("KWIN")}}
    stride_vwb, stride_vwh, stride_vwt, stride_vwd = {{stride("VWIN")}}
    stride_ob, stride_oh, stride_ol, stride_od = {{stride("OUT")}}
    stride_lb, stride_lh, stride_ll = {{stride("LSE")}}
    stride_keb, stride_keh, stride_ket = {{stride("KERR")}}
    stride_veb, stride_veh, stride_vet = {{stride("VERR")}}

    Hq = {{size("Q", 1)}}
    L = {{size("Q", 2)}}
    D = {{size("Q", 3)}}
    Hkv = {{size("KWIN", 1)}}
    Tw = {{size("KWIN", 2)}}
    DV = {{size("VWIN", 3)}}
    G = Hq // Hkv
    T_enc = {{size("KC", 2)}} - Tw  # KC (the key codes) is passed for its length only

    s0, s1, b, h, offs_w, w_ok = vq_window_scores_program(
        tl.program_id(0), tl.program_id(1),
        Q, stride_qb, stride_qh, stride_ql, stride_qd,
        mask_ptr, stride_mb, stride_mh, stride_ml, stride_mt,
        KWIN, stride_kwb, stride_kwh, stride_kwt, stride_kwd,
        VWIN, stride_vwb, stride_vwh, stride_vwt, stride_vwd,
        OUT, stride_ob, stride_oh, stride_ol, stride_od,
        LSE, stride_lb, stride_lh, stride_ll,
        SCALE, Hkv, G, L, T_enc, Tw, D, DV,
        BLOCK_L, BLOCK_D, BLOCK_W, DV_CHUNK, HAS_MASK, IS_CAUSAL,
    )
    k_err = tl.load(KERR + b * stride_keb + h * stride_keh + offs_w * stride_ket, mask=w_ok, other=0.0)
    v_err = tl.load(VERR + b * stride_veb + h * stride_veh + offs_w * stride_vet, mask=w_ok, other=0.0)
    score = k_err * s1 + v_err * s0

    idx_b = b
    idx_h = h
    idx_w = offs_w
    {{store_output(("idx_b", "idx_h", "idx_w"), "score", "w_ok", val_shape=("BLOCK_W",))}}
"""
    + shared_source()
)
