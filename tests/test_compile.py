"""antkv_backend on a hand-written nanoGPT-style model with a tuple cache: every site kind is
rewritten and the compiled model equals the eager model on the compressed cache (docs/DESIGN.md
contract 2); what the pass cannot prove is declined with its reason and computes exactly what the
uncompiled model computes (contract 3); the decode graph Inductor compiles holds no dense K/V of
the cache's length.

Most runs use `AntKVBackend(inductor=False)`: the rewritten graph runs without Inductor, which
checks the pass in seconds; the tests marked "Inductor" compile for real."""

import contextlib
import copy

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from helpers import NanoGPT, prefix_mask, random_codebooks, softmax_scale, vq_past

import antkv_compile as ak
from antkv_compile import AntKVBackend, CacheSettings, VQTensor, dequantize


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    yield
    torch._dynamo.reset()


def _eager_twin(model):
    """The same weights attending with enable_gqa on a [B, H, T, D] cache: what SDPA on the
    compressed cache computes eagerly (repeat_kv, repeat_interleave or a transpose on a VQTensor
    would dequantize it: right values, but the window tokens would not be scored)."""
    twin = copy.deepcopy(model)
    for block in twin.blocks:
        block.attn.gqa, block.attn.seq_dim = "enable_gqa", 2
    return twin


def _run(model, backend, books, settings, batch, steps, mask_kind, seed=0, seq_dim=2):
    """Prefill + decode / chunks through `backend` and eagerly on VQTensor caches; asserts the
    logits agree at every step and returns the compiled caches. `seq_dim`: the model's cache layout."""
    g = torch.Generator().manual_seed(seed)
    twin = _eager_twin(model)
    compiled = torch.compile(model, backend=backend)
    past, ref_past = model.empty_past(batch, seq_dim), vq_past(books, batch, settings)
    pad = torch.randint(0, 3, (batch,), generator=g)
    T = 0
    for n in steps:
        ids = torch.randint(0, 64, (batch, n), generator=g)
        T += n
        mask = None if mask_kind == "none" else prefix_mask(pad, n, T, additive=mask_kind == "additive", g=g)
        with torch.no_grad():
            logits, past = compiled(ids, past, mask)
            ref, ref_past = twin(ids, ref_past, mask)
        torch.testing.assert_close(logits, ref, rtol=1e-4, atol=1e-4)
        assert all(isinstance(t, VQTensor) for layer in past for t in layer)
    for layer, ref_layer in zip(past, ref_past):
        for t, r in zip(layer, ref_layer):
            r = dequantize(r) if seq_dim == 2 else dequantize(r).transpose(1, 2)
            torch.testing.assert_close(dequantize(t), r, rtol=1e-4, atol=1e-4)
    return past


@given(
    seed=st.integers(0, 2**31 - 1),
    batch=st.integers(1, 2),
    heads=st.sampled_from([(4, 4), (4, 2), (4, 1)]),
    gqa=st.sampled_from(["enable_gqa", "repeat_kv", "repeat_interleave"]),
    mask_kind=st.sampled_from(["none", "bool", "additive"]),
    scale=st.booleans(),
    steps=st.lists(st.integers(1, 6), min_size=2, max_size=4),
    window=st.sampled_from([0, 2, 8]),
    seq_dim=st.sampled_from([2, 1]),
    key_basis=st.booleans(),
    exact_dtype=st.sampled_from([None, torch.float16]),
)
def test_compiled_equals_eager_on_the_compressed_cache(seed, batch, heads, gqa, mask_kind, scale, steps, window, seq_dim, key_basis, exact_dtype):
    """Random shapes, GQA spellings, masks, prompt and decode lengths, cache layouts [B, H, T, D]
    and [B, T, H, D] (transposed before SDPA), codebooks with a key basis or not, exact rows in
    the model's dtype or float16; the pass, without Inductor."""
    torch._dynamo.reset()
    n_head, n_kv = heads
    torch.manual_seed(seed)
    model = NanoGPT(n_layer=1, n_head=n_head, n_kv_head=n_kv, gqa=gqa, scale=softmax_scale(16) if scale else None, seq_dim=seq_dim).eval()
    books = random_codebooks(1, n_kv, 16, seed=seed, key_basis=key_basis)
    settings = CacheSettings(window=window, anchor_frac=0.3, exact_dtype=exact_dtype)
    backend = AntKVBackend(books, inductor=False, window=window, anchor_frac=0.3, exact_dtype=exact_dtype)
    past = _run(model, backend, books, settings, batch, steps, mask_kind, seed, seq_dim)
    assert backend.sites and all(site.rewritten for site in backend.sites), backend.sites
    assert all(t.dtype == torch.float32 and t.window.dtype == (exact_dtype or torch.float32) for layer in past for t in layer)


