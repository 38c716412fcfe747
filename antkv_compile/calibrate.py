"""Offline calibration: learn token-aware codebooks and the K/V bit split for a model.

1. `collect_calibration` runs the model over calibration text and keeps, per layer, the keys and
   values (post-RoPE, as the cache sees them), each token's Anchor Score sums (S1, S0) from its
   real queries (blockwise, causal), the second moment of all queries per kv head, and a probe of
   late queries to measure attention error on.
2. `fit_codebooks` learns, per layer, a key basis (query-whitened principal axes, quant/basis.py),
   then per kv head and subspace centroids by k-means weighted with the Anchor Score, and picks the
   K/V split of the bit budget by the attention-output error each candidate causes on the probe,
   keys-favoured as the prior ("More for Keys, Less for Values").

3. Optionally (`side_errors` + `allocate_layer_bits`, then `fit_codebooks(layer_bits=...)`), bits
   per layer and side: each side's attention-output error alone at each byte-aligned option, and
   the assignment with the least summed error at no more stored bits than the uniform budget.

`calibrate(model, texts, bits=1.0)` does 1 and 2. Fitted codebooks are memoized on the
CalibrationData, so several budgets and ablations share the k-means work.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from .quant.anchor_score import anchor_score_terms_blockwise, combine
from .quant.basis import fit_key_basis, query_moment, query_to_basis, to_basis
from .quant.codebook import Codebooks, CodebookSide, LayerCodebook, model_fingerprint
from .quant.kmeans import weighted_kmeans
from .quant.pq import PRESETS, SUPPORTED_DTYPES, PQSpec, decode, encode, spec_for_bits
from .quant.rope import rotary_module, spread


@dataclass
class CalibrationData:
    keys: list[torch.Tensor]  # per layer [n_seq, Hkv, L, D] float32
    values: list[torch.Tensor]
    s1: list[torch.Tensor]  # per layer [n_seq, Hkv, L]: Anchor Score sums of each token
    s0: list[torch.Tensor]
    probe_q: list[torch.Tensor]  # per layer [n_seq, Hq, P, D]: the last P queries of each sequence
    scale: list[float]
    fingerprint: dict
    query_moment: list[torch.Tensor] | None = None  # per layer [Hkv, D, D]: sum of q q^T over all queries
    positions: int | None = None  # the positions the sequences were spread over (None: their length)
    fits: dict = field(default_factory=dict, repr=False)

    @property
    def num_tokens(self) -> int:
        return self.keys[0].shape[0] * self.keys[0].shape[2]

    @property
    def covered_positions(self) -> int:
        """Keys were seen at positions below this (post-RoPE keys depend on the position)."""
        return self.positions or self.keys[0].shape[2]


def _as_sequences(texts_or_ids, tokenizer, seq_len: int, max_tokens: int | None) -> torch.Tensor:
    if isinstance(texts_or_ids, str) or (isinstance(texts_or_ids, (list, tuple)) and texts_or_ids and isinstance(texts_or_ids[0], str)):
        if tokenizer is None:
            raise ValueError("calibrate got text: pass tokenizer=... (or token ids instead of text)")
        text = texts_or_ids if isinstance(texts_or_ids, str) else "\n\n".join(texts_or_ids)
        ids = tokenizer(text, return_tensors="pt").input_ids.flatten()
    else:
        ids = torch.as_tensor(texts_or_ids).flatten()
    given = ids.numel()
    if max_tokens is not None:
        ids = ids[:max_tokens]
    n_seq = ids.numel() // seq_len
    if n_seq == 0:
        kept = f" (max_tokens={max_tokens} keeps {ids.numel()} of the {given} given)" if ids.numel() < given else ""
        raise ValueError(
            f"calibration runs sequences of seq_len={seq_len} tokens and needs at least {seq_len}, got {ids.numel()}{kept}; "
            f"pass at least {seq_len} tokens{' and a larger max_tokens' if kept else ''}, "
            f"or a smaller seq_len (e.g. seq_len={max(1, ids.numel())})"
        )
    return ids[: n_seq * seq_len].view(n_seq, seq_len)


def _check_model_dtype(model) -> None:
    """The cache stores keys and values in the model's dtype and quantizes float32/16/bf16 only, so
    codebooks calibrated on, say, a float64 model could never be used with that model."""
    dtype = next(model.parameters()).dtype
    if dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"calibrate got a {dtype} model; antkv caches hold float32, float16 or bfloat16 keys and values, "
            f"so codebooks calibrated on this model could not be used with it. Cast the model first, "
            f"e.g. model.to(torch.float32), and calibrate and generate with the same dtype"
        )


def position_offsets(n_seq: int, seq_len: int, positions: int | None) -> list[int]:
    """Where each calibration sequence starts (its first position id): 0 for all of them, or with
    `positions` > seq_len spread evenly so the sequences together cover [0, positions) (the first
    at 0, the last ending at `positions`; a single sequence stays at 0)."""
    if positions is None:
        return [0] * n_seq
    if isinstance(positions, bool) or not isinstance(positions, int) or positions < seq_len:
        raise ValueError(f"positions must be a number of positions >= seq_len={seq_len} (the context the codebooks serve), "
                         f"got {positions!r}")
    return spread(n_seq, positions - seq_len)


def auto_positions(model, n_seq: int, seq_len: int) -> int | None:
    """calibrate's default `positions`: for a RoPE model, its trained context
    (max_position_embeddings) as far as the sequences tile it without gaps (n_seq x seq_len);
    None (the sequences' own positions) for a model without RoPE."""
    context = getattr(model.config.get_text_config(decoder=True), "max_position_embeddings", None)
    if rotary_module(model) is None or not isinstance(context, int):
        return None
    covered = min(context, n_seq * seq_len)
    return covered if covered > seq_len else None


@torch.no_grad()
def collect_calibration(model, texts_or_ids, tokenizer=None, seq_len=1024, max_tokens=8192, probe=64, progress=True,
                        positions: int | str | None = "auto") -> CalibrationData:  # fmt: skip
    """Run `model` over the calibration tokens and keep what codebook fitting needs (see module doc).

    positions: the positions the codebooks should serve. Keys are post-RoPE, so a codebook serves
    the positions its keys were seen at. With positions > seq_len each sequence runs at position
    ids shifted by an offset (position_offsets), spread so the sequences cover [0, positions):
    under RoPE attention depends on relative positions only, so a sequence's hidden states do not
    change and its keys are the ones the same text would have that far into a context, at the cost
    of seq_len-token sequences (the Anchor Score pass is quadratic in it). "auto" (default): the
    model's trained context as far as the sequences tile it (auto_positions); None: seq_len (SmolLM2,
    1 bit, 8192-token windows: 4.96x FP perplexity on 1024-token sequences, 1.36x spread over 8192
    positions, 1.33x on 8192-token sequences; on 2048-token windows it costs: 1 bit 1.37x against
    1.28x on the evaluation windows, 1.149x against 1.147x on the development ones)."""
    from .hf import attention_hook

    _check_model_dtype(model)
    seqs = _as_sequences(texts_or_ids, tokenizer, seq_len, max_tokens)
    if positions == "auto":
        positions = auto_positions(model, len(seqs), seqs.shape[1])
    offsets = position_offsets(len(seqs), seqs.shape[1], positions)
    n_layers = model.config.get_text_config(decoder=True).num_hidden_layers
    per_layer: list[list[tuple]] = [[] for _ in range(n_layers)]
    scales = [0.0] * n_layers
    moments: list = [0.0] * n_layers

    def hook(module, query, key, value, attention_mask, scaling):
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        s1, s0 = anchor_score_terms_blockwise(query, key, value, is_causal=True, scale=scale)
        per_layer[module.layer_idx].append((key.float(), value.float(), s1, s0, query[:, :, -probe:].float()))
        scales[module.layer_idx] = scale
        moments[module.layer_idx] = moments[module.layer_idx] + query_moment(query, key.shape[1])

    device = next(model.parameters()).device
    with attention_hook(model, hook):
        for seq, offset in zip(tqdm(seqs, desc="calibration forward", disable=not progress), offsets):
            shifted = {} if positions is None else {"position_ids": torch.arange(offset, offset + seq.numel(), device=device)[None]}
            model(seq[None].to(device), use_cache=False, **shifted)
    cat = [[torch.cat(items, 0) for items in zip(*layer)] for layer in per_layer]
    k, v, s1, s0, pq = (list(x) for x in zip(*cat))
    covered = None if positions is None else offsets[-1] + seqs.shape[1]  # one sequence cannot spread
    return CalibrationData(k, v, s1, s0, pq, scales, model_fingerprint(model.config), moments, covered)


def _expected_error(x: torch.Tensor, spec: PQSpec) -> torch.Tensor:
    """Error per head before any codebook exists: the Gaussian rate-distortion bound, RMS norm x 2^-bits."""
    return x.pow(2).sum(-1).mean((0, 2)).sqrt() * 2.0 ** (-spec.bits)


def _anchor_scores(data: CalibrationData, layer: int, kspec: PQSpec, vspec: PQSpec, keys: torch.Tensor | None = None) -> torch.Tensor:
    e_k = _expected_error(data.keys[layer] if keys is None else keys, kspec)
    e_v = _expected_error(data.values[layer], vspec)
    return combine(data.s1[layer], data.s0[layer], e_k, e_v)  # [n_seq, Hkv, L]


def _token_weights(score: torch.Tensor, anchor_frac: float) -> torch.Tensor:
    """Anchor Scores as k-means weights, capped at the anchor threshold: the top tokens stay exact
    in the cache, so they should not pull centroids away from everyone else."""
    per_head = score.transpose(0, 1).flatten(1)  # [Hkv, N]
    cap = torch.quantile(per_head, 1 - anchor_frac, dim=1, keepdim=True) if anchor_frac > 0 else per_head.amax(1, keepdim=True)
    return per_head.minimum(cap).clamp_min(1e-12)


def _kmeans_side(x, weights, spec, iters, seed, kmeans_tokens):
    """Centroids [Hkv, S, K, d] of one side (K or V) of one layer, from kmeans_tokens sampled tokens."""
    n, H, L, D = x.shape
    S = spec.num_subspaces(D)
    tokens = x.transpose(0, 1).reshape(H, n * L, D)
    gen = torch.Generator().manual_seed(seed)
    pick = torch.randperm(n * L, generator=gen)[:kmeans_tokens]
    sub = tokens[:, pick].unflatten(-1, (S, spec.sub_dim)).transpose(1, 2).reshape(H * S, -1, spec.sub_dim)
    w = None if weights is None else weights[:, pick].repeat_interleave(S, 0)
    return weighted_kmeans(sub, spec.num_centroids, w, iters=iters, seed=seed).view(H, S, spec.num_centroids, spec.sub_dim)


def _fit_side(x, weights, spec, iters, seed, kmeans_tokens):
    """Centroids [Hkv, S, K, d] and mean error per head for one side (K or V) of one layer."""
    centroids = _kmeans_side(x, weights, spec, iters, seed, kmeans_tokens)
    err = (x - decode(encode(x, centroids), centroids)).norm(dim=-1).mean((0, 2))
    return centroids, err


# Sub-vectors up to this size get a key basis under key_basis="auto". Measured on SmolLM2 (accuracy
# benchmark, 8192 calibration tokens): the basis lowers perplexity at 4, 2 and 1 bit (sub-vectors of 2, 4, 8 dims) but raises
# it at 0.5 bit (16 dims): 30.97 vs 30.64 without on two development windows (tokens 50000+), and
# 31.13 vs 29.78 on the evaluation windows. At 256 centroids for 16 dims the rate is too low for
# spreading variance evenly over subspaces to pay (ordering the axes instead was worse still, 33.36).
KEY_BASIS_MAX_SUB_DIM = 8


def _use_basis(key_basis, kspec: PQSpec) -> bool:
    if key_basis == "auto":
        return kspec.sub_dim <= KEY_BASIS_MAX_SUB_DIM
    if not isinstance(key_basis, bool):
        raise ValueError(f"key_basis must be True, False or 'auto', got {key_basis!r}")
    return key_basis


def _layer_keys(data, layer, kspec, key_basis, basis_unit=1):
    """The layer's calibration keys in the basis they are quantized in: (keys, A, A^-1)."""
    if not key_basis:
        return data.keys[layer], None, None
    if data.query_moment is None:
        raise ValueError("a key basis needs the query moments of collect_calibration; collect again or pass key_basis=False")
    key = ("basis", layer, kspec.sub_dim, basis_unit)
    if key not in data.fits:
        basis, basis_inv = fit_key_basis(data.keys[layer], data.query_moment[layer], kspec.sub_dim, unit=basis_unit)
        data.fits[key] = (to_basis(data.keys[layer], basis), basis, basis_inv)
    return data.fits[key]


def _fit_layer(data, layer, kspec, vspec, weighted, anchor_frac, iters, seed, kmeans_tokens, key_basis="auto", basis_unit=1) -> LayerCodebook:
    key_basis = _use_basis(key_basis, kspec)
    key = (layer, kspec, vspec, weighted, anchor_frac, iters, seed, kmeans_tokens, key_basis, basis_unit)
    if key not in data.fits:
        keys, basis, basis_inv = _layer_keys(data, layer, kspec, key_basis, basis_unit)
        w = _token_weights(_anchor_scores(data, layer, kspec, vspec, keys), anchor_frac) if weighted else None
        kc, ke = _fit_side(keys, w, kspec, iters, seed, kmeans_tokens)
        vc, ve = _fit_side(data.values[layer], w, vspec, iters, seed + 1, kmeans_tokens)
        data.fits[key] = LayerCodebook(CodebookSide(kspec, kc, ke, basis, basis_inv), CodebookSide(vspec, vc, ve))
    return data.fits[key]


def _dense_with_anchors(x, centroids, exact_mask):
    return torch.where(exact_mask[..., None], x, decode(encode(x, centroids), centroids))


def attention_error(data: CalibrationData, layer: int, book: LayerCodebook, anchor_frac: float) -> float:
    """Relative attention-output error on the probe queries with K and V quantized, the top
    `anchor_frac` tokens by Anchor Score exact (as the cache keeps them)."""
    k, v, q = data.keys[layer], data.values[layer], data.probe_q[layer]
    n, H, L, D = k.shape
    kb, qb = k, q  # keys and queries in the key basis, if the codebook has one
    if book.key.basis is not None:
        kb, qb = to_basis(k, book.key.basis), query_to_basis(q, book.key.basis_inv)
    score = _anchor_scores(data, layer, book.key.spec, book.value.spec, kb)
    n_anchor = math.ceil(anchor_frac * L)
    exact = torch.zeros_like(score, dtype=torch.bool).scatter_(-1, score.topk(n_anchor, -1).indices, True)
    kq = _dense_with_anchors(kb, book.key.centroids, exact)
    vq = _dense_with_anchors(v, book.value.centroids, exact)
    P = q.shape[2]
    mask = torch.ones(P, L, dtype=torch.bool).tril(L - P)  # probe i sits at position L - P + i

    def attend(qq, kk, vv):
        return torch.nn.functional.scaled_dot_product_attention(qq, kk, vv, attn_mask=mask, scale=data.scale[layer], enable_gqa=True)

    ref = attend(q, k, v)
    return ((attend(qb, kq, vq) - ref).pow(2).sum() / ref.pow(2).sum()).item()


def kv_candidates(bits: float) -> list[tuple[PQSpec, PQSpec]]:
    """Equal split first, then the key-favoured splits one preset step apart with the same average
    that the cache also stores in no more bytes (`PQSpec.stored_bits`): at 1 bit, K1.5/V0.5 keeps
    6-bit key codes in a byte each, 1.25 stored bits per element, so it is not a candidate."""
    spec = spec_for_bits(bits)
    pairs = [(spec, spec)]
    for kb in sorted(PRESETS):
        vb = 2 * spec.bits - kb
        if kb > spec.bits and vb in PRESETS and kb - vb <= 1.0 + 1e-9:
            k, v = PRESETS[kb], PRESETS[vb]
            if k.stored_bits + v.stored_bits <= 2 * spec.stored_bits + 1e-9:
                pairs.append((k, v))
    return pairs


@torch.no_grad()
def side_errors(data: CalibrationData, options=(0.5, 1.0, 2.0), anchor_frac: float = 0.01, iters: int = 15, seed: int = 0,
                kmeans_tokens: int = 4096, key_basis="auto", eval_seqs: int = 8, progress: bool = True) -> dict:
    """{bits: tensor [n_layers, 2]}: the relative attention-output error on the probe queries of the
    first `eval_seqs` calibration sequences when only the layer's keys (column 0) or only its values
    (column 1) are quantized at `bits` (Anchor-Score-weighted k-means as fit_codebooks, anchors
    exact). The input of `allocate_layer_bits`."""
    n_layers = len(data.keys)
    out = {b: torch.zeros(n_layers, 2, dtype=torch.float64) for b in options}
    bar = tqdm(total=n_layers * len(options), desc="side errors", disable=not progress)
    for layer in range(n_layers):
        k, v, q = data.keys[layer][:eval_seqs], data.values[layer][:eval_seqs], data.probe_q[layer][:eval_seqs]
        L, P = k.shape[2], q.shape[2]
        mask = torch.ones(P, L, dtype=torch.bool).tril(L - P)

        def attend(qq, kk, vv):
            return torch.nn.functional.scaled_dot_product_attention(qq, kk, vv, attn_mask=mask, scale=data.scale[layer], enable_gqa=True)

        ref = attend(q, k, v)
        for b in options:
            spec = spec_for_bits(b)
            keys, basis, basis_inv = _layer_keys(data, layer, spec, _use_basis(key_basis, spec))
            score = _anchor_scores(data, layer, spec, spec, keys)
            w = _token_weights(score, anchor_frac)
            kc = _kmeans_side(keys, w, spec, iters, seed, kmeans_tokens)
            vc = _kmeans_side(data.values[layer], w, spec, iters, seed + 1, kmeans_tokens)
            exact = torch.zeros_like(score, dtype=torch.bool).scatter_(-1, score.topk(math.ceil(anchor_frac * L), -1).indices, True)[:eval_seqs]
            kb = keys[:eval_seqs]
            qb = q if basis is None else query_to_basis(q, basis_inv)
            for col, got in enumerate((attend(qb, _dense_with_anchors(kb, kc, exact), v), attend(qb, kb, _dense_with_anchors(v, vc, exact)))):
                out[b][layer, col] = ((got - ref).pow(2).sum() / ref.pow(2).sum()).item()
            bar.update()
    bar.close()
    return out


def allocate_layer_bits(errors: dict, bits: float) -> list[tuple[float, float]]:
    """(key_bits, value_bits) per layer minimizing the summed error at a mean stored budget.

    errors: {bits_option: tensor [n_layers, 2]}, the error each layer's key (column 0) and value
    (column 1) side causes at that option (e.g. the relative attention-output error with the other
    side exact). The budget is `bits` stored bits per element on average over all sides, counted as
    the cache stores codes (`PQSpec.stored_bits`: a byte per code), so the result never stores more
    than all sides at `bits` would. Exact: a multiple-choice knapsack by dynamic programming over
    the sides, in sixteenths of a bit."""
    options = sorted(errors)
    if not options:
        raise ValueError("allocate_layer_bits needs errors for at least one bit option")
    table = torch.stack([torch.as_tensor(errors[b], dtype=torch.float64) for b in options], -1)  # [L, 2, O]
    if table.dim() != 3 or table.shape[1] != 2:
        raise ValueError(f"errors must map each bit option to a [n_layers, 2] tensor (key, value), got shape {tuple(table.shape[:-1])}")
    sides = table.reshape(-1, len(options)).tolist()
    cost = [round(spec_for_bits(b).stored_bits * 16) for b in options]
    capacity = math.floor(spec_for_bits(bits).stored_bits * 16 * len(sides) + 1e-9)
    if min(cost) * len(sides) > capacity:
        raise ValueError(f"no allocation fits {bits:g} stored bits per element with options {options}")
    inf = float("inf")
    best = [0.0] + [inf] * capacity  # best[c]: least error of the sides so far using exactly c units
    choice = []
    for errs in sides:
        new, pick = [inf] * (capacity + 1), [-1] * (capacity + 1)
        for c in range(capacity + 1):
            for o, (w, e) in enumerate(zip(cost, errs)):
                if w <= c and best[c - w] + e < new[c]:
                    new[c], pick[c] = best[c - w] + e, o
        best = new
        choice.append(pick)
    c = min(range(capacity + 1), key=lambda c: best[c])
    picked = []
    for pick in reversed(choice):
        o = pick[c]
        picked.append(options[o])
        c -= cost[o]
    picked.reverse()
    return [(picked[2 * l], picked[2 * l + 1]) for l in range(len(sides) // 2)]


def fit_codebooks(
    data: CalibrationData,
    bits: float = 1.0,
    kv_split: str | tuple = "auto",
    per_layer: bool = False,
    weighted: bool = True,
    anchor_frac: float = 0.01,
    iters: int = 15,
    seed: int = 0,
    kmeans_tokens: int = 4096,
    key_basis: bool | str = "auto",
    basis_unit: int = 1,
    layer_bits: list | None = None,
    progress: bool = True,
) -> Codebooks:
    """Codebooks for an average budget of `bits` per element.

    key_basis: quantize keys in a learned basis (quant/basis.py) instead of their own coordinates;
    "auto": for key sub-vectors of up to KEY_BASIS_MAX_SUB_DIM dims (budgets of 1 bit and more).
    basis_unit: the key basis deals its principal axes to subspaces one at a time (1) or in pairs
    adjacent in variance (2; quant/basis.deal_axes).
    kv_split: "auto" (measure the candidates of `kv_candidates`, keep the lowest attention error;
    on a near tie the norm rule decides), "equal", or explicit (key_bits, value_bits).
    per_layer: choose the split per layer instead of one split for the model.
    layer_bits: explicit (key_bits, value_bits) per layer (e.g. from `allocate_layer_bits`), instead
    of kv_split; `bits` is then only recorded, the file records the mean stored bits.
    anchor_frac: the share of tokens the cache will keep exact as anchors (CacheSettings.anchor_frac):
    k-means weights are capped at that Anchor Score quantile, the split is scored with that share
    exact, and the file records it so caches default to it.
    """
    n_layers = len(data.keys)
    if not isinstance(basis_unit, int) or basis_unit < 1:
        raise ValueError(f"basis_unit must be a positive int (1: axes one at a time, 2: in pairs), got {basis_unit!r}")
    if kv_split == "equal":
        cands = kv_candidates(bits)[:1]
    elif isinstance(kv_split, (tuple, list)):
        kb, vb = kv_split
        cands = [(spec_for_bits(kb), spec_for_bits(vb))]
    elif kv_split == "auto":
        cands = kv_candidates(bits)
    else:
        raise ValueError(f"kv_split must be 'auto', 'equal' or (key_bits, value_bits), got {kv_split!r}")
    if layer_bits is not None:
        if len(layer_bits) != n_layers or any(len(pair) != 2 for pair in layer_bits):
            raise ValueError(f"layer_bits needs one (key_bits, value_bits) pair per layer ({n_layers}), got {layer_bits!r}")
        layer_specs = [(spec_for_bits(kb), spec_for_bits(vb)) for kb, vb in layer_bits]
        cands = sorted(set(layer_specs), key=lambda kv: (kv[0].bits, kv[1].bits))
    for kspec, vspec in cands:
        kspec.num_subspaces(data.keys[0].shape[-1]), vspec.num_subspaces(data.keys[0].shape[-1])
    bad = [f"layer {i} {what}" for what, xs in (("keys", data.keys), ("values", data.values)) for i, x in enumerate(xs) if not torch.isfinite(x).all()]
    if bad:
        raise ValueError(
            f"calibration data has NaN / Inf in {', '.join(bad)}: the model overflows on these tokens in its dtype "
            "(calibrate in float32, or with other text)"
        )

    key_norm = data.keys[0].new_tensor([k.norm(dim=-1).mean() for k in data.keys]).mean().item()
    value_norm = data.values[0].new_tensor([v.norm(dim=-1).mean() for v in data.values]).mean().item()
    prior_key = key_norm > value_norm

    errors = torch.zeros(len(cands), n_layers)
    books = [[None] * n_layers for _ in cands]
    bar = tqdm(total=n_layers if layer_bits is not None else len(cands) * n_layers, desc=f"codebooks {bits:g} bit", disable=not progress)
    for c, (kspec, vspec) in enumerate(cands):
        for layer in range(n_layers):
            if layer_bits is not None and layer_specs[layer] != (kspec, vspec):
                continue
            books[c][layer] = _fit_layer(data, layer, kspec, vspec, weighted, anchor_frac, iters, seed, kmeans_tokens, key_basis, basis_unit)
            if len(cands) > 1 and layer_bits is None:
                errors[c, layer] = attention_error(data, layer, books[c][layer], anchor_frac)
            bar.update()
    bar.close()

    def pick(err):  # lowest error; within 2% the norm rule's preferred side wins
        order = sorted(range(len(cands)), key=lambda i: err[i].item())
        best = order[0]
        for i in order[1:]:
            favoured = cands[i][0].bits > cands[i][1].bits
            if err[i] <= err[best] * 1.02 and favoured == prior_key and (cands[best][0].bits > cands[best][1].bits) != prior_key:
                best = i
        return best

    name = [f"K{k.bits:g}/V{v.bits:g}" for k, v in cands]
    if layer_bits is not None:
        chosen = [cands.index(layer_specs[l]) for l in range(n_layers)]
    elif per_layer:
        chosen = [pick(errors[:, l]) for l in range(n_layers)]
    else:
        chosen = [pick(errors.mean(1))] * n_layers
    settings = {
        "bits": bits,
        "kv_split": kv_split if isinstance(kv_split, str) else list(kv_split),
        "per_layer": per_layer,
        "chosen": [name[c] for c in chosen],
        "candidate_errors": {name[c]: errors[c].mean().item() for c in range(len(cands))} if len(cands) > 1 and layer_bits is None else {},
        "layer_bits": None if layer_bits is None else [[float(kb), float(vb)] for kb, vb in layer_bits],
        "mean_stored_bits": sum(books[c][l].key.spec.stored_bits + books[c][l].value.spec.stored_bits for l, c in enumerate(chosen)) / (2 * n_layers),
        "norm_prior": "keys" if prior_key else "values",
        "mean_key_norm": key_norm,
        "mean_value_norm": value_norm,
        "weighted": weighted,
        # The cache these codebooks were fitted for: AntKVCache / patch default to it (settings.resolve).
        "cache": {"anchor_frac": anchor_frac},
        "calibration_tokens": data.num_tokens,
        # Keys are post-RoPE: positions past the calibration's quantize with a growing error
        # (Codebooks.check_positions warns when a cache goes there).
        "calibration_positions": data.covered_positions,
        "calibration_seq_len": data.keys[0].shape[2],
        "kmeans_tokens": kmeans_tokens,
        "key_basis": key_basis,
        "basis_unit": basis_unit,
        "key_basis_used": [books[c][l].key.basis is not None for l, c in enumerate(chosen)],
        "iters": iters,
        "seed": seed,
    }
    return Codebooks([books[c][l] for l, c in enumerate(chosen)], dict(data.fingerprint), settings).validate("fit_codebooks")


def calibrate(model, texts_or_ids, bits: float = 1.0, tokenizer=None, seq_len=1024, max_tokens=8192, progress=True,
              positions: int | str | None = "auto", **fit_kwargs) -> Codebooks:  # fmt: skip
    """Codebooks for `model` at an average of `bits` per element, learned from calibration text or
    ids in sequences of seq_len tokens, serving positions below `positions` (default "auto": the
    model's trained context as far as the sequences tile it; None: seq_len; collect_calibration)."""
    data = collect_calibration(model, texts_or_ids, tokenizer, seq_len=seq_len, max_tokens=max_tokens, progress=progress,
                               positions=positions)  # fmt: skip
    return fit_codebooks(data, bits, progress=progress, **fit_kwargs)
