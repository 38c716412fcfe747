"""Online refinement of data-free codebooks (AntKVCache(refine=N), hf.AntKVLayer, state.refine).

A cache without codebooks keeps the stored rows of the tokens it holds in a sample until N tokens
have arrived, then refines its codebook on them and re-encodes every token. Checked against float64
references that share no code with the package (tests/reference.py), before, at and after the
switch, whichever way the threshold is crossed (by the prompt, inside a multi-token call, exactly at
a call boundary, by a one-token call): the cache's attention equals SDPA on its dequantized tensor;
every code is the nearest centroid of its token's row under the codebook the cache holds (the
refined one after the switch); the window's errors are those of the codes; the sample exists
exactly until the switch and its bytes count; crop and beam reorder carry the sample along; and
refine off is today's data-free cache bit for bit."""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from helpers import ARCHS, random_codebooks, tiny_hf_model, tiny_llama
from reference import dense_from_parts, nearest_centroid_distances
from transformers import DynamicCache

import antkv_compile as ak
from antkv_compile.hf import RefiningLayer, refine_schedule
from antkv_compile.quant import datafree
from antkv_compile.quant.pq import PRESETS


def _rows(raw, basis):
    """The stored rows of raw [B, H, T, D] model-coordinate tokens: in the key basis, float64."""
    return raw.double() if basis.shape[-1] == 0 else torch.einsum("bhtd,hde->bhte", raw.double(), basis.double())


def _check_codes(cache, raw):
    """Every code is a nearest centroid of its token's row (up to float32 ties) under the codebook
    the cache holds now; the window's errors are its rows' distance to their codes' centroids."""
    rows = _rows(raw, cache.basis)
    dist = nearest_centroid_distances(rows, cache.centroids)  # [B, H, T, S, K]
    chosen = dist.gather(-1, cache.codes.long()[..., None])[..., 0]
    best = dist.min(-1).values
    assert (chosen <= best + 1e-5 * (1 + rows.unflatten(-1, (cache.codes.shape[-1], -1)).pow(2).sum(-1))).all()
    if cache.settings.error == "actual":
        Tw = cache.window.shape[2]
        err = chosen[:, :, rows.shape[2] - Tw :].sum(-1).sqrt()
        torch.testing.assert_close(cache.window_err.double(), err, rtol=1e-4, atol=1e-5)


def _check_attention(q, k, v):
    """VQ attention of q (the call's n queries, bottom-right causal) == float64 SDPA on the dense
    tensors rebuilt from the cache's parts."""
    parts = ("codes", "centroids", "anchor_rows", "anchor_pos", "window")
    kd, vd = (dense_from_parts(*(getattr(x, f) for f in parts)) for x in (k, v))
    if k.basis.shape[-1]:
        kd = torch.einsum("bhtd,hde->bhte", kd, k.basis_inv.double())
    n, T, G = q.shape[2], kd.shape[2], q.shape[1] // kd.shape[1]
    keep = torch.ones(n, T, dtype=torch.bool).tril(T - n)
    got = F.scaled_dot_product_attention(q, k, v, attn_mask=keep, enable_gqa=G > 1)
    ref = F.scaled_dot_product_attention(q.double(), kd.repeat_interleave(G, 1), vd.repeat_interleave(G, 1), attn_mask=keep)
    torch.testing.assert_close(got.double(), ref, rtol=1e-4, atol=1e-4)


def _sizes(draw, refine):
    """Call sizes crossing `refine` in one of the four ways, then a few more calls."""
    kind = draw(st.sampled_from(["prompt", "inside", "boundary", "one-token"]))
    if kind == "prompt":
        return kind, [refine + draw(st.integers(0, 6))] + draw(st.lists(st.integers(1, 5), max_size=3))
    before = refine - 1 if kind == "one-token" else draw(st.integers(1, refine - 1))
    sizes = []
    while sum(sizes) < before:
        sizes.append(min(draw(st.integers(1, 8)), before - sum(sizes)))
    crossing = {"inside": refine - before + draw(st.integers(1, 6)), "boundary": refine - before, "one-token": 1}[kind]
    tail = [1] * draw(st.integers(0, 3)) if kind == "one-token" else draw(st.lists(st.integers(1, 5), max_size=3))
    return kind, sizes + [crossing] + tail


