"""The key basis's allocation of principal axes to subspaces (quant/basis.deal_axes) and the paired
variant of fit_key_basis, against float64 references written here."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from antkv_compile.quant.basis import deal_axes, fit_key_basis, query_to_basis, to_basis


def _deal_reference(var: list[float], sub_dim: int, unit: int) -> list[list[int]]:
    """Plain-Python greedy: units of `unit` axes in descending variance, each to the open subspace
    with the smallest sum of log(var / min var); ties to the lowest subspace index."""
    import math

    D = len(var)
    order = sorted(range(D), key=lambda i: (-var[i], i))
    lo = min(max(v, 1e-12) for v in var)
    slots, sums = [[] for _ in range(D // sub_dim)], [0.0] * (D // sub_dim)
    for u in range(0, D, unit):
        axes = order[u : u + unit]
        best = min((s for s in range(len(slots)) if len(slots[s]) < sub_dim), key=lambda s: (sums[s], s))
        slots[best] += axes
        sums[best] += sum(math.log(max(var[i], 1e-12) / lo) for i in axes)
    return slots


@given(
    seed=st.integers(0, 2**31 - 1),
    layout=st.sampled_from([(64, 8), (64, 4), (32, 16), (16, 2), (8, 8)]),
    unit=st.sampled_from([1, 2]),
)
def test_deal_axes_matches_the_greedy_reference(seed, layout, unit):
    D, sub_dim = layout
    g = torch.Generator().manual_seed(seed)
    var = torch.rand(D, generator=g, dtype=torch.float64).mul(6).sub(3).exp()  # distinct, over ~2.6 decades
    order = deal_axes(var, sub_dim, unit)
    assert sorted(order) == list(range(D))
    got = [sorted(order[s * sub_dim : (s + 1) * sub_dim]) for s in range(D // sub_dim)]
    assert got == [sorted(slot) for slot in _deal_reference(var.tolist(), sub_dim, unit)]
    if unit == 2:  # the two axes of each variance-adjacent pair share a subspace
        ranked = var.argsort(descending=True).tolist()
        where = {i: s for s, slot in enumerate(got) for i in slot}
        assert all(where[ranked[j]] == where[ranked[j + 1]] for j in range(0, D, 2))


def test_deal_axes_rejects_units_that_do_not_divide_the_sub_vector():
    with pytest.raises(ValueError, match="units of 2"):
        deal_axes(torch.ones(8), 1, 2)


@given(seed=st.integers(0, 2**31 - 1), sub_dim=st.sampled_from([2, 4, 8]))
def test_paired_key_basis_preserves_logits(seed, sub_dim):
    """(q A^-T) . (k A) = q . k in float64 for the paired basis too, and it is a column permutation
    of W U with the same W U columns as the unpaired basis (only the order differs)."""
    g = torch.Generator().manual_seed(seed)
    H, D = 2, 16
    keys = torch.randn(3, H, 50, D, generator=g) @ torch.randn(D, D, generator=g)
    q = torch.randn(1, 3 * H, 7, D, generator=g)
    mix = torch.randn(H, D, D, generator=g)
    moment = mix @ mix.transpose(1, 2)
    a2, a2_inv = fit_key_basis(keys, moment, sub_dim, unit=2)
    a1, _ = fit_key_basis(keys, moment, sub_dim, unit=1)
    k = keys[:1]
    ref = q.double() @ k.double().repeat_interleave(3, 1).transpose(-1, -2)
    got = query_to_basis(q, a2_inv).double() @ to_basis(k, a2).double().repeat_interleave(3, 1).transpose(-1, -2)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-3)
    for h in range(H):  # every paired column is one of the unpaired columns (eigenvectors up to sign)
        sim = (a2[h].double().T @ a1[h].double()).abs() / (a2[h].double().norm(dim=0)[:, None] * a1[h].double().norm(dim=0)[None])
        torch.testing.assert_close(sim.max(1).values, torch.ones(D, dtype=torch.float64), rtol=0, atol=1e-4)


def test_fit_codebooks_checks_basis_unit():
    from antkv_compile.calibrate import CalibrationData, fit_codebooks

    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 1, 64, 16, generator=g)
    data = CalibrationData([x], [x.clone()], [torch.ones(1, 1, 64)], [torch.ones(1, 1, 64)], [torch.randn(1, 1, 4, 16, generator=g)],
                           [0.25], {}, [torch.eye(16)[None]])
    with pytest.raises(ValueError, match="basis_unit"):
        fit_codebooks(data, bits=1.0, basis_unit=0, progress=False)
    books = fit_codebooks(data, bits=2.0, kv_split="equal", basis_unit=2, kmeans_tokens=64, iters=2, progress=False)
    assert books.settings["basis_unit"] == 2 and books[0].key.basis is not None


@given(seed=st.integers(0, 2**31 - 1), layers=st.integers(1, 3), bits=st.sampled_from([1.0, 2.0]))
def test_allocate_layer_bits_is_the_exhaustive_optimum(seed, layers, bits):
    """Against every assignment of options to the 2 x layers sides: the least summed error among
    those storing no more than all sides at `bits` (stored bits: a byte per code)."""
    import itertools

    from antkv_compile.calibrate import allocate_layer_bits
    from antkv_compile.quant.pq import spec_for_bits

    g = torch.Generator().manual_seed(seed)
    options = [0.5, 1.0, 2.0, 4.0]
    # error falls with bits, per side at its own rate
    base = torch.rand(layers, 2, generator=g, dtype=torch.float64) + 0.1
    errors = {b: base * torch.rand(layers, 2, generator=g, dtype=torch.float64).add(0.5) * 2.0 ** (-2 * b) for b in options}
    got = allocate_layer_bits(errors, bits)
    assert len(got) == layers
    budget = spec_for_bits(bits).stored_bits * 2 * layers
    stored = lambda pick: sum(spec_for_bits(b).stored_bits for b in pick)
    total = lambda pick: sum(errors[b][i // 2, i % 2].item() for i, b in enumerate(pick))
    best = min((p for p in itertools.product(options, repeat=2 * layers) if stored(p) <= budget + 1e-9), key=total)
    flat = [b for pair in got for b in pair]
    assert stored(flat) <= budget + 1e-9
    assert total(flat) == pytest.approx(total(best), rel=1e-12)


def test_allocate_layer_bits_errors():
    from antkv_compile.calibrate import allocate_layer_bits

    with pytest.raises(ValueError, match="at least one"):
        allocate_layer_bits({}, 1.0)
    with pytest.raises(ValueError, match="no allocation fits"):
        allocate_layer_bits({2.0: torch.ones(3, 2)}, 1.0)
    with pytest.raises(ValueError, match=r"\[n_layers, 2\]"):
        allocate_layer_bits({1.0: torch.ones(3, 3)}, 1.0)


def test_side_errors_fall_with_bits_and_vanish_for_an_exact_side():
    """side_errors on random calibration data: more bits, less error, per side; a side whose tokens
    are all anchors (anchor_frac=1) is exact, so its error is zero to rounding."""
    from antkv_compile.calibrate import CalibrationData, side_errors

    g = torch.Generator().manual_seed(1)
    n, H, L, D = 2, 2, 768, 16  # more tokens than 256 centroids, or every token is its own centroid
    k, v = torch.randn(n, H, L, D, generator=g), torch.randn(n, H, L, D, generator=g)
    q = torch.randn(n, 2 * H, 8, D, generator=g)
    data = CalibrationData([k], [v], [torch.rand(n, H, L, generator=g)], [torch.rand(n, H, L, generator=g)], [q], [D**-0.5], {},
                           [torch.eye(D).expand(H, D, D).clone()])
    errors = side_errors(data, options=(0.5, 4.0), kmeans_tokens=1536, iters=5, eval_seqs=2, progress=False)
    assert errors[0.5].shape == (1, 2)
    assert (errors[4.0] < errors[0.5]).all() and (errors[0.5] > 0).all()
    exact = side_errors(data, options=(1.0,), anchor_frac=1.0, kmeans_tokens=512, iters=2, eval_seqs=2, progress=False)
    torch.testing.assert_close(exact[1.0], torch.zeros(1, 2, dtype=torch.float64), rtol=0, atol=1e-10)
