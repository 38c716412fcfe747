"""The compressed cache: every op equals the same op on its dequantized form (docs/DESIGN.md contract 1),
quantize-on-write, anchor selection, crop / batch select, bytes held."""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from reference import nearest_centroid_decode

from antkv_compile import CacheSettings, CodebookSide, VQTensor, dequantize
from antkv_compile.quant.pq import spec_for_bits


def _codebook(heads, head_dim, bits, g):
    spec = spec_for_bits(bits)
    S = spec.num_subspaces(head_dim)
    return spec, torch.randn(heads, S, spec.num_centroids, spec.sub_dim, generator=g), torch.rand(heads, generator=g)


def _basis(heads, head_dim, g):
    """A random invertible key basis and its inverse (condition number at most 4)."""
    q1 = torch.linalg.qr(torch.randn(heads, head_dim, head_dim, generator=g, dtype=torch.float64))[0]
    q2 = torch.linalg.qr(torch.randn(heads, head_dim, head_dim, generator=g, dtype=torch.float64))[0]
    a = q1 @ torch.diag_embed(0.5 + 1.5 * torch.rand(heads, head_dim, generator=g, dtype=torch.float64)) @ q2
    return a.float(), torch.linalg.inv(a).float()


def _empty(batch, heads, head_dim, bits, settings, g, dtype=torch.float32, basis=False):
    spec, centroids, err = _codebook(heads, head_dim, bits, g)
    a, a_inv = _basis(heads, head_dim, g) if basis else (None, None)
    return VQTensor.empty(batch, CodebookSide(spec, centroids, err, a, a_inv), settings, dtype=dtype)


def _sdpa_both(q, kc, vc, mask=None, **kw):
    got = F.scaled_dot_product_attention(q, kc, vc, attn_mask=mask, **kw)
    ref = F.scaled_dot_product_attention(
        q.double(), dequantize(kc).double(), dequantize(vc).double(),
        attn_mask=mask if mask is None or mask.dtype == torch.bool else mask.double(), **kw,
    )  # fmt: skip
    return got, ref


@given(
    seed=st.integers(0, 2**31 - 1),
    batch=st.integers(1, 2),
    kv_heads=st.integers(1, 3),
    group=st.sampled_from([1, 2, 3]),
    head_dim=st.sampled_from([32, 64, 128]),
    k_bits=st.sampled_from([4.0, 2.0, 1.0, 0.5, 0.375]),
    v_bits=st.sampled_from([2.0, 1.0, 0.5, 0.375]),
    window=st.sampled_from([0, 1, 4, 16]),
    anchor_frac=st.sampled_from([0.0, 0.01, 0.1, 0.5]),
    error=st.sampled_from(["actual", "expected"]),
    steps=st.lists(st.integers(1, 24), min_size=1, max_size=5),
    mask_kind=st.sampled_from(["bool", "additive", "none"]),
    key_basis=st.booleans(),
    exact_dtype=st.sampled_from([None, torch.float16, torch.bfloat16]),
)
def test_sdpa_on_cache_equals_sdpa_on_dequantized(
    seed, batch, kv_heads, group, head_dim, k_bits, v_bits, window, anchor_frac, error, steps, mask_kind, key_basis, exact_dtype
):
    """Prefill then decode steps / chunks: VQ attention == dense SDPA on dequantize(K), dequantize(V),
    with keys stored in a key basis or not, exact rows in the model's dtype or a narrower one."""
    g = torch.Generator().manual_seed(seed)
    settings = CacheSettings(window=window, anchor_frac=anchor_frac, error=error, exact_dtype=exact_dtype)
    kc = _empty(batch, kv_heads, head_dim, k_bits, settings, g, basis=key_basis)
    vc = _empty(batch, kv_heads, head_dim, v_bits, settings, g)
    pad = torch.randint(0, 6, (batch,), generator=g)  # left padding; may mask a whole row
    for n in steps:
        kc = torch.cat([kc, torch.randn(batch, kv_heads, n, head_dim, generator=g)], dim=-2)
        vc = torch.cat([vc, torch.randn(batch, kv_heads, n, head_dim, generator=g)], dim=-2)
        T = kc.shape[2]
        q = 2 * torch.randn(batch, kv_heads * group, n, head_dim, generator=g)
        keep = torch.ones(batch, 1, n, T, dtype=torch.bool).tril(T - n)
        keep &= torch.arange(T)[None, None, None, :] >= pad[:, None, None, None]
        mask = {"bool": keep, "additive": torch.where(keep, 0.0, float("-inf")) + 0.1 * torch.randn(keep.shape, generator=g), "none": None}[mask_kind]
        got, ref = _sdpa_both(q, kc, vc, mask, enable_gqa=group > 1)
        assert got.dtype == q.dtype and got.shape == q.shape
        torch.testing.assert_close(got.double(), ref, rtol=1e-4, atol=1e-4)