def test_inductor_decode_equals_eager_and_holds_no_dense_kv():
    """Inductor, GQA by repeat_kv, left-padded batch of 2: compiled == eager at every step, two
    graphs (prefill on the empty dense past, decode on the compressed one), and the post-grad decode
    graph Inductor lowers has no float tensor whose size grows with the cache."""
    torch.manual_seed(0)
    model = NanoGPT(gqa="repeat_kv").eval()
    books = random_codebooks(2, 2, 16, key_basis=True)
    hook = _PostGradGraphs()
    backend = AntKVBackend(books, window=2, anchor_frac=0.2, inductor_config={"post_grad_custom_post_pass": hook})
    _run(model, backend, books, CacheSettings(window=2, anchor_frac=0.2), 2, [5, 1, 1, 1], "bool")
    assert len(backend.sites) == 4 and all(site.rewritten for site in backend.sites)  # 2 graphs x 2 layers
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 2
    decode = hook.graphs[-1]
    symbols = _seq_symbols(decode)
    assert symbols, "the decode graph should take the cache length symbolically"
    assert _dense_cache_nodes(decode, symbols) == []
    assert sum(n.target is torch.ops.antkv.attention.default for n in decode.nodes) == 2


def test_settings_pass_like_torch_compile_options():
    torch.manual_seed(0)
    model = NanoGPT().eval()
    books = random_codebooks(2, 2, 16)
    past = model.empty_past(1)
    ids = torch.randint(0, 64, (1, 4))
    with torch.no_grad():
        _, present = torch.compile(model, backend="antkv", options={"codebooks": books, "window": 1, "inductor": False})(ids, past)
    assert present[0][0].settings == CacheSettings(window=1)
    assert present[0][0].window.shape[2] == 4  # the call's own tokens stay exact
    torch._dynamo.reset()
    with torch.no_grad():
        _, present = torch.compile(model, backend=AntKVBackend(books, anchor_frac=0.5, inductor=False))(ids, past)
    assert present[1][1].settings == CacheSettings(anchor_frac=0.5)
    with pytest.raises(TypeError, match="unknown cache settings"):
        AntKVBackend(books, windw=3)
    # (Dynamo wraps what the backend raises in BackendCompilerFailed, keeping the message)
    with pytest.raises(Exception, match=r"unknown option 'windw' \(did you mean 'window'"):
        torch.compile(model, backend="antkv", options={"codebooks": books, "windw": 8, "inductor": False})(ids, past)


DECLINES = {
    "dropout": (dict(dropout=0.1), "dropout_p=0.1"),
    "score modification": (dict(score_mod=True), "through `mul`"),
}


@pytest.mark.parametrize("case", list(DECLINES))
def test_declined_sites_say_why_and_compute_what_eager_computes(case):
    attn, reason = DECLINES[case]
    torch.manual_seed(0)
    model = NanoGPT(**attn)
    model.train(case == "dropout")
    books = random_codebooks(2, 2, 16)
    past = model.empty_past(1, seq_dim=attn.get("seq_dim", 2))
    ids = torch.randint(0, 64, (1, 5))
    with torch.no_grad():
        sites = ak.explain(model, ids, past, codebooks=books)
    assert len(sites) == 2 and not any(s.rewritten for s in sites)
    assert all(reason in s.detail for s in sites), [s.detail for s in sites]
    if case == "dropout":
        return  # random
    with torch.no_grad(), pytest.raises(ak.CompressionError, match=reason):  # nothing compressed: refused by default
        torch.compile(model, backend=AntKVBackend(books))(ids, past)
    torch._dynamo.reset()
    backend = AntKVBackend(books, on_nothing_compressed="warn")
    with torch.no_grad():
        for n in (5, 1):
            with pytest.warns(UserWarning, match="would run on a dense cache") if n == 5 else contextlib.nullcontext():
                out, new_past = torch.compile(model, backend=backend)(ids[:, :n], past)
            ref, ref_past = model(ids[:, :n], past)
            torch.testing.assert_close(out, ref)
            assert not isinstance(new_past[0][0], VQTensor)
            past = new_past


