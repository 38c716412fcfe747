"""Hugging Face integration: a `Cache` made of VQTensors, and an attention function that reads it.

`AntKVCache(codebooks)` goes wherever a `DynamicCache` goes (`generate(cache=...)`, a manual
forward loop; `cache_keyword(model)` names the keyword: `cache` on transformers 5.x, which
deprecates `past_key_values`, and `past_key_values` before). Its layers are DynamicLayers whose
keys and values are VQTensors, so HF's own `torch.cat` appends with quantize-on-write, and crop /
beam reorder act on the codes. Without codebooks, each layer fits a data-free codebook to its
first update (quant/datafree.py) and refines it online once enough tokens have arrived.

Transformers' "sdpa" attention repeats K and V per query head (`repeat_kv`) whenever a mask is
present, which would decode the whole cache. The "antkv" attention implementation registered here
calls SDPA with `enable_gqa=True` instead, so VQ attention reads the codes once per kv head;
`use_antkv_attention(model)` switches a model to it (dense caches still go through "sdpa").
"""

from __future__ import annotations

import contextlib
import inspect
import warnings
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from transformers.cache_utils import Cache, DynamicLayer, StaticLayer
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from . import state
from .cache import StaticVQTensor, VQTensor, with_capacity
from .quant import datafree
from .quant import rope as rope_shift
from .quant.codebook import CodebookSide, Codebooks, LayerCodebook
from .quant.pq import spec_for_bits
from .settings import CacheSettings, resolve

ATTN_IMPLEMENTATION = "antkv"


def cache_keyword(model) -> str:
    """The keyword `model`'s forward and generate() take a cache by: "cache" on the transformers
    that deprecate "past_key_values" (5.x; its forward has a `cache` parameter), else
    "past_key_values". `model`: a module, or its (compiled) forward. Read it once per loop:
    `model(ids, **{cache_keyword(model): cache})`."""
    model = getattr(model, "_orig_mod", model)  # torch.compile(module) wraps it
    forward = model.forward if isinstance(model, torch.nn.Module) else model
    return "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"


def check_batch(cache, batch: int) -> None:
    """Raise a ValueError if `cache` (an HF Cache) holds compressed layers of another batch size."""
    for layer in getattr(cache, "layers", ()):
        _check_batch(getattr(layer, "keys", None), batch)


def _check_batch(keys, batch: int) -> None:
    if isinstance(keys, VQTensor) and keys.shape[0] != batch:
        raise ValueError(
            f"antkv: this call has {batch} sequences but the compressed cache holds {keys.shape[0]}: a cache "
            f"belongs to the batch it was started with. Start a new cache (a new AntKVCache or DynamicCache, "
            f"or a new generate() call) for a batch of {batch}."
        )


