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

Not a feature: dense attention in Python, eager only, and for speed each layer also keeps its
rows decoded and turned (`Dense`, as many bytes as a dense cache) where a kernel would decode
them from the codes at every call; the effective bits the benchmark reports count the compressed
cache only, as they would with such a kernel. The accuracy benchmark's
antkv-{2,1,0.375}bit-prerope rows use it. `python benchmarks/prerope.py --bits 1` prints the
attention-output error of keys alone (values exact) per layer on a development window, for
codebooks fitted (unweighted k-means, --kmeans-tokens tokens) on the keys of --calib-tokens tokens
in sequences of --seq-len: post-RoPE keys with and without the query-whitened key basis (the
package's), pre-RoPE keys without a basis, with the principal axes and with the basis whitened by
the query moment of the pre-RoPE frame.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import replace

import torch
import torch.nn.functional as F
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

import antkv_compile as ak
from antkv_compile.cache import VQTensor, add_window_score
from antkv_compile.calibrate import position_offsets
from antkv_compile.hf import AntKVLayer, antkv_attention_forward
from antkv_compile.ops.reference import window_sums
from antkv_compile.quant.anchor_score import apply_mask, grouped_mask
from antkv_compile.quant.basis import from_basis, query_moment, query_to_basis
from antkv_compile.quant.pq import decode
from antkv_compile.quant import rope
from antkv_compile.quant.rope import shifted, spread

LOOKBACK = 2048  # distances a query looks back over, for the pre-RoPE key basis's query moment
DISTANCES = 16
ATTN_NAME = "antkv_prerope"


def turn(x: torch.Tensor, start, inv_freq: torch.Tensor, sign: int = 1) -> torch.Tensor:
    """x [B, H, T, D] with row t turned by sign x (start + t) positions; `start` an int or a [B]
    tensor of first positions."""
    start = torch.as_tensor(start, dtype=torch.float64).reshape(-1, 1, 1)  # [B or 1, 1, 1]
    return rope.turn(x, sign * (start + torch.arange(x.shape[2], dtype=torch.float64)), inv_freq)


def prerope_data(data: ak.CalibrationData, inv_freq: torch.Tensor) -> ak.CalibrationData:
    """The collection with pre-RoPE keys and the query moment of that frame (module doc)."""
    n, _, L, _ = data.keys[0].shape
    P = data.probe_q[0].shape[2]
    starts = torch.tensor(position_offsets(n, L, data.positions), dtype=torch.float64)
    keys = [turn(k, starts, inv_freq, -1) for k in data.keys]
    moments = []
    for q in data.probe_q:
        q_pre = turn(q, starts + L - P, inv_freq, -1)
        moments.append(query_moment(shifted(q_pre, spread(DISTANCES, LOOKBACK - 1), inv_freq), keys[0].shape[1]))
    return replace(data, keys=keys, query_moment=moments, fits={})


class Dense:
    """The dense rows one cache side stands for (state.dequantize), kept across calls: the encoded
    tokens' codes never change, so each is decoded once, when it leaves the window; anchor and
    window rows are read every call. With RoPE tables (cos, sin [capacity, D]) every row is turned
    forward by its position (keys stored before RoPE)."""

    def __init__(self, capacity: int, tables: tuple | None = None):
        self.capacity, self.tables = capacity, tables
        self.buf, self.upto = None, 0

    def _turned(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """x [B, H, n, D] (model coordinates) turned to positions pos ([n], or [B, H, n])."""
        if self.tables is None:
            return x
        cos, sin = (t[pos] for t in self.tables)
        return rope.rotate(x, cos, sin)

    def rows(self, side) -> torch.Tensor:
        B, H, T, D = side.codes.shape[0], side.codes.shape[1], side.codes.shape[2], side.window.shape[-1]
        Tc = T - side.window.shape[2]
        if T > self.capacity:
            raise ValueError(f"this probe cache was made for {self.capacity} tokens (max_cache_len), got {T}")
        if self.buf is None:
            self.buf = side.window.new_zeros(B, H, self.capacity, D, dtype=torch.float32)
        if self.upto < Tc:
            new = from_basis(decode(side.codes[:, :, self.upto : Tc], side.centroids).float(), side.basis_inv)
            self.buf[:, :, self.upto : Tc] = self._turned(new, torch.arange(self.upto, Tc))
            self.upto = Tc
        out = torch.cat([self.buf[:, :, :Tc], self._turned(from_basis(side.window.float(), side.basis_inv), torch.arange(Tc, T)),
                         self.buf.new_zeros(B, H, 1, D)], 2)  # a dummy row for empty anchor slots
        pos = torch.where(side.anchor_pos >= 0, side.anchor_pos.long(), T)
        anchors = self._turned(from_basis(side.anchor_rows.float(), side.basis_inv), pos.clamp_max(T - 1))
        out.scatter_(2, pos[..., None].expand(-1, -1, -1, D), anchors)
        return out[:, :, :T]


class PreRopeLayer(AntKVLayer):
    inv_freq: torch.Tensor

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            capacity = self.max_cache_len or 4096
            tables = tuple(t.float() for t in rope.cos_sin(torch.arange(capacity), self.inv_freq))
            self.dense = (Dense(capacity, tables), Dense(capacity))
        start = self.keys.shape[2] if self.is_initialized else 0
        keys, values = super().update(turn(key_states, start, self.inv_freq, -1), value_states, *args, **kwargs)
        keys.prerope = self  # read by `attention`
        return keys, values


class PreRopeCache(ak.AntKVCache):
    """AntKVCache with keys stored before RoPE (calibrated codebooks from `prerope_data`); one
    generation from position 0 (no crop or reorder)."""

    def __init__(self, codebooks: ak.Codebooks, inv_freq: torch.Tensor, **kwargs):
        super().__init__(codebooks, **kwargs)
        for i, layer in enumerate(self.layers):
            new = PreRopeLayer(layer.codebook, layer.settings, max_cache_len=layer.max_cache_len)
            new.inv_freq = inv_freq
            self.layers[i] = new


def attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
    layer = getattr(key, "prerope", None)
    if not isinstance(key, VQTensor) or layer is None:
        return antkv_attention_forward(module, query, key, value, attention_mask, dropout, scaling, is_causal, **kwargs)
    B, Hq, L, D = query.shape
    Hkv, T, Tw = key.shape[1], key.shape[2], key.num_window
    G = Hq // Hkv
    scale = 1 / math.sqrt(D) if scaling is None else scaling
    k, v = layer.dense[0].rows(key.side), layer.dense[1].rows(value.side)
    qg = query.float().reshape(B, Hkv, G * L, D)
    s = (qg @ k.transpose(-1, -2)).view(B, Hkv, G, L, T) * scale
    # the queries are the last L positions (causal without a mask: a prompt, T == L)
    s = apply_mask(s, grouped_mask(attention_mask, B, Hkv, G, L, T), L > 1 and attention_mask is None, q0=T - L)
    p = torch.softmax(s, -1).view(B, Hkv, G * L, T)
    o = p @ v
    if Tw:  # the window's Anchor Score, as the package's attention adds it
        q_pre = turn(query.float(), T - L, layer.inv_freq, -1)
        qnorm = scale * query_to_basis(q_pre, key.basis_inv).float().reshape(B, Hkv, G * L, D).norm(dim=-1, keepdim=True)
        s1, s0 = window_sums(p[..., T - Tw :], qnorm, o, value.window.float())
        add_window_score(key, value, key.window_err * s1 + value.window_err * s0)
    return o.view(B, Hq, L, D).to(query.dtype).transpose(1, 2).contiguous(), None


ALL_ATTENTION_FUNCTIONS.register(ATTN_NAME, attention)
ALL_MASK_ATTENTION_FUNCTIONS.register(ATTN_NAME, sdpa_mask)


def use(model) -> None:
    model.set_attn_implementation(ATTN_NAME)


def main(argv=None):
    from antkv_compile.calibrate import _kmeans_side
    from antkv_compile.evaluation import load_smollm2, load_wikitext_ids
    from antkv_compile.hf import attention_hook
    from antkv_compile.quant.basis import fit_key_basis, to_basis
    from antkv_compile.quant.pq import encode, spec_for_bits

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bits", type=float, default=1.0)
    p.add_argument("--calib-tokens", type=int, default=16384)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--kmeans-tokens", type=int, default=4096)
    p.add_argument("--iters", type=int, default=15)
    p.add_argument("--eval-offset", type=int, default=50_000)
    p.add_argument("--context", type=int, default=2048)
    p.add_argument("--skip", type=int, default=64, help="queries not scored at the window's start (default 64, the prompt)")
    p.add_argument("--data")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    model, tokenizer = load_smollm2()
    ids = load_wikitext_ids(tokenizer, args.data)
    inv_freq = ak.model_rope(model).inv_freq
    spec = spec_for_bits(args.bits)

    def run(x):
        seen = []
        with torch.no_grad(), attention_hook(model, lambda m, q, k, v, mask, s: seen.append((q.float(), k.float(), v.float()))):
            model(x[None], use_cache=False)
        return seen

    calib = [run(ids[i : i + args.seq_len]) for i in range(0, args.calib_tokens - args.seq_len + 1, args.seq_len)]
    window = run(ids[args.eval_offset : args.eval_offset + args.context])
    eye = torch.eye(window[0][1].shape[-1])
    kinds = ("post", "post, key basis", "pre", "pre, principal axes", "pre, key basis")
    table = []
    for layer, (q, k, v) in enumerate(window):
        G = q.shape[1] // k.shape[1]
        out = F.scaled_dot_product_attention(q, k.repeat_interleave(G, 1), v.repeat_interleave(G, 1), is_causal=True)

        def error(k_hat):
            o = F.scaled_dot_product_attention(q, k_hat.repeat_interleave(G, 1), v.repeat_interleave(G, 1), is_causal=True)
            return float(((o - out)[:, :, args.skip :].pow(2).sum(-1) / out[:, :, args.skip :].pow(2).sum(-1)).mean())

        def quantized(train, test, basis=None):
            if basis is not None:
                train, test = to_basis(train, basis[0]), to_basis(test, basis[0])
            c = _kmeans_side(train, None, spec, args.iters, 0, args.kmeans_tokens)
            r = decode(encode(test, c), c)
            return r if basis is None else from_basis(r, basis[1])

        ck = torch.cat([c[layer][1] for c in calib])
        cq = torch.cat([c[layer][0] for c in calib])
        ck_pre, k_pre, cq_pre = turn(ck, 0, inv_freq, -1), turn(k, 0, inv_freq, -1), turn(cq[:, :, :: 8], 0, inv_freq, -1)
        H = k.shape[1]
        moment_pre = query_moment(shifted(cq_pre, spread(DISTANCES, LOOKBACK - 1), inv_freq), H)
        row = [
            error(quantized(ck, k)),
            error(quantized(ck, k, fit_key_basis(ck, query_moment(cq, H), spec.sub_dim))),
            error(turn(quantized(ck_pre, k_pre), 0, inv_freq)),
            error(turn(quantized(ck_pre, k_pre, fit_key_basis(ck_pre, eye.expand(H, -1, -1), spec.sub_dim)), 0, inv_freq)),
            error(turn(quantized(ck_pre, k_pre, fit_key_basis(ck_pre, moment_pre, spec.sub_dim)), 0, inv_freq)),
        ]
        table.append(row)
        print(f"layer {layer}: " + ", ".join(f"{n} {e:.4f}" for n, e in zip(kinds, row)), flush=True)
    print(f"keys {args.bits:g} bit (values exact), relative squared error of the attention output, window of {args.context} "
          f"tokens from {args.eval_offset}; codebooks on {args.calib_tokens} tokens in sequences of {args.seq_len}")
    print("| keys | " + " | ".join(kinds) + " |")
    print("|---|" + "---|" * len(kinds))
    mean = torch.tensor(table).mean(0)
    print("| mean over layers | " + " | ".join(f"{e:.4f}" for e in mean.tolist()) + " |")


if __name__ == "__main__":
    main()
