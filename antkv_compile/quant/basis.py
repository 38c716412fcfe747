"""A learned key basis: the linear map, per kv head, under which keys are product-quantized.

Attention only sees keys through q . k, and (q A^-T) . (k A) = q . k for any invertible A, so a
cache may hold every key as k A (codes, anchors and window alike) and attend with q A^-T: nothing
changes but which errors the codebook makes. Two choices of A help product VQ:

- whitening by the query second moment E[q q^T] = W W^T (A = W): squared error in the new basis is
  E[(q . e)^2], the error of the attention logit, instead of the plain L2 error of the key;
- then a rotation onto the principal axes of the whitened keys, dealt out to the subspaces so each
  gets a similar product of variances (OPQ's eigenvalue allocation): subspaces no longer split
  correlated dimensions, and none is left with all the variance.

Measured on SmolLM2 (benchmarks/accuracy.py, the no-basis ablation rows): perplexity at 2 bits
23.21 -> 22.01, at 1 bit 28.15 -> 25.84. At 0.5 bit (16-dim sub-vectors) it was worse, so
calibration uses it only for sub-vectors of up to 8 dims (calibrate.KEY_BASIS_MAX_SUB_DIM).

An empty basis ([H, 0, 0]) means the identity: values, and codebooks fitted without one.
"""

from __future__ import annotations

import torch

from .anchor_score import group_query_heads


def identity(num_heads: int, device=None) -> torch.Tensor:
    """The 'no basis' marker: shapes decide, so a traced graph needs no data-dependent branch."""
    return torch.zeros(num_heads, 0, 0, device=device)


def is_identity(basis: torch.Tensor) -> bool:
    return basis.shape[-1] == 0


def to_basis(x: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """Keys [B, H, T, D] -> k A per head (x itself for the identity)."""
    if is_identity(basis):
        return x
    return torch.einsum("bhtd,hde->bhte", x.float(), basis).to(x.dtype)


def from_basis(x: torch.Tensor, basis_inv: torch.Tensor) -> torch.Tensor:
    """Stored keys [B, H, T, D] -> k = (k A) A^-1 per head."""
    return to_basis(x, basis_inv)


def query_to_basis(q: torch.Tensor, basis_inv: torch.Tensor) -> torch.Tensor:
    """Queries [B, Hq, R, D] -> q A^-T, each query head with the basis of its kv head (GQA)."""
    if is_identity(basis_inv):
        return q
    grouped = group_query_heads(q.float(), basis_inv.shape[0])
    return torch.einsum("bhgrd,hed->bhgre", grouped, basis_inv).reshape(q.shape).to(q.dtype)


def query_moment(q: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """Sum of q q^T over every query row [B, Hq, L, D] of each kv head's query heads (GQA):
    [Hkv, D, D] float32, what `fit_key_basis` whitens by."""
    g = group_query_heads(q.float(), num_kv_heads).transpose(0, 1).flatten(1, -2)  # [Hkv, B*G*L, D]
    return g.transpose(1, 2) @ g


def deal_axes(variances: torch.Tensor, sub_dim: int, unit: int = 1) -> list[int]:
    """Order of the axes (by index into `variances`, [D]) that deals them out to D / sub_dim
    subspaces of sub_dim consecutive slots with balanced products of variances: units of `unit`
    axes adjacent in variance order, largest first, each to the open subspace with the smallest
    log-variance sum so far (logs relative to the smallest variance, so every term is >= 0)."""
    D = variances.shape[0]
    if D % sub_dim or sub_dim % unit:
        raise ValueError(f"cannot deal {D} axes into sub-vectors of {sub_dim} in units of {unit}")
    S = D // sub_dim
    v = variances.double().clamp_min(1e-12)
    log_var = (v / v.min()).log()
    order = v.argsort(descending=True).tolist()
    units = [order[i : i + unit] for i in range(0, D, unit)]
    slots, sums = [[] for _ in range(S)], [0.0] * S
    for u in units:  # already largest first
        s = min((s for s in range(S) if len(slots[s]) < sub_dim), key=lambda s: sums[s])
        slots[s] += u
        sums[s] += float(log_var[u].sum())
    return [i for slot in slots for i in slot]


def fit_key_basis(
    keys: torch.Tensor, query_moment: torch.Tensor, sub_dim: int, ridge: float = 1e-3, unit: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, A^-1), each [H, D, D] float32, for keys [n, H, L, D] and query second moments [H, D, D]
    (sum of q q^T over the query heads of each kv head; scale does not matter).

    A = W U: W the symmetric square root of the query moment (normalized to mean diagonal 1, plus
    `ridge` so it stays invertible), U the principal axes of the whitened keys, ordered so that the
    D / sub_dim subspaces get balanced products of variances (`deal_axes`: greedy, largest axis
    first; `unit=2` deals pairs of axes adjacent in variance, so each pair shares a subspace)."""
    n, H, L, D = keys.shape
    if D % sub_dim:
        raise ValueError(f"head_dim {D} is not divisible by the sub-vector size {sub_dim}")
    eye = torch.eye(D, dtype=torch.float64)
    bases, inverses = [], []
    for h in range(H):
        m = query_moment[h].double()
        m = m / m.diagonal().mean().clamp_min(1e-30) + ridge * eye
        e, u = torch.linalg.eigh(m)
        w = u @ torch.diag(e.clamp_min(0).sqrt()) @ u.T
        k = keys[:, h].reshape(-1, D).double() @ w
        k = k - k.mean(0)
        var, axes = torch.linalg.eigh(k.T @ k / max(1, k.shape[0]))
        a = w @ axes[:, deal_axes(var, sub_dim, unit)]
        bases.append(a.float())
        inverses.append(torch.linalg.inv(a).float())
    return torch.stack(bases), torch.stack(inverses)