# Online refinement defaults (AntKVCache / patch: refine=..., refine_iters=...), chosen on
# development windows (WikiText-2 from token 50000, 2 windows of 2048 tokens, 32 per call:
# `python benchmarks/refine_sweep.py --eval-offset 50000 --windows 2 --chunk 32 --rows ...`),
# ppl / FP of SmolLM2-135M. 1 bit: data-free 1.513; refined after 256 / 512 / 1024 tokens with 3
# Lloyd iterations 1.265 / 1.262 / 1.326, after 512 with 10 / 20 iterations 1.251 / 1.251. 2 bit:
# data-free 1.190; after 256 / 512 / 1024 with 3 iterations 1.121 / 1.107 / 1.118, after 512 with
# 10 / 20 iterations 1.105 / 1.104. Later is not better: the tokens before the switch are
# predicted from data-free codes. One token per call with no prompt (1 window, --chunk 1) is far
# harder, the data-free codebook being fitted to one token: 2 bit 4.51x data-free -> 1.44x refined,
# 1 bit 14.7x -> 1.86x; the first 512 tokens pay for the one-token codebook.
# Token by token (64-token prompt, then one token per call; benchmarks/refine_probe.py, same 2
# development windows), ppl / FP per position bucket 64-128 / 128-256 / 256-512 / 512-1024 /
# 1024-2048 / all, 2 bit: one switch at 512: 1.062 / 1.116 / 1.160 / 1.090 / 1.152 / 1.131;
# progressive (128, 2048): 1.062 / 1.008 / 1.035 / 1.062 / 1.092 / 1.070. The data-free codebook
# costs the tokens before the first switch, and a codebook fitted to 512 tokens does not serve the
# next 1500 as well as one refitted as they arrive: refit at 128, 256, ..., 2048 tokens. Run once
# on the evaluation windows after the choice (accuracy.py, 4 x 2048 from 100000): 2 bit 1.205x ->
# 1.136x FP, 1 bit 1.566x -> 1.408x (1 bit was not compared on development windows first).
# Issue 15 follow-up, 2026-12-06, token by token (accuracy.py defaults: 64-token prompt, one token
# per call) on the development windows (`python benchmarks/accuracy.py --rows ROW --eval-offset
# 50000 --windows 2`, FP 24.010), ppl / FP. 1 bit: this default 1.1939 (windows 1.233 / 1.156);
# each switch from the moment re-fit (refine_init="moments") 1.1820 (1.206 / 1.159); 20 iterations
# 1.1968; a first switch at the prompt (refine=(32, 2048): 256 centroids fitted to 64 tokens)
# 1.3240; (256, 2048) 1.2201, from the moments 1.1980. The moments start is the 1 bit pick (one
# window better, the other a little worse) but is not the default: 2 bit was not measured with it
# (accuracy.py row antkv-refined-1bit-moments). No k-means (refine_iters=0, refine_init="moments":
# the data-free codebook placed again by the moments of every token held at each switch): 2 bit
# 1.2459 -> 1.1326, the data-free row now (accuracy.py antkv-datafree-*). Run once on the
# evaluation windows after the choice (`python benchmarks/accuracy.py --rows ROW --merge --out
# /work/runs/df/eval`): 2 bit data-free 1.3531x -> 1.2080x with moment re-fits (target 1.10x), 1 bit
# refined from the moments 1.3771x (default 1.4079x; target 1.35x).
REFINE_TOKENS = (128, 2048)
REFINE_ITERS = 10
# Where each switch's centroids start: "held" (the codebook the cache holds: data-free at the first
# switch, then the last refined one), "moments" (the Gaussian codebook placed again by the moments
# of every token held, quant/datafree.place) or "covariance" (placed by each sub-vector's mean and
# full covariance); then REFINE_ITERS Lloyd iterations.
REFINE_INIT = "held"
REFINE_INITS = ("held", "moments", "covariance")
_DEFAULT = object()


def refine_schedule(refine) -> tuple[int, ...] | None:
    """The token counts at which a cache refines, for a `refine` setting: N (one switch, after N
    tokens) or (FIRST, CAP) (switches after FIRST, 2 FIRST, 4 FIRST, ... tokens and a last one at
    CAP, the sample kept until then); None or 0: no refinement."""
    if refine is None or (isinstance(refine, int) and not isinstance(refine, bool) and refine == 0):
        return None
    pair = tuple(refine) if isinstance(refine, (tuple, list)) else (refine, refine)
    if len(pair) != 2 or any(isinstance(t, bool) or not isinstance(t, int) or t < 1 for t in pair) or pair[1] < pair[0]:
        raise ValueError(
            f"refine must be a number of tokens >= 1 (one switch), a pair (first, cap) of token counts with "
            f"1 <= first <= cap (switches after first, 2 first, 4 first, ... and cap tokens), or None / 0 (no "
            f"refinement); got {refine!r}"
        )
    first, cap = pair
    points = [first]
    while points[-1] * 2 < cap:
        points.append(points[-1] * 2)
    return tuple(points) + ((cap,) if cap > first else ())


class Refinement(NamedTuple):
    """How a cache without codebooks refines them online (AntKVCache / patch keywords refine,
    refine_iters, refine_init, rope): the schedule's token counts, Lloyd iterations per switch,
    where each switch's iterations start, and the model's RoPE (quant/rope.py), with which the
    last switch also fits its keys at the later positions the model serves."""

    schedule: tuple[int, ...]
    iters: int = REFINE_ITERS
    init: str = REFINE_INIT
    rope: rope_shift.Rope | None = None


