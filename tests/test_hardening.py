"""Hardening for real users (issue 12): several patched models in one process each compress, a
model that compresses nothing says so, changing the batch size, non-finite keys, safe torch.load
of a cache, no deprecation warnings from the transformers of today."""

import inspect
import warnings

import pytest
import torch
import transformers as tf
from helpers import random_codebooks
from transformers import DynamicCache

import antkv_compile as ak
from antkv_compile import StaticVQTensor, VQTensor
from antkv_compile.quant.codebook import model_fingerprint

TINY = dict(vocab_size=64, intermediate_size=32, max_position_embeddings=256, pad_token_id=0)
# (config, model, hidden, heads, kv heads, extra config): head_dims 16 and 32, GQA and MHA.
MODELS = [
    ("LlamaConfig", "LlamaForCausalLM", 64, 4, 2, {}),
    ("LlamaConfig", "LlamaForCausalLM", 64, 2, 1, {}),
    ("Qwen2Config", "Qwen2ForCausalLM", 64, 4, 2, {}),
    ("Qwen2Config", "Qwen2ForCausalLM", 64, 2, 2, {}),
    ("MistralConfig", "MistralForCausalLM", 32, 2, 1, dict(sliding_window=None)),
    ("Qwen3Config", "Qwen3ForCausalLM", 32, 2, 1, dict(head_dim=32)),
    ("Phi3Config", "Phi3ForCausalLM", 64, 4, 4, {}),
    ("GPTNeoXConfig", "GPTNeoXForCausalLM", 64, 2, 2, {}),
    ("StableLmConfig", "StableLmForCausalLM", 32, 2, 2, {}),
    ("OlmoConfig", "OlmoForCausalLM", 64, 4, 2, {}),
]


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _tiny(config_cls, model_cls, hidden, heads, kv_heads, extra, layers=1, seed=0):
    torch.manual_seed(seed)
    kw = {} if config_cls == "GPTNeoXConfig" else dict(num_key_value_heads=kv_heads)
    config = getattr(tf, config_cls)(**TINY, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, **kw, **extra)
    model = getattr(tf, model_cls)(config).eval()
    fp = model_fingerprint(config)
    books = random_codebooks(layers, fp["num_key_value_heads"], fp["head_dim"], seed=seed)
    books.fingerprint = fp
    return model, books


def _generate(model, ids, cache, n=4):
    kw = {ak.cache_keyword(model): cache}
    return model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0, **kw)


def test_ten_patched_models_in_one_process_each_compress_like_eager():
    """Different archs and head_dims patched one after the other (they share transformers' forward
    code): each writes back compressed caches and generates the eager AntKVCache tokens. Before
    patch() gave each model its own code object, the second one's sites were all declined ("scale
    not a constant") and the fifth ran eagerly past Dynamo's recompile limit, both on dense caches."""
    ids = torch.randint(3, 64, (1, 6), generator=torch.Generator().manual_seed(1))
    for i, spec in enumerate(MODELS):
        model, books = _tiny(*spec, seed=i)
        ak.use_antkv_attention(model)
        ref = _generate(model, ids, ak.AntKVCache(books, window=2, anchor_frac=0.3))
        ak.patch(model, books, window=2, anchor_frac=0.3, inductor=i in (0, 5))
        cache = DynamicCache(config=model.config)
        out = _generate(model, ids, cache)
        assert torch.equal(out, ref), spec
        assert all(isinstance(layer.keys, VQTensor) and isinstance(layer.values, VQTensor) for layer in cache.layers), spec
        assert model.antkv_backend.sites and all(site.rewritten for site in model.antkv_backend.sites), model.antkv_backend.sites


def test_codebooks_that_do_not_fit_raise_compression_error_or_warn():
    """Codebooks with the model's fingerprint but 4 kv heads (the model has 2): every site is
    declined; before, generation then ran silently on a dense cache."""
    model, _ = _tiny("LlamaConfig", "LlamaForCausalLM", 64, 4, 2, {})
    books = random_codebooks(1, 4, 16)
    books.fingerprint = model_fingerprint(model.config)
    ids = torch.randint(3, 64, (1, 6))
    ak.patch(model, books, inductor=False)
    with pytest.raises(ak.CompressionError, match=r"(?s)none of its 1 attention sites.*the key codebook is for 4 kv heads.*on_nothing_compressed"):
        _generate(model, ids, DynamicCache(config=model.config))
    torch._dynamo.reset()
    ak.patch(model, books, inductor=False, on_nothing_compressed="warn")
    with pytest.warns(UserWarning, match="would run on a dense cache"):
        out = _generate(model, ids, DynamicCache(config=model.config))
    assert out.shape == (1, 10)
    with torch.no_grad(), pytest.warns(UserWarning, match="would run on a dense cache"):
        sites = ak.explain(model, ids, codebooks=books, use_cache=True)  # a patched model: its own forward
    assert sites and not any(s.rewritten for s in sites) and "4 kv heads" in sites[0].detail


