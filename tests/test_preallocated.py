"""The preallocated cache (cache.py `Buffers`, ops.append_, write.cpp in place): eager appends
write the codes and the anchor slots into capacity buffers instead of copying them.

Checked against an independent float64 reference (tests/reference.py `dense_from_parts`: what a
state stands for, from its raw tensors) and against the functional write (`state.append`, the
spec every other test holds the functional kernels to): the same tokens, codes, anchor set and
window after every call, whatever the capacity (growing, exact, preallocated), with crops, beam
reorders and the reference in place of the kernel; plus what in place promises: no codes copy on
a decode step, and a superseded state raises instead of returning what a later append wrote."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import dense_from_parts

from antkv_compile import VQTensor, ops, state
from antkv_compile.ops import cpu
from antkv_compile.settings import CacheSettings


def _book(g, H, D, bits_spec, basis):
    d, c = bits_spec
    S, K = D // d, 1 << c
    a = torch.eye(D) + 0.3 * torch.randn(H, D, D, generator=g) / D**0.5 if basis else torch.zeros(H, 0, 0)
    a_inv = torch.linalg.inv(a) if basis else torch.zeros(H, 0, 0)
    return state.Book(torch.randn(H, S, K, d, generator=g), torch.rand(H, generator=g), a, a_inv)


def _dense64(side: state.Side) -> torch.Tensor:
    """float64 dense of a side from its raw tensors (reference.py), mapped out of the basis."""
    d = dense_from_parts(side.codes, side.centroids.double(), side.anchor_rows.double(), side.anchor_pos, side.window.double())
    return d if side.basis.shape[-1] == 0 else d @ side.basis_inv.double()


def _same_state(got: state.Side, want: state.Side):
    assert torch.equal(got.codes, want.codes)
    for f in ("window", "window_err", "window_score"):
        torch.testing.assert_close(getattr(got, f), getattr(want, f), rtol=0, atol=1e-6, equal_nan=True)
    # the same anchors, slots in any order: sort each (b, h)'s slots by position
    key = lambda s: s.anchor_pos.long() * 4 + (s.anchor_pos < 0).long()  # noqa: E731 - empty slots (-1) sort first
    for s in (got, want):
        assert s.anchor_pos.shape == want.anchor_pos.shape
    gi, wi = key(got).sort(-1).indices, key(want).sort(-1).indices
    torch.testing.assert_close(got.anchor_pos.gather(2, gi), want.anchor_pos.gather(2, wi), rtol=0, atol=0)
    filled = want.anchor_pos.gather(2, wi) >= 0
    rows_g = got.anchor_rows.gather(2, gi[..., None].expand(-1, -1, -1, got.anchor_rows.shape[3]))
    rows_w = want.anchor_rows.gather(2, wi[..., None].expand(-1, -1, -1, want.anchor_rows.shape[3]))
    assert torch.equal(rows_g[filled], rows_w[filled])
    torch.testing.assert_close(_dense64(got), _dense64(want), rtol=0, atol=1e-9, equal_nan=True)


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    spec=st.sampled_from([(4, 8), (8, 8), (16, 6), (8, 10)]),
    window=st.integers(0, 6),
    anchor_frac=st.sampled_from([0.0, 0.05, 0.3, 1.0]),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
    basis=st.booleans(),
    capacity=st.sampled_from([None, 1, 40, 300]),
    kernel=st.booleans(),
)
def test_in_place_appends_equal_the_functional_write(seed, spec, window, anchor_frac, dtype, basis, capacity, kernel):
    """Random calls (a prefill, one-token steps, a few chunks, a crop, a beam reorder, a random
    score each step as attention would add): the eager VQTensor (in place) and the functional
    write (write.cpp's own with the kernel, state.append without) hold the same state after every call."""
    with pytest.MonkeyPatch.context() as m:
        if not kernel:
            m.setattr(cpu, "append_supported", lambda *a: False)
        _random_calls(seed, spec, window, anchor_frac, dtype, basis, capacity, kernel)


def _functional(side: state.Side, x, s: CacheSettings, kernel: bool) -> state.Side:
    """The functional write: write.cpp's (the same basis map as in place: torch's matmul rounds
    differently, 1 ulp on an AVX-512 CPU) or the reference's."""
    if not kernel:
        return state.append(side, x, s)
    return state.Side(*ops.append_cpu(list(side), x, *ops.settings_args(s)), *(getattr(side, f) for f in state.BOOK_FIELDS))


def _random_calls(seed, spec, window, anchor_frac, dtype, basis, capacity, kernel=False):
    g = torch.Generator().manual_seed(seed)
    B, H, D = 2, 2, 16
    s = CacheSettings(window=window, anchor_frac=anchor_frac)
    bk = _book(g, H, D, spec, basis)
    cache = VQTensor.empty(B, bk, s, dtype, capacity=capacity)
    want = state.empty(B, bk, dtype, s)
    steps = [int(torch.randint(1, 20, (1,), generator=g))] + [1] * 12 + [3, 1, 1, 5] + [1] * 6
    for i, n in enumerate(steps):
        x = torch.randn(B, H, n, D, generator=g).to(dtype)
        cache = torch.cat([cache, x], 2)
        want = _functional(want, x, s, kernel)
        _same_state(cache.side, want)
        score = torch.rand(want.window_score.shape, generator=g)
        cache.window_score.add_(score)
        want = want._replace(window_score=want.window_score + score)
        if i == 8:  # HF's crop (assisted decoding): drop 3 tokens
            cache, want = cache[:, :, : cache.shape[2] - 3], state.crop(want, want.codes.shape[2] - 3)
        if i == 14:  # a beam reorder
            idx = torch.tensor([1, 1])
            cache, want = cache.index_select(0, idx), state.select_batch(want, idx)
    _same_state(cache.side, want)


def test_decode_steps_write_in_place_into_the_preallocated_buffers():
    """With capacity for the whole run, no step reallocates the codes or anchor buffers (the same
    storage throughout) and earlier tokens' codes are not rewritten."""
    g = torch.Generator().manual_seed(1)
    bk = _book(g, 3, 64, (8, 8), True)
    cache = torch.cat([VQTensor.empty(1, bk, CacheSettings(window=8, anchor_frac=0.05), capacity=600), torch.randn(1, 3, 500, 64, generator=g)], 2)
    ptrs = {f: t.data_ptr() for f, t in cache._buffers.tensors.items()}
    first = cache.codes.clone()
    for _ in range(100):
        cache = torch.cat([cache, torch.randn(1, 3, 1, 64, generator=g)], 2)
        assert {f: t.data_ptr() for f, t in cache._buffers.tensors.items()} == ptrs
    assert cache.shape[2] == 600 and torch.equal(cache.codes[:, :, :500], first)
    cache = torch.cat([cache, torch.randn(1, 3, 1, 64, generator=g)], 2)  # past capacity: grows (one copy)
    assert cache._buffers.tensors["codes"].data_ptr() != ptrs["codes"] and cache.shape[2] == 601


def test_a_superseded_state_raises_and_a_clone_survives():
    g = torch.Generator().manual_seed(2)
    bk = _book(g, 2, 16, (4, 8), False)
    old = torch.cat([VQTensor.empty(1, bk, CacheSettings(window=2, anchor_frac=0.5)), torch.randn(1, 2, 10, 16, generator=g)], 2)
    kept = old.clone()
    dense = kept.dequantize()
    view = old[:, :, :8]  # a crop shares the buffers: superseded with its source
    new = torch.cat([old, torch.randn(1, 2, 1, 16, generator=g)], 2)
    for stale in (old, view):
        with pytest.raises(RuntimeError, match="superseded.*clone"):
            stale.dequantize()
    torch.testing.assert_close(kept.dequantize(), dense, rtol=0, atol=0)
    assert new.shape[2] == 11 and torch.isfinite(new.dequantize()).all()
    # appending to the crop (HF's assisted decoding) copies first, and leaves the new state alone
    g2 = torch.Generator().manual_seed(3)
    base = torch.cat([VQTensor.empty(1, bk, CacheSettings(window=2, anchor_frac=0.5)), torch.randn(1, 2, 10, 16, generator=g2)], 2)
    cropped = torch.cat([base[:, :, :7], torch.randn(1, 2, 1, 16, generator=g2)], 2)
    ref = state.append(state.crop(base.side, 7), cropped.window[:, :, -1:], cropped.settings)
    _same_state(cropped.side, ref)


def test_in_place_op_declares_its_mutation_and_matches_its_fake():
    """torch.library's own check of antkv::append_ (schema, fake kernel, mutation of the buffers)."""
    g = torch.Generator().manual_seed(4)
    bk = _book(g, 2, 16, (4, 8), False)
    s = CacheSettings(window=2, anchor_frac=0.2)
    side = state.append(state.empty(1, bk, torch.float32, s), torch.randn(1, 2, 9, 16, generator=g), s)
    from antkv_compile.cache import Buffers

    buf = Buffers(side, 20, 5)
    torch.library.opcheck(ops.append_, (*ops.split_buffers(side._replace(**buf.tensors)), 9, side.anchor_pos.shape[2], torch.randn(1, 2, 1, 16, generator=g), 2, 0.2, "actual", None),
                          test_utils=("test_schema", "test_faketensor"))  # fmt: skip


def test_max_cache_len_is_validated_and_generate_is_unchanged():
    import antkv_compile as ak
    from helpers import tiny_hf_model

    with pytest.raises(ValueError, match="max_cache_len must be a number of tokens >= 1"):
        ak.AntKVCache(max_cache_len=0)
    model, books = tiny_hf_model("llama")
    ak.use_antkv_attention(model)
    ids = torch.randint(3, 96, (1, 8), generator=torch.Generator().manual_seed(5))
    kw = dict(max_new_tokens=24, min_new_tokens=24, do_sample=False, pad_token_id=0)
    outs = []
    with torch.no_grad():
        for cap in (None, 32, 4):  # grow; exactly the run; too small (grows past it)
            cache = ak.AntKVCache(books, window=4, anchor_frac=0.1, max_cache_len=cap)
            outs.append(model.generate(ids, **{ak.cache_keyword(model): cache}, **kw))
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


def test_save_and_deepcopy_of_a_preallocated_state(tmp_path):
    """torch.save keeps the state, not its capacity buffers (and loads with torch.load's defaults);
    a deepcopy is a cache of its own: appending to it leaves the original current and unchanged."""
    import copy

    g = torch.Generator().manual_seed(6)
    bk = _book(g, 2, 16, (4, 8), True)
    cache = torch.cat([VQTensor.empty(1, bk, CacheSettings(window=2, anchor_frac=0.3), capacity=1000), torch.randn(1, 2, 9, 16, generator=g)], 2)
    torch.save(cache, tmp_path / "c.pt")
    torch.save(cache.clone(), tmp_path / "compact.pt")  # a clone holds no buffers
    assert (tmp_path / "c.pt").stat().st_size <= (tmp_path / "compact.pt").stat().st_size + 512  # not the 1000-token buffers (8 KB of codes)
    loaded = torch.load(tmp_path / "c.pt")
    torch.testing.assert_close(loaded.dequantize(), cache.dequantize(), rtol=0, atol=0)
    dense = cache.dequantize()
    twin = copy.deepcopy(cache)
    x = torch.randn(1, 2, 1, 16, generator=g)
    grown = torch.cat([twin, x], 2)
    torch.testing.assert_close(cache.dequantize(), dense, rtol=0, atol=0)
    torch.testing.assert_close(grown.dequantize(), torch.cat([cache, x], 2).dequantize(), rtol=0, atol=0)