@given(
    seed=st.integers(0, 2**31 - 1),
    head_dim=st.sampled_from([32, 64, 128]),
    bits=st.sampled_from([4.0, 2.0, 1.0, 0.5, 0.375]),
    window=st.sampled_from([0, 3, 8]),
    anchor_frac=st.sampled_from([0.0, 0.05, 0.3]),
    steps=st.lists(st.integers(1, 20), min_size=2, max_size=6),
    key_basis=st.booleans(),
    exact_dtype=st.sampled_from([None, torch.float16, torch.bfloat16]),
)
def test_dequantize_is_codes_plus_exact_anchors_and_window(seed, head_dim, bits, window, anchor_frac, steps, key_basis, exact_dtype):
    """Against the appended originals: window rows and anchor rows exact, every other row the
    nearest-centroid decode of the original (float64 reference; with a key basis A, the decode of
    the nearest centroid to k A, mapped back by A^-1); codes never re-encoded; the anchor budget
    is ceil(anchor_frac * encoded tokens). With a narrower exact_dtype, "exact" is the stored row
    rounded to it (k A rounded, with a basis), and the codes are those of the rounded row."""
    g = torch.Generator().manual_seed(seed)
    settings = CacheSettings(window=window, anchor_frac=anchor_frac, exact_dtype=exact_dtype)
    cache = _empty(2, 2, head_dim, bits, settings, g, basis=key_basis)
    stored = exact_dtype or torch.float32
    assert cache.dtype == torch.float32 and cache.window.dtype == cache.anchor_rows.dtype == stored
    original = torch.zeros(2, 2, 0, head_dim)
    for n in steps:
        codes_before = cache.codes
        new = torch.randn(2, 2, n, head_dim, generator=g)
        # random scores for the window tokens, as attention would leave them
        cache.window_score.copy_(torch.rand(cache.window_score.shape, generator=g))
        cache = torch.cat([cache, new], dim=2)
        original = torch.cat([original, new], 2)
        assert torch.equal(cache.codes[:, :, : codes_before.shape[2]], codes_before)
        T, Tw = cache.shape[2], cache.window.shape[2]
        assert Tw == min(T, window + n) if T > n else Tw == n
        Tc = T - Tw
        valid = cache.anchor_pos >= 0
        assert (valid.sum(-1) == min(math.ceil(anchor_frac * Tc), Tc)).all()
        assert (cache.anchor_pos[valid] < Tc).all()
        exact = torch.zeros(2, 2, T, dtype=torch.bool)
        exact[..., Tc:] = True
        exact.scatter_(2, cache.anchor_pos.clamp_min(0).long(), valid)
        if key_basis:
            # k A in float32 as the cache computes it (so near-ties pick the same centroid), rounded
            # to the stored dtype, then float64
            in_basis = torch.einsum("bhtd,hde->bhte", original, cache.basis).to(stored).float()
            decoded = torch.einsum("bhtd,hde->bhte", nearest_centroid_decode(in_basis, cache.centroids), cache.basis_inv.double())
            rows = torch.einsum("bhtd,hde->bhte", in_basis.double(), cache.basis_inv.double())
        else:
            rounded = original.to(stored).float()
            decoded, rows = nearest_centroid_decode(rounded, cache.centroids), rounded.double()
        ref = torch.where(exact[..., None], rows, decoded)
        tol = 1e-4 if key_basis else 1e-5  # exact rows go through A^-1 in float32
        torch.testing.assert_close(dequantize(cache).double(), ref, rtol=tol, atol=tol)


