"""Product vector quantization of head vectors: encode to codes, decode back.

A head vector of dim D splits into S = D / d sub-vectors of dim d; each (kv head, subspace) has its
own codebook of 2^c centroids, so a token costs S codes of c bits: c / d bits per element.
Everything is batched over heads and subspaces: one einsum and one argmin, no per-subspace loop.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class PQSpec:
    """Sub-vector size `sub_dim` (d) and bits per code `code_bits` (c): c / d bits per element."""

    sub_dim: int
    code_bits: int

    def __post_init__(self):
        if self.sub_dim < 1 or not 1 <= self.code_bits <= 15:
            raise ValueError(f"PQSpec needs sub_dim >= 1 and 1 <= code_bits <= 15, got {self}")

    @property
    def bits(self) -> float:
        return self.code_bits / self.sub_dim

    @property
    def stored_bits(self) -> float:
        """Bits per element as the cache holds the codes: one byte per code up to 8 bits (int16
        above), so a 6-bit code costs 8 bits until codes are bit-packed."""
        return 8 * self.code_dtype.itemsize / self.sub_dim

    @property
    def num_centroids(self) -> int:
        return 1 << self.code_bits

    @property
    def code_dtype(self) -> torch.dtype:
        return torch.uint8 if self.code_bits <= 8 else torch.int16

    def num_subspaces(self, head_dim: int) -> int:
        if head_dim % self.sub_dim:
            fits = [f"{b:g}" for b, spec in sorted(PRESETS.items()) if head_dim % spec.sub_dim == 0]
            choice = (
                f"pick a bit setting whose sub-vector size divides {head_dim}: {', '.join(fits)}"
                if fits
                else f"no bit preset has a sub-vector size dividing {head_dim}: pass PQSpec(sub_dim, code_bits) with a sub_dim that does"
            )
            raise ValueError(
                f"head_dim {head_dim} is not divisible by the sub-vector size {self.sub_dim} "
                f"({self.bits:g} bits per element = {self.code_bits} bits / {self.sub_dim} dims); {choice}"
            )
        return head_dim // self.sub_dim

    def to_dict(self) -> dict:
        return {"sub_dim": self.sub_dim, "code_bits": self.code_bits}


# Bits per element -> (d, c). 256 centroids (c = 8) where possible: that is what AnTKV uses and
# what keeps a look-up table per query head small. The fractional ones exist for K/V splits.
PRESETS: dict[float, PQSpec] = {
    4.0: PQSpec(2, 8),
    3.0: PQSpec(2, 6),
    2.0: PQSpec(4, 8),
    1.5: PQSpec(4, 6),
    1.0: PQSpec(8, 8),
    0.75: PQSpec(8, 6),
    0.5: PQSpec(16, 8),
    0.375: PQSpec(16, 6),
    0.25: PQSpec(16, 4),
}


def spec_for_bits(bits: float | PQSpec) -> PQSpec:
    if isinstance(bits, PQSpec):
        return bits
    try:
        return PRESETS[float(bits)]
    except KeyError:
        raise ValueError(
            f"no product-quantization preset for {bits} bits per element; "
            f"choose one of {sorted(PRESETS)} or pass a PQSpec(sub_dim, code_bits)"
        ) from None


def check_dtype(x: torch.Tensor, what: str = "keys and values") -> None:
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"antkv quantizes float32, float16 or bfloat16 {what}, got {x.dtype}; "
            f"cast the model (model.to(torch.float16)) or the tensor first"
        )


def _split(x: torch.Tensor, num_subspaces: int) -> torch.Tensor:
    return x.unflatten(-1, (num_subspaces, x.shape[-1] // num_subspaces))


def encode(x: torch.Tensor, centroids: torch.Tensor, max_elems: int = 1 << 24) -> torch.Tensor:
    """Nearest centroid per sub-vector. x [B, H, T, D], centroids [H, S, K, d] -> codes [B, H, T, S].

    Squared L2 via ||x||^2 - 2 x.c + ||c||^2 (the ||x||^2 term does not change the argmin), in
    float32, chunked over T so the [B, H, T, S, K] distance block stays under `max_elems`.
    """
    H, S, K, d = centroids.shape
    if x.shape[-1] != S * d or x.shape[-3] != H:
        raise ValueError(f"cannot encode {tuple(x.shape)} with codebook {tuple(centroids.shape)} [H, S, K, d]")
    B, _, T, _ = x.shape
    code_dtype = torch.uint8 if K <= 256 else torch.int16
    codes = torch.empty(B, H, T, S, dtype=code_dtype, device=x.device)
    c = centroids.float()
    c_sq = (c * c).sum(-1)  # [H, S, K]
    step = max(1, max_elems // max(1, B * H * S * K))
    for t0 in range(0, T, step):
        xs = _split(x[:, :, t0 : t0 + step].float(), S)  # [B, H, t, S, d]
        dist = c_sq[None, :, None] - 2 * torch.einsum("bhtsd,hskd->bhtsk", xs, c)
        codes[:, :, t0 : t0 + step] = dist.argmin(-1).to(code_dtype)
    return codes


def decode(codes: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """codes [B, H, T, S] -> float32 vectors [B, H, T, S*d] (one gather, all subspaces at once)."""
    H, S, K, d = centroids.shape
    B, _, T, _ = codes.shape
    flat = centroids.float().reshape(H, S * K, d)
    idx = codes.long() + torch.arange(S, device=codes.device) * K  # [B, H, T, S]
    heads = torch.arange(H, device=codes.device)[None, :, None, None]
    return flat[heads, idx].reshape(B, H, T, S * d)


def quantization_error(x: torch.Tensor, codes: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Per-token L2 error ||x - decode(codes)||, float32 [B, H, T]."""
    return (x.float() - decode(codes, centroids)).norm(dim=-1)
