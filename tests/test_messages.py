"""Error messages name the problem and what to do (issue 14): each test feeds the bad input and
checks the message against what actually works."""

import inspect
import warnings
import re

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from transformers import LlamaConfig, LlamaForCausalLM

import antkv_compile as ak
from antkv_compile.quant.pq import PRESETS

# transformers 5.24 renames past_key_values= to cache=
CACHE_KW = "cache" if "cache" in inspect.signature(LlamaForCausalLM.forward).parameters else "past_key_values"


@given(head_dim=st.integers(1, 160), bits=st.sampled_from(sorted(PRESETS)))
def test_head_dim_error_lists_only_presets_that_divide_it(head_dim, bits):
    spec = PRESETS[bits]
    if head_dim % spec.sub_dim == 0:
        assert spec.num_subspaces(head_dim) * spec.sub_dim == head_dim
        return
    with pytest.raises(ValueError, match=f"head_dim {head_dim} is not divisible by the sub-vector size {spec.sub_dim}") as e:
        spec.num_subspaces(head_dim)
    msg = str(e.value)
    listed = re.search(r"divides \d+: ([\d., ]+)$", msg)
    # every preset the message offers works for this head_dim, and every one that works is offered
    offered = {float(b) for b in listed.group(1).split(", ")} if listed else set()
    works = set()
    for b, other in PRESETS.items():
        try:
            other.num_subspaces(head_dim)
            works.add(b)
        except ValueError:
            pass
    assert offered == works
    if not works:
        assert "PQSpec(sub_dim, code_bits)" in msg


@pytest.fixture(scope="module")
def tiny_llama():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, max_position_embeddings=128)  # fmt: skip
    return LlamaForCausalLM(cfg).eval()


def test_calibrate_rejects_a_float64_model(tiny_llama):
    model = tiny_llama.to(torch.float64)
    try:
        # what the message says would happen: such a model cannot use a compressed cache at all
        books = ak.calibrate(model.float(), torch.randint(0, 64, (64,)), seq_len=64, kmeans_tokens=64, iters=1, progress=False)
        model.double()
        with pytest.raises(TypeError, match="float32, float16 or bfloat16"), torch.no_grad():
            model(torch.randint(0, 64, (1, 8)), **{CACHE_KW: ak.AntKVCache(books)})
        with pytest.raises(TypeError, match=r"calibrate got a torch.float64 model.*model.to\(torch.float32\)"):
            ak.calibrate(model, torch.randint(0, 64, (64,)), seq_len=64, progress=False)
    finally:
        model.float()


@pytest.mark.parametrize("n, max_tokens", [(40, None), (200, 48)])
def test_calibrate_on_too_few_tokens_says_how_many_and_names_seq_len(tiny_llama, n, max_tokens):
    ids = torch.randint(0, 64, (n,))
    kept = min(n, max_tokens or n)
    with pytest.raises(ValueError) as e:
        ak.calibrate(tiny_llama, ids, seq_len=64, max_tokens=max_tokens, progress=False)
    msg = str(e.value)
    assert f"needs at least 64, got {kept}" in msg and f"seq_len={kept}" in msg
    assert (f"max_tokens={max_tokens} keeps {kept} of the {n} given" in msg) == (max_tokens is not None)
    # the suggested fix works
    ak.calibrate(tiny_llama, ids, seq_len=kept, max_tokens=max_tokens, kmeans_tokens=kept, iters=1, progress=False)


def test_a_cache_past_the_calibrated_positions_warns_once(tiny_llama, tmp_path):
    """Codebooks calibrated on 32-token sequences record it (and keep it through a file); a cache
    of them warns once when it holds more tokens (eager AntKVCache: at the call that passes 32, not
    before; AntKVStaticCache: at its allocation for more), naming seq_len as the fix."""
    torch.manual_seed(1)
    books = ak.calibrate(tiny_llama, torch.randint(0, 64, (64,)), seq_len=32, kmeans_tokens=64, iters=1, progress=False, positions=None)
    books.save(tmp_path / "b.safetensors")
    books = ak.Codebooks.load(tmp_path / "b.safetensors")
    assert books.settings["calibration_positions"] == 32
    cache = ak.AntKVCache(books)
    with warnings.catch_warnings(record=True) as seen, torch.no_grad():
        warnings.simplefilter("always")
        out = tiny_llama(torch.randint(0, 64, (1, 30)), **{CACHE_KW: cache})
        assert not [w for w in seen if "calibrated on positions below 32" in str(w.message)]
        for _ in range(5):  # 31 .. 35 tokens: one warning, at 33
            out = tiny_llama(out.logits[:, -1:].argmax(-1), **{CACHE_KW: cache})
    hits = [str(w.message) for w in seen if "calibrated on positions below 32" in str(w.message)]
    assert len(hits) == 1 and "holds 33 tokens" in hits[0] and "positions=N" in hits[0], hits
    with pytest.warns(UserWarning, match="holds 64 tokens, but its codebooks were calibrated on positions below 32"):
        ak.AntKVStaticCache(64, ak.Codebooks.load(tmp_path / "b.safetensors"), config=tiny_llama.config)


