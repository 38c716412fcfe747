"""The static compressed cache (cache.StaticVQTensor, ops.static_attention_, hf.AntKVStaticCache,
the pass's static sites): the cache torch.compile users run (HF StaticCache, gpt-fast's KVCache).

Checked against an independent float64 reference (SDPA on the dense cache a state stands for,
rebuilt from its raw tensors by tests/reference.py, plus the call's new tokens exact) and against
the growing cache (VQTensor appends + VQ attention), whose outputs the static one must equal at
every call; the compiled graph against eager, with its graphs counted; and the errors a misuse gets."""

import math

import pytest
import torch
import torch.nn.functional as F
import transformers
from helpers import random_codebooks, tiny_hf_model
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import dense_from_parts

import antkv_compile as ak
from antkv_compile import StaticVQTensor, VQTensor, state
from antkv_compile import ops
from antkv_compile.ops import cpu
from antkv_compile.settings import CacheSettings


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _book(g, H, D, spec, basis):
    d, c = spec
    a = torch.eye(D) + 0.3 * torch.randn(H, D, D, generator=g) / D**0.5 if basis else torch.zeros(H, 0, 0)
    a_inv = torch.linalg.inv(a) if basis else torch.zeros(H, 0, 0)
    return state.Book(torch.randn(H, D // d, 1 << c, d, generator=g), torch.rand(H, generator=g), a, a_inv)


def _dense64(side: state.Side) -> torch.Tensor:
    d = dense_from_parts(side.codes, side.centroids.double(), side.anchor_rows.double(), side.anchor_pos, side.window.double())
    return d if side.basis.shape[-1] == 0 else d @ side.basis_inv.double()


def _sdpa64(q, k, v, mask):
    G = q.shape[1] // k.shape[1]
    bias = torch.zeros(mask.shape, dtype=torch.float64).masked_fill(~mask, -math.inf)
    return F.scaled_dot_product_attention(q.double(), k.repeat_interleave(G, 1), v.repeat_interleave(G, 1), attn_mask=bias)


@settings(max_examples=20, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    spec=st.sampled_from([(4, 8), (8, 8), (16, 6)]),
    window=st.integers(0, 5),
    anchor_frac=st.sampled_from([0.0, 0.1, 0.5]),
    groups=st.sampled_from([1, 3]),
    calls=st.lists(st.sampled_from([1, 1, 1, 2, 5, 9]), min_size=1, max_size=12),
    kernel=st.booleans(),
)
def test_static_calls_equal_the_growing_cache_and_sdpa_on_the_dense_cache(seed, spec, window, anchor_frac, groups, calls, kernel):
    """Prefills, chunks and decode steps in any order: every call's output is float64 SDPA on the
    cache held before it plus the call's tokens exact, and equals the growing cache's output; with
    write.cpp's whole-call kernel and with the op's body (the device kernels composed in Python)."""
    with pytest.MonkeyPatch.context() as m:
        if not kernel:  # the op's body (what write.cpp's kernel hands the calls it does not take)
            m.setattr(ops, "static_attention_", ops.static_step_composed)
        _static_calls(seed, spec, window, anchor_frac, groups, calls)


def test_calls_the_cpu_kernel_does_not_take_run_the_ops_body():
    """A prefill of more query rows per kv head than write.cpp's kernel takes (cpu.MAX_ROWS) goes
    to the op's body from C++ (antkv::static_step_composed), then decode steps to the kernel:
    the same contract on every call."""
    _static_calls(7, (4, 8), 3, 0.1, 3, [cpu.MAX_ROWS // 3 + 5, 1, 1, 2])


def _static_calls(seed, spec, window, anchor_frac, groups, calls):
    g = torch.Generator().manual_seed(seed)
    B, H, D = 2, 2, 16
    capacity = sum(calls) + int(torch.randint(0, 4, (1,), generator=g))
    s = CacheSettings(window=window, anchor_frac=anchor_frac)
    bk, bv = _book(g, H, D, spec, True), _book(g, H, D, spec, False)
    ks, vs = StaticVQTensor.empty(B, bk, capacity, s), StaticVQTensor.empty(B, bv, capacity, s)
    kg, vg = VQTensor.empty(B, bk, s), VQTensor.empty(B, bv, s)
    T = 0
    for n in calls:
        q = torch.randn(B, H * groups, n, D, generator=g)
        k, v = torch.randn(B, H, n, D, generator=g), torch.randn(B, H, n, D, generator=g)
        keep = torch.rand(B, 1, n, capacity, generator=g) > 0.3
        keep &= torch.arange(capacity) <= T + torch.arange(n)[:, None]  # causal: nothing past the filled slots
        keep[:, :, torch.arange(n), T + torch.arange(n)] = True  # each query sees itself
        held_k, held_v = _dense64(ks.side), _dense64(vs.side)
        pos = torch.arange(T, T + n)
        ks.index_copy_(2, pos, k)
        vs[:, :, pos] = v
        out = F.scaled_dot_product_attention(q, ks, vs, attn_mask=keep, enable_gqa=groups > 1)
        want = _sdpa64(q, torch.cat([held_k, k.double()], 2), torch.cat([held_v, v.double()], 2), keep[..., : T + n])
        torch.testing.assert_close(out.double(), want, rtol=1e-4, atol=1e-4)
        kg, vg = kg.append(k), vg.append(v)
        grown = F.scaled_dot_product_attention(q, kg, vg, attn_mask=keep[..., : T + n], enable_gqa=groups > 1)
        torch.testing.assert_close(out, grown, rtol=0, atol=1e-6)
        T += n
        lengths = ks.lengths.tolist()
        assert lengths[0] == T and lengths[2] == min(T, window)
        # the growing cache flushes the same tokens at the start of its next call
        assert lengths[1] == state.flush_lengths(T, kg.anchor_pos.shape[2], kg.window.shape[2], 0, window, anchor_frac)[0]
    dense = ks.dequantize()
    assert dense.shape == (B, H, capacity, D) and not dense[:, :, T:].any()
    torch.testing.assert_close(dense[:, :, :T].double(), _dense64(ks.side), rtol=0, atol=1e-5)


def test_misuse_gets_a_clear_error_and_reset_empties_the_cache():
    g = torch.Generator().manual_seed(0)
    bk, bv = _book(g, 2, 16, (4, 8), True), _book(g, 2, 16, (4, 8), False)
    ks, vs = StaticVQTensor.empty(1, bk, 8), StaticVQTensor.empty(1, bv, 8)
    q, k = torch.randn(1, 2, 2, 16), torch.randn(1, 2, 2, 16)
    causal = torch.ones(1, 1, 2, 8, dtype=torch.bool).tril()
    ks.index_copy_(2, torch.tensor([1, 2]), k), vs.index_copy_(2, torch.tensor([1, 2]), k)
    with pytest.raises(ValueError, match=r"positions 0\.\.1 \(right after the 0 held"):
        F.scaled_dot_product_attention(q, ks, vs, attn_mask=causal)
    ks.index_copy_(2, torch.tensor([0, 1]), k), vs.index_copy_(2, torch.tensor([0, 1]), k)
    with pytest.raises(ValueError, match="unfilled slots past 2"):
        F.scaled_dot_product_attention(q, ks, vs, attn_mask=torch.ones(1, 1, 2, 8, dtype=torch.bool))
    assert ks.lengths.tolist() == [0, 0, 0]  # a refused call writes nothing
    ks.index_copy_(2, torch.tensor([0, 1]), k)
    with pytest.raises(RuntimeError, match="two writes without an attention"):
        ks.index_copy_(2, torch.tensor([0, 1]), k)
    ks._pending = vs._pending = None
    for t in range(4):
        ks.index_copy_(2, torch.tensor([2 * t, 2 * t + 1]), k), vs.index_copy_(2, torch.tensor([2 * t, 2 * t + 1]), k)
        F.scaled_dot_product_attention(q, ks, vs, attn_mask=torch.ones(1, 1, 2, 8, dtype=torch.bool).tril(2 * t))
    ks.index_copy_(2, torch.tensor([8]), k[:, :, :1]), vs.index_copy_(2, torch.tensor([8]), k[:, :, :1])
    with pytest.raises(ValueError, match="static cache full: 8 tokens held"):
        F.scaled_dot_product_attention(q[:, :, :1], ks, vs)
    ks._pending = vs._pending = None
    ks.zero_(), vs.zero_()
    ks.index_copy_(2, torch.tensor([0]), k[:, :, :1]), vs.index_copy_(2, torch.tensor([0]), k[:, :, :1])
    F.scaled_dot_product_attention(q[:, :, :1], ks, vs)  # no mask (HF's for one query): the filled prefix
    assert ks.lengths.tolist()[0] == vs.lengths.tolist()[0] == 1
    ks.zero_()
    assert ks.lengths.tolist() == [0, 0, 0] and not ks.dequantize().any()
    with pytest.raises(RuntimeError, match="would write into the compressed cache"):
        ks.add_(1.0)


class _GptFast(torch.nn.Module):
    """gpt-fast's pattern: per layer, a KVCache whose buffers are written with
    `k_cache[:, :, input_pos] = k`, then read whole by SDPA (kv heads repeated by repeat_interleave,
    or by enable_gqa) with a mask hiding the unfilled slots."""

    def __init__(self, books, capacity, heads=4, kv_heads=2, dim=16, gqa=False):
        super().__init__()
        self.heads, self.kv_heads, self.dim, self.gqa = heads, kv_heads, dim, gqa
        self.proj = torch.nn.ModuleList(torch.nn.Linear(heads * dim, (heads + 2 * kv_heads) * dim) for _ in books.layers)
        self.caches = [[StaticVQTensor.empty(1, side, capacity) for side in (b.key, b.value)] for b in books.layers]

    def forward(self, x, input_pos, mask):
        B, L, _ = x.shape
        for proj, cache in zip(self.proj, self.caches):
            q, k, v = proj(x).split([self.heads * self.dim, self.kv_heads * self.dim, self.kv_heads * self.dim], -1)
            q, k, v = (t.view(B, L, -1, self.dim).transpose(1, 2) for t in (q, k, v))
            k_cache, v_cache = cache
            k_cache[:, :, input_pos] = k
            v_cache[:, :, input_pos] = v
            if self.gqa:
                y = F.scaled_dot_product_attention(q, k_cache, v_cache, attn_mask=mask, enable_gqa=True)
            else:
                G = self.heads // self.kv_heads
                y = F.scaled_dot_product_attention(q, k_cache.repeat_interleave(G, 1), v_cache.repeat_interleave(G, 1), attn_mask=mask)
            x = x + y.transpose(1, 2).reshape(B, L, -1)
        return x


def test_gpt_fast_static_cache_compiles_fullgraph_to_one_decode_graph():
    """torch.compile(fullgraph=True) with Inductor: the prefill and every decode step up to
    capacity run in 2 graphs, and give eager's outputs (eager with enable_gqa, the compiled model
    with repeat_interleave)."""
    torch.manual_seed(0)
    books, capacity = random_codebooks(2, 2, 16), 40
    compiled_model, eager_model = _GptFast(books, capacity), _GptFast(books, capacity, gqa=True)
    eager_model.load_state_dict(compiled_model.state_dict())
    backend = ak.AntKVBackend(books, window=4, anchor_frac=0.1)
    step = torch.compile(compiled_model, backend=backend, fullgraph=True)
    for m in (compiled_model, eager_model):
        m.caches = [[StaticVQTensor.empty(1, side, capacity, CacheSettings(4, 0.1)) for side in (b.key, b.value)] for b in books.layers]
    causal = torch.ones(capacity, capacity, dtype=torch.bool).tril()
    torch._dynamo.utils.counters.clear()
    with torch.no_grad():
        for start, n in [(0, 7)] + [(t, 1) for t in range(7, capacity)]:
            x, pos = torch.randn(1, n, 64), torch.arange(start, start + n)
            torch.testing.assert_close(step(x, pos, causal[None, None, pos]), eager_model(x, pos, causal[None, None, pos]), rtol=0, atol=1e-5)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 2
    assert all(site.rewritten and "static compressed cache" in site.detail for site in backend.sites), backend.sites
    assert compiled_model.caches[0][0].lengths.tolist()[0] == capacity


def test_generate_with_a_static_cache_through_patch_compresses_and_equals_eager():
    """generate(cache_implementation="static") under patch(): its StaticCache's layers become
    compressed static layers, the prefill runs eagerly, every decode step in one graph, and the
    tokens are eager AntKVStaticCache's (and, with calibrated codebooks, the eager growing
    AntKVCache's: the two caches give the same outputs)."""
    model, books = tiny_hf_model("llama")
    ids = torch.randint(3, 64, (2, 9))
    kw = dict(max_new_tokens=10, min_new_tokens=10, do_sample=False, pad_token_id=0)
    ak.use_antkv_attention(model)
    with torch.no_grad():
        want = model.generate(ids, **{ak.cache_keyword(model): ak.AntKVStaticCache(19, books)}, **kw)
        grown = model.generate(ids, **{ak.cache_keyword(model): ak.AntKVCache(books)}, **kw)
        ak.patch(model, books, inductor=False)
        torch._dynamo.utils.counters.clear()
        got = model.generate(ids, cache_implementation="static", **kw)
    assert torch.equal(got, want) and torch.equal(got, grown)
    # transformers 4 hands generate's 2-d attention mask, one column longer each step, to the
    # forward: Dynamo recompiles for its size twice (then marks it dynamic); 5 passes a fixed one
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == (1 if int(transformers.__version__.split(".")[0]) >= 5 else 3)
    assert model.antkv_backend.sites and all(s.rewritten for s in model.antkv_backend.sites)


def test_one_decode_graph_serves_every_generation_and_reads_each_ones_codebook():
    """Without codebooks each generation's static cache fits data-free books to its own prompt.
    The decode graph takes a cache's book as inputs read at every call (not guarded, not baked in):
    a second generation reuses the graph, and both give eager AntKVStaticCache's tokens."""
    model, _ = tiny_hf_model("llama")
    ak.use_antkv_attention(model)
    kw = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    prompts = [torch.randint(3, 64, (1, 12), generator=torch.Generator().manual_seed(s)) for s in (1, 2)]
    with torch.no_grad():
        # window 2: the codes (and so the book) are read from the first decode step on
        want = [model.generate(ids, **{ak.cache_keyword(model): ak.AntKVStaticCache(18, config=model.config, window=2)}, **kw)
                for ids in prompts]
        ak.patch(model, inductor=False, window=2)
        torch._dynamo.utils.counters.clear()
        got = [model.generate(ids, cache_implementation="static", **kw) for ids in prompts]
    for g, w in zip(got, want):  # the logits of every step (the tiny model's tokens barely depend on the book)
        assert torch.equal(g.sequences, w.sequences)
        torch.testing.assert_close(torch.stack(g.logits), torch.stack(w.logits), rtol=0, atol=1e-5)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == (1 if int(transformers.__version__.split(".")[0]) >= 5 else 3)


def test_static_cache_without_codebooks_fits_data_free_ones_and_holds_fewer_bytes():
    model, _ = tiny_hf_model("qwen2")
    ids = torch.randint(3, 64, (1, 16))
    cache = ak.AntKVStaticCache(512, config=model.config)
    ak.use_antkv_attention(model)
    with torch.no_grad():
        model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0, **{ak.cache_keyword(model): cache})
    layer = cache.layers[0]
    assert isinstance(layer.keys, StaticVQTensor) and layer.keys.lengths.tolist()[0] == 23
    kv_heads, D = layer.keys.shape[1], layer.keys.shape[3]
    dense = 2 * len(cache.layers) * kv_heads * 512 * D * 4  # a float32 StaticCache of 512 tokens
    assert cache.cache_nbytes() < dense / 4


def test_static_op_schema_fake_kernel_and_functionalization():
    """torch.library.opcheck: the declared mutations match what the kernel writes, the fake kernel
    matches the real one, and the op traces through AOT (functionalized)."""
    g = torch.Generator().manual_seed(4)
    bk, bv = _book(g, 2, 16, (4, 8), True), _book(g, 2, 16, (4, 8), False)
    ks, vs = StaticVQTensor.empty(1, bk, 12), StaticVQTensor.empty(1, bv, 12)
    q, k, v = torch.randn(1, 4, 3, 16, generator=g), torch.randn(1, 2, 3, 16, generator=g), torch.randn(1, 2, 3, 16, generator=g)
    mask = torch.ones(1, 1, 3, 12, dtype=torch.bool).tril()
    args = (q, *ks.op_args(), *vs.op_args(), k, v, torch.arange(3), mask, False, None, 4, 0.25, "actual", None)
    torch.library.opcheck(torch.ops.antkv.static_attention_.default, args,
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))  # fmt: skip
