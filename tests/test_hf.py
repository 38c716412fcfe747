"""AntKVCache inside Hugging Face models (tiny random-weight configs): generate() in all its modes,
and every decode step equals the same model run on a DynamicCache holding the dequantized past."""

import pytest
import torch
from helpers import tiny_llama
from transformers import DynamicCache, LlamaConfig

import antkv_compile as ak
from antkv_compile.cache import VQTensor


@pytest.fixture(scope="module")
def tiny():
    model = tiny_llama()
    books = ak.calibrate(model, torch.randint(3, 96, (512,)), bits=1.0, seq_len=128, max_tokens=512, kmeans_tokens=256, iters=4, progress=False)
    return model, books


def _dense_past(cache, drop_last):
    ref = DynamicCache()
    for i, layer in enumerate(cache.layers):
        ref.update(ak.dequantize(layer.keys)[..., : layer.keys.shape[2] - drop_last, :],
                   ak.dequantize(layer.values)[..., : layer.values.shape[2] - drop_last, :], i)  # fmt: skip
    return ref


@pytest.mark.parametrize("attn, exact_dtype", [("antkv", None), ("sdpa", None), ("antkv", torch.float16)])
@torch.no_grad()
def test_each_step_equals_dense_attention_on_the_dequantized_past(tiny, attn, exact_dtype):
    """With exact_dtype float16 the float32 model's window and anchors are stored in half the bytes."""
    model, books = tiny
    model.set_attn_implementation(attn)  # "sdpa" repeats K/V densely: the fallback must agree too
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 96, (2, 40), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # left padding
    cache = ak.AntKVCache(books, window=4, anchor_frac=0.1, exact_dtype=exact_dtype)
    for n in (24, 8, 1, 1, 3, 1, 2):  # prefill, a chunk, decode steps, a short chunk
        start = cache.get_seq_length()
        step_ids, step_mask = ids[:, start : start + n], mask[:, : start + n]
        out = model(step_ids, attention_mask=step_mask, **{ak.cache_keyword(model): cache}, use_cache=True).logits
        ref_cache = _dense_past(cache, drop_last=n) if start else None
        ref = model(step_ids, attention_mask=step_mask, **{ak.cache_keyword(model): ref_cache}, use_cache=True).logits
        # The reference attends to the call's own tokens unrounded; the cache holds them in exact_dtype.
        tol = 1e-4 if exact_dtype is None else 2e-3
        torch.testing.assert_close(out, ref, rtol=tol, atol=tol)
        assert all(isinstance(layer.keys, VQTensor) for layer in cache.layers)
    assert (cache.layers[0].keys.anchor_pos >= 0).any()
    keys = cache.layers[0].keys
    assert keys.dtype == torch.float32 and keys.window.dtype == keys.anchor_rows.dtype == (exact_dtype or torch.float32)
    model.set_attn_implementation("sdpa")