def test_patch_warns_once_past_the_calibrated_positions():
    """patch(model, codebooks) with a growing cache: the call that takes it past the calibration
    sequences' length warns, once for the whole generation."""
    from helpers import tiny_llama as fresh_llama

    model = fresh_llama()
    books = ak.calibrate(model, torch.randint(3, 96, (64,)), seq_len=32, kmeans_tokens=64, iters=1, progress=False, positions=None)
    ak.patch(model, books, inductor=False)
    with warnings.catch_warnings(record=True) as seen, torch.no_grad():
        warnings.simplefilter("always")
        model.generate(torch.randint(3, 96, (1, 8)), max_new_tokens=40, min_new_tokens=40, do_sample=False, pad_token_id=0)
    hits = [str(w.message) for w in seen if "calibrated on positions below 32" in str(w.message)]
    assert len(hits) == 1 and "holds 33 tokens" in hits[0], hits


@pytest.mark.parametrize("path", ["eager", "patch"])
def test_a_cache_past_its_last_refinement_warns_once(path):
    """A cache without codebooks refines them on its first CAP tokens (refine=(FIRST, CAP)); without
    the model's RoPE the step that takes it past CAP warns once for the whole cache (all layers,
    every later step), naming the fixes; before CAP, nothing. patch reads the RoPE from the model:
    GPT-NeoX's partial rotary is not one it can shift, so it warns too."""
    from helpers import tiny_hf_model
    from helpers import tiny_llama as fresh_llama

    model = tiny_hf_model("gpt_neox")[0] if path == "patch" else fresh_llama()
    with warnings.catch_warnings(record=True) as seen, torch.no_grad():
        warnings.simplefilter("always")
        if path == "patch":
            ak.patch(model, refine=(16, 32), inductor=False)
            model.generate(torch.randint(3, 96, (1, 20)), max_new_tokens=20, min_new_tokens=20, do_sample=False, pad_token_id=0)
        else:
            ak.use_antkv_attention(model)
            cache = ak.AntKVCache(refine=(16, 32))
            out = model(torch.randint(3, 96, (1, 20)), **{CACHE_KW: cache})
            for _ in range(20):  # 21 .. 40 tokens
                out = model(out.logits[:, -1:].argmax(-1), **{CACHE_KW: cache})
    hits = [str(w.message) for w in seen if "refined its codebooks" in str(w.message)]
    assert len(hits) == 1, hits
    assert "on its first 32 tokens and now holds 33" in hits[0] and "positions=N" in hits[0] and "ak.model_rope(model)" in hits[0]


def test_a_cache_given_the_models_rope_warns_only_past_its_context():
    """With rope=ak.model_rope(model) the last switch serves the model's trained context
    (max_position_embeddings 256 here): no warning at 40 tokens; past 256, one."""
    from helpers import tiny_llama as fresh_llama

    model = fresh_llama()
    rope = ak.model_rope(model)
    assert rope is not None and rope.positions == 256
    ak.use_antkv_attention(model)
    cache = ak.AntKVCache(refine=(16, 32), rope=rope._replace(positions=48))  # a context of 48 keeps the test short
    with warnings.catch_warnings(record=True) as seen, torch.no_grad():
        warnings.simplefilter("always")
        out = model(torch.randint(3, 96, (1, 20)), **{CACHE_KW: cache})
        for step in range(40):  # 21 .. 60 tokens
            out = model(out.logits[:, -1:].argmax(-1), **{CACHE_KW: cache})
            hits = [str(w.message) for w in seen if "refined its codebooks" in str(w.message)]
            assert len(hits) == (21 + step > 48), (21 + step, hits)
    assert "at later positions up to 48 and now holds 49" in hits[0]
