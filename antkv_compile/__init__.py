"""antkv-compile: AnTKV vector-quantized KV cache, read directly by attention.

    codebooks = antkv_compile.calibrate(model, token_ids, bits=1.0)
    cache = antkv_compile.AntKVCache(codebooks)
    model.generate(..., past_key_values=cache)

    model = torch.compile(model, backend=antkv_compile.antkv_backend, options={"codebooks": codebooks})
    model = antkv_compile.patch(hf_model, codebooks)     # generate() runs compiled

The public names load on first use (PEP 562), so `import antkv_compile` and the `antkv` command
line (antkv_compile.cli: argparse before torch) start in a fraction of a second. The first access
to any of them imports them all, with what that registers: the antkv:: custom ops, the "antkv"
torch.compile backend name and the "antkv" transformers attention implementation.
"""

import sys
import types
from typing import TYPE_CHECKING

__all__ = [
    "AntKVBackend",
    "AntKVCache",
    "CacheSettings",
    "CalibrationData",
    "Codebooks",
    "LayerCodebook",
    "PQSpec",
    "VQTensor",
    "antkv_backend",
    "calibrate",
    "collect_calibration",
    "dequantize",
    "explain",
    "fit_codebooks",
    "mark_growing",
    "patch",
    "use_antkv_attention",
]


_loaded = False


def _load() -> None:
    global _loaded
    _loaded = True
    from .backend import AntKVBackend, antkv_backend, explain, mark_growing
    from .cache import CacheSettings, VQTensor, dequantize
    from .calibrate import CalibrationData, calibrate, collect_calibration, fit_codebooks
    from .hf import AntKVCache, use_antkv_attention
    from .patch import patch
    from .quant.codebook import Codebooks, LayerCodebook
    from .quant.pq import PQSpec

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


if TYPE_CHECKING:  # for type checkers and IDEs; at run time __getattr__ loads these
    from .backend import AntKVBackend, antkv_backend, explain, mark_growing  # noqa: F401
    from .cache import CacheSettings, VQTensor, dequantize  # noqa: F401
    from .calibrate import CalibrationData, calibrate, collect_calibration, fit_codebooks  # noqa: F401
    from .hf import AntKVCache, use_antkv_attention  # noqa: F401
    from .patch import patch  # noqa: F401
    from .quant.codebook import Codebooks, LayerCodebook  # noqa: F401
    from .quant.pq import PQSpec  # noqa: F401