@torch.no_grad()
def test_generate_greedy_sampling_beams(tiny):
    model, books = tiny
    ak.use_antkv_attention(model)
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(3, 96, (2, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    kw = dict(attention_mask=mask, max_new_tokens=40, pad_token_id=0)
    greedy = model.generate(ids, do_sample=False, **{ak.cache_keyword(model): ak.AntKVCache(books, window=8)}, **kw)
    assert greedy.shape == (2, 52)
    torch.manual_seed(0)
    sampled = model.generate(ids, do_sample=True, top_k=20, **{ak.cache_keyword(model): ak.AntKVCache(books)}, **kw)
    assert sampled.shape[0] == 2
    cache = ak.AntKVCache(books, window=8)
    beams = model.generate(ids, num_beams=3, do_sample=False, **{ak.cache_keyword(model): cache}, **kw)
    assert beams.shape[0] == 2
    assert all(isinstance(layer.keys, VQTensor) for layer in cache.layers)
    assert cache.cache_nbytes() > 0
    model.set_attn_implementation("sdpa")


def test_codebooks_for_another_model_are_refused(tiny):
    model, books = tiny
    other = LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4)
    with pytest.raises(ValueError, match="num_key_value_heads: codebooks have 2, model has 4"):
        ak.AntKVCache(books, config=other)
    ak.AntKVCache(books, config=model.config)  # the right model passes


def test_calibration_spread_over_positions_sees_the_keys_of_those_positions(tiny):
    """positions > seq_len runs each sequence at shifted position ids: its values do not change and
    its keys are the unshifted ones rotated by RoPE at the offset (a float64 rotation by the
    config's rope_theta, rotate-half pairs), so the codebooks serve [0, positions)."""
    model, _ = tiny
    ids = torch.randint(3, 96, (96,))
    plain = ak.collect_calibration(model, ids, seq_len=32, max_tokens=None, progress=False, positions=None)
    spread = ak.collect_calibration(model, ids, seq_len=32, max_tokens=None, progress=False, positions=200)
    offsets = [0, 84, 168]  # evenly over [0, 200 - 32]
    D = plain.keys[0].shape[-1]
    rope = getattr(model.config, "rope_parameters", None) or {"rope_theta": model.config.rope_theta}  # transformers 5 / 4
    inv_freq = rope["rope_theta"] ** (-torch.arange(0, D, 2, dtype=torch.float64) / D)

    def turned(k, offset):  # rotate-half pairs (i, i + D/2) by offset x inv_freq[i], float64
        angle = (offset * inv_freq).repeat(2)
        return k * angle.cos() + torch.cat([-k[..., D // 2 :], k[..., : D // 2]], -1) * angle.sin()

    for layer in range(model.config.num_hidden_layers):
        torch.testing.assert_close(spread.values[layer], plain.values[layer], atol=2e-5, rtol=1e-4)
        for s, offset in enumerate(offsets):
            torch.testing.assert_close(spread.keys[layer][s].double(), turned(plain.keys[layer][s].double(), offset), atol=1e-4, rtol=1e-4)
    books = ak.fit_codebooks(spread, bits=1.0, kmeans_tokens=64, iters=1, progress=False)
    assert books.settings["calibration_positions"] == 200 and books.settings["calibration_seq_len"] == 32
    # the default: the trained context (256) as far as 3 sequences of 32 tile it, 96 positions
    auto = ak.collect_calibration(model, ids, seq_len=32, max_tokens=None, progress=False)
    assert auto.covered_positions == 96
    for layer in range(model.config.num_hidden_layers):  # the third sequence starts at 96 - 32
        torch.testing.assert_close(auto.keys[layer][2].double(), turned(plain.keys[layer][2].double(), 64), atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="positions must be a number of positions >= seq_len=32"):
        ak.collect_calibration(model, ids, seq_len=32, max_tokens=None, progress=False, positions=16)


def test_calibration_records_the_split_and_refuses_bad_head_dim(tiny):
    model, books = tiny
    # 1 bit: K1.5/V0.5 would store 6-bit key codes a byte each (1.25 bits per element): not a candidate
    assert books.settings["bits"] == 1.0 and books.settings["chosen"] == ["K1/V1"] * 2
    assert books.settings["candidate_errors"] == {} and books.average_bits == 1.0
    data = ak.collect_calibration(model, torch.randint(3, 96, (128,)), seq_len=64, max_tokens=128, progress=False)
    low = ak.fit_codebooks(data, bits=0.375, kmeans_tokens=128, iters=2, progress=False)  # both store 0.5 bits per element
    assert set(low.settings["candidate_errors"]) == {"K0.375/V0.375", "K0.5/V0.25"}
    assert low.settings["chosen"][0] == min(low.settings["candidate_errors"], key=low.settings["candidate_errors"].get) or \
        low.settings["chosen"][0] == "K0.5/V0.25"  # the norm rule may break a near tie towards keys
    assert low.settings["norm_prior"] in ("keys", "values")
    data.keys = [k[..., :24] for k in data.keys]  # pretend head_dim 24: 0.5 bit needs d = 16
    with pytest.raises(ValueError, match="head_dim 24 is not divisible by the sub-vector size 16"):
        ak.fit_codebooks(data, bits=0.5, progress=False)
