"""antkv-compile: AnTKV vector-quantized KV cache, read directly by attention.

    codebooks = antkv_compile.calibrate(model, token_ids, bits=1.0)
    cache = antkv_compile.AntKVCache(codebooks)
    model.generate(..., cache=cache)     # past_key_values=cache before transformers 5 (cache_keyword)

    model = torch.compile(model, backend=antkv_compile.antkv_backend, options={"codebooks": codebooks})
    model = antkv_compile.patch(hf_model, codebooks)     # generate() runs compiled
"""

import torch as _torch

from .cache import VQTensor, dequantize
from .calibrate import CalibrationData, calibrate, collect_calibration, fit_codebooks
from .compile.backend import AntKVBackend, CompressionError, antkv_backend, explain, mark_growing
from .compile.patch import patch
from .hf import AntKVCache, cache_keyword, use_antkv_attention
from .quant.codebook import Codebooks, CodebookSide, LayerCodebook
from .quant.pq import PQSpec
from .settings import CacheSettings

# A saved cache (torch.save of a VQTensor) loads with torch.load's default weights_only=True.
_torch.serialization.add_safe_globals([VQTensor, CacheSettings])

__all__ = [
    "AntKVBackend",
    "AntKVCache",
    "CacheSettings",
    "CalibrationData",
    "CodebookSide",
    "Codebooks",
    "CompressionError",
    "LayerCodebook",
    "PQSpec",
    "VQTensor",
    "antkv_backend",
    "cache_keyword",
    "calibrate",
    "collect_calibration",
    "dequantize",
    "explain",
    "fit_codebooks",
    "mark_growing",
    "patch",
    "use_antkv_attention",
]
