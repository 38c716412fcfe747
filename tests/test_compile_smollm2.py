"""SmolLM2-135M-Instruct (real weights): 64 greedy tokens from several prompts are identical between
patch()'s compiled generate() and the eager compressed-cache run.

Loading, calibrating and compiling the 30-layer model takes minutes on a CPU, so this check is
opt-in: ANTKV_REAL_MODEL=1 python -m pytest tests/test_compile_smollm2.py"""

import os

import pytest
import torch

import antkv_compile as ak

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.environ.get("ANTKV_REAL_MODEL") != "1", reason="real model: set ANTKV_REAL_MODEL=1"),
]

PROMPTS = ["The history of the Roman Empire", "Photosynthesis is the process by which", "In computer science, a hash table"]


@torch.no_grad()
def test_smollm2_greedy_tokens_identical_compiled_and_eager():
    from antkv_compile.evaluation import load_smollm2, load_wikitext_ids

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    model, tok = load_smollm2()
    ids = load_wikitext_ids(tok)[:1024]
    books = ak.calibrate(model, ids, bits=1.0, seq_len=512, max_tokens=1024, kmeans_tokens=1024, iters=6, kv_split="equal", progress=False)
    tok.padding_side = "left"
    batch = tok(PROMPTS, return_tensors="pt", padding=True)
    kw = dict(max_new_tokens=64, min_new_tokens=64, do_sample=False, pad_token_id=tok.pad_token_id)
    ak.use_antkv_attention(model)
    eager = model.generate(**batch, past_key_values=ak.AntKVCache(books, window=8), **kw)
    ak.patch(model, books, window=8)
    compiled = model.generate(**batch, **kw)
    assert torch.equal(compiled, eager)
    sites = model.antkv_backend.sites
    assert len(sites) == 60 and all(s.rewritten for s in sites)  # 30 layers x (prefill, decode)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] <= 3
