"""Calibrated codebooks cached on disk, keyed by the model and the calibration settings.

    books, path, hit = cached_calibrate(model, ids, bits=1.0, seq_len=1024, max_tokens=4096)

The first run calibrates and saves the codebooks (the usual safetensors file of Codebooks.save)
under cache_dir(); the next run with the same model weights, calibration tokens and settings
loads them instead (seconds instead of minutes); `recalibrate=True` fits them again and replaces
the file. The directory is $ANTKV_CACHE_DIR, else $XDG_CACHE_HOME/antkv, else ~/.cache/antkv.

The key hashes what the codebooks depend on: the model's architecture fingerprint, its dtype and
a strided sample of every weight (a fine-tune of the same architecture gets its own file), the
calibration token ids themselves, every calibration setting, and the codebook file format.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import warnings
from pathlib import Path

import torch

from .calibrate import calibrate, fit_codebooks
from .quant.codebook import FORMAT_VERSION, Codebooks, model_fingerprint

WEIGHT_SAMPLE = 4096  # elements hashed per weight tensor


def cache_dir() -> Path:
    """$ANTKV_CACHE_DIR, else $XDG_CACHE_HOME/antkv, else ~/.cache/antkv."""
    if os.environ.get("ANTKV_CACHE_DIR"):
        return Path(os.environ["ANTKV_CACHE_DIR"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "antkv"
    return Path.home() / ".cache" / "antkv"


def model_digest(model) -> str:
    """Hash of the architecture fingerprint, parameter names, shapes, dtypes and a strided sample of
    each parameter's values: changes when the weights do, costs milliseconds, not a pass over them."""
    h = hashlib.sha256(json.dumps(model_fingerprint(model.config), sort_keys=True).encode())
    for name, p in model.state_dict().items():
        flat = p.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // WEIGHT_SAMPLE)][:WEIGHT_SAMPLE]
        h.update(f"{name}:{tuple(p.shape)}:{p.dtype};".encode())
        h.update(sample.to("cpu", torch.float64).numpy().tobytes())
    return h.hexdigest()


def cache_key(model, ids: torch.Tensor, settings: dict) -> str:
    ids = torch.as_tensor(ids).flatten().to("cpu", torch.int64)
    h = hashlib.sha256()
    h.update(model_digest(model).encode())
    h.update(hashlib.sha256(ids.numpy().tobytes()).hexdigest().encode())
    h.update(json.dumps({**settings, "format": FORMAT_VERSION}, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


def calibration_settings(bits: float, **settings) -> dict:
    """Every setting calibrate() will use, defaults filled in: an argument passed at its default
    value and one left out give the same key (and a changed default, another)."""
    defaults = {
        name: p.default
        for fn in (calibrate, fit_codebooks)
        for name, p in inspect.signature(fn).parameters.items()
        if p.default is not inspect.Parameter.empty and name not in ("progress", "tokenizer", "bits")
    }
    unknown = set(settings) - set(defaults)
    if unknown:
        raise TypeError(f"cached_calibrate got unknown calibration settings {sorted(unknown)}; known: {sorted(defaults)}")
    return {**defaults, **settings, "bits": float(bits)}


def cache_path(model, ids, bits: float, **settings) -> Path:
    """Where cached_calibrate keeps the codebooks of these arguments."""
    model_type = model_fingerprint(model.config)["model_type"]
    return cache_dir() / f"{model_type}-{bits:g}bit-{cache_key(model, ids, calibration_settings(bits, **settings))}.safetensors"


def cached_calibrate(model, ids, bits: float = 1.0, recalibrate: bool = False, progress: bool = True, **settings) -> tuple[Codebooks, Path, bool]:
    """`calibrate(model, ids, bits, **settings)`, or its earlier result from the cache directory.

    `ids` are token ids (tokenize text first: the key hashes the ids). Returns (codebooks, path of
    the cached file, True if it was loaded rather than calibrated). A cached file that cannot be
    read (truncated, other format) is recalibrated and replaced, with a warning."""
    path = cache_path(model, ids, bits, **settings)
    if path.exists() and not recalibrate:
        try:
            return Codebooks.load(path, config=model.config), path, True
        except Exception as e:  # noqa: BLE001  (any unreadable file: refit it)
            warnings.warn(f"cached codebooks {path} could not be loaded ({e}); calibrating again", stacklevel=2)
    books = calibrate(model, ids, bits=bits, progress=progress, **settings)
    atomic_write(path, books.save)
    return books, path, False


def atomic_write(path: Path, write) -> None:
    """`write(tmp)` to a temporary file beside `path`, then renamed onto it: a concurrent reader
    sees the old file or the whole new one, never a partial one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    write(tmp)
    os.replace(tmp, path)
