"""The evaluation utilities on a tiny random Llama: chunked cached decoding reproduces a full forward,
and cache bytes are the bytes of the tensors held."""

import pytest
import torch
import torch.nn.functional as F
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM, QuantizedCache

from antkv_compile.evaluation import cache_nbytes, decode_faithful_nll, decode_nll, dense_kv_elements, tensors_nbytes

LAYERS, KV_HEADS, HEAD_DIM = 2, 2, 16


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = LlamaConfig(num_hidden_layers=LAYERS, hidden_size=64, num_attention_heads=4, num_key_value_heads=KV_HEADS,
                         intermediate_size=128, vocab_size=128, max_position_embeddings=512)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 128, (200,), generator=torch.Generator().manual_seed(1))


def test_chunked_nll_equals_full_forward(model, ids):
    total, n, _ = decode_faithful_nll(model, ids, lambda: DynamicCache(config=model.config), chunk=8)
    with torch.no_grad():
        logits = model(ids[None]).logits[0, :-1].float()
    expected = F.cross_entropy(logits, ids[1:], reduction="sum").item()
    assert n == ids.numel() - 1
    assert total == pytest.approx(expected, rel=1e-4)


def test_dynamic_cache_bytes_are_dense_fp32(model, ids):
    _, _, cache = decode_faithful_nll(model, ids, lambda: DynamicCache(config=model.config), chunk=8)
    dense = 2 * LAYERS * 1 * KV_HEADS * ids.numel() * HEAD_DIM
    assert dense_kv_elements(cache, model.config) == dense
    assert cache_nbytes(cache) == dense * 4


def test_views_count_their_whole_storage_once():
    base = torch.zeros(10, 8)
    assert tensors_nbytes([base[:2], base[5:], {"again": base}]) == base.nbytes
    assert tensors_nbytes([base, torch.ones(3)], exclude=[base[0]]) == 3 * 4


def test_quanto_cache_is_smaller_than_dense(model, ids):
    pytest.importorskip("optimum.quanto")

    def make_cache():
        return QuantizedCache("quanto", model.config, nbits=2, axis_key=0, axis_value=0, q_group_size=16,
                              residual_length=32)

    _, _, cache = decode_faithful_nll(model, ids, make_cache, chunk=8)
    nbytes = cache_nbytes(cache)
    assert 0 < nbytes < dense_kv_elements(cache, model.config) * 4


@pytest.mark.parametrize("chunk,prompt", [(1, 0), (1, 17), (5, 9), (3, 1)])
def test_batched_decode_scores_the_generated_predictions(model, chunk, prompt):
    """A batch of windows, a prompt prefill then `chunk` tokens per call: each window's NLL is the
    full forward's cross entropy over the positions from the prompt's last one on."""
    windows = torch.randint(0, 128, (3, 41), generator=torch.Generator().manual_seed(chunk * 100 + prompt))
    total, n, cache = decode_nll(model, windows, lambda: DynamicCache(config=model.config), chunk=chunk, prompt=prompt)
    first = max(prompt - 1, 0)
    with torch.no_grad():
        logits = model(windows).logits[:, first:-1].double()
    expected = F.cross_entropy(logits.transpose(1, 2), windows[:, first + 1:], reduction="none").sum(-1)
    assert n == windows.shape[1] - 1 - first and cache.get_seq_length() == windows.shape[1]
    torch.testing.assert_close(total, expected, rtol=1e-4, atol=1e-3)


def test_batched_decode_rejects_a_prompt_as_long_as_the_window(model):
    with pytest.raises(ValueError, match="prompt"):
        decode_nll(model, torch.zeros(1, 8, dtype=torch.long), lambda: DynamicCache(config=model.config), prompt=8)
