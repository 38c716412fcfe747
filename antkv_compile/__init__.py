"""antkv-compile: AnTKV vector-quantized KV cache, read directly by attention.

    codebooks = antkv_compile.calibrate(model, token_ids, bits=1.0)
    cache = antkv_compile.AntKVCache(codebooks)
    model.generate(..., past_key_values=cache)
"""

from .cache import CacheSettings, VQTensor, dequantize
from .calibrate import CalibrationData, calibrate, collect_calibration, fit_codebooks
from .hf import AntKVCache, use_antkv_attention
from .quant.codebook import Codebooks, LayerCodebook
from .quant.pq import PQSpec

__all__ = [
    "AntKVCache",
    "CacheSettings",
    "CalibrationData",
    "Codebooks",
    "LayerCodebook",
    "PQSpec",
    "VQTensor",
    "calibrate",
    "collect_calibration",
    "dequantize",
    "fit_codebooks",
    "use_antkv_attention",
]
