"""VQ decode / prefill attention and window Anchor Score sums (Triton, interpreted on CPU) against
a float64 reference: dequantize the cache, then torch SDPA and the dense Anchor Score."""

import math
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import given, strategies as st  # noqa: E402
from helpers import random_parts  # noqa: E402
from reference import attention_from_parts  # noqa: E402

from antkv_compile.ops.triton.attention import (  # noqa: E402
    vq_decode_attention,
    vq_prefill_attention,
    vq_window_scores,
)


# --- comparing with the reference (reference.attention_from_parts) -------------------------------


def assert_close_scaled(got, want, tol):
    """|got - want| <= tol * max(1, max |want|) elementwise (infinities must match exactly)."""
    finite = want[torch.isfinite(want)]
    scale = max(1.0, finite.abs().max().item()) if finite.numel() else 1.0
    torch.testing.assert_close(got.double(), want, atol=tol * scale, rtol=tol)


# --- random caches ------------------------------------------------------------------------------


def random_mask(g, kind, B, Hq, L, T):
    if kind == "none":
        return None
    pad = torch.randint(0, T, (B,), generator=g)
    if kind == "padding":  # HF left padding: the first pad[b] keys of sequence b are padding
        return (torch.arange(T) >= pad[:, None])[:, None, None, :]
    if kind == "padding_causal":  # new queries sit at the last L positions; pad query rows see nothing
        qpos = torch.arange(T - L, T) if L <= T else torch.arange(L)
        causal = torch.arange(T)[None, :] <= qpos[:, None]
        return causal[None, None] & (torch.arange(T) >= pad[:, None])[:, None, None, :]
    bias = torch.randn(B, Hq, L, T, generator=g)  # additive, with some -inf
    return bias.masked_fill(torch.rand(B, Hq, L, T, generator=g) < 0.2, -math.inf)


