"""Weighted k-means, batched over independent groups (one group = one kv head x subspace).

AnTKV's token-aware centroids: each calibration token pulls on the centroids in proportion to its
Anchor Score, so the codebook spends its resolution where errors move the attention output.
k-means++ seeding and a fixed number of Lloyd iterations, deterministic under `seed`.
"""

from __future__ import annotations

import torch


def _assign(x: torch.Tensor, c: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """Nearest centroid of every point: x [G, N, d], c [G, K, d] -> [G, N]. argmin of
    ||c||^2 - 2 x.c (||x||^2 does not change it) in one baddbmm, chunked over N to stay in cache."""
    c_sq = (c * c).sum(-1)[:, None]  # [G, 1, K]
    ct = c.transpose(1, 2)
    return torch.cat([torch.baddbmm(c_sq, x[:, i : i + chunk], ct, alpha=-2).argmin(-1) for i in range(0, x.shape[1], chunk)], 1)


def _sample(p: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """One index per row with probability proportional to p [G, N] (inverse CDF: far cheaper
    than torch.multinomial on long rows)."""
    cdf = p.double().cumsum(-1)
    u = torch.rand(p.shape[0], 1, generator=gen, dtype=torch.float64, device=p.device) * cdf[:, -1:]
    return torch.searchsorted(cdf, u).squeeze(1).clamp_max(p.shape[1] - 1)


def kmeans_pp_init(x: torch.Tensor, w: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    """k-means++ seeding with weighted sampling: P(pick i) ~ w_i * D(i)^2. x [G, N, d] -> [G, k, d]."""
    G, N, d = x.shape
    rows = torch.arange(G, device=x.device)
    centers = [x[rows, _sample(w, gen)]]
    best = ((x - centers[0][:, None]) ** 2).sum(-1)
    for _ in range(1, k):
        p = w * best
        # A group whose points are all covered (fewer distinct points than k) re-picks by weight.
        p = torch.where(p.sum(-1, keepdim=True) > 0, p, w)
        centers.append(x[rows, _sample(p, gen)])
        best = torch.minimum(best, ((x - centers[-1][:, None]) ** 2).sum(-1))
    return torch.stack(centers, 1)


def weighted_kmeans(
    x: torch.Tensor,
    k: int,
    weights: torch.Tensor | None = None,
    iters: int = 20,
    seed: int = 0,
    init: torch.Tensor | None = None,
) -> torch.Tensor:
    """Centroids [G, k, d] minimizing sum_i w_i ||x_i - c(x_i)||^2 per group. x [G, N, d], weights [G, N].

    Lloyd iterations from `init` [G, k, d] if given (e.g. a data-free codebook being refined), else
    from k-means++ seeds. Empty clusters keep their previous centroid. Runs in float32 on x's device.
    """
    x = x.float()
    G, N, d = x.shape
    w = torch.ones(G, N, device=x.device) if weights is None else weights.float().expand(G, N)
    if (w < 0).any() or not torch.isfinite(w).all():
        raise ValueError("k-means weights must be finite and non-negative")
    if init is not None:
        if tuple(init.shape) != (G, k, d):
            raise ValueError(f"k-means init of shape {tuple(init.shape)} does not match [groups={G}, k={k}, d={d}]")
        c = init.float().to(x.device)
    else:
        c = kmeans_pp_init(x, w, k, torch.Generator(device=x.device).manual_seed(seed))
    for _ in range(iters):
        assign = _assign(x, c)  # [G, N]
        mass = torch.zeros(G, k, device=x.device).scatter_add_(1, assign, w)
        sums = torch.zeros(G, k, d, device=x.device).scatter_add_(1, assign[..., None].expand(G, N, d), w[..., None] * x)
        new_c = torch.where(mass[..., None] > 0, sums / mass.clamp_min(1e-30)[..., None], c)
        if torch.equal(new_c, c):
            break
        c = new_c
    return c
