"""antkv_backend on Hugging Face decoders (tiny random-weight configs): the pass rewrites the
attention sites of eight architectures behind transformers' own DynamicCache (the first call
concatenates its empty tensor, later calls the compressed cache), outputs equal the eager
AntKVCache run, and `patch()` makes generate() work compiled with a bounded number of graphs."""

import pytest
import torch
from helpers import ARCHS, tiny_hf_model
from transformers import DynamicCache

import antkv_compile as ak
from antkv_compile import VQTensor

@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    yield
    torch._dynamo.reset()


def _steps(model, forward, cache, n_decode=1):
    """A left-padded prefill of 6 tokens then decode steps; the logits of each call."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 96, (2, 6 + n_decode), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    bounds = [(0, 6)] + [(6 + i, 7 + i) for i in range(n_decode)]
    with torch.no_grad():
        return [forward(ids[:, s:e], attention_mask=mask[:, :e], **{ak.cache_keyword(model): cache}, use_cache=True).logits for s, e in bounds]


@pytest.mark.parametrize("arch", list(ARCHS))
def test_architectures_are_rewritten_and_equal_eager(arch):
    """HF's "sdpa" attention (repeat_kv under a mask) on a DynamicCache, compiled, against eager
    "antkv" attention on an AntKVCache."""
    model, books = tiny_hf_model(arch)
    backend = ak.AntKVBackend(books, inductor=False, window=2, anchor_frac=0.2)
    model.set_attn_implementation("sdpa")
    cache = DynamicCache(config=model.config)
    got = _steps(model, torch.compile(model.forward, backend=backend), cache)
    ak.use_antkv_attention(model)
    ref = _steps(model, model, ak.AntKVCache(books, window=2, anchor_frac=0.2))
    for g, r in zip(got, ref):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-4)
    assert all(isinstance(layer.keys, VQTensor) and isinstance(layer.values, VQTensor) for layer in cache.layers)
    assert len(backend.sites) == 4 and all(site.rewritten for site in backend.sites), backend.sites


def test_sliding_window_cache_is_declined_and_exact():
    """Mistral with a sliding window: the cache writes back a slice of the concatenation, which the
    compressed cache does not implement; declined: an error by default (nothing would be
    compressed), with on_nothing_compressed="warn" a warning and the uncompiled model's numbers."""
    model, books = tiny_hf_model("mistral", sliding_window=4)
    with pytest.raises(ak.CompressionError, match="not written back as is"):
        _steps(model, torch.compile(model.forward, backend=ak.AntKVBackend(books, inductor=False)), DynamicCache(config=model.config))
    torch._dynamo.reset()
    backend = ak.AntKVBackend(books, inductor=False, on_nothing_compressed="warn")
    with pytest.warns(UserWarning, match="would run on a dense cache"):
        got = _steps(model, torch.compile(model.forward, backend=backend), DynamicCache(config=model.config))
    ref = _steps(model, model, DynamicCache(config=model.config))
    for g, r in zip(got, ref):
        torch.testing.assert_close(g, r)
    assert backend.sites and all("not written back as is" in site.detail for site in backend.sites)


def test_patch_generates_512_tokens_like_eager_with_at_most_3_graphs():
    """Greedy, left-padded batch of 2, Inductor: identical tokens to the eager compressed-cache
    run, and the whole generation compiles at most 3 graphs."""
    model, books = tiny_hf_model("llama")
    ids = torch.randint(3, 96, (2, 8), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    kw = dict(attention_mask=mask, max_new_tokens=512, min_new_tokens=512, do_sample=False, pad_token_id=0)
    ak.use_antkv_attention(model)
    ref = model.generate(ids, **{ak.cache_keyword(model): ak.AntKVCache(books, window=8)}, **kw)
    ak.patch(model, books, window=8)
    out = model.generate(ids, **kw)
    assert out.shape == (2, 520)
    assert torch.equal(out, ref)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] <= 3
    assert all(site.rewritten for site in model.antkv_backend.sites)


def test_patch_sampling_and_beam_search():
    """Sampling runs; beam search (the cache reordered between compiled calls) gives the eager
    compressed-cache beams."""
    model, books = tiny_hf_model("qwen2")
    ids = torch.randint(3, 96, (2, 5), generator=torch.Generator().manual_seed(3))
    kw = dict(max_new_tokens=8, min_new_tokens=8, pad_token_id=0)
    ak.use_antkv_attention(model)
    ref = model.generate(ids, num_beams=3, do_sample=False, **{ak.cache_keyword(model): ak.AntKVCache(books, window=4)}, **kw)
    ak.patch(model, books, window=4, inductor=False)
    beams = model.generate(ids, num_beams=3, do_sample=False, **kw)
    assert torch.equal(beams, ref)
    torch.manual_seed(0)
    sampled = model.generate(ids, do_sample=True, top_k=20, **kw)
    assert sampled.shape == (2, 13)
    assert all(site.rewritten for site in model.antkv_backend.sites)


def test_codebooks_with_bits_per_layer_and_side_compile_like_eager():
    """Codebooks whose layers and sides have different bits (what calibrate.allocate_layer_bits
    produces: 2-bit keys with 0.5-bit values, 0.5-bit keys with 1-bit values) generate the same
    tokens through ak.patch as through the eager AntKVCache, and the compiled caches hold codes of
    each side's own width."""
    from helpers import random_codebooks

    from antkv_compile.quant.codebook import Codebooks, LayerCodebook

    torch._dynamo.reset()
    model, books = tiny_hf_model("llama")
    b = {bits: random_codebooks(2, 2, 16, bits=bits, seed=i) for i, bits in enumerate((2.0, 0.5, 1.0))}
    mixed = Codebooks([LayerCodebook(b[2.0].layers[0].key, b[0.5].layers[0].value),
                       LayerCodebook(b[0.5].layers[1].key, b[1.0].layers[1].value)], books.settings)  # fmt: skip
    mixed.fingerprint = books.fingerprint
    ids = torch.randint(3, 96, (2, 8), generator=torch.Generator().manual_seed(2))
    kw = dict(max_new_tokens=24, min_new_tokens=24, do_sample=False, pad_token_id=0)
    ak.use_antkv_attention(model)
    with torch.no_grad():
        cache = ak.AntKVCache(mixed, window=4, anchor_frac=0.1)
        eager = model.generate(ids, **{ak.cache_keyword(model): cache}, **kw)
        assert [cache.layers[i].keys.codes.shape[-1] for i in (0, 1)] == [4, 1]  # 16 / 4, 16 / 16 subspaces
        ak.patch(model, mixed, window=4, anchor_frac=0.1)
        compiled = model.generate(ids, **kw)
    assert torch.equal(eager, compiled)
    torch._dynamo.reset()