@st.composite
def refinement_cases(draw):
    refine = draw(st.integers(2, 40))
    kind, sizes = _sizes(draw, refine)
    return dict(
        seed=draw(st.integers(0, 2**31 - 1)), batch=draw(st.integers(1, 2)), kv_heads=draw(st.integers(1, 2)),
        group=draw(st.sampled_from([1, 2])), head_dim=draw(st.sampled_from([32, 64])),
        bits=draw(st.sampled_from([4.0, 2.0, 1.0])), window=draw(st.sampled_from([0, 2, 8])),
        anchor_frac=draw(st.sampled_from([0.0, 0.1])), error=draw(st.sampled_from(["actual", "expected"])),
        iters=draw(st.sampled_from([0, 1, 5])), refine=refine, kind=kind, sizes=sizes,
    )  # fmt: skip


@given(case=refinement_cases())
def test_switch_keeps_the_contract_and_reencodes_every_token(case):
    g = torch.Generator().manual_seed(case["seed"])
    B, H, D, R = case["batch"], case["kv_heads"], case["head_dim"], case["refine"]
    cache = ak.AntKVCache(bits=case["bits"], refine=R, refine_iters=case["iters"], window=case["window"],
                          anchor_frac=case["anchor_frac"], error=case["error"])  # fmt: skip
    raw_k, raw_v = torch.zeros(B, H, 0, D), torch.zeros(B, H, 0, D)
    datafree_book = None
    for n in case["sizes"]:
        # per-channel scales and offsets, so the refined codebook differs from the data-free one
        k = torch.randn(B, H, n, D, generator=g) * torch.linspace(0.2, 3, D) + 1
        v = torch.randn(B, H, n, D, generator=g) * torch.linspace(3, 0.2, D)
        if datafree_book is None:  # what the first call fits (refined at once if it crosses the threshold)
            spec = PRESETS[case["bits"]]
            kb, vb = datafree.fit_side(k, spec, rotate=True, seed=0), datafree.fit_side(v, spec, rotate=False, seed=1)
            datafree_book = (kb.centroids, vb.centroids, kb.basis)
        keys, values = cache.update(k, v, 0)
        layer = cache.layers[0]
        raw_k, raw_v = torch.cat([raw_k, k], 2), torch.cat([raw_v, v], 2)
        T = raw_k.shape[2]
        _check_attention(torch.randn(B, H * case["group"], n, D, generator=g), keys, values)
        _check_codes(keys, raw_k)
        _check_codes(values, raw_v)
        assert torch.equal(keys.basis, datafree_book[2])  # keys stay in the data-free rotation
        assert layer.codebook.key.centroids is keys.centroids and layer.codebook.value.centroids is values.centroids
        vq_bytes = keys.cache_nbytes() + values.cache_nbytes()
        if T < R:  # collecting: the data-free codebook, the sample of every token held, counted
            assert torch.equal(keys.centroids, datafree_book[0]) and torch.equal(values.centroids, datafree_book[1])
            assert layer.sample_keys.shape == layer.sample_values.shape == (B, H, T, D)
            # the sample: the rows the codes were encoded from (keys in the basis)
            torch.testing.assert_close(layer.sample_keys.double(), _rows(raw_k, keys.basis), rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(layer.sample_values.double(), raw_v.double(), rtol=0, atol=0)
            assert cache.cache_nbytes() == vq_bytes + 2 * B * H * R * D * 4  # the sample's buffers: room for R tokens
        else:  # switched: the sample is gone, the refined codebook stays
            assert layer.sample_keys is None and layer.sample_values is None and not layer.refining
            assert cache.cache_nbytes() == vq_bytes
            if case["iters"]:
                assert not torch.equal(keys.centroids, datafree_book[0])


@given(first=st.integers(1, 300), extra=st.integers(0, 5000))
def test_refine_schedule_doubles_from_first_up_to_cap(first, extra):
    """refine=(FIRST, CAP): a switch after FIRST tokens, after each doubling below CAP, and at CAP;
    refine=N is the one switch (N, N); None / 0: off."""
    cap = first + extra
    expected, t = [], first
    while t < cap:  # written out by hand: every count FIRST * 2^k below CAP, then CAP
        expected.append(t)
        t *= 2
    expected.append(cap)
    assert refine_schedule((first, cap)) == refine_schedule([first, cap]) == tuple(expected)
    assert refine_schedule(cap) == refine_schedule((cap, cap)) == (cap,)
    assert refine_schedule(None) is None and refine_schedule(0) is None


def _lloyd_step(rows, centroids):
    """One Lloyd iteration in float64 (assign every sub-vector of rows [B, H, T, S*d] to its
    nearest centroid of [H, S, K, d], move each centroid to its points' mean, an empty one stays).
    Returns (centroids, sure [H, S, K]): sure is False for the clusters a near-tie point (the two
    nearest within float32 rounding) could have gone to, which the comparison skips."""
    H, S, K, d = centroids.shape
    dist = nearest_centroid_distances(rows, centroids)  # [B, H, T, S, K]
    two = dist.topk(2, -1, largest=False)
    norm = rows.double().unflatten(-1, (S, d)).pow(2).sum(-1)
    tie = (two.values[..., 1] - two.values[..., 0]) <= 1e-4 * (1 + norm)  # [B, H, T, S]
    onehot = F.one_hot(two.indices[..., 0], K).double()  # [B, H, T, S, K]
    sums = torch.einsum("bhtsk,bhtsd->hskd", onehot, rows.double().unflatten(-1, (S, d)))
    mass = onehot.sum((0, 2))  # [H, S, K]
    new = torch.where(mass[..., None] > 0, sums / mass.clamp_min(1)[..., None], centroids.double())
    unsure = (F.one_hot(two.indices, K).sum(-2) * tie[..., None]).sum((0, 2)) > 0  # [H, S, K]
    return new, ~unsure


@st.composite
def schedule_cases(draw):
    first = draw(st.integers(2, 12))
    cap = draw(st.integers(first, 48))
    sizes = draw(st.lists(st.integers(1, 9), min_size=1, max_size=6))
    end = cap + draw(st.integers(0, 6))
    while sum(sizes) < end:  # reach the cap: every switch is crossed
        sizes.append(draw(st.integers(1, 9)))
    return dict(seed=draw(st.integers(0, 2**31 - 1)), batch=draw(st.integers(1, 2)), kv_heads=draw(st.integers(1, 2)),
                bits=draw(st.sampled_from([2.0, 1.0])), window=draw(st.sampled_from([0, 4])), first=first, cap=cap, sizes=sizes)


@given(case=schedule_cases())
def test_progressive_refinement_refits_on_every_token_held_at_each_switch(case):
    """refine=(FIRST, CAP): each call that reaches a count of the schedule (one or several at
    once) refines the codebook the cache holds on the rows of every token held (one Lloyd
    iteration here, against a float64 reference), between switches the codebook stays; the sample
    holds every token's row until CAP, then is gone; after every call each code is the nearest
    centroid under the codebook held and attention equals SDPA on the dequantized cache."""
    g = torch.Generator().manual_seed(case["seed"])
    B, H, D = case["batch"], case["kv_heads"], 32
    cache = ak.AntKVCache(bits=case["bits"], refine=(case["first"], case["cap"]), refine_iters=1, window=case["window"], anchor_frac=0.1)
    raw = [torch.zeros(B, H, 0, D)] * 2
    points = refine_schedule((case["first"], case["cap"]))
    before = None  # the centroids (keys, values) held before the call
    switches = 0
    for n in case["sizes"]:
        k = torch.randn(B, H, n, D, generator=g) * torch.linspace(0.2, 3, D) + 1
        v = torch.randn(B, H, n, D, generator=g) * torch.linspace(3, 0.2, D)
        if before is None:  # the first call fits the data-free codebook the schedule starts from
            spec = PRESETS[case["bits"]]
            before = (datafree.fit_side(k, spec, rotate=True, seed=0).centroids, datafree.fit_side(v, spec, rotate=False, seed=1).centroids)
        held = raw[0].shape[2]
        keys, values = cache.update(k, v, 0)
        raw = [torch.cat([raw[0], k], 2), torch.cat([raw[1], v], 2)]
        T = held + n
        layer = cache.layers[0]
        crossed = any(held < p <= T for p in points)
        for side, old, x in ((keys, before[0], raw[0]), (values, before[1], raw[1])):
            if crossed:
                ref, sure = _lloyd_step(_rows(x, side.basis), old)
                torch.testing.assert_close(side.centroids.double()[sure], ref[sure], rtol=1e-4, atol=1e-4)
            else:
                assert torch.equal(side.centroids, old)
            _check_codes(side, x)
        switches += crossed
        _check_attention(torch.randn(B, 2 * H, n, D, generator=g), keys, values)
        if T < case["cap"]:
            assert layer.refining and layer.sample_keys.shape[2] == T
            torch.testing.assert_close(layer.sample_keys.double(), _rows(raw[0], keys.basis), rtol=1e-5, atol=1e-5)
            assert torch.equal(layer.sample_values, raw[1])
        else:
            assert layer.sample_keys is None and layer.sample_values is None and not layer.refining
        before = (keys.centroids, values.centroids)
    assert 1 <= switches <= len(points)


def _feed(cache, g, B, H, D, sizes, raw):
    for n in sizes:
        k, v = torch.randn(B, H, n, D, generator=g) * 2 + 0.5, torch.randn(B, H, n, D, generator=g)
        cache.update(k, v, 0)
        raw[0], raw[1] = torch.cat([raw[0], k], 2), torch.cat([raw[1], v], 2)
        _check_attention(torch.randn(B, 2 * H, n, D, generator=g), cache.layers[0].keys, cache.layers[0].values)


@given(seed=st.integers(0, 2**31 - 1), cut=st.integers(1, 6), bits=st.sampled_from([2.0, 1.0]))
def test_crop_before_the_switch_crops_the_sample(seed, cut, bits):
    """Cropping before the switch drops the cut tokens from the sample too: the refined codebook
    is the one fitted to the kept tokens (a twin cache that never saw the cut ones gets it)."""
    g = torch.Generator().manual_seed(seed)
    B, H, D, R = 2, 2, 32, 24
    cache, raw = ak.AntKVCache(bits=bits, refine=R, window=4, anchor_frac=0.1), [torch.zeros(B, H, 0, D)] * 2
    _feed(cache, g, B, H, D, [8, 3, 1, 1, 6], raw)  # 19 < R tokens
    cache.crop(-cut)
    kept = [r[:, :, : 19 - cut] for r in raw]
    assert cache.layers[0].sample_keys.shape[2] == cache.get_seq_length() == 19 - cut
    twin = ak.AntKVCache(bits=bits, refine=R, window=4, anchor_frac=0.1)
    twin.update(kept[0][:, :, :8], kept[1][:, :, :8], 0)
    twin.update(kept[0][:, :, 8:], kept[1][:, :, 8:], 0)
    raw[:] = kept
    state = g.get_state()
    _feed(cache, g, B, H, D, [4, 1, 5, 1], raw)  # crosses R inside the 5-token call
    g.set_state(state)
    _feed(twin, g, B, H, D, [4, 1, 5, 1], [t.clone() for t in kept])
    for name in ("keys", "values"):
        ours, theirs = getattr(cache.layers[0], name), getattr(twin.layers[0], name)
        torch.testing.assert_close(ours.centroids, theirs.centroids, rtol=1e-5, atol=1e-5)
    assert cache.layers[0].sample_keys is None
    _check_codes(cache.layers[0].keys, raw[0])
    _check_codes(cache.layers[0].values, raw[1])


@given(seed=st.integers(0, 2**31 - 1), index=st.lists(st.integers(0, 2), min_size=3, max_size=3), beams=st.booleans())
def test_batch_reorder_before_the_switch_reorders_the_sample(seed, index, beams):
    """Beam search reorders (or picks) sequences before the switch: every sequence's codes after it
    are the nearest centroids of that sequence's own rows (not of the sequence that had its slot)."""
    g = torch.Generator().manual_seed(seed)
    B, H, D = 3, 2, 32
    cache, raw = ak.AntKVCache(bits=1.0, refine=20, window=4, anchor_frac=0.1), [torch.zeros(B, H, 0, D)] * 2
    _feed(cache, g, B, H, D, [6, 1, 1, 1], raw)
    idx = torch.tensor(index)
    cache.reorder_cache(idx) if beams else cache.batch_select_indices(idx)
    raw[:] = [r[idx] for r in raw]
    _feed(cache, g, B, H, D, [1] * 12, raw)  # crossed by a one-token call
    layer = cache.layers[0]
    assert layer.sample_keys is None
    _check_codes(layer.keys, raw[0])
    _check_codes(layer.values, raw[1])


@given(seed=st.integers(0, 2**31 - 1), bits=st.sampled_from([4.0, 2.0, 1.0]), sizes=st.lists(st.integers(1, 9), min_size=1, max_size=6))
def test_refine_off_is_the_datafree_cache_bit_for_bit(seed, bits, sizes):
    """refine=None: exactly the data-free cache built by hand (fit_side on the first call, then
    quantize-on-write); a threshold not yet reached: the same cache plus the sample."""
    g = torch.Generator().manual_seed(seed)
    settings = ak.CacheSettings(window=3, anchor_frac=0.2)
    off, waiting = ak.AntKVCache(bits=bits, refine=None, settings=settings), ak.AntKVCache(bits=bits, refine=1000, settings=settings)
    k_ref = v_ref = None
    for n in sizes:
        k, v = torch.randn(2, 2, n, 32, generator=g), torch.randn(2, 2, n, 32, generator=g)
        if k_ref is None:
            k_ref = ak.VQTensor.empty(2, datafree.fit_side(k, PRESETS[bits], rotate=True, seed=0), settings)
            v_ref = ak.VQTensor.empty(2, datafree.fit_side(v, PRESETS[bits], rotate=False, seed=1), settings)
        k_ref, v_ref = torch.cat([k_ref, k], 2), torch.cat([v_ref, v], 2)
        for cache in (off, waiting):
            keys, values = cache.update(k, v, 0)
            for ours, ref in ((keys, k_ref), (values, v_ref)):
                assert all(torch.equal(a, b) for a, b in zip(ours.side, ref.side))
    assert off.layers[0].sample_keys is None and off.cache_nbytes() == k_ref.cache_nbytes() + v_ref.cache_nbytes()
    assert waiting.cache_nbytes() == off.cache_nbytes() + 2 * (2 * 2 * 1000 * 32) * 4  # sample buffers for 1000 tokens


@pytest.mark.parametrize("refine", [-3, 1.5, True, "128", (0, 8), (16, 8), (4, 8.0), (4, 8, 16), (False, 8)])
def test_bad_refine_settings_are_refused(refine):
    with pytest.raises(ValueError, match="refine must be a number of tokens"):
        ak.AntKVCache(refine=refine)
    with pytest.raises(ValueError, match="refine must be a number of tokens"):
        ak.patch(tiny_llama(), refine=refine)


def test_bad_refine_iters_and_refine_with_codebooks_are_refused():
    with pytest.raises(ValueError, match="refine_iters must be an int"):
        ak.AntKVCache(refine_iters=1.5)
    # a calibrated cache does not refine: asking for it is an error, not silently ignored
    with pytest.raises(ValueError, match="Pass refine only without codebooks"):
        ak.AntKVCache(random_codebooks(1, 2, 32), refine=64)
    ak.AntKVCache(random_codebooks(1, 2, 32))  # the default is fine with codebooks (no refinement)


@pytest.fixture(scope="module")
def tiny():
    return tiny_llama()


@torch.no_grad()
def test_hf_model_steps_equal_dense_attention_across_the_switch(tiny):
    """In a model: every call (prefill, chunks, decode steps; the switch inside the 8-token chunk)
    equals the same model on a DynamicCache holding the dequantized past."""
    model = ak.use_antkv_attention(tiny)
    ids = torch.randint(3, 96, (2, 40), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    cache = ak.AntKVCache(bits=2.0, refine=28, window=4, anchor_frac=0.1)
    switched = []
    for n in (24, 8, 1, 1, 3, 1, 2):
        start = cache.get_seq_length()
        step_ids, step_mask = ids[:, start : start + n], mask[:, : start + n]
        out = model(step_ids, attention_mask=step_mask, **{ak.cache_keyword(model): cache}, use_cache=True).logits
        ref_cache = DynamicCache()
        for i, layer in enumerate(cache.layers):
            ref_cache.update(layer.keys.dequantize()[:, :, :start], layer.values.dequantize()[:, :, :start], i)
        ref = model(step_ids, attention_mask=step_mask, **{ak.cache_keyword(model): ref_cache if start else None}, use_cache=True).logits
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
        switched.append(all(layer.sample_keys is None for layer in cache.layers))
    assert switched == [False] + [True] * 6


@torch.no_grad()
def test_generate_beams_across_the_switch(tiny):
    model = ak.use_antkv_attention(tiny)
    ids = torch.randint(3, 96, (2, 10), generator=torch.Generator().manual_seed(2))
    cache = ak.AntKVCache(bits=1.0, refine=24)
    out = model.generate(ids, num_beams=3, do_sample=False, max_new_tokens=30, min_new_tokens=30, pad_token_id=0,
                         **{ak.cache_keyword(model): cache})  # fmt: skip
    assert out.shape == (2, 40)
    assert all(layer.sample_keys is None and isinstance(layer.keys, ak.VQTensor) for layer in cache.layers)
    assert cache.layers[0].keys.shape[0] == 6 and math.isfinite(cache.cache_nbytes())


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("arch", list(ARCHS))
def test_patch_refines_between_compiled_calls(arch, fresh_dynamo):
    """patch(model) without codebooks: a 64-token prompt and 64 greedy tokens with refine=100 (the
    switch by a one-token decode call). Every layer of generate()'s cache collects its sample
    between compiled calls, refines, drops it, and the tokens are the eager AntKVCache's with the
    same setting; the switch does not recompile (prefill and decode graphs only)."""
    model, _ = tiny_hf_model(arch)
    ids = torch.randint(3, 96, (1, 64), generator=torch.Generator().manual_seed(4))
    kw = dict(max_new_tokens=64, min_new_tokens=64, do_sample=False, pad_token_id=0)
    ak.use_antkv_attention(model)
    with torch.no_grad():
        ref = model.generate(ids, **{ak.cache_keyword(model): ak.AntKVCache(bits=1.0, refine=100)}, **kw)
    ak.patch(model, inductor=False, refine=100)
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        out = model.generate(ids, **{ak.cache_keyword(model): cache}, **kw)
    assert all(isinstance(layer, RefiningLayer) and layer.sample_keys is None and not layer.refining for layer in cache.layers)
    assert cache.layers[0].keys.codes.shape[2] == 127 and cache.layers[0].keys.basis.shape[-1] == cache.layers[0].keys.shape[-1]  # still rotated
    assert len(model.antkv_backend.sites) == 2 * len(cache.layers) and all(site.rewritten for site in model.antkv_backend.sites)
    assert torch.equal(out, ref)


@pytest.mark.parametrize("how", [dict(), dict(refine_iters=0, refine_init="moments")])
def test_patch_follows_a_refine_schedule(how, fresh_dynamo):
    """patch(model, refine=(32, 100), **how): the 64-token prompt passes the first two switches
    (32, 64: one refit), decode calls reach 100; the layers keep their sample until then, and the
    tokens are the eager AntKVCache's with the same refinement (schedule, iterations, start)."""
    model, _ = tiny_hf_model(next(iter(ARCHS)))
    ids = torch.randint(3, 96, (1, 64), generator=torch.Generator().manual_seed(6))
    kw = dict(do_sample=False, pad_token_id=0)
    ak.use_antkv_attention(model)
    with torch.no_grad():
        ref = model.generate(ids, **{ak.cache_keyword(model): ak.AntKVCache(bits=2.0, refine=(32, 100), **how)}, max_new_tokens=64, min_new_tokens=64, **kw)
    ak.patch(model, inductor=False, bits=2.0, refine=(32, 100), **how)
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model.generate(ids, **{ak.cache_keyword(model): cache}, max_new_tokens=20, min_new_tokens=20, **kw)  # 83 tokens held: waiting for 100
        assert all(isinstance(layer, RefiningLayer) and layer.refine == (100,) and layer.sample_keys.shape[2] == 83 for layer in cache.layers)
        cache = DynamicCache(config=model.config)
        out = model.generate(ids, **{ak.cache_keyword(model): cache}, max_new_tokens=64, min_new_tokens=64, **kw)
    assert all(layer.sample_keys is None and not layer.refining for layer in cache.layers)
    assert torch.equal(out, ref)


@pytest.mark.parametrize("init", ["held", "moments", "covariance"])
def test_nonfinite_rows_do_not_poison_the_refined_codebook(init):
    """NaN / Inf rows arriving after the first call (an overflowing float16 model) stay out of the
    refinement fit (Lloyd iterations and the moment re-fit): the refined centroids are finite, and
    the finite rows still moved them."""
    g = torch.Generator().manual_seed(5)
    k, v = torch.randn(1, 2, 30, 32, generator=g), torch.randn(1, 2, 30, 32, generator=g) * 3 + 1
    v[0, 1, 12, 3], v[0, 0, 20, :] = float("nan"), float("inf")
    cache = ak.AntKVCache(bits=2.0, refine=30, window=0, anchor_frac=0.0, refine_init=init)
    cache.update(k[:, :, :10], v[:, :, :10], 0)
    datafree_centroids = cache.layers[0].values.centroids
    cache.update(k[:, :, 10:], v[:, :, 10:], 0)  # the bad rows are this call's: in the window, exact
    refined = cache.layers[0].values
    assert cache.layers[0].sample_values is None
    assert torch.isfinite(refined.centroids).all() and not torch.equal(refined.centroids, datafree_centroids)


def test_the_sample_grows_in_its_buffer_without_copying():
    """One-token calls add to the sample in place (a torch.cat per step made collecting O(T^2)):
    the same buffer until the last switch, the rows those of every token held."""
    g = torch.Generator().manual_seed(9)
    cache = ak.AntKVCache(bits=2.0, refine=(8, 64), window=2)
    rows, buffers = [], set()
    for n in (5, *[1] * 40):
        k, v = torch.randn(1, 2, n, 32, generator=g), torch.randn(1, 2, n, 32, generator=g)
        cache.update(k, v, 0)
        rows.append(v)
        layer = cache.layers[0]
        buffers.add(layer.sample_values.data_ptr())
    assert len(buffers) == 1  # allocated once, for the 64 tokens of the last switch
    torch.testing.assert_close(layer.sample_values, torch.cat(rows, 2), rtol=0, atol=0)


def _moment_placement(rows, g, shrink, full=False):
    """float64 reference of a moment re-fit: the Gaussian codebook g [K, d] placed per (kv head,
    coordinate) by the moments of rows [B, H, T, S*d] (every token held, in the basis): mean =
    sum / (n + shrink), variance about it shrunk towards the head's pooled variance by `shrink`
    pseudo-tokens; centroid = mean + std * g. `full`: centroid = mean + L g, L the Cholesky factor
    of the sub-vector's covariance (that variance on the diagonal, the products about the mean
    over n + shrink off it). Returns [H, S, K, d]."""
    x = rows.double().transpose(0, 1).reshape(rows.shape[1], -1, rows.shape[-1])  # [H, N, D]
    n = x.shape[1]
    mean = x.sum(1) / (n + shrink)
    var = ((x - mean[:, None]) ** 2).sum(1) / n
    var = (n * var + shrink * var.mean(1, keepdim=True)) / (n + shrink)
    H, D = mean.shape
    K, d = g.shape
    if not full:
        return mean.view(H, D // d, 1, d) + var.sqrt().view(H, D // d, 1, d) * g.double()
    out = torch.empty(H, D // d, K, d, dtype=torch.float64)
    for h in range(H):
        for s in range(D // d):
            z = x[h, :, s * d : (s + 1) * d] - mean[h, s * d : (s + 1) * d]
            cov = z.T @ z / (n + shrink)
            cov[range(d), range(d)] = var[h, s * d : (s + 1) * d]
            out[h, s] = mean[h, s * d : (s + 1) * d] + g.double() @ torch.linalg.cholesky(cov).T
    return out


@given(case=schedule_cases(), iters=st.sampled_from([0, 1]), init=st.sampled_from(["moments", "covariance"]))
def test_moment_refit_places_the_gaussian_codebook_by_every_token_held(case, iters, init):
    """refine_init="moments" / "covariance": at each switch the centroids are the Gaussian
    codebook placed again by the moments (per coordinate / with each sub-vector's full covariance)
    of every token held (then `iters` Lloyd iterations from there), against a float64 reference;
    between switches the codebook stays; every code is the nearest centroid of its row under the
    codebook held; attention equals SDPA on the dequantized cache."""
    g = torch.Generator().manual_seed(case["seed"])
    B, H, D = case["batch"], case["kv_heads"], 32
    cache = ak.AntKVCache(bits=case["bits"], refine=(case["first"], case["cap"]), refine_iters=iters, refine_init=init,
                          window=case["window"], anchor_frac=0.1)  # fmt: skip
    spec = PRESETS[case["bits"]]
    shape = datafree.gaussian_codebook(spec.sub_dim, spec.num_centroids)  # the fixed codebook shape (an input here)
    raw = [torch.zeros(B, H, 0, D)] * 2
    points = refine_schedule((case["first"], case["cap"]))
    before = None
    for n in case["sizes"]:
        k = torch.randn(B, H, n, D, generator=g) * torch.linspace(0.2, 3, D) + 1
        v = torch.randn(B, H, n, D, generator=g) * torch.linspace(3, 0.2, D) - 0.5
        if before is None:
            before = (datafree.fit_side(k, spec, rotate=True, seed=0).centroids, datafree.fit_side(v, spec, rotate=False, seed=1).centroids)
        held = raw[0].shape[2]
        keys, values = cache.update(k, v, 0)
        raw = [torch.cat([raw[0], k], 2), torch.cat([raw[1], v], 2)]
        crossed = any(held < p <= held + n for p in points)
        for side, old, x in ((keys, before[0], raw[0]), (values, before[1], raw[1])):
            if crossed:
                ref = _moment_placement(_rows(x, side.basis), shape, datafree.SHRINK, init == "covariance")
                sure = torch.ones(ref.shape[:-1], dtype=torch.bool)
                if iters:
                    ref, sure = _lloyd_step(_rows(x, side.basis), ref)
                torch.testing.assert_close(side.centroids.double()[sure], ref[sure], rtol=1e-4, atol=1e-4)
            else:
                assert torch.equal(side.centroids, old)
            _check_codes(side, x)
        _check_attention(torch.randn(B, 2 * H, n, D, generator=g), keys, values)
        before = (keys.centroids, values.centroids)
    assert cache.layers[0].sample_keys is None


def test_bad_refine_init_is_refused():
    with pytest.raises(ValueError, match="refine_init must be one of"):
        ak.AntKVCache(refine_init="kmeans")
    with pytest.raises(ValueError, match="refine_init must be one of"):
        ak.patch(tiny_llama(), refine_init="kmeans")


def _later(raw, shift, inv_freq):
    """raw [B, H, T, D] post-RoPE keys `shift` positions later, float64: each pair (i, i + D/2) as
    the complex number x_i + j x_{i+D/2}, turned by e^{j shift inv_freq[i]}."""
    half = raw.shape[-1] // 2
    z = torch.complex(raw[..., :half].double(), raw[..., half:].double()) * torch.polar(
        torch.ones(half, dtype=torch.float64), shift * inv_freq.double())
    return torch.cat([z.real, z.imag], -1)


@given(seed=st.integers(0, 2**16), positions=st.integers(40, 400), bits=st.sampled_from([1.0, 2.0]))
def test_the_last_switch_fits_keys_at_the_later_positions_rope_reaches(seed, positions, bits):
    """rope=Rope(inv_freq, positions): the schedule's last switch (at 32 tokens here) places the key
    codebook by the moments of the tokens held and of 4 copies turned by RoPE to offsets spread
    over [0, positions - 32] (the first is the tokens themselves), against a float64 complex
    rotation; the values and the earlier switch are as without rope; every code is still the
    nearest centroid of its own token's row (the copies are fitted, never encoded) and attention
    equals SDPA on the dequantized cache."""
    from antkv_compile.quant.rope import Rope

    g = torch.Generator().manual_seed(seed)
    B, H, D = 1, 2, 32
    inv_freq = 10000.0 ** (-torch.arange(0, D, 2, dtype=torch.float32) / D)
    cache = ak.AntKVCache(bits=bits, refine=(16, 32), refine_iters=0, refine_init="moments", rope=Rope(inv_freq, positions),
                          window=4, anchor_frac=0.1)  # fmt: skip
    spec = PRESETS[bits]
    shape = datafree.gaussian_codebook(spec.sub_dim, spec.num_centroids)
    raw = [torch.zeros(B, H, 0, D)] * 2
    for n in (10, 6, 9, 7, 3):  # 10, 16 (first switch), 25, 32 (last switch), 35
        k = torch.randn(B, H, n, D, generator=g) * torch.linspace(0.2, 3, D) + 1
        v = torch.randn(B, H, n, D, generator=g) - 0.5
        keys, values = cache.update(k, v, 0)
        raw = [torch.cat([raw[0], k], 2), torch.cat([raw[1], v], 2)]
        held = raw[0].shape[2]
        if held in (16, 32):
            fit = raw[0]
            if held == 32 and positions > 32:
                offsets = [round(i * (positions - 32) / 3) for i in range(4)]
                fit = torch.cat([_later(raw[0], m, inv_freq) for m in offsets], 0)
            for side, x in ((keys, fit), (values, raw[1])):
                ref = _moment_placement(_rows(x, side.basis), shape, datafree.SHRINK, False)
                torch.testing.assert_close(side.centroids.double(), ref, rtol=1e-4, atol=1e-4)
        for side, x in ((keys, raw[0]), (values, raw[1])):
            _check_codes(side, x)
        _check_attention(torch.randn(B, 2 * H, n, D, generator=g), keys, values)
    assert keys.shape[2] == 35


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gpt_neox"])
def test_model_rope_reads_rotate_half_models_and_refuses_the_rest(arch):
    """ak.model_rope: the model's inv_freq and trained context where its own RoPE is the
    whole-head rotate-half rotation (the float64 complex rotation of a random key, run through
    the model's rotary module and apply_rotary_pos_emb, agrees); None for GPT-NeoX's partial rotary."""
    model, _ = tiny_hf_model(arch)
    rope = ak.model_rope(model)
    if arch == "gpt_neox":
        assert rope is None
        return
    head_dim = getattr(model.config, "head_dim", None) or model.config.hidden_size // model.config.num_attention_heads
    assert rope.positions == model.config.max_position_embeddings and rope.inv_freq.numel() == head_dim // 2
    rotary = model.model.rotary_emb
    k = torch.randn(1, 1, 1, head_dim)
    cos, sin = rotary(k, torch.tensor([[300]]))
    turned = k * cos + torch.cat([-k[..., head_dim // 2 :], k[..., : head_dim // 2]], -1) * sin  # the model's rotation at 300
    torch.testing.assert_close(_later(k, 300, rope.inv_freq), turned.double(), atol=1e-5, rtol=1e-5)
