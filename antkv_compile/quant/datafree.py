"""Data-free codebooks: product VQ from the first tokens a cache sees, no calibration data.

A calibrated codebook is learned offline from thousands of a model's keys and values. Without
one, a cache still has to compress from its first call (a chat prompt, then one token per call).
The codebook here needs only the tokens of that first call, and only their first two moments:

- keys are rotated by a fixed random orthogonal matrix R per kv head (the key basis A = R,
  A^-1 = R^T, quant/basis.py), as TurboQuant does: outlier channels are spread over every
  coordinate, so the coordinates of k R are close to identically distributed;
- the shape of the codebook is fixed: `gaussian_codebook(d, K)`, K centroids of the standard
  normal in d dims (k-means on normal samples, computed once per (d, K) and cached);
- its place and scale come from the first call's tokens, per kv head and coordinate: centroid
  = mean + std * g, with the mean and variance shrunk towards the head's pooled values by
  `SHRINK` pseudo-tokens, so one token gives a usable codebook and a long prompt a per-channel one.

Values are not rotated (the cache has no value basis: attention would return its output in it);
their per-channel scale is what the moments capture. A rotation would not help them:
benchmarks/datafree_probe.py --value-basis rotation / pca (DESIGN.md).
"""

from __future__ import annotations

import functools

import torch

from .codebook import CodebookSide
from .kmeans import weighted_kmeans
from .pq import PQSpec, decode, encode

# Pseudo-tokens of the pooled (per-head) estimate in each per-channel mean and variance.
SHRINK = 16.0


@functools.cache
def gaussian_codebook(sub_dim: int, num_centroids: int, seed: int = 0) -> torch.Tensor:
    """K centroids [K, d] of the standard normal in d dims: k-means on 64 K normal samples."""
    g = torch.Generator().manual_seed(seed)
    samples = torch.randn(1, 64 * num_centroids, sub_dim, generator=g)
    return weighted_kmeans(samples, num_centroids, iters=25, seed=seed)[0]


def random_rotation(num_heads: int, dim: int, seed: int) -> torch.Tensor:
    """A random orthogonal matrix [H, D, D] per head (QR of a Gaussian, signs fixed), from `seed`."""
    g = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(num_heads, dim, dim, generator=g, dtype=torch.float64))
    return (q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1))[:, None, :]).float().contiguous()


def moments(x: torch.Tensor, shrink: float = SHRINK) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) [H, D] per head and channel of tokens x [B, H, T, D], each shrunk towards the
    head's pooled value by `shrink` pseudo-tokens (the pooled mean is 0)."""
    x = x.float().transpose(0, 1).flatten(1, 2)  # [H, N, D]
    finite = torch.isfinite(x).all(-1)  # [H, N]
    if finite.all():
        n = x.shape[1]
        mean = x.mean(1) * (n / (n + shrink))
        var = (x - mean[:, None]).pow(2).mean(1)
    else:  # a token with a NaN / Inf entry does not count
        w = finite.float()[..., None]
        x = x.masked_fill(~finite[..., None], 0.0)
        n = w.sum(1)  # [H, 1]
        mean = (w * x).sum(1) / (n + shrink)
        var = (w * (x - mean[:, None]).pow(2)).sum(1) / n.clamp_min(1)
    pooled = var.mean(1, keepdim=True)
    var = (n * var + shrink * pooled) / (n + shrink)
    return mean, var.clamp_min(1e-12).sqrt()


def fit_side(x: torch.Tensor, spec: PQSpec, rotate: bool, seed: int) -> CodebookSide:
    """A codebook side for tokens like x [B, H, T, D] (the first call's), see the module doc."""
    B, H, T, D = x.shape
    basis = basis_inv = None
    x = x.float()
    if rotate:
        basis = random_rotation(H, D, seed).to(x.device)
        basis_inv = basis.transpose(1, 2).contiguous()
        x = torch.einsum("bhtd,hde->bhte", x, basis)
    centroids = place(x, spec)
    error = (x - decode(encode(x, centroids), centroids)).norm(dim=-1).mean((0, 2))
    return CodebookSide(spec, centroids, error, basis, basis_inv)


def place(x: torch.Tensor, spec: PQSpec, shrink: float = SHRINK, full: bool = False) -> torch.Tensor:
    """Centroids [H, S, K, d] of the Gaussian codebook placed and scaled by the moments of tokens
    x [B, H, T, D] (already in the codebook's basis): mean + std * g per head and coordinate; with
    `full`, mean + L g per (head, subspace), L L^T the sub-vector's covariance (its diagonal the
    shrunk variances of `moments`, its off-diagonal the sample's, shrunk towards 0 alike), so
    correlated coordinates of a sub-vector share the codes."""
    H, D = x.shape[1], x.shape[-1]
    S, d = spec.num_subspaces(D), spec.sub_dim
    mean, std = moments(x, shrink)
    g = gaussian_codebook(d, spec.num_centroids).to(x.device)  # [K, d]
    if not full:
        return mean.view(H, S, 1, d) + std.view(H, S, 1, d) * g
    z = x.float().transpose(0, 1).flatten(1, 2)  # [H, N, D]
    finite = torch.isfinite(z).all(-1, keepdim=True)
    z = torch.where(finite, z - mean[:, None], 0.0).unflatten(-1, (S, d)).transpose(1, 2)  # [H, S, N, d]
    n = finite.sum(1).float()[:, None, :, None]  # [H, 1, 1, 1]
    cov = z.transpose(-1, -2) @ z / (n + shrink)  # off-diagonal shrunk towards 0 by `shrink` pseudo-tokens
    eye = torch.eye(d, device=x.device, dtype=torch.bool)
    var = std.pow(2).view(H, S, d)
    cov = torch.where(eye, torch.diag_embed(var), cov)
    L, info = torch.linalg.cholesky_ex(cov.double())
    bad = info != 0  # not positive definite (rounding): diagonal only
    L = torch.where(bad[..., None, None], torch.diag_embed(var.double().sqrt()), L).float()
    return mean.view(H, S, 1, d) + g @ L.transpose(-1, -2)


def refine(x: torch.Tensor, centroids: torch.Tensor, iters: int) -> torch.Tensor:
    """Centroids [H, S, K, d] refined on tokens x [B, H, T, D] (in the codebook's basis): `iters`
    Lloyd iterations per (head, subspace), unweighted, starting from `centroids` (online refinement
    of a data-free codebook: a centroid no token is nearest to stays where it was). A sub-vector
    with a NaN / Inf entry does not pull on any centroid."""
    B, H, T, D = x.shape
    _, S, K, d = centroids.shape
    points = x.float().reshape(B, H, T, S, d).permute(1, 3, 0, 2, 4).reshape(H * S, B * T, d)
    finite = torch.isfinite(points).all(-1)
    points = points.masked_fill(~finite[..., None], 0.0)
    init = centroids.float().reshape(H * S, K, d)
    return weighted_kmeans(points, K, finite.float(), iters=iters, init=init).reshape(H, S, K, d)
