"""Codebooks for a whole model, and their file format (safetensors + JSON metadata, never pickle).

One `LayerCodebook` per attention layer holds a `CodebookSide` for keys and one for values: the
centroids [Hkv, S, K, d] with their own `PQSpec` (keys may get more bits than values), the mean
quantization error per kv head (the "expected error" of the Anchor Score) and, optionally, the
basis the centroids live in (quant/basis.py; keys only). The file records the model it was calibrated for,
so loading it onto another model fails with the field that differs.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .pq import PQSpec

# 2: optional key basis (a reader of version 1 would ignore it and decode keys in the wrong basis).
FORMAT_VERSION = 2


@dataclass
class CodebookSide:
    """The codebook of one side (K or V) of one layer."""

    spec: PQSpec
    centroids: torch.Tensor  # [Hkv, S, K, d] float32
    error: torch.Tensor  # [Hkv] mean ||x - decode(encode(x))|| on calibration data
    basis: torch.Tensor | None = None  # [Hkv, D, D]: centroids are centroids of x @ basis (keys only)
    basis_inv: torch.Tensor | None = None

    TENSORS = ("centroids", "error", "basis", "basis_inv")

    def tensors(self) -> dict[str, torch.Tensor]:
        return {n: getattr(self, n) for n in self.TENSORS if getattr(self, n) is not None}

    def to(self, device) -> "CodebookSide":
        return dataclasses.replace(self, **{n: t.to(device) for n, t in self.tensors().items()})

    @property
    def nbytes(self) -> int:
        """Centroids and basis: what a device must hold to run the side (errors are a few floats)."""
        return sum(t.numel() * t.element_size() for n, t in self.tensors().items() if n != "error")


@dataclass
class LayerCodebook:
    key: CodebookSide
    value: CodebookSide

    def sides(self) -> dict[str, CodebookSide]:
        return {"key": self.key, "value": self.value}

    def to(self, device) -> "LayerCodebook":
        return LayerCodebook(self.key.to(device), self.value.to(device))

    def tensors(self) -> list[torch.Tensor]:
        return [t for side in self.sides().values() for t in side.tensors().values()]

    @property
    def nbytes(self) -> int:
        return self.key.nbytes + self.value.nbytes


def model_fingerprint(config) -> dict:
    """What a codebook depends on: the architecture and the shape of every layer's K and V."""
    config = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    num_heads = config.num_attention_heads
    return {
        "model_type": getattr(config, "model_type", "unknown"),
        "num_hidden_layers": config.num_hidden_layers,
        "num_key_value_heads": getattr(config, "num_key_value_heads", None) or num_heads,
        "head_dim": getattr(config, "head_dim", None) or config.hidden_size // num_heads,
    }


@dataclass
class Codebooks:
    layers: list[LayerCodebook]
    fingerprint: dict
    settings: dict = field(default_factory=dict)  # budget, K/V allocation, calibration details

    def __getitem__(self, layer_idx: int) -> LayerCodebook:
        return self.layers[layer_idx]

    def __len__(self) -> int:
        return len(self.layers)

    @property
    def nbytes(self) -> int:
        return sum(layer.nbytes for layer in self.layers)

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor of the codebooks: shared by all caches, so not counted as cache bytes."""
        return [t for layer in self.layers for t in layer.tensors()]

    @property
    def average_bits(self) -> float:
        return sum(l.key.spec.bits + l.value.spec.bits for l in self.layers) / (2 * len(self.layers))

    def check_model(self, config) -> None:
        """Raise a ValueError naming every field where `config` differs from the calibrated model."""
        expected, actual = self.fingerprint, model_fingerprint(config)
        diffs = [f"{k}: codebooks have {expected.get(k)!r}, model has {v!r}" for k, v in actual.items() if expected.get(k) != v]
        if diffs:
            raise ValueError(
                "these codebooks were calibrated for a different model (" + "; ".join(diffs) + "). "
                "Calibrate codebooks for this model with antkv_compile.calibrate(model, texts)."
            )

    def save(self, path: str | Path) -> None:
        tensors, specs = {}, []
        for i, layer in enumerate(self.layers):
            for what, side in layer.sides().items():
                for name, t in side.tensors().items():
                    tensors[f"layers.{i}.{what}.{name}"] = t.float().contiguous().cpu()
            specs.append({what: side.spec.to_dict() for what, side in layer.sides().items()})
        meta = {
            "format": "antkv-codebooks",
            "version": str(FORMAT_VERSION),
            "fingerprint": json.dumps(self.fingerprint),
            "layers": json.dumps(specs),
            "settings": json.dumps(self.settings),
        }
        save_file(tensors, str(path), metadata=meta)

    @classmethod
    def load(cls, path: str | Path, config=None, device="cpu") -> "Codebooks":
        """Load a codebook file; with `config`, check it matches the model first."""
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        if meta.get("format") != "antkv-codebooks":
            raise ValueError(f"{path} is not an antkv codebook file (no 'antkv-codebooks' metadata)")
        if int(meta["version"]) > FORMAT_VERSION:
            raise ValueError(f"{path} has codebook format version {meta['version']}; this antkv_compile reads up to {FORMAT_VERSION}")
        tensors = load_file(str(path), device=str(device))
        layers = [
            LayerCodebook(*(
                CodebookSide(PQSpec(**spec[what]), **{n: tensors.get(f"layers.{i}.{what}.{n}") for n in CodebookSide.TENSORS})
                for what in ("key", "value")
            ))
            for i, spec in enumerate(json.loads(meta["layers"]))
        ]
        books = cls(layers, json.loads(meta["fingerprint"]), json.loads(meta["settings"]))
        if config is not None:
            books.check_model(config)
        return books
