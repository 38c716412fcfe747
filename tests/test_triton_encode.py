"""vq_encode (Triton, interpreted on CPU) against a float64 PyTorch nearest-centroid reference."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import given, settings, strategies as st  # noqa: E402

from antkv_compile.ops.triton.encode import vq_encode  # noqa: E402


def reference_distances(x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Squared L2 distance of every sub-vector to every centroid, float64: [B, H, T, S, K] for
    x [B, H, T, D], [N, H, S, K] for x [N, H, D]."""
    H, S, K, d = centroids.shape
    xs = x.double().unflatten(-1, (S, d)).unsqueeze(-2)  # [..., S, 1, d]
    c = centroids.double() if x.dim() == 3 else centroids.double()[:, None]  # align H
    return ((xs - c) ** 2).sum(-1)


def check_encoding(x, centroids, codes, err):
    dist = reference_distances(x, centroids)
    chosen = dist.gather(-1, codes.long().unsqueeze(-1)).squeeze(-1)
    best = dist.min(-1).values
    # Optimal up to float32 rounding: a tie or near-tie may pick either centroid.
    torch.testing.assert_close(chosen, best, atol=1e-5 * (1 + best.max().item()), rtol=1e-5)
    torch.testing.assert_close(err.double(), chosen.sum(-1).sqrt(), atol=1e-5, rtol=1e-5)


