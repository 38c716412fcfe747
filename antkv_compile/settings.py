"""The cache settings: defined once, parsed in one place.

Every entry point (`AntKVCache`, `patch`, `antkv_backend` and its torch.compile `options`,
`explain`) takes the settings as keyword arguments and hands them to `resolve`, which applies, in
order: the defaults, what the codebooks were calibrated with (`Codebooks.settings["cache"]`),
then the caller's. A caller value that differs from the calibrated one is kept, with a warning.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass

import torch

EXACT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class CacheSettings:
    """window: exact recent tokens kept after a flush; anchor_frac: share of the encoded tokens kept
    exact as anchors (calibration weights tokens for the same share); error: Anchor Score with each
    token's 'actual' quantization error or the per-head 'expected' one; exact_dtype: dtype the exact
    rows (anchors, window) are stored in, None for the model's. In a float32 model, float16 halves
    their bytes, as a float16 KV cache (llama.cpp's default) does."""

    window: int = 32
    anchor_frac: float = 0.01
    error: str = "actual"
    exact_dtype: torch.dtype | None = None

    def __post_init__(self):
        if isinstance(self.window, bool) or not isinstance(self.window, int):
            raise TypeError(f"window must be an int (a number of tokens), got {self.window!r} of type {type(self.window).__name__}")
        if self.window < 0:
            raise ValueError(f"window must be >= 0 tokens, got {self.window}")
        if isinstance(self.anchor_frac, bool) or not isinstance(self.anchor_frac, (int, float)):
            raise TypeError(f"anchor_frac must be a float (a share of the tokens), got {self.anchor_frac!r} of type {type(self.anchor_frac).__name__}")
        if not 0 <= self.anchor_frac <= 1:
            raise ValueError(f"anchor_frac must be in [0, 1] (a share of the tokens), got {self.anchor_frac}")
        if self.error not in ("actual", "expected"):
            raise ValueError(f"error must be 'actual' or 'expected', got {self.error!r}")
        if self.exact_dtype is not None and self.exact_dtype not in EXACT_DTYPES:
            raise TypeError(f"exact_dtype must be None or one of {', '.join(map(str, EXACT_DTYPES))}, got {self.exact_dtype!r}")
        object.__setattr__(self, "anchor_frac", float(self.anchor_frac))

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["exact_dtype"] = None if self.exact_dtype is None else str(self.exact_dtype).removeprefix("torch.")
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "CacheSettings":
        d = {k: v for k, v in d.items() if k in NAMES}
        if d.get("exact_dtype") is not None:
            d["exact_dtype"] = getattr(torch, d["exact_dtype"])
        return cls(**d)


NAMES = tuple(f.name for f in dataclasses.fields(CacheSettings))
# What calibration depends on: the cache the codebooks were fitted for keeps this share exact.
CALIBRATED = ("anchor_frac",)


def split(options: dict) -> tuple[dict, dict]:
    """(cache settings, everything else) of a keyword dict."""
    ours = {k: v for k, v in options.items() if k in NAMES}
    return ours, {k: v for k, v in options.items() if k not in NAMES}


def calibrated(codebooks) -> dict:
    """The settings `codebooks` were calibrated with (files from before the "cache" record: the
    calibration's anchor_frac)."""
    if codebooks is None:
        return {}
    recorded = codebooks.settings.get("cache")
    if recorded is None and "anchor_frac" in codebooks.settings:
        recorded = {"anchor_frac": codebooks.settings["anchor_frac"]}
    return {k: v for k, v in (recorded or {}).items() if k in CALIBRATED}


def resolve(codebooks=None, settings: CacheSettings | None = None, **given) -> CacheSettings:
    """The one place settings are parsed: defaults < the codebooks' calibration < the caller's
    (`settings` or keyword arguments, not both). Unknown names raise a TypeError listing the
    known ones; a caller value that differs from the calibrated one warns."""
    if settings is not None:
        if given:
            raise TypeError(f"pass either settings=CacheSettings(...) or keyword settings, not both (got {sorted(given)})")
        given = {f: getattr(settings, f) for f in NAMES}
    unknown = set(given) - set(NAMES)
    if unknown:
        raise TypeError(f"unknown cache settings {sorted(unknown)}; the settings are {', '.join(NAMES)}")
    base = calibrated(codebooks)
    for name, value in given.items():
        if name in base and value != base[name]:
            warnings.warn(
                f"antkv: {name}={value!r}, but the codebooks were calibrated with {name}={base[name]!r}; "
                f"using {value!r} (recalibrate with this {name} for the best accuracy)",
                stacklevel=3,
            )
    return CacheSettings(**{**base, **given})