def refine_setting(codebooks, refine, refine_iters: int, refine_init: str = REFINE_INIT, rope=None) -> Refinement | None:
    """The `Refinement` the keywords stand for (None: off), validated: the default schedule
    (REFINE_TOKENS) without codebooks, off with them (calibrated codebooks are used as they are;
    asking for refinement with them raises)."""
    if codebooks is not None:
        if refine is not _DEFAULT and refine:
            raise ValueError(
                f"refine={refine!r} refines data-free codebooks online; calibrated codebooks are used as they are. "
                "Pass refine only without codebooks (AntKVCache(bits=..., refine=...), patch(model, refine=...))."
            )
        return None
    schedule = refine_schedule(REFINE_TOKENS if refine is _DEFAULT else refine)
    if isinstance(refine_iters, bool) or not isinstance(refine_iters, int) or refine_iters < 0:
        raise ValueError(f"refine_iters must be an int >= 0 (Lloyd iterations), got {refine_iters!r}")
    if refine_init not in REFINE_INITS:
        raise ValueError(f"refine_init must be one of {REFINE_INITS}, got {refine_init!r}")
    if rope is not None and not isinstance(rope, rope_shift.Rope):
        raise TypeError(f"rope must be the model's RoPE, ak.model_rope(model) (or None), got {type(rope).__name__}")
    return None if schedule is None else Refinement(schedule, refine_iters, refine_init, rope)


def _grown(sample: torch.Tensor | None, new: torch.Tensor, capacity: int) -> torch.Tensor:
    """`sample` [B, H, T, D] with `new` [B, H, n, D] appended, written into the buffer `sample` is
    the prefix view of when it has room (no copy of the sample: a torch.cat per decode step made
    collecting O(T^2) until the last switch), else into a new buffer of max(capacity, T + n)
    tokens. Returns the [:, :, :T + n] view."""
    T, n = (0 if sample is None else sample.shape[2]), new.shape[2]
    base = None if sample is None else sample._base
    if base is None or base.shape[2] < T + n or base.data_ptr() != sample.data_ptr() or base[:, :, :T].stride() != sample.stride():
        base = with_capacity(new[:, :, :0] if sample is None else sample, max(capacity, T + n))
    base[:, :, T : T + n] = new
    return base[:, :, : T + n]


class WarnOnce:
    """A warning given once for a whole cache: its layers share one (a generation crosses the
    same condition in every layer at the same step)."""

    def __init__(self):
        self.given = False

    def __call__(self, message: str) -> None:
        if not self.given:
            self.given = True
            warnings.warn(message, stacklevel=4)