def test_declines_grad_head_dim_and_missing_codebook():
    torch.manual_seed(0)
    model = NanoGPT().eval()
    ids = torch.randint(0, 64, (1, 3))
    past = model.empty_past(1)
    sites = ak.explain(model, ids, past, codebooks=random_codebooks(2, 2, 16))  # grad enabled
    assert all("grad is enabled" in s.detail for s in sites)
    torch._dynamo.reset()
    with torch.no_grad():
        sites = ak.explain(model, ids, past, codebooks=random_codebooks(1, 2, 16))  # one layer only
        assert sites[0].rewritten and "no codebook for this layer" in sites[1].detail
        torch._dynamo.reset()
        model12 = NanoGPT(dim=48, n_head=4, n_kv_head=2).eval()  # head_dim 12, 1 bit needs d = 8
        books = random_codebooks(2, 2, 16)
        sites = ak.explain(model12, ids, model12.empty_past(1), codebooks=books)
        assert all("head_dim 12 is not divisible" in s.detail for s in sites)


def test_cache_layout_with_the_sequence_last_is_declined():
    def attend(q, k_past, v_past, k_new, v_new):  # keys cached as [B, H, D, T]
        k, v = torch.cat([k_past, k_new], 3), torch.cat([v_past, v_new], 2)
        return torch.nn.functional.scaled_dot_product_attention(q, k.transpose(2, 3), v), k, v

    x = torch.randn(1, 2, 3, 16)
    with torch.no_grad():
        sites = ak.explain(attend, x, x.transpose(2, 3), x, x.transpose(2, 3), x, codebooks=random_codebooks(1, 2, 16))
    assert "concatenated on dim 3" in sites[0].detail


def test_written_back_slice_is_declined():
    """A sliding-window cache writes back a slice of the concatenation: not implemented, declined."""

    def attend(q, k_past, v_past, k_new, v_new):
        k, v = torch.cat([k_past, k_new], 2), torch.cat([v_past, v_new], 2)
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        return out, k[:, :, -4:], v[:, :, -4:]

    x = torch.randn(1, 2, 3, 16)
    with torch.no_grad():
        sites = ak.explain(attend, x, x, x, x, x, codebooks=random_codebooks(1, 2, 16))
    assert "not written back as is" in sites[0].detail


class _PostGradGraphs:
    """Inductor's post-grad custom pass hook: keeps every graph Inductor is about to lower."""

    def __init__(self):
        self.graphs = []

    def __call__(self, graph):
        self.graphs.append(copy.copy(graph.owning_module.graph))


def _dense_cache_nodes(graph, seq_symbols):
    """Floating tensors in the graph with a dimension that grows with the cache length."""
    found = []
    for node in graph.nodes:
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor) and val.is_floating_point():
            if any(isinstance(s, torch.SymInt) and s.node.expr.free_symbols & seq_symbols for s in val.shape):
                found.append(f"{node.name} {node.target} {tuple(val.shape)}")
    return found


def _seq_symbols(graph):
    """Symbols of the cache lengths: the sequence sizes of the integer codes inputs, or on a dense
    cache, of the 4-D float inputs."""
    inputs = [n.meta.get("val") for n in graph.find_nodes(op="placeholder")]
    inputs = [v for v in inputs if isinstance(v, torch.Tensor) and v.dim() == 4 and isinstance(v.shape[2], torch.SymInt)]
    codes = [v for v in inputs if not v.is_floating_point()]
    return set().union(*(v.shape[2].node.expr.free_symbols for v in codes or inputs))


def test_the_dense_kv_detector_sees_a_dense_cache():
    """The check above is not vacuous: a dense-cache decode step traced with symbolic shapes has
    float tensors of the cache's length."""
    from torch.fx.experimental.proxy_tensor import make_fx

    def decode(q, k_past, v_past, k_new, v_new):
        k, v = torch.cat([k_past, k_new], 2), torch.cat([v_past, v_new], 2)
        return torch.nn.functional.scaled_dot_product_attention(q, k, v), k, v

    x, past = torch.randn(1, 2, 1, 16), torch.randn(1, 2, 9, 16)
    graph = make_fx(decode, tracing_mode="symbolic")(x, past, past, x, x).graph
    assert len(_dense_cache_nodes(graph, _seq_symbols(graph))) >= 4  # k_past, v_past, k, v


