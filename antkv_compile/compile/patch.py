"""`patch(hf_model, codebooks)`: a Hugging Face decoder whose forward runs through antkv_backend.

generate() keeps its default `DynamicCache`: the first compiled call concatenates its empty
tensors with the prompt's keys and values and writes back compressed caches (`VQTensor`s); every
later call appends to them. With a static cache (`generate(cache_implementation="static")`, or an
HF StaticCache passed in), its full-attention layers become compressed static layers
(hf.compress_static) before their first call, which runs eagerly (it allocates the buffers, fitting
data-free codebooks to the prompt without calibrated ones); every later call runs one compiled
graph of fixed shapes. Greedy, sampling, left-padded batches and beam search work as with any
cache (beam search reorders the compressed cache through its batch index_select).

Each patched model compiles its own code object (backend.own_code): transformers models all share
one forward code object, and Dynamo keeps graphs, recompile counts and automatic-dynamic state per
code object. A change of batch size is caught before the compiled call (a clear error; a cache
belongs to its batch).
"""

from __future__ import annotations

import functools
import itertools

import torch

from ..quant.rope import of_model as rope_of_model
from ..hf import _DEFAULT, REFINE_INIT, REFINE_ITERS, check_batch, collect_after_call, compress_static, refine_setting, use_antkv_attention
from ..quant.codebook import Codebooks
from .backend import AntKVBackend, mark_growing, own_code

_MODEL_IDS = itertools.count()


def patch(model, codebooks: Codebooks | None = None, *, refine: int | tuple[int, int] | None = _DEFAULT, refine_iters: int = REFINE_ITERS,
          refine_init: str = REFINE_INIT, **settings):
    """Compile `model.forward` with antkv_backend (in place) and return the model.

    codebooks: calibrated `Codebooks`, or None: each layer fits a data-free codebook (`bits`, default
    1.0) to its first call's keys and values (quant/datafree.py) and, with `refine` (default
    hf.REFINE_TOKENS; None or 0: off), refines it online as AntKVCache does: between calls, this
    wrapper keeps the stored rows of each compressed layer's tokens (the newest window rows) in a
    sample on the cache layer and switches its caches to a refined codebook at each count of the
    `refine` schedule (hf.refine_schedule: N, or (FIRST, CAP) doubling; `refine_iters` and
    `refine_init` as for AntKVCache; the model's RoPE, when quant/rope.of_model can read it, as
    AntKVCache's `rope`, so the last switch serves the model's whole context). `settings` are the cache settings (window, anchor_frac, error, exact_dtype), `inductor`,
    `inductor_config` and `on_nothing_compressed` ("error", the default: a graph with a KV cache
    whose every attention site is declined raises `CompressionError`; "warn": it runs dense with a
    warning). The model switches to the "antkv" attention implementation (SDPA with enable_gqa on
    compressed caches, no repeat_kv); `model.antkv_backend.sites` reports what the pass did.
    """
    if codebooks is not None:
        codebooks.check_model(model.config)
    refinement = refine_setting(codebooks, refine, refine_iters, refine_init, rope_of_model(model) if codebooks is None else None)
    backend = AntKVBackend(codebooks, **settings)
    use_antkv_attention(model)
    original = getattr(model, "antkv_original_forward", model.forward)  # patching again replaces the first patch
    forward = own_code(original, f"antkv_forward_{next(_MODEL_IDS)}_{type(model).__name__}")
    compiled = torch.compile(forward, backend=backend)

    @functools.wraps(original, updated=())
    def checked(*args, **kwargs):  # outside the compiled region: a batch change never reaches Dynamo
        ids = args[0] if args else kwargs.get("input_ids", kwargs.get("inputs_embeds"))
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if ids is not None and cache is not None:
            check_batch(cache, ids.shape[0])
        if compress_static(cache, codebooks, backend.settings, backend.bits):  # a static cache's first call: eager
            return original(*args, **kwargs)
        if codebooks is not None and cache is not None:
            out = compiled(*args, **kwargs)
            length = cache.get_seq_length()
            if isinstance(length, int):  # a growing cache (a static one is a tensor: checked at allocation, no device sync)
                codebooks.check_positions(length)
            return out
        if refinement is None or cache is None:
            return compiled(*args, **kwargs)
        before = [layer.get_seq_length() for layer in getattr(cache, "layers", ())]
        out = compiled(*args, **kwargs)
        for layer in collect_after_call(cache, before, refinement):  # re-encoded: new caches
            layer.keys, layer.values = mark_growing(layer.keys), mark_growing(layer.values)
        return out

    model.forward = checked
    if hasattr(model.generation_config, "disable_compile"):  # the forward is compiled here; HF's auto-compile would skip the pass
        model.generation_config.disable_compile = True
    model.antkv_backend, model.antkv_original_forward = backend, original
    return model