class RefiningLayer(DynamicLayer):
    """A DynamicLayer whose keys and values are VQTensors, with online refinement: with a schedule
    set (`start_refining`, refine_schedule's token counts), it keeps the stored rows of every token
    it holds in a sample (`sample_keys`, `sample_values`, [B, H, T, D]: keys in the side's basis,
    the exact-row dtype, what quantize-on-write encoded), and each time the tokens held reach the
    schedule's next count re-writes both sides with a codebook refined on all of them (state.refine,
    from the codebook it holds); after the last count it drops the sample. Crop, batch select, beam
    reorder and reset carry the sample along. `AntKVLayer` is one; the compiled path (`patch`)
    turns the DynamicLayers of a generate() cache into one after the call that compressed them."""

    refine: tuple[int, ...] | None = None  # the switches still to come (token counts)
    refinement: Refinement | None = None
    # Plain attributes, so that everything measuring the layer's tensors counts the sample.
    sample_keys: torch.Tensor | None = None
    sample_values: torch.Tensor | None = None
    refining = False  # a sample is being collected
    refined_on: int | None = None  # the tokens the last switch held: its codebook has seen their positions only
    warn_once: WarnOnce | None = None  # shared by the cache's layers: the warning past refined_on

    def start_refining(self, refinement: Refinement | None) -> None:
        self.refinement = refinement
        self.refine = None if refinement is None else refinement.schedule
        self.sample_keys = self.sample_values = None
        self.refining = self.refine is not None

    def collect(self, n: int) -> bool:
        """Add the last call's n tokens to the sample (the last n window rows: a call's tokens
        join the window whole); refine once it holds the schedule's next count of tokens (once,
        however many counts the call passed). True if it refined."""
        if not self.refining:
            self.check_positions()
            return False
        if n <= 0:
            return False
        cap = self.refine[-1]  # the sample lives until the last switch: its buffer holds that many tokens
        self.sample_keys = _grown(self.sample_keys, self.keys.window[:, :, -n:], cap)
        self.sample_values = _grown(self.sample_values, self.values.window[:, :, -n:], cap)
        if self.sample_keys.shape[2] < self.refine[0]:
            return False
        self.refine_now()
        return True

    def refine_now(self) -> None:
        """Refine the codebook on the sample, re-encode every token held with it (state.refine);
        later tokens are written with the refined codebook. The sample is dropped after the
        schedule's last switch, kept for the next one otherwise."""
        held = self.sample_keys.shape[2]
        rope = self.refinement.rope if not any(t > held for t in self.refine) else None  # the last switch
        if rope is not None and getattr(self, "max_cache_len", None):  # a preallocated cache: its length is the context
            rope = rope._replace(positions=min(rope.positions, self.max_cache_len))
        side = self.keys.side
        fit_keys = None if rope is None else rope_shift.augment(self.sample_keys, side.basis, side.basis_inv, rope)
        self.keys, self.values = (cache._with(state.refine(cache.side, rows, cache.settings, self.refinement.iters, self.refinement.init, fit),
                                              view=True)
                                  for cache, rows, fit in ((self.keys, self.sample_keys, fit_keys), (self.values, self.sample_values, None)))  # fmt: skip
        self.refine = tuple(t for t in self.refine if t > held) or None
        if self.refine is None:
            self.sample_keys = self.sample_values = None
            self.refining = False
            self.refined_on = held

    def check_positions(self) -> None:
        """Warn (once per cache) when the layer holds more tokens than its last switch did (or,
        with the model's RoPE, than its trained context): keys are post-RoPE, and the codebook has
        seen the positions below that only."""
        if self.refined_on is None or self.warn_once is None:
            return
        held, rope = self.get_seq_length(), self.refinement.rope
        covered = self.refined_on if rope is None else max(self.refined_on, rope.positions)
        if held > covered:
            seen = f"its first {self.refined_on} tokens" + ("" if rope is None else f" and at later positions up to {covered}")
            self.warn_once(
                f"antkv: this cache refined its codebooks on {seen} and now holds {held}: keys "
                f"are quantized after RoPE, so past position {covered} their error grows with the position "
                f"(SmolLM2, benchmarks/position_probe.py --online 2048: key error 0.10 below 2048, 0.44 at 6144-8192 at 1 bit). "
                f"For long contexts pass the model's RoPE, AntKVCache(rope=ak.model_rope(model)) (patch(model) does), use "
                f"codebooks calibrated over them, ak.calibrate(model, texts, positions=N), or refine until later, "
                f"refine=(128, N) (a dense copy of N tokens is kept until then)."
            )

    def sample_nbytes(self) -> int:
        """Bytes the sample holds: its buffers whole (allocated for the last switch's count)."""
        return sum(t.untyped_storage().nbytes() for t in (self.sample_keys, self.sample_values) if t is not None)

    def crop(self, tokens_to_remove: int) -> None:
        super().crop(tokens_to_remove)
        if self.sample_keys is not None:
            end = self.get_seq_length()
            self.sample_keys, self.sample_values = self.sample_keys[:, :, :end], self.sample_values[:, :, :end]

    def _select(self, index: torch.Tensor) -> None:
        """Pick / reorder sequences: keys, values and the sample alike (batch select, beam reorder)."""
        if self.get_seq_length() > 0:
            self.keys, self.values = self.keys.select_batch(index), self.values.select_batch(index)
            if self.sample_keys is not None:
                index = torch.as_tensor(index).long().to(self.sample_keys.device)
                self.sample_keys, self.sample_values = self.sample_keys.index_select(0, index), self.sample_values.index_select(0, index)

    def reset(self) -> None:
        super().reset()
        if self.refining:  # not refined yet: collect again from the next update
            self.sample_keys = self.sample_values = None

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.get_seq_length() > 0:
            self._select(torch.arange(self.keys.shape[0], device=self.keys.device).repeat_interleave(repeats))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._select(indices)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._select(beam_idx)