def test_flush_keeps_the_top_scorers_as_anchors():
    g = torch.Generator().manual_seed(0)
    cache = _empty(1, 1, 32, 1.0, CacheSettings(window=0, anchor_frac=0.2), g)
    cache = torch.cat([cache, torch.randn(1, 1, 10, 32, generator=g)], 2)
    cache.window_score.copy_(torch.tensor([[[0.1, 5.0, 0.2, 0.3, 9.0, 0.0, 0.0, 0.0, 0.0, 0.0]]]))
    cache = torch.cat([cache, torch.randn(1, 1, 1, 32, generator=g)], 2)  # flushes all 10
    assert sorted(cache.anchor_pos.flatten().tolist()) == [1, 4]
    # next flush: budget ceil(0.2 * 11) = 3; the new token competes with the old anchors
    cache.window_score.fill_(7.0)
    cache = torch.cat([cache, torch.randn(1, 1, 1, 32, generator=g)], 2)
    assert sorted(cache.anchor_pos.flatten().tolist()) == [1, 4, 10]


def test_attention_scores_the_window_tokens():
    """A query that attends to one window token gives that token the largest Anchor Score."""
    g = torch.Generator().manual_seed(0)
    kc = _empty(1, 1, 32, 1.0, CacheSettings(window=0, anchor_frac=0.1), g)
    vc = _empty(1, 1, 32, 1.0, CacheSettings(window=0, anchor_frac=0.1), g)
    keys = torch.randn(1, 1, 8, 32, generator=g)
    kc, vc = torch.cat([kc, keys], 2), torch.cat([vc, torch.randn(1, 1, 8, 32, generator=g)], 2)
    q = 30 * keys[:, :, 5:6] / keys[:, :, 5:6].norm()
    F.scaled_dot_product_attention(q, kc, vc)
    assert kc.window_score.argmax().item() == 5
    assert torch.equal(kc.window_score, vc.window_score)


@given(seed=st.integers(0, 2**31 - 1), crop=st.integers(-30, 30), window=st.sampled_from([0, 4, 16]))
def test_crop_and_batch_select_equal_the_dense_ops(seed, crop, window):
    g = torch.Generator().manual_seed(seed)
    cache = _empty(3, 2, 32, 1.0, CacheSettings(window=window, anchor_frac=0.2), g)
    for n in (12, 1, 5):
        cache.window_score.copy_(torch.rand(cache.window_score.shape, generator=g))
        cache = torch.cat([cache, torch.randn(3, 2, n, 32, generator=g)], 2)
    dense = dequantize(cache)
    cropped = cache[..., :crop, :]
    assert isinstance(cropped, VQTensor)
    assert torch.equal(dequantize(cropped), dense[..., :crop, :])
    idx = torch.tensor([2, 0, 0])
    for picked in (cache.index_select(0, idx), cache[idx]):
        assert isinstance(picked, VQTensor)
        assert torch.equal(dequantize(picked), dense[idx])
    # a cropped cache keeps appending onto the same codes
    grown = torch.cat([cropped, torch.randn(3, 2, 2, 32, generator=g)], 2)
    assert grown.shape[2] == cropped.shape[2] + 2
    assert torch.equal(grown.codes[:, :, : cropped.shape[2]], cropped.codes)