def test_a_dense_static_cache_is_refused_with_its_reason_not_run_dense_silently():
    """A dense HF StaticCache already holding tokens when a patched model first sees it (patch()
    converts only an empty one, tests/test_static.py): its buffers are written in place
    (index_copy_), which the pass compresses only in a StaticVQTensor; every site names the pattern
    and what to do, and the call raises."""
    model, books = _tiny("LlamaConfig", "LlamaForCausalLM", 64, 4, 2, {})
    ids = torch.randint(3, 64, (1, 6))
    cache = tf.StaticCache(config=model.config, max_cache_len=16)
    with torch.no_grad():
        model(ids, **{ak.cache_keyword(model): cache})  # filled eagerly, dense
    ak.patch(model, books, inductor=False)
    with pytest.raises(ak.CompressionError, match=r"(?s)dense preallocated buffer written in place \(`index_copy_`.*AntKVStaticCache"):
        _generate(model, torch.cat([ids, ids[:, :1]], 1), cache)


class _GptFastAttention(torch.nn.Module):
    """gpt-fast's KVCache: preallocated buffers written with `k_cache[:, :, input_pos] = k`."""

    def __init__(self, heads=2, max_len=32, dim=16):
        super().__init__()
        self.register_buffer("k_cache", torch.zeros(1, heads, max_len, dim))
        self.register_buffer("v_cache", torch.zeros(1, heads, max_len, dim))

    def forward(self, q, k, v, input_pos, mask):
        self.k_cache[:, :, input_pos] = k
        self.v_cache[:, :, input_pos] = v
        return torch.nn.functional.scaled_dot_product_attention(q, self.k_cache, self.v_cache, attn_mask=mask)


def test_a_gpt_fast_cache_is_refused_with_its_reason():
    torch.manual_seed(0)
    module = _GptFastAttention()
    compiled = torch.compile(module, backend=ak.AntKVBackend(random_codebooks(1, 2, 16), inductor=False))
    q, k, v = (torch.randn(1, 2, 1, 16) for _ in range(3))
    mask = torch.arange(32)[None, None, None, :] <= 3
    with torch.no_grad(), pytest.raises(ak.CompressionError, match="dense preallocated buffer written in place.*StaticVQTensor"):
        compiled(q, k, v, torch.tensor([3]), mask)


def test_grad_enabled_call_is_refused_but_a_call_without_cache_is_not():
    """A forward with grad enabled has a cache it cannot compress: refused with the reason. A
    forward without a cache (use_cache=False) has nothing to compress and runs."""
    model, books = _tiny("Qwen2Config", "Qwen2ForCausalLM", 64, 4, 2, {})
    ak.patch(model, books, inductor=False)
    ids = torch.randint(3, 64, (1, 6))
    with pytest.raises(ak.CompressionError, match="grad is enabled"):
        model(ids, use_cache=True, **{ak.cache_keyword(model): DynamicCache(config=model.config)})
    with torch.no_grad():
        ref = model.forward.__wrapped__(ids, use_cache=False).logits
        torch.testing.assert_close(model(ids, use_cache=False).logits, ref)


def test_without_codebooks_a_short_prompt_compresses_without_warnings():
    """Without codebooks every layer fits a data-free codebook to its first call: a 6-token prompt
    compresses from there (it used to stay dense until a call held 256 tokens), with no warning."""
    model, _ = _tiny("LlamaConfig", "LlamaForCausalLM", 64, 4, 2, {})
    ak.patch(model, inductor=False)
    cache = DynamicCache(config=model.config)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        _generate(model, torch.randint(3, 64, (1, 6)), cache, n=1)
    assert all(isinstance(layer.keys, ak.VQTensor) for layer in cache.layers)
    assert model.antkv_backend.sites and all(site.rewritten for site in model.antkv_backend.sites)


