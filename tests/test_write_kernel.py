"""The CPU write kernel (antkv_compile/ops/cpu/write.cpp) against `state.append`, the PyTorch
reference it replaces as antkv::append's CPU kernel, on fresh random sides: shapes, windows, flush
sizes (nothing leaves, some, all), anchor budgets, score ties, NaN scores, NaN / Inf rows, row and
code dtypes, with and without a key basis, both error modes."""

import math
import warnings

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from antkv_compile import ops, state
from antkv_compile.ops import cpu
from antkv_compile.quant.basis import to_basis
from antkv_compile.settings import CacheSettings
from antkv_compile.state import STATE_FIELDS, Book, Side

# (sub_dim, code_bits): 4, 2, 1, 0.5, 0.375 bits, 3-bit codes of pairs, 10-bit codes (int16).
SPECS = [(2, 8), (4, 8), (8, 8), (16, 8), (16, 6), (2, 3), (8, 10)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture(scope="module", autouse=True)
def _built():
    if not cpu.extension():
        pytest.fail("the CPU kernels did not build")


def _poison(g, x, frac):
    """x with a share `frac` of its rows [..., D] given one NaN, +Inf or -Inf entry."""
    rows = x.reshape(-1, x.shape[-1]).clone()
    hit = torch.rand(rows.shape[0], generator=g) < frac
    for r in hit.nonzero().flatten().tolist():
        rows[r, torch.randint(0, rows.shape[1], (1,), generator=g)] = [math.nan, math.inf, -math.inf][r % 3]
    return rows.view(x.shape)


def _scores(g, shape, kind):
    if kind == "ties":  # few distinct values: topk's choice among equals matters
        return torch.randint(0, 3, shape, generator=g).float()
    if kind == "zeros":  # a prefill's window: every score 0
        return torch.zeros(shape)
    s = torch.rand(shape, generator=g)
    return s.masked_fill(torch.rand(shape, generator=g) < 0.2, math.nan) if kind == "nan" else s


def _side(g, B, H, Tc, Tw, A, D, spec, dtype, basis, scores, poison, codes_view):
    """A random side: Tc encoded tokens (random codes), A anchor slots at distinct encoded
    positions (some empty: -1, score -inf), a window of Tw exact rows with errors and scores."""
    d, c = spec
    S, K = D // d, 1 << c
    T = Tc + Tw
    codes = torch.randint(0, K, (B, H, T + 2 * codes_view, S), generator=g).to(torch.uint8 if K <= 256 else torch.int16)
    if codes_view:  # a cropped cache's codes: batch / head strides not T * S
        codes = codes[:, :, :T]
    A = min(A, Tc)
    pos = torch.stack([torch.randperm(Tc, generator=g)[:A] for _ in range(B * H)]).view(B, H, A).to(torch.int32)
    empty = torch.rand(B, H, A, generator=g) < 0.3
    if basis:
        a = torch.randn(H, D, D, generator=g) / math.sqrt(D) + torch.eye(D)
        bk = Book(torch.randn(H, S, K, d, generator=g), torch.rand(H, generator=g), a, torch.linalg.inv(a))
    else:
        bk = Book(torch.randn(H, S, K, d, generator=g), torch.rand(H, generator=g), torch.zeros(H, 0, 0), torch.zeros(H, 0, 0))
    return Side(
        codes,
        torch.randn(B, H, A, D, generator=g).to(dtype),
        pos.masked_fill(empty, -1),
        _scores(g, (B, H, A), scores).masked_fill(empty, -math.inf),
        _poison(g, torch.randn(B, H, Tw, D, generator=g), poison).to(dtype),
        torch.rand(B, H, Tw, generator=g),
        _scores(g, (B, H, Tw), scores),
        *bk,
    )


def _run(fn):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = fn()
    return out, [str(w.message) for w in caught if "left the exact window" in str(w.message)]


def _bits_equal(a, b):
    """Same values to the bit, NaN payloads aside (vectorized and scalar casts write different NaNs)."""
    assert a.dtype == b.dtype and a.shape == b.shape
    torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


def _row_tol(dtypes, basis):
    """How far a new row may be from the reference's, relative: none without a basis; with one,
    the basis product's float32 sum differs from the BLAS one by a rounding, which the casts (to
    the new rows' dtype, then the row dtype) may carry to the last bit of the coarser."""
    if not basis:
        return 0.0
    return max(2 * torch.finfo(t).eps if t != torch.float32 else 1e-5 for t in dtypes)


def _check_codes(got, want, rows, centroids, tol=1e-5):
    """Codes equal, except where the two centroids are equidistant from the stored row within
    float32 rounding (encode's |c|^2 - 2 x.c in another summation order), or within `tol` when
    the rows themselves may differ by a rounding."""
    H, S, K, d = centroids.shape
    differ = (got != want).nonzero().tolist()
    for b, h, t, s in differ:
        x = rows[b, h, t, s * d : (s + 1) * d].double()
        assert torch.isfinite(x).all(), f"codes differ on a non-finite sub-vector at {(b, h, t, s)}"
        c = centroids[h, s].double()
        dist = ((x - c) ** 2).sum(-1)
        scale = (x * x).sum() + (c * c).sum(-1).max()
        gap = (dist[int(got[b, h, t, s])] - dist[int(want[b, h, t, s])]).abs()
        assert gap <= tol * scale, f"code {(b, h, t, s)}: {int(got[b, h, t, s])} vs {int(want[b, h, t, s])}, distance gap {gap:.3g}"
    return len(differ)


@given(
    seed=st.integers(0, 2**31 - 1),
    batch=st.integers(1, 2),
    heads=st.sampled_from([1, 3]),
    head_dim=st.sampled_from([16, 32, 64]),
    spec=st.sampled_from(SPECS),
    encoded=st.sampled_from([0, 1, 7, 100]),
    held=st.sampled_from([0, 1, 5, 33]),
    anchors=st.sampled_from([0, 1, 4, 9]),
    new_len=st.sampled_from([1, 1, 3, 40]),
    keep=st.sampled_from(["all", "some", "none", "more"]),
    anchor_frac=st.sampled_from([0.0, 0.01, 0.1, 0.5, 1.0]),
    error=st.sampled_from(["actual", "expected"]),
    row_dtype=st.sampled_from(DTYPES),
    new_dtype=st.sampled_from(DTYPES),
    basis=st.booleans(),
    scores=st.sampled_from(["random", "ties", "zeros", "nan"]),
    poison=st.sampled_from([0.0, 0.0, 0.3]),
    codes_view=st.booleans(),
)
def test_kernel_equals_state_append(
    seed, batch, heads, head_dim, spec, encoded, held, anchors, new_len, keep, anchor_frac, error, row_dtype, new_dtype,
    basis, scores, poison, codes_view,
):  # fmt: skip
    if head_dim % spec[0]:
        head_dim = 64
    g = torch.Generator().manual_seed(seed)
    side = _side(g, batch, heads, encoded, held, anchors, head_dim, spec, row_dtype, basis, scores, poison, codes_view)
    # settings.window: nothing leaves (window >= held), some leave, all leave (window 0)
    window = {"all": held, "more": held + 3, "some": held // 2, "none": 0}[keep]
    settings = CacheSettings(window=window, anchor_frac=anchor_frac, error=error)
    new = _poison(g, 3 * torch.randn(batch, heads, new_len, head_dim, generator=g), poison).to(new_dtype)
    assert cpu.append_supported(side, new)  # the kernel, not the fallback, is under test

    want, want_warn = _run(lambda: state.append(side, new, settings))
    got, got_warn = _run(lambda: cpu.append(side, new, *ops.settings_args(settings)[:3]))
    want = [getattr(want, f) for f in STATE_FIELDS]
    assert got_warn == want_warn  # the same warning, with the same count and budget

    codes, arows, apos, ascore, win, werr, wscore = got
    for f, a, b in zip(STATE_FIELDS, got, want):
        assert a.shape == b.shape and a.dtype == b.dtype, f
    # the flush: which candidates stay, in topk's order (ties included), their rows and scores
    assert torch.equal(apos, want[2])
    _bits_equal(arows, want[1])
    _bits_equal(ascore, want[3])
    _bits_equal(wscore, want[6])
    stay = window if held > window else held
    _bits_equal(win[:, :, :stay], want[4][:, :, :stay])
    _bits_equal(werr[:, :, :stay], want[5][:, :, :stay])
    # the new rows: to the bit without a basis, else within a rounding (_row_tol)
    tol = _row_tol((row_dtype, new_dtype), basis)
    if basis:
        torch.testing.assert_close(win.float(), want[4].float(), rtol=tol, atol=3 * tol, equal_nan=True)
    else:
        _bits_equal(win, want[4])
    T = encoded + held
    assert torch.equal(codes[:, :, :T], want[0][:, :, :T])
    _check_codes(codes[:, :, T:], want[0][:, :, T:], win[:, :, -new_len:], side.centroids, max(1e-5, 8 * tol))
    torch.testing.assert_close(werr, want[5], rtol=max(1e-4, 4 * tol), atol=max(1e-4, 4 * tol), equal_nan=True)
    # the op dispatches to this kernel on CPU, and returns fresh tensors
    op = torch.ops.antkv.append(list(side), new, *ops.settings_args(settings))
    for a, b in zip(op, got):
        _bits_equal(a, b)
    inputs = {t.untyped_storage().data_ptr() for t in (*side, new) if t.numel()}
    assert not any(t.numel() and t.untyped_storage().data_ptr() in inputs for t in op)


@pytest.mark.parametrize("leaving, anchor_frac", [(1000, 0.001), (1000, 0.004), (200, 0.1), (40, 0.1)])
@pytest.mark.parametrize("scores", ["zeros", "ties"])
def test_ties_resolve_as_torch_topk(leaving, anchor_frac, scores):
    """Equal scores everywhere: the anchors kept, and their order, are torch.topk's, on both of its
    paths (partial_sort when k * 64 <= candidates, as in the first two cases; else nth_element)."""
    g = torch.Generator().manual_seed(leaving)
    side = _side(g, 2, 3, 300, leaving, 9, 32, (8, 8), torch.float32, False, scores, 0.0, False)
    new = torch.randn(2, 3, 1, 32, generator=g)
    settings = CacheSettings(window=0, anchor_frac=anchor_frac)
    want = state.append(side, new, settings)
    got = cpu.append(side, new, *ops.settings_args(settings)[:3])
    assert 0 < want.anchor_pos.shape[2] < side.anchor_pos.shape[2] + leaving  # ranked, not all kept
    assert torch.equal(got[2], want.anchor_pos)
    _bits_equal(got[1], want.anchor_rows)


@given(
    seed=st.integers(0, 2**31 - 1),
    past_len=st.sampled_from([0, 5, 50]),
    new_len=st.sampled_from([1, 7]),
    window=st.sampled_from([0, 4, 32]),
    basis=st.booleans(),
    dtype=st.sampled_from(DTYPES),
)
def test_start_op_equals_state_start(seed, past_len, new_len, window, basis, dtype):
    """antkv::start on CPU (two appends by the kernel) against state.start."""
    g = torch.Generator().manual_seed(seed)
    side = _side(g, 1, 3, 0, 0, 0, 64, (8, 8), dtype, basis, "random", 0.0, False)
    bk = Book(*side[len(STATE_FIELDS):])
    past = torch.randn(1, 3, past_len, 64, generator=g).to(dtype) if past_len else torch.zeros(0)
    new = torch.randn(1, 3, new_len, 64, generator=g).to(dtype)
    settings = CacheSettings(window=window, anchor_frac=0.1)
    want = state.start(past, new, bk, settings)
    got = torch.ops.antkv.start(past, new, list(bk), *ops.settings_args(settings))
    assert torch.equal(got[2], want.anchor_pos)  # prefill scores are all 0: topk's tie order
    # the rows the reference encoded: every token, in the basis, in the row dtype
    rows = to_basis(torch.cat([past, new], 2) if past_len else new, bk.basis).to(dtype)
    tol = _row_tol((dtype,), basis)
    for f, a in zip(STATE_FIELDS, got):
        b = getattr(want, f)
        if f == "codes":
            _check_codes(a, b, rows, bk.centroids, max(1e-5, 8 * tol))
        elif basis and f in ("anchor_rows", "window"):
            torch.testing.assert_close(a.float(), b.float(), rtol=tol, atol=3 * tol)
        elif f == "window_err":
            torch.testing.assert_close(a, b, rtol=max(1e-4, 4 * tol), atol=max(1e-4, 4 * tol))
        else:
            _bits_equal(a, b)


def test_fallback_outside_the_contract(monkeypatch):
    """A side the kernel does not take (int64 anchor positions), or no extension: state.append."""
    g = torch.Generator().manual_seed(0)
    side = _side(g, 1, 2, 20, 6, 2, 32, (8, 8), torch.float32, False, "random", 0.0, False)
    new = torch.randn(1, 2, 1, 32, generator=g)
    settings = CacheSettings(window=4, anchor_frac=0.2)
    called = []
    monkeypatch.setattr(cpu, "append", lambda *a: called.append(1))
    odd = side._replace(anchor_pos=side.anchor_pos.long())
    assert not cpu.append_supported(odd, new)
    out = torch.ops.antkv.append(list(odd), new, *ops.settings_args(settings))
    want = state.append(odd, new, settings)
    assert not called and all(torch.equal(a, getattr(want, f)) for f, a in zip(STATE_FIELDS, out))
    monkeypatch.setattr(cpu, "extension", lambda: False)
    assert not cpu.append_supported(side, new)
    out = torch.ops.antkv.append(list(side), new, *ops.settings_args(settings))
    want = state.append(side, new, settings)
    assert not called and all(torch.equal(a, getattr(want, f)) for f, a in zip(STATE_FIELDS, out))


def test_prepared_codebook_follows_the_centroids():
    """The memoized transposed codebook (cpu.prepared): the transpose and |c|^2 of these very
    centroids, recomputed after an in-place change, dropped with the tensor."""
    g = torch.Generator().manual_seed(0)
    c = torch.randn(2, 4, 6, 8, generator=g)  # K = 6: padded to 8

    def want(c):
        ct = torch.nn.functional.pad(c.transpose(2, 3), (0, 2))
        return ct, (ct.double() ** 2).sum(2).float()

    ct, csq = cpu.prepared(c)
    assert torch.equal(ct, want(c)[0]) and torch.allclose(csq, want(c)[1], rtol=1e-6)
    assert cpu.prepared(c)[0] is ct  # memoized
    side = _side(g, 1, 2, 10, 6, 2, 32, (8, 3), torch.float32, False, "random", 0.0, False)
    side = side._replace(centroids=c)
    new = torch.randn(1, 2, 2, 32, generator=g)
    settings = CacheSettings(window=4, anchor_frac=0.3)
    cpu.append(side, new, *ops.settings_args(settings)[:3])
    c.mul_(-1)  # in place: the next append must use the new centroids
    got = cpu.append(side, new, *ops.settings_args(settings)[:3])
    assert torch.equal(cpu.prepared(c)[0], want(c)[0])
    want_codes = state.append(side, new, settings).codes
    assert torch.equal(got[0][:, :, :16], want_codes[:, :, :16])
    _check_codes(got[0][:, :, 16:], want_codes[:, :, 16:], got[4][:, :, -2:], c)
    key = id(c)
    del c, side
    assert key not in cpu._PREPARED


def test_generate_same_tokens_with_the_kernel_the_reference_and_compiled(monkeypatch):
    """A tiny Llama, greedy: eager AntKVCache with the write kernel (in place, cpu.append_), eager
    with the reference (state.append_into), and compiled by ak.patch (Inductor, the functional
    kernel cpu.append) give the same tokens; the kernels ran."""
    import antkv_compile as ak
    from helpers import tiny_hf_model

    torch._dynamo.reset()
    model, books = tiny_hf_model("llama")
    ids = torch.randint(3, 96, (2, 8), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    kw = dict(attention_mask=mask, max_new_tokens=64, min_new_tokens=64, do_sample=False, pad_token_id=0)
    ak.use_antkv_attention(model)
    calls = []
    kernel, kernel_ = cpu.append, cpu.append_
    monkeypatch.setattr(cpu, "append", lambda *a: calls.append(1) or kernel(*a))
    monkeypatch.setattr(cpu, "append_", lambda *a: calls.append(1) or kernel_(*a))
    generate = lambda: model.generate(ids, **{ak.cache_keyword(model): ak.AntKVCache(books, window=8, anchor_frac=0.1)}, **kw)  # noqa: E731
    with torch.no_grad():
        out = generate()
        assert len(calls) >= 2 * 2 * 64  # layers x sides x steps
        with monkeypatch.context() as m:
            m.setattr(cpu, "append_supported", lambda *a: False)
            n = len(calls)
            ref = generate()
            assert len(calls) == n
        assert torch.equal(out, ref)
        ak.patch(model, books, window=8, anchor_frac=0.1)
        n = len(calls)
        compiled = model.generate(ids, **kw)
        assert len(calls) > n
    assert torch.equal(compiled, ref)
    torch._dynamo.reset()