@st.composite
def encode_cases(draw):
    D = draw(st.sampled_from([32, 64]))
    d = draw(st.sampled_from([4, 8, 16]))
    K = draw(st.sampled_from([16, 64, 256]))
    H = draw(st.integers(1, 3))
    dtype = draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16]))
    token_major = draw(st.booleans())
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    centroids = torch.randn(H, D // d, K, d, generator=g)
    if token_major:
        x = torch.randn(draw(st.integers(1, 40)), H, D, generator=g)
    else:
        x = torch.randn(draw(st.integers(1, 2)), H, draw(st.integers(1, 40)), D, generator=g)
    return x.to(dtype), centroids


@given(encode_cases())
def test_encode_matches_reference(case):
    x, centroids = case
    codes, err = vq_encode(x, centroids)
    H, S, K, d = centroids.shape
    assert codes.shape == (*x.shape[:-1], S) and codes.dtype == torch.uint8
    assert err.shape == x.shape[:-1] and err.dtype == torch.float32
    check_encoding(x, centroids, codes, err)


def test_encode_int16_codes_and_out_slice():
    """K > 256 needs int16 codes; out= writes into a strided slice of a larger buffer."""
    g = torch.Generator().manual_seed(0)
    centroids = torch.randn(2, 4, 512, 8, generator=g)
    x = torch.randn(1, 2, 21, 32, generator=g)
    codes_buf = torch.full((1, 2, 30, 4), -1, dtype=torch.int16)
    err_buf = torch.full((1, 2, 30), -1.0)
    codes, err = vq_encode(x, centroids, out=(codes_buf[:, :, 5:26], err_buf[:, :, 5:26]))
    assert codes.data_ptr() == codes_buf[:, :, 5:].data_ptr()
    check_encoding(x, centroids, codes, err)
    assert (codes_buf[:, :, :5] == -1).all() and (codes_buf[:, :, 26:] == -1).all()
    assert (err_buf[:, :, :5] == -1).all() and (err_buf[:, :, 26:] == -1).all()


def test_encode_exact_centroids_have_zero_error():
    g = torch.Generator().manual_seed(1)
    centroids = torch.randn(3, 8, 64, 8, generator=g)
    want = torch.randint(0, 64, (2, 3, 10, 8), generator=g)
    x = centroids[torch.arange(3)[:, None, None], torch.arange(8), want].flatten(-2)
    codes, err = vq_encode(x, centroids)
    assert torch.equal(codes.long(), want)
    assert err.abs().max() < 1e-6


@pytest.mark.parametrize(
    "x_shape, c_shape, dtype, match",
    [
        ((1, 2, 5, 30), (2, 4, 16, 8), torch.float32, "head_dim"),
        ((1, 3, 5, 32), (2, 4, 16, 8), torch.float32, "heads"),
        ((1, 2, 5, 32), (2, 4, 16, 8), torch.int32, "float32/float16/bfloat16"),
        ((5, 32), (2, 4, 16, 8), torch.float32, r"\[B, H, T, D\]"),
    ],
)
def test_encode_rejects_bad_inputs(x_shape, c_shape, dtype, match):
    x = torch.zeros(x_shape, dtype=dtype)
    with pytest.raises((ValueError, TypeError), match=match):
        vq_encode(x, torch.zeros(c_shape))


@given(st.integers(0, 2**31 - 1), st.sampled_from(["actual", "expected"]), st.booleans(), st.sampled_from([torch.float32, torch.float16]))
@settings(max_examples=12, deadline=None)
def test_cuda_write_kernels_equal_the_reference_in_the_interpreter(seed, error, basis, dtype):
    """antkv::start / antkv::append's CUDA kernels (state's functions with the Triton encoder),
    called on CPU tensors in the interpreter: the same state as the reference (state.start /
    state.append with quant.pq's encoder), codes optimal, errors the codes' actual error; and
    antkv::append_'s (in place into capacity buffers) the same state as antkv::append's."""
    from antkv_compile import state
    from antkv_compile.ops import append_cuda, settings_args, start_cuda
    from antkv_compile.settings import CacheSettings
    from antkv_compile.state import STATE_FIELDS, Book, Side

    g = torch.Generator().manual_seed(seed)
    H, D, d, K = 2, 16, 4, 16
    a = torch.randn(H, D, D, generator=g) / 4 + torch.eye(D) if basis else torch.zeros(H, 0, 0)
    bk = Book(torch.randn(H, D // d, K, d, generator=g), torch.rand(H, generator=g), a, torch.linalg.inv(a) if basis else a)
    s = CacheSettings(window=3, anchor_frac=0.2, error=error, exact_dtype=dtype)
    past, new, step = (torch.randn(2, H, n, D, generator=g) for n in (9, 2, 1))
    ref = state.start(past, new, bk, s)
    got = Side(*start_cuda(past, new, list(bk), *settings_args(s)), *bk)
    ref2 = state.append(ref, step, s)
    got2 = Side(*append_cuda(list(got), step, *settings_args(s)), *bk)
    from antkv_compile.cache import Buffers
    from antkv_compile.ops import _KERNELS, append_, split_buffers

    T, A = got.codes.shape[2], got.anchor_pos.shape[2]
    buf = Buffers(got, T + 4, A + 4)
    window = _KERNELS[(append_, "cuda")](*split_buffers(got._replace(**buf.tensors)), T, A, step, *settings_args(s))
    in_place = got2._replace(**buf.prefix(T + 1, got2.anchor_pos.shape[2]), **dict(zip(state.WINDOW_FIELDS, window)))
    for f in STATE_FIELDS:
        torch.testing.assert_close(getattr(in_place, f), getattr(got2, f), rtol=0, atol=0, msg=f)
    for r, k in ((ref, got), (ref2, got2)):
        for f in STATE_FIELDS:
            if f in ("codes", "window_err"):
                continue
            torch.testing.assert_close(getattr(k, f), getattr(r, f), rtol=0, atol=0, msg=f)
        Tc = k.codes.shape[2] - k.window.shape[2]
        window = k.window.float()  # the window's rows are the encoded rows, in the basis
        dist = reference_distances(window, k.centroids)
        chosen = dist.gather(-1, k.codes[:, :, Tc:].long().unsqueeze(-1)).squeeze(-1)
        torch.testing.assert_close(chosen, dist.min(-1).values, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(k.codes[:, :, :Tc], r.codes[:, :, :Tc]) if Tc else None
        want = chosen.sum(-1).sqrt().float() if error == "actual" else r.window_err
        torch.testing.assert_close(k.window_err, want, atol=1e-5, rtol=1e-5)
