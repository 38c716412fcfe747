"""The quantizer: product VQ, weighted k-means, the Anchor Score, codebook files."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from reference import anchor_score_terms_loops, nearest_centroid_decode

from antkv_compile.quant.anchor_score import anchor_score_terms_blockwise, anchor_score_terms_dense, combine
from antkv_compile.quant.codebook import Codebooks, CodebookSide, LayerCodebook, model_fingerprint
from antkv_compile.quant.kmeans import weighted_kmeans
from antkv_compile.quant.pq import PRESETS, PQSpec, check_dtype, decode, encode, spec_for_bits

BITS = [4.0, 2.0, 1.0, 0.5, 0.375]


@given(
    seed=st.integers(0, 2**31 - 1),
    bits=st.sampled_from(sorted(PRESETS)),
    head_dim=st.sampled_from([32, 64, 128]),
    heads=st.integers(1, 3),
    tokens=st.integers(1, 40),
)
def test_encode_decode_is_nearest_centroid(seed, bits, head_dim, heads, tokens):
    g = torch.Generator().manual_seed(seed)
    spec = spec_for_bits(bits)
    S = spec.num_subspaces(head_dim)
    centroids = torch.randn(heads, S, spec.num_centroids, spec.sub_dim, generator=g)
    x = torch.randn(2, heads, tokens, head_dim, generator=g)
    codes = encode(x, centroids, max_elems=4096)  # small chunks: exercises the chunked path
    assert codes.shape == (2, heads, tokens, S) and codes.dtype == spec.code_dtype
    got = decode(codes, centroids).double()
    ref = nearest_centroid_decode(x, centroids)
    # Ties aside, the same centroid; compare distances so an exact tie cannot fail the test.
    d_got = (got - x.double()).unflatten(-1, (S, -1)).pow(2).sum(-1)
    d_ref = (ref - x.double()).unflatten(-1, (S, -1)).pow(2).sum(-1)
    torch.testing.assert_close(d_got, d_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bits", BITS)
def test_presets_bits_per_element(bits):
    spec = spec_for_bits(bits)
    assert spec.code_bits / spec.sub_dim == bits
    assert spec.bits == bits


def test_head_dim_not_divisible_is_a_clear_error():
    with pytest.raises(ValueError, match="head_dim 72 is not divisible by the sub-vector size 16"):
        spec_for_bits(0.5).num_subspaces(72)


def test_unknown_bits_is_a_clear_error():
    with pytest.raises(ValueError, match="no product-quantization preset for 0.3 bits"):
        spec_for_bits(0.3)


@pytest.mark.parametrize("dtype", [torch.int8, torch.float64, torch.int64])
def test_unsupported_dtype_is_a_clear_error(dtype):
    with pytest.raises(TypeError, match=f"float32, float16 or bfloat16 .* got {dtype}"):
        check_dtype(torch.zeros(2, dtype=dtype))


def test_kmeans_recovers_separated_clusters_and_is_deterministic():
    g = torch.Generator().manual_seed(1)
    centers = torch.randn(3, 4, 2, generator=g) * 20  # 3 groups, 4 clusters each
    x = (centers[:, :, None] + 0.1 * torch.randn(3, 4, 50, 2, generator=g)).flatten(1, 2)
    c = weighted_kmeans(x, 4, iters=20, seed=7)
    assert torch.equal(c, weighted_kmeans(x, 4, iters=20, seed=7))
    # every true center has a learned centroid next to it
    gap = torch.cdist(centers.double(), c.double()).amin(-1)
    assert gap.max() < 0.2


def test_kmeans_zero_weight_points_do_not_move_centroids():
    g = torch.Generator().manual_seed(2)
    inliers = torch.randn(1, 200, 4, generator=g)
    outliers = 1000 + torch.randn(1, 20, 4, generator=g)
    x = torch.cat([inliers, outliers], 1)
    w = torch.cat([torch.ones(1, 200), torch.zeros(1, 20)], 1)
    c = weighted_kmeans(x, 8, w, iters=10)
    assert c.abs().max() < 10  # no centroid went to the outliers
    # heavy weight pulls a centroid onto a point
    w2 = torch.ones(1, 200)
    w2[0, 0] = 1e6
    c2 = weighted_kmeans(inliers, 4, w2, iters=10)
    assert torch.cdist(inliers[:, :1], c2).min() < 1e-3


def _s1_unit(q, v, s0):
    """The size of an S1 term, scale |q| |v| times the attention mass, for absolute tolerances."""
    return (q.norm(dim=-1).max() * v.norm(dim=-1).max() / q.shape[-1] ** 0.5 * max(1.0, s0.max().item())).item()


def _mask(kind, L, T, g):
    if kind == "none":
        return None
    keep = torch.ones(L, T, dtype=torch.bool).tril(T - L)  # a cache: query i at position T - L + i
    if kind == "padded":
        keep[:, : torch.randint(0, T, (1,), generator=g).item()] = False
    return keep


@given(
    seed=st.integers(0, 2**31 - 1),
    kv_heads=st.integers(1, 2),
    group=st.sampled_from([1, 3]),
    L=st.integers(1, 9),
    extra=st.integers(0, 12),
    head_dim=st.sampled_from([32, 64, 128]),
    mask=st.sampled_from(["none", "causal", "padded"]),
)
def test_anchor_score_dense_matches_definition(seed, kv_heads, group, L, extra, head_dim, mask):
    g = torch.Generator().manual_seed(seed)
    T = L + extra
    q = torch.randn(1, kv_heads * group, L, head_dim, generator=g)
    k, v = torch.randn(2, 1, kv_heads, T, head_dim, generator=g)
    m = _mask(mask, L, T, g)
    s1, s0 = anchor_score_terms_dense(q.double(), k.double(), v.double(), attn_mask=m)
    r1, r0 = anchor_score_terms_loops(q, k, v, m)
    # ||v_j - o_i|| from the Gram expansion loses ~sqrt(eps) absolute where v_j == o_i (T = 1).
    torch.testing.assert_close(s1, r1, rtol=1e-7, atol=1e-6 * _s1_unit(q, v, r0))
    torch.testing.assert_close(s0, r0, rtol=1e-9, atol=1e-9)


@given(
    seed=st.integers(0, 2**31 - 1),
    batch=st.integers(1, 2),
    kv_heads=st.integers(1, 3),
    group=st.sampled_from([1, 2, 3]),
    L=st.integers(1, 70),
    extra=st.integers(0, 70),
    head_dim=st.sampled_from([32, 64, 128]),
    mask=st.sampled_from(["none", "causal", "padded", "is_causal"]),
    block=st.sampled_from([(16, 16), (7, 32), (64, 5)]),
)
def test_anchor_score_blockwise_equals_dense_fp32(seed, batch, kv_heads, group, L, extra, head_dim, mask, block):
    g = torch.Generator().manual_seed(seed)
    T = L + extra
    q = 2 * torch.randn(batch, kv_heads * group, L, head_dim, generator=g)
    k, v = torch.randn(2, batch, kv_heads, T, head_dim, generator=g)
    causal = mask == "is_causal"
    m = None if causal else _mask(mask, L, T, g)
    d1, d0 = anchor_score_terms_dense(q, k, v, attn_mask=m, is_causal=causal)
    b1, b0 = anchor_score_terms_blockwise(q, k, v, attn_mask=m, is_causal=causal, block_q=block[0], block_k=block[1])
    # 1e-5 relative to the size of one S1 term (scale |q| |v| per unit of attention): where a
    # query attends to a single token, S1 is exactly 0 in one pass and rounding-sized in the other.
    torch.testing.assert_close(b1, d1, rtol=1e-5, atol=1e-5 * _s1_unit(q, v, d0))
    torch.testing.assert_close(b0, d0, rtol=1e-5, atol=1e-6)


def test_anchor_score_expected_and_actual_error_variants():
    s1, s0 = torch.rand(2, 3, 5), torch.rand(2, 3, 5)
    expected = combine(s1, s0, torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0.5, 0.5, 0.5]))
    torch.testing.assert_close(expected[:, 2], 3.0 * s1[:, 2] + 0.5 * s0[:, 2])
    e_k, e_v = torch.rand(2, 3, 5), torch.rand(2, 3, 5)
    torch.testing.assert_close(combine(s1, s0, e_k, e_v), e_k * s1 + e_v * s0)


class _Config:
    model_type, num_hidden_layers, num_attention_heads, num_key_value_heads, head_dim, hidden_size = "llama", 2, 6, 2, 32, 192


def _basis_pair(H, D):
    a = torch.eye(D) + 0.3 * torch.randn(H, D, D) / D**0.5  # well conditioned: loading checks the inverse
    return a, torch.linalg.inv(a)


def _books(config=_Config, kspec=PQSpec(8, 8), vspec=PQSpec(16, 6)):
    H, D = config.num_key_value_heads, config.head_dim
    layers = [
        LayerCodebook(
            CodebookSide(kspec, torch.randn(H, D // kspec.sub_dim, kspec.num_centroids, kspec.sub_dim), torch.rand(H),
                         *(_basis_pair(H, D) if i == 0 else (None, None))),  # a key basis on layer 0 only
            CodebookSide(vspec, torch.randn(H, D // vspec.sub_dim, vspec.num_centroids, vspec.sub_dim), torch.rand(H)),
        )  # fmt: skip
        for i in range(config.num_hidden_layers)
    ]
    return Codebooks(layers, model_fingerprint(config), {"bits": 0.6875, "chosen": ["K1/V0.375"] * 2})


def test_codebook_file_round_trip(tmp_path):
    books = _books()
    books.save(tmp_path / "cb.safetensors")
    loaded = Codebooks.load(tmp_path / "cb.safetensors", config=_Config)
    assert loaded.fingerprint == books.fingerprint and loaded.settings == books.settings
    for a, b in zip(books.layers, loaded.layers):
        for what in ("key", "value"):
            x_side, y_side = getattr(a, what), getattr(b, what)
            assert x_side.spec == y_side.spec
            for name in ("centroids", "error", "basis", "basis_inv"):
                x, y = getattr(x_side, name), getattr(y_side, name)
                assert (x is None and y is None) or torch.equal(x, y), f"{what}.{name}"
    assert loaded.average_bits == pytest.approx((1 + 0.375) / 2)


def test_codebook_for_another_model_names_the_field(tmp_path):
    _books().save(tmp_path / "cb.safetensors")

    class Other(_Config):
        num_key_value_heads = 3

    with pytest.raises(ValueError, match="num_key_value_heads: codebooks have 2, model has 3"):
        Codebooks.load(tmp_path / "cb.safetensors", config=Other)


def test_not_a_codebook_file(tmp_path):
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(tmp_path / "x.safetensors"))
    with pytest.raises(ValueError, match="not an antkv codebook file"):
        Codebooks.load(tmp_path / "x.safetensors")


def _moment(head_dim, heads, g):
    """A query second moment with a few dominant directions, as real attention heads have."""
    scales = torch.logspace(1, -1, head_dim)[torch.randperm(head_dim, generator=g)]
    q = torch.randn(heads, 512, head_dim, generator=g) * scales
    return q.transpose(1, 2) @ q


@pytest.mark.parametrize("sub_dim", [2, 4, 8])
def test_key_basis_preserves_logits_and_turns_l2_into_logit_error(sub_dim):
    """(q A^-T).(k A) == q.k for every query head of a kv head (GQA); ||e A||^2 == e M e^T with M the
    normalized query moment (+ ridge), i.e. L2 error in the basis is the logit error; A^-1 is the inverse."""
    from antkv_compile.quant.basis import fit_key_basis, from_basis, query_to_basis, to_basis

    g = torch.Generator().manual_seed(sub_dim)
    H, D = 2, 32
    moment = _moment(D, H, g)
    keys = torch.randn(3, H, 50, D, generator=g) * torch.rand(D, generator=g) * 3
    a, a_inv = fit_key_basis(keys, moment, sub_dim, ridge=1e-3)
    torch.testing.assert_close(a.double() @ a_inv.double(), torch.eye(D, dtype=torch.float64).expand(H, D, D), atol=1e-4, rtol=0)
    q, k = torch.randn(1, 3 * H, 7, D, generator=g), torch.randn(1, H, 5, D, generator=g)
    logits = q.double() @ k.double().repeat_interleave(3, 1).transpose(-1, -2)
    got = query_to_basis(q, a_inv).double() @ to_basis(k, a).double().repeat_interleave(3, 1).transpose(-1, -2)
    torch.testing.assert_close(got, logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(from_basis(to_basis(k, a), a_inv), k, rtol=1e-4, atol=1e-4)
    m = moment.double() / moment.double().diagonal(dim1=1, dim2=2).mean(-1)[:, None, None] + 1e-3 * torch.eye(D, dtype=torch.float64)
    e = torch.randn(H, 10, D, generator=g, dtype=torch.float64)
    torch.testing.assert_close((e @ a.double()).pow(2).sum(-1), torch.einsum("htd,hde,hte->ht", e, m, e), rtol=1e-4, atol=1e-6)


def test_key_basis_balances_variance_across_subspaces():
    """Principal axes dealt out so each subspace gets a similar product of variances: the spread of
    per-subspace log-variance sums is far below that of the axes taken in order."""
    from antkv_compile.quant.basis import fit_key_basis, to_basis

    g = torch.Generator().manual_seed(0)
    H, D, d = 1, 32, 4
    keys = torch.randn(4, H, 400, D, generator=g) * torch.logspace(1, -2, D)
    a, _ = fit_key_basis(keys, torch.eye(D).expand(H, D, D), d)
    log_var = to_basis(keys, a)[:, 0].reshape(-1, D).var(0).log().view(D // d, d).sum(-1)
    in_order = keys[:, 0].reshape(-1, D).var(0).sort(descending=True).values.log().view(D // d, d).sum(-1)
    assert log_var.max() - log_var.min() < 0.25 * (in_order.max() - in_order.min())


def test_key_basis_lowers_attention_error_when_queries_favour_some_directions():
    """Isotropic keys, queries concentrated on a few directions: k-means in the basis spends its
    centroids where the queries look, so the probe attention error drops (same budget, same data)."""
    from antkv_compile.calibrate import CalibrationData, attention_error, fit_codebooks

    g = torch.Generator().manual_seed(0)
    n, H, G, L, D = 2, 2, 2, 512, 32
    scales = torch.logspace(0.5, -1.5, D)[torch.randperm(D, generator=g)]
    queries = torch.randn(n, H * G, L, D, generator=g) * scales
    keys, values = torch.randn(n, H, L, D, generator=g), torch.randn(n, H, L, D, generator=g)
    grouped = queries.view(n, H, G, L, D).transpose(0, 1).reshape(H, -1, D)
    data = CalibrationData(
        [keys], [values], [torch.rand(n, H, L, generator=g)], [torch.rand(n, H, L, generator=g)],
        [queries[:, :, -64:]], [D**-0.5], {"model_type": "toy"}, [grouped.transpose(1, 2) @ grouped],
    )  # fmt: skip
    errors = {}
    for key_basis in (False, True):
        books = fit_codebooks(data, bits=1.0, kv_split="equal", kmeans_tokens=1024, iters=8, key_basis=key_basis, progress=False)
        assert (books[0].key.basis is not None) == key_basis
        errors[key_basis] = attention_error(data, 0, books[0], 0.01)
    assert errors[True] < 0.8 * errors[False], errors


@pytest.mark.parametrize("bits", BITS)
def test_kv_candidates_never_store_more_than_the_equal_split(bits):
    """Codes take a byte each (c <= 8): a split is a candidate only if the cache holds it in no more
    bytes than the equal split, whatever its nominal bits."""
    from antkv_compile.calibrate import kv_candidates

    cands = kv_candidates(bits)
    equal = cands[0]
    assert equal[0] == equal[1] == spec_for_bits(bits)
    for k, v in cands:
        assert (k.bits + v.bits) / 2 == pytest.approx(bits)
        assert k.stored_bits + v.stored_bits <= 2 * equal[0].stored_bits + 1e-9
    assert PQSpec(4, 6).stored_bits == 2.0 and PQSpec(16, 4).stored_bits == 0.5 and PQSpec(8, 8).stored_bits == 1.0
