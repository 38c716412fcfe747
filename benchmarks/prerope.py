"""Probe: keys quantized before RoPE (as KVQuant), what it is worth in perplexity.

The package quantizes keys after RoPE: the codebook has to cover every rotation of every key it
will see, and the LUT kernels score codes with one table per query. Quantized before RoPE, a key is
the same vector wherever it sits; attention has to rotate each decoded key by its position, which
no kernel of the package does yet. This module measures what that would buy, through the real
compressed cache (codes, anchors chosen by their Anchor Score, exact window) and the real
calibration, with only the RoPE moved:

- `prerope_data(data, inv_freq)`: the calibration collection with every key turned back by its
  position (the collection's sequence offsets), and the key basis's query moment taken in the same
  frame: score = q_pre . R(p_k - p_q) k_pre, so the metric of a pre-RoPE key error is the query
  moment of the queries turned by the distances a query looks back (DISTANCES spread over
  [0, LOOKBACK)), from the collection's probe queries.
- `PreRopeCache`: an AntKVCache whose layers turn each new key back by its position before it is
  written (positions 0, 1, ... from the cache's first token: one generation, no crops).
- `attention`: the HF attention function for it: keys decoded and turned forward by their
  positions, dense attention in float32, and the window's Anchor Score sums added to the cache
  as the package's kernels add them (ops/reference.py), so anchors are chosen the same way.

Not a feature: dense attention in Python, eager only. `python benchmarks/prerope.py` prints the
attention-output error probe (keys only) on a development window.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

import antkv_compile as ak
from antkv_compile.cache import VQTensor
from antkv_compile.calibrate import position_offsets
from antkv_compile.hf import AntKVLayer, antkv_attention_forward
from antkv_compile.quant.anchor_score import group_query_heads, pairwise_dist
from antkv_compile.quant.basis import query_to_basis
from antkv_compile.quant.rope import shifted, spread

LOOKBACK = 2048  # distances a query looks back over, for the pre-RoPE key basis's query moment
DISTANCES = 16
ATTN_NAME = "antkv_prerope"


def turn(x: torch.Tensor, start, inv_freq: torch.Tensor, sign: int = 1) -> torch.Tensor:
    """x [B, H, T, D] with row t turned by sign x (start + t) positions (rotate-half RoPE);
    `start` an int or a [B] tensor of first positions."""
    T, D = x.shape[2], x.shape[-1]
    start = torch.as_tensor(start, dtype=torch.float64).reshape(-1, 1, 1, 1)  # [B or 1, 1, 1, 1]
    pos = start + torch.arange(T, dtype=torch.float64)[:, None]  # [., 1, T, 1]
    angle = sign * pos * inv_freq.double()
    angle = torch.cat([angle, angle], -1)
    half = D // 2
    turned = torch.cat([-x[..., half:], x[..., :half]], -1)
    return (x.double() * angle.cos() + turned.double() * angle.sin()).to(x.dtype)


def prerope_data(data: ak.CalibrationData, inv_freq: torch.Tensor) -> ak.CalibrationData:
    """The collection with pre-RoPE keys and the query moment of that frame (module doc)."""
    n, _, L, _ = data.keys[0].shape
    P = data.probe_q[0].shape[2]
    starts = torch.tensor(position_offsets(n, L, data.positions), dtype=torch.float64)
    keys = [turn(k, starts, inv_freq, -1) for k in data.keys]
    moments = []
    for q in data.probe_q:
        q_pre = turn(q, starts + L - P, inv_freq, -1)
        qd = shifted(q_pre, spread(DISTANCES, LOOKBACK - 1), inv_freq)  # [DISTANCES * n, Hq, P, D]
        g = group_query_heads(qd.float(), keys[0].shape[1]).transpose(0, 1).flatten(1, -2)  # [Hkv, ., D]
        moments.append(g.transpose(1, 2) @ g)
    return replace(data, keys=keys, query_moment=moments, fits={})


class PreRopeLayer(AntKVLayer):
    inv_freq: torch.Tensor

    def update(self, key_states, value_states, *args, **kwargs):
        start = self.keys.shape[2] if self.is_initialized else 0
        keys, values = super().update(turn(key_states, start, self.inv_freq, -1), value_states, *args, **kwargs)
        keys.prerope_inv_freq = self.inv_freq  # read by `attention`
        return keys, values


class PreRopeCache(ak.AntKVCache):
    """AntKVCache with keys stored before RoPE (calibrated codebooks from `prerope_data`)."""

    def __init__(self, codebooks: ak.Codebooks, inv_freq: torch.Tensor, **kwargs):
        super().__init__(codebooks, **kwargs)
        for i, layer in enumerate(self.layers):
            new = PreRopeLayer(layer.codebook, layer.settings, max_cache_len=layer.max_cache_len)
            new.inv_freq = inv_freq
            self.layers[i] = new


def attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
    inv_freq = getattr(key, "prerope_inv_freq", None)
    if not isinstance(key, VQTensor) or inv_freq is None:
        return antkv_attention_forward(module, query, key, value, attention_mask, dropout, scaling, is_causal, **kwargs)
    B, Hq, L, D = query.shape
    Hkv, T, Tw = key.shape[1], key.shape[2], key.num_window
    G = Hq // Hkv
    scale = 1 / math.sqrt(D) if scaling is None else scaling
    k = turn(key.dequantize().float(), 0, inv_freq)
    v = value.dequantize().float()
    qg = query.float().reshape(B, Hkv, G * L, D)
    s = (qg @ k.transpose(-1, -2)).view(B, Hkv, G, L, T) * scale
    if attention_mask is not None:
        m = attention_mask[:, :, None] if attention_mask.dim() == 4 else attention_mask
        s = s.masked_fill(~m, float("-inf")) if m.dtype == torch.bool else s + m
    elif L > 1:
        causal = torch.ones(L, T, dtype=torch.bool).tril(T - L)
        s = s.masked_fill(~causal, float("-inf"))
    p = torch.softmax(s, -1).view(B, Hkv, G * L, T)
    o = p @ v
    if Tw:  # the window's Anchor Score sums, as ops/reference.py returns them
        pw = p[..., T - Tw:]
        q_pre = turn(qg.view(B, Hkv * G, L, D), T - L, inv_freq, -1).reshape(B, Hq, L, D)
        qnorm = scale * query_to_basis(q_pre, key.basis_inv).float().reshape(B, Hkv, G * L, D).norm(dim=-1, keepdim=True)
        s1 = (pw * qnorm * pairwise_dist(o, value.window.float())).sum(2)
        score = key.window_err * s1 + value.window_err * pw.sum(2)
        with torch.no_grad():
            key.window_score.add_(score)
            if value.window_score is not key.window_score:
                value.window_score.add_(score)
    return o.view(B, Hq, L, D).to(query.dtype).transpose(1, 2).contiguous(), None


ALL_ATTENTION_FUNCTIONS.register(ATTN_NAME, attention)
ALL_MASK_ATTENTION_FUNCTIONS.register(ATTN_NAME, sdpa_mask)


def use(model) -> None:
    model.set_attn_implementation(ATTN_NAME)


__all__ = ["PreRopeCache", "attention", "prerope_data", "turn", "use", "sdpa_attention_forward"]
