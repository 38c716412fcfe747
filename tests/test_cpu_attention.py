"""The CPU kernel of antkv::attention (antkv_compile/ops/cpu/) against dense float64 attention on the
cache it stands for, built from the raw inner tensors (tests/reference.py: no package code)."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from helpers import full_side
from reference import attention_from_parts

from antkv_compile import ops
from antkv_compile.ops import cpu

# (sub_dim, code_bits): 4, 2, 1, 0.5, 0.375 bits, and 10-bit codes (int16, 1024 centroids).
SPECS = [(2, 8), (4, 8), (8, 8), (16, 8), (16, 6), (8, 10)]


def _side(g, B, H, Tc, Tw, A, D, spec, dtype, empty_slots, codes_view):
    """Random inner tensors of one side of a cache: codes of T = Tc + Tw tokens, A anchor slots at
    distinct encoded positions (some empty: -1, with garbage rows), a window of Tw exact rows."""
    d, c = spec
    S, K = D // d, 1 << c
    T = Tc + Tw
    codes = torch.randint(0, K, (B, H, T + 3 * codes_view, S), generator=g).to(torch.uint8 if c <= 8 else torch.int16)
    if codes_view:  # a cropped cache's codes: a view whose batch / head strides are not T * S
        codes = codes[:, :, :T]
    A = min(A, Tc)
    pos = torch.stack([torch.randperm(Tc, generator=g)[:A] for _ in range(B * H)]).view(B, H, A).to(torch.int32)
    pos = pos.masked_fill(torch.rand(B, H, A, generator=g) < empty_slots, -1)
    return full_side(
        codes=codes,
        centroids=torch.randn(H, S, K, d, generator=g),
        anchor_rows=torch.randn(B, H, A, D, generator=g).to(dtype),
        anchor_pos=pos,
        window=torch.randn(B, H, Tw, D, generator=g).to(dtype),
        window_err=torch.rand(B, H, Tw, generator=g),
    )


def _reference(q, k, v, mask, is_causal, scale):
    """(out, window score) in float64 (tests/reference.py): SDPA on the dense K / V and the Anchor
    Score of the window tokens, AS_t = e_k,t * S1_t + e_v,t * S0_t."""
    out, _, s0, s1 = attention_from_parts(q, k, v, mask, scale, is_causal)
    return out, k.window_err.double() * s1 + v.window_err.double() * s0


@pytest.fixture(scope="module", autouse=True)
def _built():
    if not cpu.extension():
        pytest.fail("the CPU attention kernel did not build")


@given(
    seed=st.integers(0, 2**31 - 1),
    batch=st.integers(1, 2),
    kv_heads=st.integers(1, 3),
    group=st.sampled_from([1, 2, 3, 4]),
    q_len=st.sampled_from([1, 1, 2, 5]),
    head_dim=st.sampled_from([32, 64, 128]),
    k_spec=st.sampled_from(SPECS),
    v_spec=st.sampled_from(SPECS),
    encoded=st.sampled_from([0, 1, 7, 100, 300]),
    window=st.sampled_from([0, 1, 5, 33]),
    anchors=st.sampled_from([0, 1, 4, 9]),
    empty_slots=st.sampled_from([0.0, 0.3, 1.0]),
    mask_kind=st.sampled_from(["none", "bool", "additive", "padding"]),
    mask_shape=st.sampled_from(["LT", "B1LT", "BHLT"]),
    is_causal=st.booleans(),
    scale=st.sampled_from([None, 0.05, 0.3]),
    codes_view=st.booleans(),
    dtype=st.sampled_from([torch.float32, torch.float32, torch.bfloat16]),
    chunk_tokens=st.sampled_from([2048, 1, 16, 50]),  # small: the sequence is split and merged
)
def test_kernel_equals_dense_attention_on_the_dequantized_cache(
    seed, batch, kv_heads, group, q_len, head_dim, k_spec, v_spec, encoded, window, anchors, empty_slots,
    mask_kind, mask_shape, is_causal, scale, codes_view, dtype, chunk_tokens,
):  # fmt: skip
    g = torch.Generator().manual_seed(seed)
    B, H, L, D, T = batch, kv_heads, q_len, head_dim, encoded + window
    k = _side(g, B, H, encoded, window, anchors, D, k_spec, dtype, empty_slots, codes_view)
    v = _side(g, B, H, encoded, window, anchors, D, v_spec, dtype, empty_slots, codes_view)
    q = (2 * torch.randn(B, H * group, L, D, generator=g)).to(dtype)
    shape = {"LT": (L, T), "B1LT": (B, 1, L, T), "BHLT": (B, H * group, L, T)}[mask_shape]
    keep = torch.rand(shape, generator=g) > 0.3
    if mask_kind == "padding":  # left padding as HF builds it; the last query row of batch 0 sees nothing
        keep = torch.arange(T) >= torch.randint(0, T + 1, shape[:-1] + (1,), generator=g)
        keep[(0,) * (len(shape) - 2) + (L - 1,)] = False
    mask = {
        "none": None,
        "bool": keep,
        "padding": keep,
        "additive": torch.where(keep, 0.0, -math.inf) + torch.randn(shape, generator=g),
    }[mask_kind]
    assert cpu.supported(q, k)  # the kernel, not the fallback, is under test
    out, score = cpu.attention(q, k, v, mask, is_causal, scale, chunk_tokens=chunk_tokens)
    ref_out, ref_score = _reference(q, k, v, mask, is_causal, scale)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    assert out.dtype == dtype and out.shape == q.shape and score.shape == (B, H, window)
    torch.testing.assert_close(out.double(), ref_out, rtol=tol, atol=tol)
    biggest = ref_score.abs().max().item() if ref_score.numel() else 0.0
    torch.testing.assert_close(score.double(), ref_score, rtol=1e-3, atol=1e-3 * (1 + biggest))
    # the custom op on CPU tensors dispatches to the same kernel
    op_out, op_score = torch.ops.antkv.attention(q, list(k), list(v), mask, is_causal, scale)
    if chunk_tokens == 2048:  # same split of the sequence: same result to the bit
        assert torch.equal(op_out, out) and torch.equal(op_score, score)
    torch.testing.assert_close(op_out, out, rtol=tol, atol=tol)


@given(seed=st.integers(0, 2**31 - 1), q_len=st.sampled_from([1, 3]), spec=st.sampled_from(SPECS))
def test_kernel_and_reference_agree_where_the_op_switches(seed, q_len, spec):
    """Above cpu.MAX_ROWS rows the op runs the PyTorch reference: both give the same answer."""
    g = torch.Generator().manual_seed(seed)
    B, H, G, D = 2, 2, 3, 64
    k = _side(g, B, H, 200, 8, 3, D, spec, torch.float32, 0.3, False)
    v = _side(g, B, H, 200, 8, 3, D, spec, torch.float32, 0.3, False)
    q = torch.randn(B, H * G, q_len, D, generator=g)
    mask = torch.randn(B, 1, q_len, 208, generator=g)
    # not causal: top-left causal would hide all but the first keys
    out, score = cpu.attention(q, k, v, mask, False, None, chunk_tokens=32)
    ref_out, ref_score = ops.attention_reference(q, k, v, mask, False, None)
    torch.testing.assert_close(out, ref_out, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(score, ref_score, rtol=1e-4, atol=1e-5)


def test_large_calls_fall_back_to_the_reference(monkeypatch):
    g = torch.Generator().manual_seed(0)
    k = _side(g, 1, 1, 50, 4, 2, 32, (8, 8), torch.float32, 0.0, False)
    v = _side(g, 1, 1, 50, 4, 2, 32, (8, 8), torch.float32, 0.0, False)
    q = torch.randn(1, 2, 3, 32, generator=g)
    assert cpu.supported(q, k)
    monkeypatch.setattr(cpu, "MAX_ROWS", 4)
    assert not cpu.supported(q, k)
    called = []
    monkeypatch.setattr(cpu, "attention", lambda *a: called.append(1))
    out, _ = torch.ops.antkv.attention(q, list(k), list(v), None, False, None)
    assert not called
    torch.testing.assert_close(out.double(), _reference(q, k, v, None, False, None)[0], rtol=1e-4, atol=1e-4)
