"""Data-free codebooks (quant/datafree.py): compression from the first call with no calibration.

Properties of the pieces (the rotation is orthogonal, the Gaussian codebook quantizes fresh normal
samples near its rate's distortion, the fit is scale-equivariant), the cache contract on caches
built from them, and: a 64-token prompt plus 64 generated tokens through `patch(model)` with no
codebooks writes back compressed caches on every architecture, token for token as the eager
`AntKVCache()`."""

import pytest
import torch
import torch.nn.functional as F
from helpers import ARCHS, tiny_hf_model
from hypothesis import given
from hypothesis import strategies as st
from transformers import DynamicCache

import antkv_compile as ak
from antkv_compile.quant import datafree
from antkv_compile.quant.pq import PRESETS, decode, encode


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@given(seed=st.integers(0, 2**31 - 1), heads=st.integers(1, 4), dim=st.sampled_from([16, 64, 128]))
def test_rotation_is_orthogonal_and_seeded(seed, heads, dim):
    r = datafree.random_rotation(heads, dim, seed).double()
    eye = torch.eye(dim, dtype=torch.float64).expand(heads, dim, dim)
    torch.testing.assert_close(r @ r.transpose(1, 2), eye, atol=1e-6, rtol=0)
    assert torch.equal(datafree.random_rotation(heads, dim, seed), datafree.random_rotation(heads, dim, seed))


# Mean squared error per dimension of the standard normal, for each preset's (d, K): bounds a
# little above what 64-samples-per-centroid k-means reaches (measured 0.36 at 1 bit, 0.12 at 2,
# 0.034 at 4), far below what an untrained codebook gives (1 + ...), and, for 1 and 2 bits, below
# nothing better than Shannon's D(R) = 2^(-2R) (0.25 / 0.0625 / 0.0039) can reach.
MSE_BOUND = {4.0: 0.045, 2.0: 0.14, 1.0: 0.40, 0.5: 0.65}


@pytest.mark.parametrize("bits", list(MSE_BOUND))
def test_gaussian_codebook_quantizes_fresh_normal_samples(bits):
    spec = PRESETS[bits]
    g = datafree.gaussian_codebook(spec.sub_dim, spec.num_centroids)
    assert g.shape == (spec.num_centroids, spec.sub_dim) and torch.isfinite(g).all()
    x = torch.randn(1, 1, 20000, spec.sub_dim, generator=torch.Generator().manual_seed(123))
    c = g[None, None]  # one head, one subspace
    mse = (x - decode(encode(x, c), c)).pow(2).mean().item()
    assert 2.0 ** (-2 * bits) < mse < MSE_BOUND[bits], mse


@given(seed=st.integers(0, 2**31 - 1), scale=st.floats(0.01, 100.0), bits=st.sampled_from([2.0, 1.0]), tokens=st.integers(1, 80))
def test_fit_is_scale_equivariant(seed, scale, bits, tokens):
    """x -> a x (a > 0) scales the moments, so the centroids, by a: same codes (no rotation: the
    rotation is linear too, but its float rounding could flip near-ties)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, tokens, 32, generator=g) * torch.rand(32, generator=g) * 4 + torch.randn(32, generator=g)
    spec = PRESETS[bits]
    a, b = datafree.fit_side(x, spec, rotate=False, seed=0), datafree.fit_side(x * scale, spec, rotate=False, seed=0)
    torch.testing.assert_close(b.centroids, a.centroids * scale, rtol=1e-4, atol=1e-6 * scale)
    codes_a, codes_b = encode(x, a.centroids), encode(x * scale, b.centroids)
    assert (codes_a == codes_b).float().mean() > 0.99


@given(seed=st.integers(0, 2**31 - 1), bits=st.sampled_from([4.0, 2.0, 1.0]), rotate=st.booleans(), tokens=st.integers(1, 40))
def test_fit_error_is_the_per_head_mean_and_tracks_the_data(seed, bits, rotate, tokens):
    """The recorded expected error is the mean error of the fitted tokens (in the basis, if any);
    on per-channel scaled normal data the relative error is near the standard normal's."""
    g = torch.Generator().manual_seed(seed)
    std = 0.1 + 3 * torch.rand(2, 1, 1, 64, generator=g)
    x = torch.randn(1, 2, 200 + tokens, 64, generator=g) * std
    side = datafree.fit_side(x, PRESETS[bits], rotate, seed)
    xb = torch.einsum("bhtd,hde->bhte", x, side.basis) if rotate else x
    err = (xb - decode(encode(xb, side.centroids), side.centroids)).norm(dim=-1)
    torch.testing.assert_close(side.error, err.mean((0, 2)), rtol=1e-5, atol=1e-6)
    rel = (err.pow(2).sum() / xb.pow(2).sum()).item()
    assert rel < 1.6 * MSE_BOUND[bits], rel


@given(seed=st.integers(0, 2**31 - 1), bits=st.sampled_from([2.0, 1.0, 0.5]), steps=st.lists(st.integers(1, 12), min_size=1, max_size=4))
def test_datafree_cache_attention_equals_sdpa_on_dequantized(seed, bits, steps):
    """The cache contract with data-free codebooks (keys in a rotation basis)."""
    g = torch.Generator().manual_seed(seed)
    prompt_k, prompt_v = torch.randn(2, 2, 9, 32, generator=g), torch.randn(2, 2, 9, 32, generator=g)
    spec = PRESETS[bits]
    settings = ak.CacheSettings(window=4, anchor_frac=0.2)
    k = ak.VQTensor.empty(2, datafree.fit_side(prompt_k, spec, True, seed), settings)
    v = ak.VQTensor.empty(2, datafree.fit_side(prompt_v, spec, False, seed), settings)
    k, v = torch.cat([k, prompt_k], 2), torch.cat([v, prompt_v], 2)
    for n in steps:
        k = torch.cat([k, torch.randn(2, 2, n, 32, generator=g)], 2)
        v = torch.cat([v, torch.randn(2, 2, n, 32, generator=g)], 2)
        q = torch.randn(2, 4, n, 32, generator=g)
        got = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        ref = F.scaled_dot_product_attention(q.double(), k.dequantize().double(), v.dequantize().double(), enable_gqa=True)
        torch.testing.assert_close(got.double(), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_patch_without_codebooks_compresses_from_the_prompt(arch):
    """A 64-token prompt and 64 greedy tokens: every site rewritten, every layer's cache written
    back compressed, the same tokens as the eager data-free AntKVCache (both fit the same codebook
    to the prompt)."""
    model, _ = tiny_hf_model(arch)
    ids = torch.randint(3, 96, (1, 64), generator=torch.Generator().manual_seed(4))
    kw = dict(max_new_tokens=64, min_new_tokens=64, do_sample=False, pad_token_id=0)
    ak.use_antkv_attention(model)
    with torch.no_grad():
        ref = model.generate(ids, **{ak.cache_keyword(model): ak.AntKVCache(bits=1.0)}, **kw)
    ak.patch(model, inductor=False)
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        out = model.generate(ids, **{ak.cache_keyword(model): cache}, **kw)
    assert all(isinstance(layer.keys, ak.VQTensor) and isinstance(layer.values, ak.VQTensor) for layer in cache.layers)
    assert cache.layers[0].keys.shape[2] == 127 and cache.layers[0].keys.codes.shape[2] == 127
    assert model.antkv_backend.sites and all(site.rewritten for site in model.antkv_backend.sites), model.antkv_backend.sites
    assert torch.equal(out, ref)