def test_default_backend_fits_data_free_codebooks_from_the_first_call():
    """`backend=antkv_backend` with no settings: each layer fits a data-free codebook (1 bit: 256
    centroids of 8 dims, keys in a rotation basis) to the prompt's keys and values, then decodes
    on the compressed cache; compiled == eager on the same compressed cache."""
    torch.manual_seed(0)
    model = NanoGPT().eval()
    compiled = torch.compile(model, backend=ak.antkv_backend)
    past = model.empty_past(2)
    with torch.no_grad():
        for n in (7, 1, 1):
            ids = torch.randint(0, 64, (2, n))
            ref_past = tuple((copy.deepcopy(k), copy.deepcopy(v)) for k, v in past) if n == 1 else None
            logits, new_past = compiled(ids, past)
            if ref_past is not None:  # decode: compiled == eager on the same compressed cache
                ref, _ = _eager_twin(model)(ids, ref_past)
                torch.testing.assert_close(logits, ref, rtol=1e-4, atol=1e-4)
            past = new_past
    k, v = past[0]
    assert isinstance(k, VQTensor) and k.centroids.shape == (2, 2, 256, 8) and k.shape[2] == 9
    assert k.basis.shape == (2, 16, 16) and v.basis.shape == (2, 0, 0)  # keys rotated, values not
    torch.testing.assert_close(k.basis @ k.basis_inv, torch.eye(16).expand(2, 16, 16), atol=1e-5, rtol=0)
    sites = ak.antkv_backend.sites[-4:]
    assert all(s.rewritten for s in sites) and "data-free codebook" in sites[0].detail


def test_data_free_prefill_equals_the_eager_data_free_cache():
    """The prefill graph fits the same data-free codebook the eager AntKVLayer fits (same tokens,
    same seed): the caches it writes back dequantize to the eager ones."""
    torch.manual_seed(0)
    model = NanoGPT(n_layer=1).eval()
    backend = AntKVBackend(bits=2.0, window=2, inductor=False)
    ids = torch.randint(0, 64, (2, 6))
    with torch.no_grad():
        _, past = torch.compile(model, backend=backend)(ids, model.empty_past(2))
        x = model.emb(ids)
        _, (k_dense, v_dense) = model.blocks[0].attn(model.blocks[0].ln1(x), model.empty_past(2)[0], None)
    from antkv_compile.quant import datafree

    spec = ak.PQSpec(4, 8)
    for got, dense, rotate, seed in ((past[0][0], k_dense, True, 0), (past[0][1], v_dense, False, 1)):
        want = datafree.fit_side(dense, spec, rotate, seed)
        torch.testing.assert_close(got.centroids, want.centroids, rtol=1e-5, atol=1e-6)
        assert got.window.shape[2] == 6  # the call's own tokens stay exact


def test_a_cache_in_b_t_h_d_layout():
    """VQTensor with seq_dim=1 (eager): [B, T, H, D], cat on dim 1 appends; other ops (transpose)
    see its dequantized form."""
    books = random_codebooks(1, 2, 16)
    ((k, _),) = vq_past(books, 2, CacheSettings(window=2, anchor_frac=0.5), seq_dim=1)
    ((ref, _),) = vq_past(books, 2, CacheSettings(window=2, anchor_frac=0.5))
    g = torch.Generator().manual_seed(0)
    for n in (5, 1, 2):
        new = torch.randn(2, n, 2, 16, generator=g)
        k, ref = torch.cat([k, new], dim=1), torch.cat([ref, new.transpose(1, 2)], dim=2)
    assert isinstance(k, VQTensor) and k.shape == (2, 8, 2, 16)
    torch.testing.assert_close(dequantize(k), dequantize(ref).transpose(1, 2))
    torch.testing.assert_close(k.transpose(1, 2), dequantize(ref))


@pytest.mark.parametrize("marked", [True, False])
def test_a_cache_built_eagerly_compiles_once_when_marked_growing(marked):
    """A compressed cache made outside the compiled model (prefilled eagerly, loaded) carries no
    dynamic marks: its first compiled call specializes on its length and the next call recompiles.
    `mark_growing` makes the first trace general: one graph for every later decode step."""
    torch.manual_seed(0)
    model = NanoGPT()
    books = random_codebooks(2, 2, 16)
    past = vq_past(books, 1, CacheSettings(window=4))
    with torch.no_grad():
        _, past = model(torch.randint(0, 64, (1, 40)), past)  # eager prefill on VQTensors
    if marked:
        past = tuple(tuple(ak.mark_growing(t) for t in layer) for layer in past)
    compiled = torch.compile(model, backend=AntKVBackend(books, window=4, inductor=False))
    with torch.no_grad():
        for _ in range(3):
            _, past = compiled(torch.randint(0, 64, (1, 1)), past)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert graphs == (1 if marked else 2)