def collect_after_call(cache, lengths_before: list[int], refinement: Refinement) -> list[RefiningLayer]:
    """Online refinement for a cache compressed by compiled code (`patch`), called after each
    call with each layer's length before it: a DynamicLayer the call compressed from empty becomes
    a RefiningLayer (its class swapped in place: generate() made the cache, the layer's tensors are
    the compiled graph's), and every RefiningLayer collects the call's tokens. Returns the layers
    that refined in this call (their keys and values are new VQTensors)."""
    refined = []
    for layer, before in zip(getattr(cache, "layers", ()), lengths_before):
        if not (isinstance(layer.keys, VQTensor) and isinstance(layer.values, VQTensor)):
            continue
        if type(layer) is DynamicLayer:
            if before:  # compressed from a dense past: its rows are in codes now, the sample would miss them
                continue
            layer.__class__ = RefiningLayer
            layer.start_refining(refinement)
            layer.warn_once = cache.__dict__.setdefault("_antkv_warn_once", WarnOnce())
        if isinstance(layer, RefiningLayer) and layer.collect(layer.get_seq_length() - before):
            refined.append(layer)
    return refined


def datafree_codebook(key_states, value_states, bits: float, seed: int) -> LayerCodebook:
    """A layer's data-free codebook of `bits` fitted to these keys (rotated) and values
    (quant/datafree.py), seeded per layer: what a cache layer without codebooks starts from."""
    spec = spec_for_bits(bits)
    return LayerCodebook(datafree.fit_side(key_states, spec, rotate=True, seed=2 * seed),
                         datafree.fit_side(value_states, spec, rotate=False, seed=2 * seed + 1))  # fmt: skip


class AntKVLayer(RefiningLayer):
    """A DynamicLayer whose keys and values are VQTensors (created on the first update). Without a
    codebook, it fits a data-free one (quant/datafree.py) of `bits` to the first update's tokens
    and, with a `refine` schedule, refines it as tokens arrive (see AntKVCache)."""

    def __init__(self, codebook: LayerCodebook | None, settings: CacheSettings, bits: float = 1.0, seed: int = 0,
                 refinement: Refinement | None = None, max_cache_len: int | None = None, warn_once: WarnOnce | None = None):
        super().__init__()
        self.warn_once = warn_once
        self.codebook, self.settings, self.bits, self.seed = codebook, settings, bits, seed
        self.max_cache_len = max_cache_len
        self.refinement = refinement
        self.check_calibrated_positions = None  # Codebooks.check_positions, set on one layer of a calibrated cache
        self.is_initialized = False  # transformers < 5 has no such flag (it tests keys is None)

    def lazy_initialization(self, key_states, value_states=None, *args, **kwargs):
        # transformers < 5 passes the keys only; the values have the keys' shape in every model it runs
        value_states = key_states if value_states is None else value_states
        self.dtype, self.device = key_states.dtype, key_states.device
        for name, states in (("key", key_states), ("value", value_states)):
            centroids = self.codebook.sides()[name].centroids
            if states.shape[1] != centroids.shape[0] or states.shape[-1] != centroids.shape[1] * centroids.shape[3]:
                raise ValueError(
                    f"{name} states of shape {tuple(states.shape)} do not match the codebook "
                    f"[{centroids.shape[0]} kv heads, head_dim {centroids.shape[1] * centroids.shape[3]}]: "
                    f"these codebooks were calibrated for another model"
                )
        batch = key_states.shape[0]
        self.keys, self.values = (VQTensor.empty(batch, side, self.settings, self.dtype, self.device, capacity=self.max_cache_len)
                                  for side in (self.codebook.key, self.codebook.value))  # fmt: skip
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        if self.is_initialized:
            _check_batch(self.keys, key_states.shape[0])
        elif self.codebook is None:  # data-free: fitted here, where both keys and values are at hand
            self.codebook = datafree_codebook(key_states, value_states, self.bits, self.seed)
            self.start_refining(self.refinement)
        super().update(key_states, value_states, *args, **kwargs)
        self.collect(key_states.shape[-2])
        if self.check_calibrated_positions is not None:  # calibrated codebooks, first layer (AntKVCache)
            self.check_calibrated_positions(self.get_seq_length())
        return self.keys, self.values

    def refine_now(self) -> None:
        super().refine_now()
        old = self.codebook  # the refined tensors are the caches' own (shared storage: one copy)
        self.codebook = LayerCodebook(*(CodebookSide(o.spec, c.centroids, c.expected_err, o.basis, o.basis_inv)
                                        for o, c in ((old.key, self.keys), (old.value, self.values))))  # fmt: skip


