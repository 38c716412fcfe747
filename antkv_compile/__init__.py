"""antkv-compile: AnTKV vector-quantized KV cache, read directly by attention.

    codebooks = antkv_compile.calibrate(model, token_ids, bits=1.0)
    cache = antkv_compile.AntKVCache(codebooks)
    model.generate(..., cache=cache)     # past_key_values=cache before transformers 5 (cache_keyword)

    model = torch.compile(model, backend=antkv_compile.antkv_backend, options={"codebooks": codebooks})
    model = antkv_compile.patch(hf_model, codebooks)     # generate() runs compiled

The public names load on first use (the module's class checks each attribute access), so `import antkv_compile` and the `antkv` command
line (antkv_compile.cli: argparse before torch) start in a fraction of a second. The first access
to any of them imports them all, with what that registers: the antkv:: custom ops, the "antkv"
torch.compile backend name (also found without that through the torch_dynamo_backends entry point),
the "antkv" transformers attention implementation and the cache's classes as torch.load safe globals.
"""

import sys
import types
from typing import TYPE_CHECKING

__all__ = [
    "AntKVBackend",
    "AntKVCache",
    "AntKVStaticCache",
    "CacheSettings",
    "CalibrationData",
    "CodebookSide",
    "Codebooks",
    "CompressionError",
    "LayerCodebook",
    "PQSpec",
    "StaticVQTensor",
    "VQTensor",
    "antkv_backend",
    "cache_keyword",
    "calibrate",
    "collect_calibration",
    "dequantize",
    "explain",
    "fit_codebooks",
    "mark_growing",
    "model_rope",
    "patch",
    "use_antkv_attention",
]


_loaded = False


def _load() -> None:
    global _loaded
    _loaded = True
    import torch
    from torch._dynamo.backends import registry

    from .cache import StaticVQTensor, VQTensor, dequantize
    from .calibrate import CalibrationData, calibrate, collect_calibration, fit_codebooks
    from .compile.backend import AntKVBackend, CompressionError, antkv_backend, explain, mark_growing
    from .compile.patch import patch
    from .hf import AntKVCache, AntKVStaticCache, cache_keyword, use_antkv_attention
    from .quant.codebook import Codebooks, CodebookSide, LayerCodebook
    from .quant.pq import PQSpec
    from .quant.rope import of_model as model_rope
    from .settings import CacheSettings

    # A saved cache (torch.save of a VQTensor) loads with torch.load's default weights_only=True.
    torch.serialization.add_safe_globals([VQTensor, CacheSettings])
    # torch.compile(backend="antkv"): registered here, or, before the package is used, found by
    # Dynamo through the torch_dynamo_backends entry point (pyproject.toml) that names the same object.
    if "antkv" not in registry._COMPILER_FNS:
        registry.register_backend(antkv_backend, name="antkv")

    names = locals()
    globals().update({name: names[name] for name in __all__})


class _LazyModule(types.ModuleType):
    # __getattribute__, not a module __getattr__: importing the submodule antkv_compile.calibrate
    # (or .patch) first sets the package attribute of that name to the module, and the public
    # function must still win, as it did with eager imports.
    def __getattribute__(self, name: str):
        if not _loaded and name in __all__:
            _load()
        return super().__getattribute__(name)

    def __dir__(self):
        return sorted(set(super().__dir__()) | set(__all__))


sys.modules[__name__].__class__ = _LazyModule


if TYPE_CHECKING:  # for type checkers and IDEs; at run time _load imports these
    from .cache import StaticVQTensor, VQTensor, dequantize  # noqa: F401
    from .calibrate import CalibrationData, calibrate, collect_calibration, fit_codebooks  # noqa: F401
    from .compile.backend import AntKVBackend, CompressionError, antkv_backend, explain, mark_growing  # noqa: F401
    from .compile.patch import patch  # noqa: F401
    from .hf import AntKVCache, AntKVStaticCache, cache_keyword, use_antkv_attention  # noqa: F401
    from .quant.codebook import Codebooks, CodebookSide, LayerCodebook  # noqa: F401
    from .quant.pq import PQSpec  # noqa: F401
    from .settings import CacheSettings  # noqa: F401
