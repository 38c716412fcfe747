"""Weighted k-means, batched over independent groups (one group = one kv head x subspace).

AnTKV's token-aware centroids: each calibration token pulls on the centroids in proportion to its
Anchor Score, so the codebook spends its resolution where errors move the attention output.
k-means++ seeding and a fixed number of Lloyd iterations, deterministic under `seed`.
"""

from __future__ import annotations

import torch


def _sq_dist(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """[G, N, d] x [G, K, d] -> [G, N, K] squared distances, clamped at 0."""
    return ((x * x).sum(-1, keepdim=True) - 2 * x @ c.transpose(1, 2) + (c * c).sum(-1)[:, None]).clamp_min_(0)


def kmeans_pp_init(x: torch.Tensor, w: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    """k-means++ seeding with weighted sampling: P(pick i) ~ w_i * D(i)^2. x [G, N, d] -> [G, k, d]."""
    G, N, d = x.shape
    rows = torch.arange(G, device=x.device)
    first = torch.multinomial(w + 1e-30, 1, generator=gen).squeeze(1)
    centers = [x[rows, first]]
    best = ((x - centers[0][:, None]) ** 2).sum(-1)
    for _ in range(1, k):
        p = w * best
        # A group whose points are all covered (fewer distinct points than k) re-picks by weight.
        p = torch.where(p.sum(-1, keepdim=True) > 0, p, w + 1e-30)
        pick = torch.multinomial(p, 1, generator=gen).squeeze(1)
        centers.append(x[rows, pick])
        best = torch.minimum(best, ((x - centers[-1][:, None]) ** 2).sum(-1))
    return torch.stack(centers, 1)


def weighted_kmeans(
    x: torch.Tensor,
    k: int,
    weights: torch.Tensor | None = None,
    iters: int = 20,
    seed: int = 0,
) -> torch.Tensor:
    """Centroids [G, k, d] minimizing sum_i w_i ||x_i - c(x_i)||^2 per group. x [G, N, d], weights [G, N].

    Empty clusters keep their previous centroid. Runs in float32 on x's device.
    """
    x = x.float()
    G, N, d = x.shape
    w = torch.ones(G, N, device=x.device) if weights is None else weights.float().expand(G, N)
    if (w < 0).any() or not torch.isfinite(w).all():
        raise ValueError("k-means weights must be finite and non-negative")
    gen = torch.Generator(device=x.device).manual_seed(seed)
    c = kmeans_pp_init(x, w, k, gen)
    for _ in range(iters):
        assign = _sq_dist(x, c).argmin(-1)  # [G, N]
        mass = torch.zeros(G, k, device=x.device).scatter_add_(1, assign, w)
        sums = torch.zeros(G, k, d, device=x.device).scatter_add_(1, assign[..., None].expand(G, N, d), w[..., None] * x)
        new_c = torch.where(mass[..., None] > 0, sums / mass.clamp_min(1e-30)[..., None], c)
        if torch.equal(new_c, c):
            break
        c = new_c
    return c