def test_changing_the_batch_size_gives_the_same_clear_error_eager_and_compiled():
    """Before: eager said "cannot append (3, 2, 1, 16) to a cache of shape (2, 2, 6, 16)", compiled
    raised TypeError: 'int' object is not subscriptable from inside transformers."""
    model, books = _tiny("LlamaConfig", "LlamaForCausalLM", 64, 4, 2, {})
    g = torch.Generator().manual_seed(0)
    first, second = torch.randint(3, 64, (2, 6), generator=g), torch.randint(3, 64, (3, 1), generator=g)
    why = "this call has 3 sequences but the compressed cache holds 2.*Start a new cache"
    ak.use_antkv_attention(model)
    keyword = ak.cache_keyword(model)
    with torch.no_grad():
        cache = ak.AntKVCache(books)
        model(first, **{keyword: cache})
        with pytest.raises(ValueError, match=why):
            model(second, **{keyword: cache})
        ak.patch(model, books, inductor=False)
        cache = DynamicCache(config=model.config)
        model(first, **{keyword: cache})
        assert isinstance(cache.layers[0].keys, VQTensor)
        with pytest.raises(ValueError, match=why):
            model(second, **{keyword: cache})
        model(second, **{keyword: DynamicCache(config=model.config)})  # a new cache for the new batch works


def _cache_with_window(rows, scores, window=4, anchor_frac=0.5):
    """A key cache whose window holds `rows` [1, H, n, D] with Anchor Scores `scores` [n], then one
    more token appended: the flush moves n - window tokens out (anchor budget ceil(anchor_frac x that))."""
    books = random_codebooks(1, rows.shape[1], rows.shape[3], seed=3)
    settings = ak.CacheSettings(window=window, anchor_frac=anchor_frac)
    cache = VQTensor.empty(1, books[0].key, settings).append(rows)
    cache.window_score.copy_(scores.expand_as(cache.window_score))
    return cache.append(torch.randn(1, rows.shape[1], 1, rows.shape[3]))


def test_nan_scores_never_win_anchor_slots():
    """One NaN key or value makes the scores of every window token its queries saw NaN; topk ranks
    NaN first, so such tokens held the anchor slots for ever. Now the best finite scores win."""
    rows = torch.randn(1, 2, 8, 16, generator=torch.Generator().manual_seed(0))
    nan = float("nan")
    cache = _cache_with_window(rows, torch.tensor([nan, 1.0, 3.0, 2.0, nan, nan, nan, nan]))
    assert cache.anchor_pos.shape[2] == 2
    assert sorted(cache.anchor_pos[0, 0].tolist()) == [2, 3] and sorted(cache.anchor_pos[0, 1].tolist()) == [2, 3]
    assert not cache.anchor_score.isnan().any()


def test_non_finite_rows_stay_exact_like_the_dense_cache():
    """Rows with NaN / Inf leaving the window stay exact as anchors (here with the lowest scores),
    so attention is non-finite where dense attention is; before, they became finite codes."""
    g = torch.Generator().manual_seed(1)
    rows = torch.randn(1, 2, 8, 16, generator=g)
    rows[0, 0, 1, 5] = float("nan")
    rows[0, 1, 3, 0] = float("inf")
    with pytest.warns(UserWarning, match="2 cache rows with NaN / Inf left the exact window"):
        cache = _cache_with_window(rows, torch.tensor([5.0, 0.0, 4.0, 0.1, 0, 0, 0, 0]))
    assert 1 in cache.anchor_pos[0, 0].tolist() and 3 in cache.anchor_pos[0, 1].tolist()
    dense = ak.dequantize(cache)
    assert torch.equal(~torch.isfinite(dense[:, :, :8]), ~torch.isfinite(rows))
    value = VQTensor.empty(1, random_codebooks(1, 2, 16, seed=4)[0].value, cache.settings).append(torch.randn(1, 2, 9, 16, generator=g))
    q = torch.randn(1, 4, 1, 16, generator=g)
    out = torch.nn.functional.scaled_dot_product_attention(q, cache, value, enable_gqa=True)
    ref_keys = torch.cat([rows, dense[:, :, 8:]], 2)
    ref = torch.nn.functional.scaled_dot_product_attention(q, ref_keys, ak.dequantize(value), enable_gqa=True)
    assert ref.isnan().any() and torch.equal(torch.isfinite(out), torch.isfinite(ref))


