"""Independent float64 references the tests compare against (loops, no code shared with the package)."""

import math

import torch


def nearest_centroid_decode(x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Each sub-vector replaced by its nearest centroid, subspace by subspace, in float64."""
    H, S, K, d = centroids.shape
    x64, c64 = x.double(), centroids.double()
    out = torch.empty_like(x64)
    for s in range(S):
        sub = x64[..., s * d : (s + 1) * d]  # [B, H, T, d]
        dist = ((sub[..., None, :] - c64[None, :, None, s]) ** 2).sum(-1)  # [B, H, T, K]
        best = dist.argmin(-1)
        out[..., s * d : (s + 1) * d] = c64[:, s][torch.arange(H)[None, :, None], best]
    return out


def anchor_score_terms_loops(q, k, v, mask=None, scale=None):
    """(S1, S0) straight from the definition, one (query head, query, key) at a time, float64.
    q [B, Hq, L, D], k/v [B, Hkv, T, D], mask bool [L, T] or None."""
    B, Hq, L, D = q.shape
    Hkv, T = k.shape[1], k.shape[2]
    G = Hq // Hkv
    scale = 1 / math.sqrt(D) if scale is None else scale
    q, k, v = q.double(), k.double(), v.double()
    s1 = torch.zeros(B, Hkv, T, dtype=torch.float64)
    s0 = torch.zeros_like(s1)
    for b in range(B):
        for hq in range(Hq):
            h = hq // G
            for i in range(L):
                logits = torch.tensor([scale * q[b, hq, i] @ k[b, h, j] for j in range(T)], dtype=torch.float64)
                if mask is not None:
                    logits[~mask[i]] = float("-inf")
                if torch.isinf(logits).all():
                    continue
                a = torch.softmax(logits, 0)
                o = sum(a[j] * v[b, h, j] for j in range(T))
                for j in range(T):
                    s1[b, h, j] += a[j] * scale * q[b, hq, i].norm() * (v[b, h, j] - o).norm()
                    s0[b, h, j] += a[j]
    return s1, s0