def test_other_ops_fall_back_to_dequantize():
    g = torch.Generator().manual_seed(0)
    cache = torch.cat([_empty(2, 2, 32, 1.0, CacheSettings(window=2), g), torch.randn(2, 2, 9, 32, generator=g)], 2)
    cache = torch.cat([cache, torch.randn(2, 2, 3, 32, generator=g)], 2)
    dense = dequantize(cache)
    for op in (lambda x: x * 2, lambda x: x.sum(), lambda x: x.transpose(1, 2).contiguous(), lambda x: x[:, :, 3:7],
               lambda x: x[:, :, None].expand(2, 2, 3, 12, 32).reshape(2, 6, 12, 32), lambda x: x.float().mean(-1)):  # fmt: skip
        got = op(cache)
        assert not isinstance(got, VQTensor)
        assert torch.equal(got, op(dense))
    # GQA through repeat_kv (expand + reshape) still computes the right attention, densely
    q = torch.randn(2, 6, 1, 32, generator=g)
    rep = lambda x: x[:, :, None].expand(2, 2, 3, 12, 32).reshape(2, 6, 12, 32)  # noqa: E731
    torch.testing.assert_close(F.scaled_dot_product_attention(q, rep(cache), rep(cache)), F.scaled_dot_product_attention(q, rep(dense), rep(dense)))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_cache(dtype):
    g = torch.Generator().manual_seed(0)
    settings = CacheSettings(window=4, anchor_frac=0.1)
    kc, vc = (_empty(1, 2, 64, 1.0, settings, g, dtype=dtype) for _ in range(2))
    for n in (20, 1, 1):
        kc = torch.cat([kc, torch.randn(1, 2, n, 64, generator=g).to(dtype)], 2)
        vc = torch.cat([vc, torch.randn(1, 2, n, 64, generator=g).to(dtype)], 2)
    assert kc.dtype == dtype and dequantize(kc).dtype == dtype and kc.anchor_rows.dtype == dtype
    q = torch.randn(1, 4, 1, 64, generator=g).to(dtype)
    got, ref = _sdpa_both(q, kc, vc, enable_gqa=True)
    assert got.dtype == dtype
    torch.testing.assert_close(got.double(), ref, rtol=2e-2, atol=2e-2)


def test_bad_input_errors():
    g = torch.Generator().manual_seed(0)
    cache = _empty(1, 2, 32, 1.0, CacheSettings(), g)
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        cache.append(torch.zeros(1, 2, 3, 32, dtype=torch.int32))
    with pytest.raises(ValueError, match="cannot append"):
        cache.append(torch.zeros(1, 3, 3, 32))


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(error="median"), ValueError, "error must be 'actual' or 'expected', got 'median'"),
    (dict(window=2.5), TypeError, "window must be an int .* got 2.5 of type float"),
    (dict(window="8"), TypeError, "window must be an int .* got '8' of type str"),
    (dict(window=True), TypeError, "window must be an int .* got True of type bool"),
    (dict(window=-1), ValueError, "window must be >= 0"),
    (dict(anchor_frac="0.1"), TypeError, "anchor_frac must be a float"),
    (dict(anchor_frac=1.5), ValueError, r"anchor_frac must be in \[0, 1\]"),
    (dict(exact_dtype=torch.int8), TypeError, "exact_dtype must be None or one of"),
])
def test_bad_settings_name_the_setting(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        CacheSettings(**kwargs)


def test_one_bit_cache_at_4096_tokens_is_under_a_tenth_of_fp16():
    """SmolLM2 shapes, fp16, a 4064-token prefill then 32 decode steps into a cache preallocated for
    4096 tokens: measured bytes, every inner tensor counted (codes, anchors, positions, scores,
    window, its errors and scores), the capacity buffers whole."""
    g = torch.Generator().manual_seed(0)
    cache = _empty(1, 3, 64, 1.0, CacheSettings(window=32, anchor_frac=0.01), g, dtype=torch.float16)
    cache.capacity = 4096
    cache = torch.cat([cache, torch.randn(1, 3, 4064, 64, generator=g).half()], 2)
    for _ in range(32):
        cache = torch.cat([cache, torch.randn(1, 3, 1, 64, generator=g).half()], 2)
    assert cache.shape[2] == 4096
    dense_fp16 = 1 * 3 * 4096 * 64 * 2
    held = sum(t.numel() * t.element_size() for name in cache.__tensor_flatten__()[0] if name not in ("centroids", "expected_err", "basis", "basis_inv") for t in [getattr(cache, name)])
    free_anchor_slots = cache._buffers.tensors["anchor_pos"].shape[2] - cache.anchor_pos.shape[2]
    assert cache.cache_nbytes() == held + free_anchor_slots * 3 * (64 * 2 + 4 + 4)  # rows fp16, position, score
    assert cache.cache_nbytes() <= dense_fp16 / 10, f"{cache.cache_nbytes()} bytes vs fp16 {dense_fp16}"