def test_non_finite_rows_leaving_a_static_window_warn_and_stay_exact():
    """The static cache's C++ step (write.cpp) keeps the growing cache's rule and warning: a row
    with NaN / Inf that leaves the window stays exact as an anchor."""
    g = torch.Generator().manual_seed(2)
    book = random_codebooks(1, 2, 16, seed=6)[0]
    settings = ak.CacheSettings(window=2, anchor_frac=0.5)
    ks, vs = (StaticVQTensor.empty(1, side, 12, settings) for side in (book.key, book.value))
    rows = torch.randn(1, 2, 6, 16, generator=g)
    rows[0, 1, 0, 3] = float("inf")  # in the keys and the values: 2 rows
    with pytest.warns(UserWarning, match="2 cache rows with NaN / Inf left the exact window"):
        for t in range(6):  # one token per call: the row at 0 leaves the window in the call at 2
            ks.index_copy_(2, torch.tensor([t]), rows[:, :, t : t + 1]), vs.index_copy_(2, torch.tensor([t]), rows[:, :, t : t + 1])
            torch.nn.functional.scaled_dot_product_attention(torch.randn(1, 2, 1, 16, generator=g), ks, vs)
    assert 0 in ks.side.anchor_pos[0, 1].tolist()
    assert torch.isinf(ks.dequantize()[0, 1, 0, 3])


def test_a_saved_cache_loads_with_torch_load_defaults(tmp_path):
    """Before: torch.load needed weights_only=False ("Unsupported global: antkv_compile.cache.VQTensor")."""
    books = random_codebooks(1, 2, 16, key_basis=True, seed=5)
    cache = ak.AntKVCache(books, window=2, anchor_frac=0.3, exact_dtype=torch.float16)
    g = torch.Generator().manual_seed(5)
    for n in (7, 1, 1):
        cache.update(torch.randn(2, 2, n, 16, generator=g), torch.randn(2, 2, n, 16, generator=g), 0)
    keys = cache.layers[0].keys
    assert (keys.anchor_pos >= 0).any()
    torch.save(keys, tmp_path / "keys.pt")
    loaded = torch.load(tmp_path / "keys.pt")
    assert isinstance(loaded, VQTensor) and loaded.settings == keys.settings and loaded.dtype == keys.dtype
    assert all(torch.equal(a, b) for a, b in zip(loaded.side, keys.side))
    torch.testing.assert_close(ak.dequantize(loaded), ak.dequantize(keys), rtol=0, atol=0)
    assert torch.equal(loaded.append(torch.ones(2, 2, 1, 16)).codes, keys.append(torch.ones(2, 2, 1, 16)).codes)


def test_no_deprecation_warnings_from_the_transformers_of_today():
    """transformers 5 deprecates past_key_values= (FutureWarning on every call): the package (and
    cache_keyword for callers) passes the keyword the installed version wants. Before,
    decode_faithful_nll warned on every chunk."""
    from antkv_compile.evaluation import decode_faithful_nll

    model, books = _tiny("Qwen2Config", "Qwen2ForCausalLM", 64, 4, 2, {})
    ids = torch.randint(3, 64, (1, 6), generator=torch.Generator().manual_seed(6))
    keyword = ak.cache_keyword(model)
    assert keyword in ("cache", "past_key_values") and keyword in inspect.signature(type(model).forward).parameters
    assert ak.cache_keyword(model.forward) == ak.cache_keyword(torch.compile(model)) == ak.cache_keyword(torch.compile(model.forward)) == keyword
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # transformers' deprecations are FutureWarnings
        warnings.filterwarnings("error", category=DeprecationWarning, module="transformers")
        warnings.filterwarnings("error", message=".*(past_key_values|deprecated).*")
        ak.use_antkv_attention(model)
        ref = _generate(model, ids, ak.AntKVCache(books, window=2))
        nll, n, cache = decode_faithful_nll(model, ids[0], lambda: ak.AntKVCache(books, window=2), chunk=2)
        assert n == 5 and nll > 0 and isinstance(cache.layers[0].keys, VQTensor)
        ak.patch(model, books, window=2, inductor=False)
        assert torch.equal(_generate(model, ids, DynamicCache(config=model.config)), ref)
        assert torch.equal(model.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0), ref)