class AntKVCache(Cache):
    """An HF cache that stores every layer's K and V vector-quantized (see cache.py).

    codebooks: calibrated `Codebooks` (ak.calibrate), or None: each layer fits a data-free codebook
    of `bits` per element to its first update's tokens (the prompt), no calibration needed, and
    compresses from the first token.
    refine (no codebooks only; default REFINE_TOKENS, None or 0: off): online refinement, a
    schedule (FIRST, CAP) of switches after FIRST, 2 FIRST, 4 FIRST, ... and CAP tokens, or N: one
    switch after N tokens (refine_schedule). Each layer keeps the stored rows of the tokens it holds
    in a sample; each time the tokens held (over any number of calls) reach the schedule's next
    count, it runs `refine_iters` Lloyd iterations per (kv head, subspace) from the centroids it
    holds (data-free at the first switch) on all of them (keys in the same rotated basis) and
    re-encodes every token held with the refined codebook; later tokens are written with it. After
    the last switch the sample is dropped. The contract holds throughout: attention on the cache
    equals SDPA on its dequantized tensor under the codebook it holds at that call. While it exists
    the sample counts in `cache_nbytes()`: a buffer of [B, H, CAP, D] rows per side (allocated for
    the last switch at the first update), as a dense cache of CAP tokens, so until the last switch
    the cache holds more than a dense one would (codes and window too).
    refine_init (default REFINE_INIT): where each switch's iterations start: "held" (the codebook
    the cache holds), "moments" (the Gaussian codebook placed again by the moments of every token
    held, quant/datafree.place) or "covariance" (by each sub-vector's mean and covariance). With
    refine_iters=0 and "moments" a switch is a data-free moment re-fit, no k-means.
    rope (no codebooks only; `ak.model_rope(model)`, None: off): the model's RoPE. Keys are
    post-RoPE, so a codebook refined on the first CAP tokens has seen their positions only and
    the error past them grows with the position; with `rope` the last switch fits the keys also at
    later offsets up to the model's trained context, or max_cache_len if smaller (quant/rope.py;
    the rows encoded stay the tokens' own). It costs a little below CAP and saves much past it (Results).
    The same keywords work for `patch(model)` without codebooks (it reads `rope` from the model).
    max_cache_len: tokens to preallocate the codes and anchor slots for (prompt + new tokens, as
    HF's StaticCache); appends then write in place and never copy the codes (cache.py). None: the
    buffers grow by an eighth when full (one copy each time), so a decode step copies no codes
    either, but up to an eighth of the codes' bytes is unused capacity (counted in cache_nbytes).
    Settings: `settings=CacheSettings(...)` or keyword arguments (window, anchor_frac, error,
    exact_dtype); unset ones come from what the codebooks were calibrated with (settings.resolve)."""

    def __init__(self, codebooks: Codebooks | None = None, settings: CacheSettings | None = None, config=None, bits: float = 1.0,
                 refine: int | tuple[int, int] | None = _DEFAULT, refine_iters: int = REFINE_ITERS, max_cache_len: int | None = None,
                 refine_init: str = REFINE_INIT, rope: rope_shift.Rope | None = None, **setting_kwargs):  # fmt: skip
        self.settings = resolve(codebooks, settings, **setting_kwargs)
        if max_cache_len is not None and (isinstance(max_cache_len, bool) or not isinstance(max_cache_len, int) or max_cache_len < 1):
            raise ValueError(f"max_cache_len must be a number of tokens >= 1 (or None: grow as needed), got {max_cache_len!r}")
        refinement = refine_setting(codebooks, refine, refine_iters, refine_init, rope)
        if codebooks is None:
            spec_for_bits(bits)  # a bad budget fails here, not at the first update
            count, once = iter(range(1 << 30)), WarnOnce()
            super().__init__(layer_class_to_replicate=lambda: AntKVLayer(None, self.settings, bits, next(count), refinement, max_cache_len,
                                                                         warn_once=once))  # fmt: skip
            return
        if config is not None:
            codebooks.check_model(config)
        super().__init__(layers=[AntKVLayer(book, self.settings, max_cache_len=max_cache_len) for book in codebooks.layers])
        self.layers[0].check_calibrated_positions = codebooks.check_positions

    def cache_nbytes(self) -> int:
        """Bytes held by the compressed K and V of all layers, and the refinement samples while
        they exist (codebooks not included)."""
        return sum(t.cache_nbytes() for layer in self.layers if layer.is_initialized for t in (layer.keys, layer.values)) + \
            sum(layer.sample_nbytes() for layer in self.layers)


