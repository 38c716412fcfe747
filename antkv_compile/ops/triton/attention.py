"""Triton attention over the compressed (product-VQ) KV cache.

One side (K or V) of a layer's cache is a `state.Side`; the kernels read five of its tensors:
codes [B, H, T, S] for every position, centroids [H, S, K, d], exact anchor rows [B, H, A, D] at
anchor_pos [B, H, A] (-1 = empty slot, positions < T - Tw) and an exact window [B, H, Tw, D] of the
last Tw positions. Every kernel computes SDPA on the dense tensor those stand for; the query is
already in the key basis (ops.attention maps it).

- `vq_decode_attention`: few queries (decode, L <= 16). One program per (batch, kv head, split of
  the sequence) serves all G*L query rows of the group from one read of the codes. Key scores come
  from a per-row look-up table LUT[s, k] = scale * q_s . centroid[s, k] (a load per code); value
  tiles are gathered from the codebook by code (see `vq_decode_kernel` for why not a per-centroid
  histogram). Splits are merged by their log-sum-exp (flash-decoding).
- `vq_prefill_attention`: many queries. FlashAttention tiling with keys and values decoded tile by
  tile from the codebook (with many query rows a decoded tile and a tensor-core dot beat per-row
  tables), then `vq_window_scores` for the Anchor Score sums of the window tokens.
- `vq_window_scores`: S0_j = sum A_ij and S1_j = sum A_ij * scale * ||q_i|| * ||v_j - o_i|| over the
  group's query heads and queries, for the window tokens, from the output and row log-sum-exp of
  the attention pass, so the L x T attention matrix is never held.

Kernel bodies take plain pointers and strides (Inductor-template style); the launchers check
inputs, build the per-position anchor slot maps and pick block sizes.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import triton
import triton.language as tl

if TYPE_CHECKING:  # annotations only: this module also loads standalone (tests/test_triton_sm90.py)
    from ...state import Side

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_DECODE_QUERIES = 16


# --- shared device helpers -----------------------------------------------------------------------


@triton.jit
def _mm(a, b, USE_DOT: tl.constexpr):
    """a [M, K] @ b [K, N] in float32: tl.dot for tiles of 16+ rows, else a broadcast sum (decode
    has a handful of query rows; padding them to tl.dot's 16 would waste registers)."""
    if USE_DOT:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.sum(a[:, :, None] * b[None, :, :], axis=1)


@triton.jit
def _mask_scores(
    s, offs_t, t_ok, row_hq, row_i, row_ok,
    mask_ptr, stride_mh, stride_ml, stride_mt,
    HAS_MASK: tl.constexpr, IS_CAUSAL: tl.constexpr,
):
    """SDPA masking of a [rows, keys] score tile: additive mask, top-left causal, padding."""
    keep = row_ok[:, None] & t_ok[None, :]
    if HAS_MASK:
        s += tl.load(mask_ptr + row_hq[:, None] * stride_mh + row_i[:, None] * stride_ml
                     + offs_t[None, :] * stride_mt, mask=keep, other=0.0).to(tl.float32)
    if IS_CAUSAL:
        keep &= offs_t[None, :] <= row_i[:, None]
    return tl.where(keep, s, float("-inf"))


@triton.jit
def _online_softmax(m_i, l_i, s):
    """One online-softmax step: new running max, rescale factor for old sums, and p = exp(s - m).
    A row that has seen only -inf keeps m = -inf and gets p = 0 (no NaN)."""
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp(m_i - m_safe)
    p = tl.exp(s - m_safe[:, None])
    return m_new, alpha, p, l_i * alpha + tl.sum(p, axis=1)


@triton.jit
def _decode_tile(
    codes_ptr, stride_ct, stride_cs, cent_ptr, stride_cs2, stride_ck, stride_cd,
    slot_ptr, stride_slt, rows_ptr, stride_ra, stride_rd,
    offs_t, t_ok, offs_d, d_ok, SUB_D: tl.constexpr,
):
    """Dense rows [BLOCK_T, BLOCK_D] of encoded positions: exact anchor rows where the slot map
    has one, centroids gathered by code elsewhere (one head's codebook, S*K*d floats = D*K, stays
    in L1/L2, so each element costs a cached load, not a DRAM read)."""
    sub = offs_d // SUB_D
    ok = t_ok[:, None] & d_ok[None, :]
    code = tl.load(codes_ptr + offs_t[:, None] * stride_ct + sub[None, :] * stride_cs,
                   mask=ok, other=0).to(tl.int32)
    rows = tl.load(cent_ptr + sub[None, :] * stride_cs2 + code * stride_ck
                   + (offs_d % SUB_D)[None, :] * stride_cd, mask=ok, other=0.0)
    slot = tl.load(slot_ptr + offs_t * stride_slt, mask=t_ok, other=-1).to(tl.int32)
    if tl.max(slot, axis=0) >= 0:
        anchored = slot >= 0
        exact = tl.load(rows_ptr + slot[:, None] * stride_ra + offs_d[None, :] * stride_rd,
                        mask=anchored[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
        rows = tl.where(anchored[:, None], exact, rows)
    return rows


@triton.jit
def _dense_rows_attention(
    q, row_hq, row_i, row_ok, n, pos0, m_i, l_i, acc,
    mask_ptr, stride_mh, stride_ml, stride_mt,
    krows_ptr, stride_krt, stride_krd, vrows_ptr, stride_vrt, stride_vrd,
    D, DV, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_T: tl.constexpr,
    HAS_MASK: tl.constexpr, IS_CAUSAL: tl.constexpr, USE_DOT: tl.constexpr,
):
    """Plain flash attention of the (pre-scaled) query rows over n exact rows at positions
    pos0 .. pos0+n-1 (the window)."""
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    for j0 in range(0, n, BLOCK_T):
        offs_j = j0 + tl.arange(0, BLOCK_T)
        j_ok = offs_j < n
        k = tl.load(krows_ptr + offs_j[:, None] * stride_krt + offs_d[None, :] * stride_krd,
                    mask=j_ok[:, None] & (offs_d < D)[None, :], other=0.0).to(tl.float32)
        s = _mm(q, tl.trans(k), USE_DOT)
        s = _mask_scores(s, pos0 + offs_j, j_ok, row_hq, row_i, row_ok,
                         mask_ptr, stride_mh, stride_ml, stride_mt, HAS_MASK, IS_CAUSAL)
        m_i, alpha, p, l_i = _online_softmax(m_i, l_i, s)
        v = tl.load(vrows_ptr + offs_j[:, None] * stride_vrt + offs_dv[None, :] * stride_vrd,
                    mask=j_ok[:, None] & (offs_dv < DV)[None, :], other=0.0).to(tl.float32)
        acc = acc * alpha[:, None] + _mm(p, v, USE_DOT)
    return m_i, l_i, acc


# --- decode --------------------------------------------------------------------------------------


@triton.jit
def _decode_codes_split(
    q, lut_rows, stride_lutc, row_hq, row_i, row_ok, t_lo, t_hi,
    mask_ptr, stride_mh, stride_ml, stride_mt,
    kcodes_ptr, stride_kct, stride_kcs, kslot_ptr, stride_kslt, krows_ptr, stride_kra, stride_krd,
    vcodes_ptr, stride_vct, stride_vcs, vcent_ptr, stride_vcs2, stride_vck, stride_vcd,
    vslot_ptr, stride_vslt, vrows_ptr, stride_vra, stride_vrd,
    D, DV, SK,
    KK: tl.constexpr, DV_SUB: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_SK: tl.constexpr, BLOCK_T: tl.constexpr,
    HAS_MASK: tl.constexpr, IS_CAUSAL: tl.constexpr,
):
    """Attention of the query rows over encoded positions [t_lo, t_hi): scores gathered from the
    LUT rows (sum over subspaces of LUT[s*K + code]), the exact q . row at key anchors; values
    decoded by code, exact at value anchors."""
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    offs_sk = tl.arange(0, BLOCK_SK)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    for t0 in range(t_lo, t_hi, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        t_ok = offs_t < t_hi

        code_ok = t_ok[:, None] & (offs_sk < SK)[None, :]
        kc = tl.load(kcodes_ptr + offs_t[:, None] * stride_kct + offs_sk[None, :] * stride_kcs,
                     mask=code_ok, other=0).to(tl.int32)
        s = tl.sum(tl.load(lut_rows[:, None, None] + (offs_sk[None, :] * KK + kc)[None, :, :] * stride_lutc,
                           mask=row_ok[:, None, None] & code_ok[None, :, :], other=0.0), axis=2)
        kslot = tl.load(kslot_ptr + offs_t * stride_kslt, mask=t_ok, other=-1).to(tl.int32)
        if tl.max(kslot, axis=0) >= 0:
            k_exact = tl.load(krows_ptr + kslot[:, None] * stride_kra + offs_d[None, :] * stride_krd,
                              mask=(kslot >= 0)[:, None] & (offs_d < D)[None, :], other=0.0)
            s_exact = _mm(q, tl.trans(k_exact.to(tl.float32)), False)
            s = tl.where((kslot >= 0)[None, :], s_exact, s)
        s = _mask_scores(s, offs_t, t_ok, row_hq, row_i, row_ok,
                         mask_ptr, stride_mh, stride_ml, stride_mt, HAS_MASK, IS_CAUSAL)
        m_i, alpha, p, l_i = _online_softmax(m_i, l_i, s)

        v = _decode_tile(vcodes_ptr, stride_vct, stride_vcs, vcent_ptr, stride_vcs2, stride_vck,
                         stride_vcd, vslot_ptr, stride_vslt, vrows_ptr, stride_vra, stride_vrd,
                         offs_t, t_ok, offs_dv, offs_dv < DV, DV_SUB)
        acc = acc * alpha[:, None] + _mm(p, v, False)
    return m_i, l_i, acc


@triton.jit
def vq_decode_program(
    pid_bh, split,
    q_ptr, stride_qb, stride_qh, stride_ql, stride_qd,
    mask_ptr, stride_mb, stride_mh, stride_ml, stride_mt,
    kcodes_ptr, stride_kcb, stride_kch, stride_kct, stride_kcs,
    kcent_ptr, stride_kch2, stride_kcs2, stride_kck, stride_kcd,
    kslot_ptr, stride_kslb, stride_kslh, stride_kslt,
    krows_ptr, stride_krb, stride_krh, stride_kra, stride_krd,
    kwin_ptr, stride_kwb, stride_kwh, stride_kwt, stride_kwd,
    vcodes_ptr, stride_vcb, stride_vch, stride_vct, stride_vcs,
    vcent_ptr, stride_vch2, stride_vcs2, stride_vck, stride_vcd,
    vslot_ptr, stride_vslb, stride_vslh, stride_vslt,
    vrows_ptr, stride_vrb, stride_vrh, stride_vra, stride_vrd,
    vwin_ptr, stride_vwb, stride_vwh, stride_vwt, stride_vwd,
    lut_ptr, stride_lutb, stride_luth, stride_lutm, stride_lutc,
    scale, Hkv, G, L, T_enc, Tw, split_len, NUM_SPLITS, D, DV, SK,
    KK: tl.constexpr, DV_SUB: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_SK: tl.constexpr, BLOCK_T: tl.constexpr,
    HAS_MASK: tl.constexpr, IS_CAUSAL: tl.constexpr,
):
    """The work of one program of `vq_decode_kernel` (program ids pid_bh, split), shared with the
    Inductor template (antkv_compile/templates/vq_attention_template.py): returns the normalized
    partial output [BLOCK_M, BLOCK_DV] and log-sum-exp [BLOCK_M] of the G*L query rows of this
    split, with the indices the caller stores them at (b, row_hq, row_i, row_ok)."""
    b = pid_bh // Hkv
    h = pid_bh % Hkv

    offs_m = tl.arange(0, BLOCK_M)
    row_ok = offs_m < G * L
    row_hq = h * G + offs_m // L
    row_i = offs_m % L
    offs_d = tl.arange(0, BLOCK_D)
    q = tl.load(q_ptr + b * stride_qb + row_hq[:, None] * stride_qh + row_i[:, None] * stride_ql
                + offs_d[None, :] * stride_qd, mask=row_ok[:, None] & (offs_d < D)[None, :], other=0.0)
    q = q.to(tl.float32) * scale
    mask_b = mask_ptr + b * stride_mb

    if split < NUM_SPLITS:
        t_lo = split * split_len
        t_hi = tl.minimum(t_lo + split_len, T_enc)
        m_i, l_i, acc = _decode_codes_split(
            q, lut_ptr + b * stride_lutb + h * stride_luth + offs_m * stride_lutm,
            stride_lutc, row_hq, row_i, row_ok, t_lo, t_hi,
            mask_b, stride_mh, stride_ml, stride_mt,
            kcodes_ptr + b * stride_kcb + h * stride_kch, stride_kct, stride_kcs,
            kslot_ptr + b * stride_kslb + h * stride_kslh, stride_kslt,
            krows_ptr + b * stride_krb + h * stride_krh, stride_kra, stride_krd,
            vcodes_ptr + b * stride_vcb + h * stride_vch, stride_vct, stride_vcs,
            vcent_ptr + h * stride_vch2, stride_vcs2, stride_vck, stride_vcd,
            vslot_ptr + b * stride_vslb + h * stride_vslh, stride_vslt,
            vrows_ptr + b * stride_vrb + h * stride_vrh, stride_vra, stride_vrd,
            D, DV, SK, KK, DV_SUB, BLOCK_M, BLOCK_D, BLOCK_DV, BLOCK_SK, BLOCK_T,
            HAS_MASK, IS_CAUSAL,
        )
    else:
        m_i, l_i, acc = _dense_rows_attention(
            q, row_hq, row_i, row_ok, Tw, T_enc,
            tl.full([BLOCK_M], float("-inf"), dtype=tl.float32),
            tl.zeros([BLOCK_M], dtype=tl.float32),
            tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32),
            mask_b, stride_mh, stride_ml, stride_mt,
            kwin_ptr + b * stride_kwb + h * stride_kwh, stride_kwt, stride_kwd,
            vwin_ptr + b * stride_vwb + h * stride_vwh, stride_vwt, stride_vwd,
            D, DV, BLOCK_D, BLOCK_DV, BLOCK_T, HAS_MASK, IS_CAUSAL, False,
        )

    l_safe = tl.where(l_i > 0, l_i, 1.0)
    lse = tl.where(l_i > 0, m_i + tl.log(l_safe), float("-inf"))
    return acc / l_safe[:, None], lse, b, row_hq, row_i, row_ok


@triton.jit
def vq_decode_kernel(
    q_ptr, stride_qb, stride_qh, stride_ql, stride_qd,
    mask_ptr, stride_mb, stride_mh, stride_ml, stride_mt,
    kcodes_ptr, stride_kcb, stride_kch, stride_kct, stride_kcs,
    kcent_ptr, stride_kch2, stride_kcs2, stride_kck, stride_kcd,
    kslot_ptr, stride_kslb, stride_kslh, stride_kslt,
    krows_ptr, stride_krb, stride_krh, stride_kra, stride_krd,
    kwin_ptr, stride_kwb, stride_kwh, stride_kwt, stride_kwd,
    vcodes_ptr, stride_vcb, stride_vch, stride_vct, stride_vcs,
    vcent_ptr, stride_vch2, stride_vcs2, stride_vck, stride_vcd,
    vslot_ptr, stride_vslb, stride_vslh, stride_vslt,
    vrows_ptr, stride_vrb, stride_vrh, stride_vra, stride_vrd,
    vwin_ptr, stride_vwb, stride_vwh, stride_vwt, stride_vwd,
    lut_ptr, stride_lutb, stride_luth, stride_lutm, stride_lutc,
    o_ptr, stride_ob, stride_oh, stride_ol, stride_os, stride_od,
    lse_ptr, stride_lb, stride_lh, stride_ll, stride_ls,
    scale, Hkv, G, L, T_enc, Tw, split_len, NUM_SPLITS, D, DV, SK,
    KK: tl.constexpr, DV_SUB: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_SK: tl.constexpr, BLOCK_T: tl.constexpr,
    HAS_MASK: tl.constexpr, IS_CAUSAL: tl.constexpr,
):
    """Grid (B * Hkv, NUM_SPLITS + 1). Split i < NUM_SPLITS covers encoded positions
    [i * split_len, (i+1) * split_len); the last split covers the exact window. Each writes its
    normalized partial output and log-sum-exp for the G*L query rows (row m = g*L + i).

    The key LUT [B, Hkv, G*L, S*K] comes precomputed (a small batched matmul, once per kv head
    rather than once per split) and is gathered with pointer loads that hit L1/L2: gathering it
    from registers with tl.gather compiled for sm_90 to ~17 KB of spills per thread.

    Values are decoded by code rather than accumulated per centroid: a weighted histogram needs
    a scatter-add, which Triton has only as global atomics; the one-hot matmul alternative
    (p [M, T] @ onehot [T, S*K]) costs K/d times the FLOPs of decoding and, compiled for sm_90 at
    1 bit (D=64, d=8, K=256), needed 644 KB of shared memory (the limit is 227 KB).
    """
    out, lse, b, row_hq, row_i, row_ok = vq_decode_program(
        tl.program_id(0), tl.program_id(1),
        q_ptr, stride_qb, stride_qh, stride_ql, stride_qd,
        mask_ptr, stride_mb, stride_mh, stride_ml, stride_mt,
        kcodes_ptr, stride_kcb, stride_kch, stride_kct, stride_kcs,
        kcent_ptr, stride_kch2, stride_kcs2, stride_kck, stride_kcd,
        kslot_ptr, stride_kslb, stride_kslh, stride_kslt,
        krows_ptr, stride_krb, stride_krh, stride_kra, stride_krd,
        kwin_ptr, stride_kwb, stride_kwh, stride_kwt, stride_kwd,
        vcodes_ptr, stride_vcb, stride_vch, stride_vct, stride_vcs,
        vcent_ptr, stride_vch2, stride_vcs2, stride_vck, stride_vcd,
        vslot_ptr, stride_vslb, stride_vslh, stride_vslt,
        vrows_ptr, stride_vrb, stride_vrh, stride_vra, stride_vrd,
        vwin_ptr, stride_vwb, stride_vwh, stride_vwt, stride_vwd,
        lut_ptr, stride_lutb, stride_luth, stride_lutm, stride_lutc,
        scale, Hkv, G, L, T_enc, Tw, split_len, NUM_SPLITS, D, DV, SK,
        KK, DV_SUB,
        BLOCK_M, BLOCK_D, BLOCK_DV,
        BLOCK_SK, BLOCK_T,
        HAS_MASK, IS_CAUSAL,
    )
    split = tl.program_id(1)
    offs_dv = tl.arange(0, BLOCK_DV)
    row_o = b * stride_ob + row_hq * stride_oh + row_i * stride_ol + split * stride_os
    tl.store(o_ptr + row_o[:, None] + offs_dv[None, :] * stride_od, out,
             mask=row_ok[:, None] & (offs_dv < DV)[None, :])
    tl.store(lse_ptr + b * stride_lb + row_hq * stride_lh + row_i * stride_ll + split * stride_ls,
             lse, mask=row_ok)


# --- prefill -------------------------------------------------------------------------------------


@triton.jit
def vq_prefill_kernel(
    q_ptr, stride_qb, stride_qh, stride_ql, stride_qd,
    mask_ptr, stride_mb, stride_mh, stride_ml, stride_mt,
    kcodes_ptr, stride_kcb, stride_kch, stride_kct, stride_kcs,
    kcent_ptr, stride_kch2, stride_kcs2, stride_kck, stride_kcd,
    kslot_ptr, stride_kslb, stride_kslh, stride_kslt,
    krows_ptr, stride_krb, stride_krh, stride_kra, stride_krd,
    kwin_ptr, stride_kwb, stride_kwh, stride_kwt, stride_kwd,
    vcodes_ptr, stride_vcb, stride_vch, stride_vct, stride_vcs,
    vcent_ptr, stride_vch2, stride_vcs2, stride_vck, stride_vcd,
    vslot_ptr, stride_vslb, stride_vslh, stride_vslt,
    vrows_ptr, stride_vrb, stride_vrh, stride_vra, stride_vrd,
    vwin_ptr, stride_vwb, stride_vwh, stride_vwt, stride_vwd,
    o_ptr, stride_ob, stride_oh, stride_ol, stride_od,
    lse_ptr, stride_lb, stride_lh, stride_ll,
    scale, Hq, G, L, T_enc, Tw, D, DV,
    DK_SUB: tl.constexpr, DV_SUB: tl.constexpr,
    BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_T: tl.constexpr,
    HAS_MASK: tl.constexpr, IS_CAUSAL: tl.constexpr,
):
    """Grid (B * Hq, cdiv(L, BLOCK_L)): FlashAttention of BLOCK_L queries of one head over the
    encoded positions (tiles decoded from the codebook, anchors exact) and then the window."""
    pid_bh = tl.program_id(0)
    b = pid_bh // Hq
    hq = pid_bh % Hq
    h = hq // G
    offs_l = tl.program_id(1) * BLOCK_L + tl.arange(0, BLOCK_L)
    row_ok = offs_l < L
    row_hq = tl.zeros([BLOCK_L], dtype=tl.int32) + hq
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    d_ok = offs_d < D
    dv_ok = offs_dv < DV
    q = tl.load(q_ptr + b * stride_qb + hq * stride_qh + offs_l[:, None] * stride_ql
                + offs_d[None, :] * stride_qd, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    q = q.to(tl.float32) * scale
    mask_b = mask_ptr + b * stride_mb

    kcodes = kcodes_ptr + b * stride_kcb + h * stride_kch
    vcodes = vcodes_ptr + b * stride_vcb + h * stride_vch
    kslot = kslot_ptr + b * stride_kslb + h * stride_kslh
    vslot = vslot_ptr + b * stride_vslb + h * stride_vslh
    krows = krows_ptr + b * stride_krb + h * stride_krh
    vrows = vrows_ptr + b * stride_vrb + h * stride_vrh

    # Top-left causal: this query block sees no key past its last query index.
    t_enc_hi = T_enc
    n_win = Tw
    if IS_CAUSAL:
        last = tl.program_id(1) * BLOCK_L + BLOCK_L
        t_enc_hi = tl.minimum(T_enc, last)
        n_win = tl.maximum(tl.minimum(Tw, last - T_enc), 0)

    m_i = tl.full([BLOCK_L], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_L], dtype=tl.float32)
    acc = tl.zeros([BLOCK_L, BLOCK_DV], dtype=tl.float32)
    for t0 in range(0, t_enc_hi, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        t_ok = offs_t < t_enc_hi
        k = _decode_tile(kcodes, stride_kct, stride_kcs,
                         kcent_ptr + h * stride_kch2, stride_kcs2, stride_kck, stride_kcd,
                         kslot, stride_kslt, krows, stride_kra, stride_krd,
                         offs_t, t_ok, offs_d, d_ok, DK_SUB)
        s = tl.dot(q, tl.trans(k), input_precision="ieee")
        s = _mask_scores(s, offs_t, t_ok, row_hq, offs_l, row_ok,
                         mask_b, stride_mh, stride_ml, stride_mt, HAS_MASK, IS_CAUSAL)
        m_i, alpha, p, l_i = _online_softmax(m_i, l_i, s)
        v = _decode_tile(vcodes, stride_vct, stride_vcs,
                         vcent_ptr + h * stride_vch2, stride_vcs2, stride_vck, stride_vcd,
                         vslot, stride_vslt, vrows, stride_vra, stride_vrd,
                         offs_t, t_ok, offs_dv, dv_ok, DV_SUB)
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")

    m_i, l_i, acc = _dense_rows_attention(
        q, row_hq, offs_l, row_ok, n_win, T_enc, m_i, l_i, acc,
        mask_b, stride_mh, stride_ml, stride_mt,
        kwin_ptr + b * stride_kwb + h * stride_kwh, stride_kwt, stride_kwd,
        vwin_ptr + b * stride_vwb + h * stride_vwh, stride_vwt, stride_vwd,
        D, DV, BLOCK_D, BLOCK_DV, BLOCK_T, HAS_MASK, IS_CAUSAL, True,
    )

    l_safe = tl.where(l_i > 0, l_i, 1.0)
    lse = tl.where(l_i > 0, m_i + tl.log(l_safe), float("-inf"))
    tl.store(o_ptr + b * stride_ob + hq * stride_oh + offs_l[:, None] * stride_ol
             + offs_dv[None, :] * stride_od, acc / l_safe[:, None],
             mask=row_ok[:, None] & dv_ok[None, :])
    tl.store(lse_ptr + b * stride_lb + hq * stride_lh + offs_l * stride_ll, lse, mask=row_ok)


@triton.jit
def vq_window_scores_program(
    pid_bh, pid_w,
    q_ptr, stride_qb, stride_qh, stride_ql, stride_qd,
    mask_ptr, stride_mb, stride_mh, stride_ml, stride_mt,
    kwin_ptr, stride_kwb, stride_kwh, stride_kwt, stride_kwd,
    vwin_ptr, stride_vwb, stride_vwh, stride_vwt, stride_vwd,
    o_ptr, stride_ob, stride_oh, stride_ol, stride_od,
    lse_ptr, stride_lb, stride_lh, stride_ll,
    scale, Hkv, G, L, T_enc, Tw, D, DV,
    BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_W: tl.constexpr, DV_CHUNK: tl.constexpr,
    HAS_MASK: tl.constexpr, IS_CAUSAL: tl.constexpr,
):
    """The work of one program of `vq_window_scores_kernel` (program ids pid_bh, pid_w), shared
    with the Inductor template: returns S0, S1 [BLOCK_W] of its window tokens and their indices
    (b, h, offs_w, w_ok)."""
    b = pid_bh // Hkv
    h = pid_bh % Hkv
    offs_w = pid_w * BLOCK_W + tl.arange(0, BLOCK_W)
    w_ok = offs_w < Tw
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    kw = tl.load(kwin_ptr + b * stride_kwb + h * stride_kwh + offs_w[:, None] * stride_kwt
                 + offs_d[None, :] * stride_kwd, mask=w_ok[:, None] & d_ok[None, :], other=0.0)
    kw = kw.to(tl.float32)
    vwin = vwin_ptr + b * stride_vwb + h * stride_vwh + offs_w[:, None] * stride_vwt
    mask_b = mask_ptr + b * stride_mb

    s0 = tl.zeros([BLOCK_W], dtype=tl.float32)
    s1 = tl.zeros([BLOCK_W], dtype=tl.float32)
    for g in range(G):
        hq = h * G + g
        row_hq = tl.zeros([BLOCK_L], dtype=tl.int32) + hq
        for i0 in range(0, L, BLOCK_L):
            offs_l = i0 + tl.arange(0, BLOCK_L)
            row_ok = offs_l < L
            q = tl.load(q_ptr + b * stride_qb + hq * stride_qh + offs_l[:, None] * stride_ql
                        + offs_d[None, :] * stride_qd, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
            q = q.to(tl.float32) * scale
            lse = tl.load(lse_ptr + b * stride_lb + hq * stride_lh + offs_l * stride_ll,
                          mask=row_ok, other=float("-inf"))
            s = tl.dot(q, tl.trans(kw), input_precision="ieee")
            s = _mask_scores(s, T_enc + offs_w, w_ok, row_hq, offs_l, row_ok,
                             mask_b, stride_mh, stride_ml, stride_mt, HAS_MASK, IS_CAUSAL)
            live = lse > float("-inf")
            a = tl.exp(s - tl.where(live, lse, 0.0)[:, None])
            a = tl.where(live[:, None], a, 0.0)
            orow = o_ptr + b * stride_ob + hq * stride_oh + offs_l[:, None] * stride_ol
            dist_sq = tl.zeros([BLOCK_L, BLOCK_W], dtype=tl.float32)
            for c0 in range(0, DV, DV_CHUNK):
                offs_c = c0 + tl.arange(0, DV_CHUNK)
                c_ok = offs_c < DV
                o_c = tl.load(orow + offs_c[None, :] * stride_od, mask=row_ok[:, None] & c_ok[None, :], other=0.0)
                v_c = tl.load(vwin + offs_c[None, :] * stride_vwd, mask=w_ok[:, None] & c_ok[None, :], other=0.0)
                diff = o_c[:, None, :] - v_c.to(tl.float32)[None, :, :]
                dist_sq += tl.sum(diff * diff, axis=2)
            q_norm = tl.sqrt(tl.sum(q * q, axis=1))
            s0 += tl.sum(a, axis=0)
            s1 += tl.sum(a * q_norm[:, None] * tl.sqrt(dist_sq), axis=0)
    return s0, s1, b, h, offs_w, w_ok


@triton.jit
def vq_window_scores_kernel(
    q_ptr, stride_qb, stride_qh, stride_ql, stride_qd,
    mask_ptr, stride_mb, stride_mh, stride_ml, stride_mt,
    kwin_ptr, stride_kwb, stride_kwh, stride_kwt, stride_kwd,
    vwin_ptr, stride_vwb, stride_vwh, stride_vwt, stride_vwd,
    o_ptr, stride_ob, stride_oh, stride_ol, stride_od,
    lse_ptr, stride_lb, stride_lh, stride_ll,
    s0_ptr, s1_ptr, stride_sb, stride_sh, stride_st,
    scale, Hkv, G, L, T_enc, Tw, D, DV,
    BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_W: tl.constexpr, DV_CHUNK: tl.constexpr,
    HAS_MASK: tl.constexpr, IS_CAUSAL: tl.constexpr,
):
    """Grid (B * Hkv, cdiv(Tw, BLOCK_W)): a program owns BLOCK_W window tokens and sums over all
    query heads of the group and all queries, A_ij = exp(s_ij - lse_i), so no atomics are needed.
    ||v_j - o_i|| is summed directly over DV_CHUNK-wide column chunks: the expansion
    ||o||^2 - 2 o.v + ||v||^2 would fit a dot but cancels catastrophically exactly where it matters,
    a token that dominates its query's attention (o_i ~ v_j)."""
    s0, s1, b, h, offs_w, w_ok = vq_window_scores_program(
        tl.program_id(0), tl.program_id(1),
        q_ptr, stride_qb, stride_qh, stride_ql, stride_qd,
        mask_ptr, stride_mb, stride_mh, stride_ml, stride_mt,
        kwin_ptr, stride_kwb, stride_kwh, stride_kwt, stride_kwd,
        vwin_ptr, stride_vwb, stride_vwh, stride_vwt, stride_vwd,
        o_ptr, stride_ob, stride_oh, stride_ol, stride_od,
        lse_ptr, stride_lb, stride_lh, stride_ll,
        scale, Hkv, G, L, T_enc, Tw, D, DV,
        BLOCK_L, BLOCK_D, BLOCK_W, DV_CHUNK,
        HAS_MASK, IS_CAUSAL,
    )
    offs_s = b * stride_sb + h * stride_sh + offs_w * stride_st
    tl.store(s0_ptr + offs_s, s0, mask=w_ok)
    tl.store(s1_ptr + offs_s, s1, mask=w_ok)


# --- launchers -----------------------------------------------------------------------------------


def _check_side(name: str, parts: Side, B: int, Hkv: int, dtype: torch.dtype, device) -> None:
    codes, cent, rows, pos, win = (parts.codes, parts.centroids, parts.anchor_rows,
                                   parts.anchor_pos, parts.window)
    if cent.dtype != torch.float32 or cent.dim() != 4:
        raise TypeError(f"{name}.centroids must be float32 [H, S, K, d], got {cent.dtype} {tuple(cent.shape)}")
    if codes.dim() != 4 or win.dim() != 4:
        raise ValueError(f"{name}.codes and {name}.window must be 4-d [B, H, T, .], got "
                         f"{tuple(codes.shape)} and {tuple(win.shape)}")
    H, S, K, d = cent.shape
    D = S * d
    if K & (K - 1) or d & (d - 1):
        raise ValueError(f"{name}: centroids per subspace K={K} and subspace dim d={d} must be powers of two")
    if codes.dtype not in (torch.uint8, torch.int16):
        raise TypeError(f"{name}.codes must be uint8 or int16, got {codes.dtype}")
    if pos.dtype != torch.int32:
        raise TypeError(f"{name}.anchor_pos must be int32, got {pos.dtype}")
    if rows.dtype != win.dtype or win.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name}.anchor_rows ({rows.dtype}) and {name}.window ({win.dtype}) must share "
                        f"one float dtype (the query's, {dtype}, or a narrower exact-row dtype)")
    A = pos.shape[-1] if pos.dim() == 3 else -1
    want = {"codes": (B, Hkv, codes.shape[2], S), "centroids": (Hkv, S, K, d),
            "anchor_rows": (B, Hkv, A, D), "anchor_pos": (B, Hkv, A), "window": (B, Hkv, win.shape[2], D)}
    for field, shape in want.items():
        got = tuple(getattr(parts, field).shape)
        if got != shape:
            raise ValueError(f"{name}.{field} has shape {got}, expected {shape}")
        if getattr(parts, field).device != device:
            raise ValueError(f"{name}.{field} is on {getattr(parts, field).device}, query on {device}")
    if win.shape[2] > codes.shape[2]:
        raise ValueError(f"{name}: window of {win.shape[2]} rows exceeds the {codes.shape[2]} positions")


def _check_inputs(q: torch.Tensor, k: Side, v: Side, attn_mask: torch.Tensor | None):
    """Validate shapes/dtypes; returns (G, T, Tw, additive float mask expanded to [B, Hq, L, T] or None)."""
    if q.dim() != 4:
        raise ValueError(f"q must be [B, Hq, L, D], got {tuple(q.shape)}")
    if q.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"q must be float32/float16/bfloat16, got {q.dtype}")
    B, Hq, L, D = q.shape
    Hkv = k.codes.shape[1] if k.codes.dim() == 4 else -1
    if Hkv <= 0 or Hq % Hkv:
        raise ValueError(f"{Hq} query heads are not a multiple of the {Hkv} kv heads")
    _check_side("k", k, B, Hkv, q.dtype, q.device)
    _check_side("v", v, B, Hkv, q.dtype, q.device)
    if k.window.shape[-1] != D:
        raise ValueError(f"key head_dim {k.window.shape[-1]} differs from the query's {D}")
    T, Tw = k.codes.shape[2], k.window.shape[2]
    if v.codes.shape[2] != T or v.window.shape[2] != Tw:
        raise ValueError(f"keys hold {T} positions ({Tw} in the window), values "
                         f"{v.codes.shape[2]} ({v.window.shape[2]})")
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            attn_mask = torch.where(attn_mask, 0.0, float("-inf"))
        elif attn_mask.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"attn_mask must be bool or float, got {attn_mask.dtype}")
        try:
            attn_mask = attn_mask.expand(B, Hq, L, T)
        except RuntimeError:
            raise ValueError(f"attn_mask of shape {tuple(attn_mask.shape)} does not broadcast to "
                             f"{(B, Hq, L, T)}") from None
    return Hq // Hkv, T, Tw, attn_mask


def _anchor_slots(pos: torch.Tensor, t_enc: int) -> torch.Tensor:
    """Position -> anchor slot map [B, H, t_enc] (-1 = no anchor), so a tile of positions finds its
    exact rows with one load. Slots at window positions are dropped: the window wins there."""
    B, H, A = pos.shape
    dtype = torch.int16 if A < 2**15 else torch.int32
    slots = torch.full((B, H, t_enc + 1), -1, dtype=dtype, device=pos.device)
    idx = torch.where((pos >= 0) & (pos < t_enc), pos.long(), t_enc)
    slots.scatter_(2, idx, torch.arange(A, dtype=dtype, device=pos.device).expand(B, H, A))
    return slots[:, :, :t_enc]


def _side_args(parts: Side, slots: torch.Tensor) -> list:
    return [parts.codes, *parts.codes.stride(), parts.centroids, *parts.centroids.stride(),
            slots, *slots.stride(), parts.anchor_rows, *parts.anchor_rows.stride(),
            parts.window, *parts.window.stride()]


def _mask_args(mask: torch.Tensor | None, q: torch.Tensor) -> list:
    return [q, 0, 0, 0, 0] if mask is None else [mask, *mask.stride()]


# Launch configurations. tests/test_triton_sm90.py compiles each kernel with these for sm_90 and
# checks shared memory and register spills (e.g. 32-query or 32-key tiles at D=128 spilled with
# float32 dots).


def decode_config(G: int, L: int, D: int, DV: int) -> dict:
    BLOCK_M = triton.next_power_of_2(G * L)
    BLOCK_D, BLOCK_DV = triton.next_power_of_2(D), triton.next_power_of_2(DV)
    # Broadcast products are [rows, BLOCK_T, head_dim]: keep them near 8K elements.
    BLOCK_T = max(8, min(64, 8192 // (BLOCK_M * max(BLOCK_D, BLOCK_DV))))
    return dict(BLOCK_M=BLOCK_M, BLOCK_D=BLOCK_D, BLOCK_DV=BLOCK_DV, BLOCK_T=BLOCK_T, num_warps=4)


def prefill_config(D: int, DV: int) -> dict:
    BLOCK_D, BLOCK_DV = max(16, triton.next_power_of_2(D)), max(16, triton.next_power_of_2(DV))
    wide = max(BLOCK_D, BLOCK_DV) > 64
    return dict(BLOCK_L=16, BLOCK_D=BLOCK_D, BLOCK_DV=BLOCK_DV, BLOCK_T=16 if wide else 32,
                num_warps=8 if wide else 4)


def window_scores_config(D: int, DV: int) -> dict:
    BLOCK_D = max(16, triton.next_power_of_2(D))
    # BLOCK_W = 32 at D = 64 spilled 240 bytes per thread on sm_90 (tests/test_triton_sm90.py).
    return dict(BLOCK_L=16, BLOCK_D=BLOCK_D, BLOCK_W=16,
                DV_CHUNK=min(16, triton.next_power_of_2(DV)), num_warps=4)


def vq_decode_attention(
    q: torch.Tensor,
    k: Side,
    v: Side,
    attn_mask: torch.Tensor | None = None,
    scale: float | None = None,
    is_causal: bool = False,
    num_splits: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SDPA of q [B, Hq, L, D] (L <= 16) over the compressed K and V, Hq a multiple of Hkv (GQA).

    attn_mask: bool (True = keep) or additive float, broadcastable to [B, Hq, L, T]; is_causal is
    SDPA's top-left alignment (query i sees keys j <= i). num_splits: splits of the encoded
    positions (flash-decoding); default about one per 256 positions, at most 64.
    Returns (out [B, Hq, L, Dv] in q's dtype, lse [B, Hq, L] float32); a fully masked row gives
    out 0 and lse -inf, as torch SDPA does.
    """
    G, T, Tw, mask = _check_inputs(q, k, v, attn_mask)
    B, Hq, L, D = q.shape
    if L > MAX_DECODE_QUERIES:
        raise ValueError(f"decode attention takes at most {MAX_DECODE_QUERIES} queries, got {L}: "
                         f"use vq_prefill_attention")
    Hkv = Hq // G
    _, SK, KK, DK_SUB = k.centroids.shape
    DV = v.centroids.shape[1] * v.centroids.shape[3]
    scale = 1 / math.sqrt(D) if scale is None else scale
    T_enc = T - Tw
    cfg = decode_config(G, L, D, DV)
    BLOCK_T = cfg["BLOCK_T"]
    if num_splits is None:
        num_splits = min(triton.cdiv(T_enc, 256), 64)
    num_splits = max(min(num_splits, triton.cdiv(T_enc, BLOCK_T)), 1 if T_enc else 0)
    split_len = triton.cdiv(triton.cdiv(T_enc, num_splits), BLOCK_T) * BLOCK_T if num_splits else 0

    # LUT[b, h, g*L + i, s*K + k] = scale * q[b, h*G + g, i, s*d:(s+1)*d] . centroid[h, s, k]
    lut = torch.einsum("bhmsd,hskd->bhmsk", q.float().reshape(B, Hkv, G * L, SK, DK_SUB) * scale,
                       k.centroids).flatten(-2)
    o_part = torch.empty(B, Hq, L, num_splits + 1, DV, dtype=torch.float32, device=q.device)
    lse_part = torch.empty(B, Hq, L, num_splits + 1, dtype=torch.float32, device=q.device)
    vq_decode_kernel[(B * Hkv, num_splits + 1)](
        q, *q.stride(), *_mask_args(mask, q),
        *_side_args(k, _anchor_slots(k.anchor_pos, T_enc)),
        *_side_args(v, _anchor_slots(v.anchor_pos, T_enc)),
        lut, *lut.stride(), o_part, *o_part.stride(), lse_part, *lse_part.stride(),
        scale, Hkv, G, L, T_enc, Tw, split_len, num_splits, D, DV, SK,
        KK=KK, DV_SUB=v.centroids.shape[3],
        BLOCK_SK=triton.next_power_of_2(SK), **cfg,
        HAS_MASK=mask is not None, IS_CAUSAL=is_causal,
    )
    # Merge the splits by their log-sum-exp; empty splits carry lse = -inf and weigh nothing.
    lse = torch.logsumexp(lse_part, dim=-1)
    weight = torch.exp(lse_part - lse[..., None]).nan_to_num(0.0)
    out = (weight[..., None] * o_part).sum(-2)
    return out.to(q.dtype), lse


def _prefill(q, k, v, G, T, Tw, mask, scale, is_causal):
    B, Hq, L, D = q.shape
    _, SV, _, DV_SUB = v.centroids.shape
    DV = SV * DV_SUB
    T_enc = T - Tw
    out = torch.empty(B, Hq, L, DV, dtype=torch.float32, device=q.device)
    lse = torch.empty(B, Hq, L, dtype=torch.float32, device=q.device)
    cfg = prefill_config(D, DV)
    vq_prefill_kernel[(B * Hq, triton.cdiv(L, cfg["BLOCK_L"]))](
        q, *q.stride(), *_mask_args(mask, q),
        *_side_args(k, _anchor_slots(k.anchor_pos, T_enc)),
        *_side_args(v, _anchor_slots(v.anchor_pos, T_enc)),
        out, *out.stride(), lse, *lse.stride(),
        scale, Hq, G, L, T_enc, Tw, D, DV,
        DK_SUB=k.centroids.shape[-1], DV_SUB=DV_SUB,
        **cfg, HAS_MASK=mask is not None, IS_CAUSAL=is_causal,
    )
    return out, lse


def _window_scores(q, k, v, out, lse, G, T, Tw, mask, scale, is_causal):
    B, Hq, L, D = q.shape
    Hkv, DV = Hq // G, out.shape[-1]
    s0 = torch.zeros(B, Hkv, Tw, dtype=torch.float32, device=q.device)
    s1 = torch.zeros_like(s0)
    if Tw == 0 or L == 0:
        return s0, s1
    cfg = window_scores_config(D, DV)
    vq_window_scores_kernel[(B * Hkv, triton.cdiv(Tw, cfg["BLOCK_W"]))](
        q, *q.stride(), *_mask_args(mask, q),
        k.window, *k.window.stride(), v.window, *v.window.stride(),
        out, *out.stride(), lse, *lse.stride(),
        s0, s1, *s0.stride(),
        scale, Hkv, G, L, T - Tw, Tw, D, DV,
        **cfg, HAS_MASK=mask is not None, IS_CAUSAL=is_causal,
    )
    return s0, s1


def vq_prefill_attention(
    q: torch.Tensor,
    k: Side,
    v: Side,
    attn_mask: torch.Tensor | None = None,
    scale: float | None = None,
    is_causal: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """SDPA of q [B, Hq, L, D] over the compressed past plus the new tokens (in the window), with
    the Anchor Score sums of the window tokens.

    Mask and causal semantics as in `vq_decode_attention`. Returns (out [B, Hq, L, Dv] in q's dtype,
    lse [B, Hq, L], S0 [B, Hkv, Tw], S1 [B, Hkv, Tw]), all but out float32, with
    S0_j = sum_{g, i} A_ij and S1_j = sum_{g, i} A_ij * scale * ||q_i|| * ||v_j - o_i||.
    """
    G, T, Tw, mask = _check_inputs(q, k, v, attn_mask)
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    out, lse = _prefill(q, k, v, G, T, Tw, mask, scale, is_causal)
    s0, s1 = _window_scores(q, k, v, out, lse, G, T, Tw, mask, scale, is_causal)
    return out.to(q.dtype), lse, s0, s1


def vq_window_scores(
    q: torch.Tensor,
    k: Side,
    v: Side,
    out: torch.Tensor,
    lse: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    scale: float | None = None,
    is_causal: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Anchor Score sums (S0, S1) [B, Hkv, Tw] of the window tokens for an attention pass that
    already produced out [B, Hq, L, Dv] and lse [B, Hq, L] (e.g. `vq_decode_attention`)."""
    G, T, Tw, mask = _check_inputs(q, k, v, attn_mask)
    B, Hq, L, _ = q.shape
    if out.shape != (B, Hq, L, v.window.shape[-1]) or lse.shape != (B, Hq, L):
        raise ValueError(f"out {tuple(out.shape)} / lse {tuple(lse.shape)} do not match the queries")
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    return _window_scores(q, k, v, out.float(), lse.float(), G, T, Tw, mask, scale, is_causal)
