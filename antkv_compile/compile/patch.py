"""`patch(hf_model, codebooks)`: a Hugging Face decoder whose forward runs through antkv_backend.

generate() keeps its default `DynamicCache`: the first compiled call concatenates its empty
tensors with the prompt's keys and values and writes back compressed caches (`VQTensor`s); every
later call appends to them. Greedy, sampling, left-padded batches and beam search work as with any
cache (beam search reorders the compressed cache through its batch index_select).
"""

from __future__ import annotations

import torch

from ..hf import use_antkv_attention
from ..quant.codebook import Codebooks
from .backend import AntKVBackend


def patch(model, codebooks: Codebooks | None = None, **settings):
    """Compile `model.forward` with antkv_backend (in place) and return the model.

    `settings` are the cache settings (window, anchor_frac, error, exact_dtype) and `inductor_config`. The model
    switches to the "antkv" attention implementation (SDPA with enable_gqa on compressed caches,
    no repeat_kv); `model.antkv_backend.sites` reports what the pass did.
    """
    if codebooks is not None:
        codebooks.check_model(model.config)
    backend = AntKVBackend(codebooks, **settings)
    use_antkv_attention(model)
    model.forward = torch.compile(model.forward, backend=backend)
    model.antkv_backend = backend
    return model