class AntKVStaticLayer(StaticLayer):
    """HF's StaticLayer with compressed buffers: its keys and values are `StaticVQTensor`s of
    `max_cache_len` tokens (created at the first update, or by `initialize`), written by
    StaticLayer's own `index_copy_`. Without a codebook it fits a data-free one of `bits` to the
    first update's tokens, as AntKVLayer does (no online refinement: the buffers' codes are fixed)."""

    is_compileable = False  # patch() compiles the forward with the pass; HF's own auto-compile would not run it

    def __init__(self, max_cache_len: int, codebook: LayerCodebook | None, settings: CacheSettings, bits: float = 1.0, seed: int = 0):
        super().__init__(max_cache_len=max_cache_len)
        self.codebook, self.settings, self.bits, self.seed = codebook, settings, bits, seed
        self.is_initialized = False
        self.cumulative_length = torch.zeros((), dtype=torch.int64)

    def lazy_initialization(self, key_states, value_states=None, *args, **kwargs):
        value_states = key_states if value_states is None else value_states
        if self.codebook is None:
            self.codebook = datafree_codebook(key_states, value_states, self.bits, self.seed)
        self.initialize(key_states.shape[0], key_states.dtype, key_states.device)

    def initialize(self, batch: int, dtype: torch.dtype, device) -> None:
        """Allocate the compressed buffers (needs the codebook)."""
        self.dtype, self.device, self.batch_size = dtype, device, batch
        self.keys, self.values = (StaticVQTensor.empty(batch, side, self.max_cache_len, self.settings, dtype, device)
                                  for side in (self.codebook.key, self.codebook.value))  # fmt: skip
        self.cumulative_length = torch.zeros((), dtype=torch.int64, device=device)
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        """StaticLayer's update (positions from the tokens held, as transformers 5 computes them;
        transformers 4's StaticLayer takes cache_position and counts by reading the keys)."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n = key_states.shape[-2]
        position = torch.arange(n, device=self.device) + self.cumulative_length
        self.cumulative_length.add_(n)
        self.keys.index_copy_(2, position, key_states)
        self.values.index_copy_(2, position, value_states)
        return self.keys, self.values

    def get_seq_length(self, *args, **kwargs):
        return self.cumulative_length if self.is_initialized else 0

    def reset(self) -> None:
        if self.is_initialized:
            self.keys.zero_(), self.values.zero_(), self.cumulative_length.zero_()


def _holds_tokens(layer) -> bool:
    """An HF cache layer's buffers are allocated (transformers 5's is_initialized; 4's keys)."""
    return getattr(layer, "is_initialized", getattr(layer, "keys", None) is not None)


def compress_static(cache, codebooks: Codebooks | None, settings: CacheSettings, bits: float) -> bool:
    """Turn the full-attention layers of an HF StaticCache that holds nothing yet into compressed
    `AntKVStaticLayer`s (in place; sliding-window layers stay dense and the pass reports them).
    True if `cache` has static compressed layers not yet initialized: the caller runs this call
    eagerly, which allocates them (patch()). False for any other cache."""
    layers = getattr(cache, "layers", ())
    for i, layer in enumerate(layers):
        if type(layer) is StaticLayer and not _holds_tokens(layer):
            book = codebooks.layers[i] if codebooks is not None else None
            layers[i] = AntKVStaticLayer(layer.max_cache_len, book, settings, bits, i)
            if book is not None and i == 0:
                codebooks.check_positions(layer.max_cache_len)
    return any(isinstance(layer, AntKVStaticLayer) and not layer.is_initialized for layer in layers)


