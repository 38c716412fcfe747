"""Keys at later positions: RoPE shifts for codebooks fitted on early tokens.

Keys are quantized after RoPE, which rotates each pair of channels (i, i + D/2) by the position
times inv_freq[i]. A codebook fitted to the keys of positions below T has not seen the rotations
past T, and the error there grows with the position (benchmarks/position_probe.py). Under RoPE the
same key one position further on is the same vector rotated once more, so rotated copies of the
early keys stand for the keys a longer context will hold: `augment` adds them to the rows a
codebook is fitted on (the cache's last refinement switch, hf.RefiningLayer), never to the rows it
encodes.

`of_model(model)` reads a Hugging Face model's RoPE frequencies and checks, on random vectors,
that its own `apply_rotary_pos_emb` is exactly this rotate-half rotation; for a model where it is
not (interleaved pairs, partial rotary, no RoPE) it returns None and nothing is augmented.
"""

from __future__ import annotations

import sys
from typing import NamedTuple

import torch

COPIES = 4  # the fit sees the early keys at this many offsets, spread over the positions to serve


class Rope(NamedTuple):
    """A model's RoPE: inv_freq [D/2] (rotate-half pairs) and the positions its codebooks should
    serve (the model's trained context, max_position_embeddings)."""

    inv_freq: torch.Tensor
    positions: int


def spread(n: int, span: int) -> list[int]:
    """n offsets spread evenly over [0, span], the first 0 and the last `span` (one: 0)."""
    return [round(i * span / (n - 1)) if n > 1 else 0 for i in range(n)]


def rotary_module(model) -> torch.nn.Module | None:
    """The model's rotary embedding (a *Rotary* module holding inv_freq), None if it has none."""
    return next((m for m in model.modules() if "Rotary" in type(m).__name__ and isinstance(getattr(m, "inv_freq", None), torch.Tensor)), None)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE of rows x [..., D] by angles given as cos, sin [..., D] (each pair
    (i, i + D/2) turned by its angle: the first half's angles repeated)."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], -1) * sin


def cos_sin(positions, inv_freq: torch.Tensor, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [..., D] float64 of the angles positions [...] x inv_freq, for `rotate`."""
    angle = torch.as_tensor(positions, dtype=torch.float64, device=device)[..., None] * inv_freq.to(device, torch.float64)
    angle = torch.cat([angle, angle], -1)
    return angle.cos(), angle.sin()


def turn(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """x [..., D] turned by `positions` (broadcastable to x.shape[:-1]; negative turns back),
    computed in float64, returned in x's dtype."""
    return rotate(x.double(), *cos_sin(positions, inv_freq, x.device)).to(x.dtype)


def shifted(x: torch.Tensor, shifts, inv_freq: torch.Tensor) -> torch.Tensor:
    """Post-RoPE keys x [B, H, T, D] as the same keys `shift` positions later, for each shift:
    [len(shifts) * B, H, T, D] (rotate-half pairs: (i, i + D/2) turned by shift x inv_freq[i])."""
    shifts = torch.as_tensor(shifts, dtype=torch.float64).reshape(-1, 1, 1, 1)
    return turn(x[None], shifts, inv_freq).flatten(0, 1)


def augment(rows: torch.Tensor, basis: torch.Tensor, basis_inv: torch.Tensor, rope: Rope) -> torch.Tensor:
    """Key rows [B, H, T, D] in a codebook's basis (A, A^-1 [H, D, D], or [H, 0, 0]: none) with
    copies at COPIES offsets spread over [0, rope.positions - T], in the same basis: the rows to
    fit a codebook that serves rope.positions. Unchanged when T already covers them."""
    T = rows.shape[2]
    if rope.positions <= T:
        return rows
    x = rows if basis.numel() == 0 else torch.einsum("bhtd,hde->bhte", rows.float(), basis_inv).to(rows.dtype)
    x = shifted(x, spread(COPIES, rope.positions - T), rope.inv_freq)
    return x if basis.numel() == 0 else torch.einsum("bhtd,hde->bhte", x.float(), basis).to(rows.dtype)


def of_model(model) -> Rope | None:
    """The model's Rope, if its attention applies rotate-half RoPE over the whole head (checked by
    running its own apply_rotary_pos_emb against `shifted`), else None."""
    rotary = rotary_module(model)
    modeling = sys.modules.get(type(model).__module__)
    apply = getattr(modeling, "apply_rotary_pos_emb", None)
    config = model.config.get_text_config(decoder=True)
    if rotary is None or apply is None:
        return None
    inv_freq = rotary.inv_freq.detach().float().cpu()
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    if 2 * inv_freq.numel() != head_dim:
        return None  # partial rotary: not this rotation over the whole head
    try:
        g = torch.Generator().manual_seed(0)
        k = torch.randn(1, 1, 1, head_dim, generator=g, dtype=torch.float32)
        param = next(rotary.buffers())
        position_ids = torch.tensor([[0, 1, 3]], device=param.device)  # small: a dynamic RoPE does not rescale
        cos, sin = rotary(k.to(param.device), position_ids)
        scale = getattr(rotary, "attention_scaling", 1.0) or 1.0
        _, got = apply(k.expand(1, 1, 3, head_dim), k.expand(1, 1, 3, head_dim), (cos / scale).float().cpu(), (sin / scale).float().cpu())
    except Exception:  # another signature: not a model this can read
        return None
    want = torch.cat([shifted(k, [p], inv_freq) for p in (0, 1, 3)], 2)
    if not torch.allclose(got.float(), want, atol=1e-4, rtol=1e-4):
        return None
    return Rope(inv_freq, int(getattr(config, "max_position_embeddings", 0) or 0))