@st.composite
def attention_cases(draw, max_queries):
    B = draw(st.integers(1, 2))
    Hkv = draw(st.integers(1, 2))
    G = draw(st.sampled_from([1, 3]))
    L = draw(st.integers(1, max_queries))
    D = draw(st.sampled_from([32, 64]))
    dk, dv = draw(st.sampled_from([4, 8, 16])), draw(st.sampled_from([4, 8, 16]))
    Kk, Kv = draw(st.sampled_from([16, 64, 256])), draw(st.sampled_from([16, 64, 256]))
    T = draw(st.integers(1, 200))
    Tw = draw(st.integers(0, min(T, 40)))
    A = draw(st.integers(0, 6))
    dtype = draw(st.sampled_from([torch.float32] * 3 + [torch.float16, torch.bfloat16]))
    # exact rows (anchors, window) in the query's dtype, or narrower (CacheSettings.exact_dtype)
    exact = draw(st.sampled_from([dtype, torch.float16])) if dtype == torch.float32 else dtype
    mask_kind = draw(st.sampled_from(["none", "padding", "padding_causal", "additive"]))
    is_causal = draw(st.booleans()) if mask_kind == "none" else draw(st.sampled_from([False] * 3 + [True]))
    scale = draw(st.sampled_from([None, 0.3]))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    k = random_parts(g, B, Hkv, T, Tw, A, D // dk, Kk, dk, exact)
    v = random_parts(g, B, Hkv, T, Tw, A, D // dv, Kv, dv, exact)
    q = torch.randn(B, G * Hkv, L, D, generator=g).to(dtype)
    mask = random_mask(g, mask_kind, B, G * Hkv, L, T)
    return q, k, v, mask, scale, is_causal, draw(st.sampled_from([None, 1, 2, 5]))


TOL = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


# --- tests ---------------------------------------------------------------------------------------


@given(attention_cases(max_queries=4))
def test_decode_matches_reference(case):
    q, k, v, mask, scale, is_causal, num_splits = case
    out, lse = vq_decode_attention(q, k, v, mask, scale=scale, is_causal=is_causal, num_splits=num_splits)
    ref_out, ref_lse, _, _ = attention_from_parts(q, k, v, mask, scale, is_causal)
    assert out.dtype == q.dtype and lse.dtype == torch.float32
    assert_close_scaled(out, ref_out, TOL[q.dtype])
    assert_close_scaled(lse, ref_lse, 1e-4)


@given(attention_cases(max_queries=40))
def test_prefill_matches_reference(case):
    q, k, v, mask, scale, is_causal, _ = case
    out, lse, s0, s1 = vq_prefill_attention(q, k, v, mask, scale=scale, is_causal=is_causal)
    ref_out, ref_lse, ref_s0, ref_s1 = attention_from_parts(q, k, v, mask, scale, is_causal)
    assert out.dtype == q.dtype
    assert s0.shape == s1.shape == k.window.shape[:3]
    assert_close_scaled(out, ref_out, TOL[q.dtype])
    assert_close_scaled(lse, ref_lse, 1e-4)
    # o is rounded to q's dtype only at the very end; S1 uses the float32 o.
    assert_close_scaled(s0, ref_s0, 1e-4)
    assert_close_scaled(s1, ref_s1, 1e-4)


def _case(seed=0, B=2, Hkv=2, G=3, L=1, T=150, Tw=5, A=4, S=8, K=64, d=8, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    k = random_parts(g, B, Hkv, T, Tw, A, S, K, d, dtype)
    v = random_parts(g, B, Hkv, T, Tw, A, S, K, d, dtype)
    return torch.randn(B, G * Hkv, L, S * d, generator=g).to(dtype), k, v


def test_decode_then_window_scores_equals_prefill():
    q, k, v = _case(L=3)
    out, lse = vq_decode_attention(q, k, v, num_splits=3)
    s0, s1 = vq_window_scores(q, k, v, out, lse)
    p_out, p_lse, p_s0, p_s1 = vq_prefill_attention(q, k, v)
    torch.testing.assert_close(out, p_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, p_lse, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(s0, p_s0, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(s1, p_s1, atol=1e-5, rtol=1e-5)


def test_int16_codes_and_different_value_codebook():
    """c > 8 (int16 codes) on keys; values with their own (d, c) and head dim."""
    g = torch.Generator().manual_seed(3)
    k = random_parts(g, 1, 2, 90, 4, 3, S=4, K=512, d=8, dtype=torch.float32)
    v = random_parts(g, 1, 2, 90, 4, 3, S=4, K=16, d=4, dtype=torch.float32)  # Dv = 16
    q = torch.randn(1, 4, 2, 32, generator=g)
    ref = attention_from_parts(q, k, v, None, None, False)
    out, lse = vq_decode_attention(q, k, v)
    assert out.shape == (1, 4, 2, 16)
    assert_close_scaled(out, ref[0], 1e-4)
    out, lse, s0, s1 = vq_prefill_attention(q, k, v)
    for got, want in zip((out, lse, s0, s1), ref):
        assert_close_scaled(got, want, 1e-4)


def test_everything_in_window_and_no_window():
    for Tw in (0, 40):
        q, k, v = _case(T=40, Tw=Tw, L=2)
        ref = attention_from_parts(q, k, v, None, None, False)
        assert_close_scaled(vq_decode_attention(q, k, v)[0], ref[0], 1e-4)
        for got, want in zip(vq_prefill_attention(q, k, v), ref):
            assert_close_scaled(got, want, 1e-4)


def test_fully_masked_rows_give_zero_and_minus_inf():
    q, k, v = _case(L=2)
    mask = torch.ones(2, 1, 2, 150, dtype=torch.bool)
    mask[1, :, 0] = False
    out, lse = vq_decode_attention(q, k, v, mask)
    assert (out[1, :, 0] == 0).all() and (lse[1, :, 0] == -math.inf).all()
    assert torch.isfinite(out).all()
    ref = attention_from_parts(q, k, v, mask, None, False)
    assert_close_scaled(out, ref[0], 1e-4)


def _bad(**change):
    q, k, v = _case()
    args = {"q": q, "k": k, "v": v}
    for key, fn in change.items():
        args[key] = fn(args[key])
    return args


@pytest.mark.parametrize(
    "change, error, match",
    [
        ({"q": lambda q: q[..., :32]}, ValueError, "head_dim|anchor_rows|window"),
        ({"q": lambda q: q[:, :5]}, ValueError, "multiple"),
        ({"q": lambda q: q.double()}, TypeError, "float32/float16/bfloat16"),
        ({"k": lambda k: k._replace(window=k.window.half())}, TypeError, "share one float dtype"),
        ({"k": lambda k: k._replace(codes=k.codes.int())}, TypeError, "uint8 or int16"),
        ({"k": lambda k: k._replace(anchor_pos=k.anchor_pos.long())}, TypeError, "int32"),
        ({"k": lambda k: k._replace(centroids=k.centroids[:, :, :48])}, ValueError, "powers of two"),
        ({"v": lambda v: v._replace(codes=v.codes[:, :, :100])}, ValueError, "positions"),
        ({"v": lambda v: v._replace(window=v.window[:, :, :2])}, ValueError, "window"),
    ],
)
def test_rejects_bad_inputs(change, error, match):
    args = _bad(**change)
    with pytest.raises(error, match=match):
        vq_decode_attention(**args)
    with pytest.raises(error, match=match):
        vq_prefill_attention(**args)


def test_rejects_bad_mask_and_too_many_decode_queries():
    q, k, v = _case()
    with pytest.raises(ValueError, match="broadcast"):
        vq_decode_attention(q, k, v, torch.ones(3, 1, 1, 150, dtype=torch.bool))
    with pytest.raises(TypeError, match="bool or float"):
        vq_prefill_attention(q, k, v, torch.ones(1, 1, 1, 150, dtype=torch.int64))
    q, k, v = _case(L=17)
    with pytest.raises(ValueError, match="vq_prefill_attention"):
        vq_decode_attention(q, k, v)


@given(
    seed=st.integers(0, 2**31 - 1),
    L=st.sampled_from([1, 3, 16, 17, 24]),
    G=st.sampled_from([1, 3]),
    key_basis=st.booleans(),
    mask_kind=st.sampled_from(["none", "padding", "additive"]),
)
def test_cuda_kernel_of_the_op(seed, L, G, key_basis, mask_kind):
    """ops.attention_cuda, what antkv::attention runs on CUDA tensors outside compiled graphs
    (decode kernel up to 16 queries, prefill kernel above, then the window's Anchor Score), here on
    CPU tensors in the interpreter: the output and the score against the float64 reference, with
    the query mapped into the key basis in float64 here."""
    from antkv_compile import ops

    g = torch.Generator().manual_seed(seed)
    B, Hkv, T, Tw, A, S, K, d = 2, 2, 90, 7, 4, 8, 64, 4
    k = random_parts(g, B, Hkv, T, Tw, A, S, K, d, torch.float32, window_err=True)
    v = random_parts(g, B, Hkv, T, Tw, A, S, K, d, torch.float32, window_err=True)
    q = torch.randn(B, G * Hkv, L, S * d, generator=g)
    qb = q.double()
    if key_basis:
        a = torch.eye(S * d) + 0.3 * torch.randn(Hkv, S * d, S * d, generator=g) / (S * d) ** 0.5
        k = k._replace(basis=a, basis_inv=torch.linalg.inv(a))
        qb = torch.einsum("bhgld,hed->bhgle", qb.view(B, Hkv, G, L, S * d), k.basis_inv.double()).reshape(q.shape)
    mask = random_mask(g, mask_kind, B, G * Hkv, L, T)
    out, score = ops.attention_cuda(q, list(k), list(v), mask, False, None)
    ref_out, _, s0, s1 = attention_from_parts(qb, k, v, mask, None, False)
    assert_close_scaled(out, ref_out, 1e-4)
    assert_close_scaled(score, k.window_err.double() * s1 + v.window_err.double() * s0, 1e-3)
