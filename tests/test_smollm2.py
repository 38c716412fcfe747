"""The real model, kept small for CI: SmolLM2-135M-Instruct (real weights) with a 1-bit cache.
The long accuracy runs live in benchmarks/accuracy.py."""

import pytest
import torch
from transformers import DynamicCache

import antkv_compile as ak
from antkv_compile.evaluation import cache_nbytes, load_smollm2, load_wikitext_ids

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    try:
        model, tok = load_smollm2()
        ids = load_wikitext_ids(tok)
    except (ImportError, FileNotFoundError) as e:  # the demo extra or ../shared missing
        pytest.skip(str(e))
    books = ak.calibrate(model, ids[:1024], bits=1.0, seq_len=512, max_tokens=1024, kmeans_tokens=1024, iters=3, progress=False)
    return model, tok, ids, books


@torch.no_grad()
def test_chunks_equal_dense_attention_on_the_dequantized_past(smollm2):
    model, _, ids, books = smollm2
    ak.use_antkv_attention(model)
    window = ids[5000:5160][None]
    cache = ak.AntKVCache(books, config=model.config, window=16)
    for start in range(0, 160, 32):
        chunk = window[:, start : start + 32]
        out = model(chunk, **{ak.cache_keyword(model): cache}, use_cache=True).logits
        ref_past = None
        if start:
            ref_past = DynamicCache()
            for i, layer in enumerate(cache.layers):
                T = layer.keys.shape[2] - chunk.shape[1]
                ref_past.update(ak.dequantize(layer.keys)[:, :, :T], ak.dequantize(layer.values)[:, :, :T], i)
        ref = model(chunk, **{ak.cache_keyword(model): ref_past}, use_cache=True).logits
        torch.testing.assert_close(out, ref, rtol=1e-3, atol=1e-3)
    assert (cache.layers[3].keys.anchor_pos >= 0).all()  # the flushes picked anchors
    model.set_attn_implementation("sdpa")


@torch.no_grad()
def test_generate_with_the_1bit_cache(smollm2):
    model, tok, _, books = smollm2
    ak.use_antkv_attention(model)
    prompt = tok("The capital of France is", return_tensors="pt").input_ids
    cache = ak.AntKVCache(books, window=8)
    out = model.generate(prompt, max_new_tokens=24, do_sample=False, **{ak.cache_keyword(model): cache})
    assert out.shape[1] == prompt.shape[1] + 24
    assert cache.cache_nbytes() == cache_nbytes(cache, exclude=books.tensors())
    model.set_attn_implementation("sdpa")