class AntKVStaticCache(Cache):
    """HF's StaticCache, compressed: every layer an `AntKVStaticLayer` of `max_cache_len` tokens
    (codes, anchor slots and the exact window preallocated; nothing reallocated or copied on a
    step). The cache torch.compile users run: under `patch(model)` a decode step is one graph of
    fixed shapes for every step up to capacity (the pass rewrites StaticLayer's `index_copy_` +
    SDPA into `antkv::static_attention_`). Tokens are written in order; `crop` is not supported.
    codebooks / bits / settings as for AntKVCache (no online refinement)."""

    def __init__(self, max_cache_len: int, codebooks: Codebooks | None = None, settings: CacheSettings | None = None, config=None,
                 bits: float = 1.0, num_layers: int | None = None, **setting_kwargs):  # fmt: skip
        if isinstance(max_cache_len, bool) or not isinstance(max_cache_len, int) or max_cache_len < 1:
            raise ValueError(f"max_cache_len must be a number of tokens >= 1, got {max_cache_len!r}")
        self.settings = resolve(codebooks, settings, **setting_kwargs)
        if codebooks is not None:
            if config is not None:
                codebooks.check_model(config)
            books = codebooks.layers
            codebooks.check_positions(max_cache_len)
        else:
            spec_for_bits(bits)
            n = num_layers or (config.get_text_config(decoder=True).num_hidden_layers if config is not None else None)
            if n is None:
                raise ValueError("AntKVStaticCache without codebooks needs config= (or num_layers=) to know how many layers to make")
            books = [None] * n
        super().__init__(layers=[AntKVStaticLayer(max_cache_len, book, self.settings, bits, i) for i, book in enumerate(books)])

    def cache_nbytes(self) -> int:
        """Bytes of the compressed buffers of all layers, whole (codebooks not included)."""
        return sum(t.cache_nbytes() for layer in self.layers if layer.is_initialized for t in (layer.keys, layer.values))


def antkv_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
    """HF attention function: SDPA with enable_gqa on a VQ cache (no repeat_kv), "sdpa" otherwise."""
    if isinstance(key, StaticVQTensor):  # the whole buffer, the mask hiding its unfilled slots (no slicing)
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling,
                                             is_causal=query.shape[2] > 1 and attention_mask is None, enable_gqa=query.shape[1] != key.shape[1])  # fmt: skip
        return out.transpose(1, 2).contiguous(), None
    if not isinstance(key, VQTensor):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, is_causal, **kwargs)
    q_len = query.shape[2]
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    is_causal = q_len > 1 and attention_mask is None and is_causal
    if is_causal and key.shape[2] > q_len:  # same as HF's sdpa: empty-static-cache prefill
        key, value = key[:, :, :q_len], value[:, :, :q_len]
    out = F.scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling, is_causal=is_causal,
        enable_gqa=query.shape[1] != key.shape[1],
    )  # fmt: skip
    return out.transpose(1, 2).contiguous(), None


ALL_ATTENTION_FUNCTIONS.register(ATTN_IMPLEMENTATION, antkv_attention_forward)
ALL_MASK_ATTENTION_FUNCTIONS.register(ATTN_IMPLEMENTATION, sdpa_mask)


def use_antkv_attention(model):
    """Switch `model` to the "antkv" attention implementation (in place); returns the model."""
    model.set_attn_implementation(ATTN_IMPLEMENTATION)
    return model


@contextlib.contextmanager
def attention_hook(model, hook: Callable):
    """Run `hook(module, query, key, value, attention_mask, scaling)` on every attention call of
    `model` (post-RoPE, before GQA repetition), then attend as "sdpa" would."""
    name = "antkv_hook"

    def forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
        hook(module, query, key, value, attention_mask, scaling)
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, is_causal, **kwargs)

    ALL_ATTENTION_FUNCTIONS.register(name, forward)
    ALL_MASK_ATTENTION_FUNCTIONS.register(name, sdpa_mask)
    previous = model.config._attn_implementation
    model.set_attn_implementation(name)
    try:
        yield
    finally:
        model.set_attn_implementation(previous)
