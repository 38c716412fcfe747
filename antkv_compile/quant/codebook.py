"""Codebooks for a whole model, and their file format (safetensors + JSON metadata, never pickle).

One `LayerCodebook` per attention layer holds the key and the value centroids, each [Hkv, S, K, d]
with its own `PQSpec` (keys may get more bits than values), the mean quantization error per kv
head (the "expected error" of the Anchor Score) and, optionally, the key basis the key centroids
live in (quant/basis.py). The file records the model it was calibrated for,
so loading it onto another model fails with the field that differs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .pq import PQSpec

# 2: optional key basis (a reader of version 1 would ignore it and decode keys in the wrong basis).
FORMAT_VERSION = 2


@dataclass
class LayerCodebook:
    key_centroids: torch.Tensor  # [Hkv, S_k, K_k, d_k] float32
    value_centroids: torch.Tensor  # [Hkv, S_v, K_v, d_v] float32
    key_spec: PQSpec
    value_spec: PQSpec
    key_error: torch.Tensor  # [Hkv] mean ||k - decode(encode(k))|| on calibration data
    value_error: torch.Tensor  # [Hkv]
    key_basis: torch.Tensor | None = None  # [Hkv, D, D]: key centroids are centroids of k @ key_basis
    key_basis_inv: torch.Tensor | None = None

    def to(self, device) -> "LayerCodebook":
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return LayerCodebook(
            self.key_centroids.to(device), self.value_centroids.to(device), self.key_spec, self.value_spec,
            self.key_error.to(device), self.value_error.to(device), move(self.key_basis), move(self.key_basis_inv),
        )  # fmt: skip

    def tensors(self) -> list[torch.Tensor]:
        both = (self.key_centroids, self.value_centroids, self.key_error, self.value_error, self.key_basis, self.key_basis_inv)
        return [t for t in both if t is not None]

    @property
    def nbytes(self) -> int:
        """Centroids and basis: what a device must hold to run the layer (errors are a few floats)."""
        return sum(t.numel() * t.element_size() for t in (self.key_centroids, self.value_centroids, self.key_basis, self.key_basis_inv) if t is not None)


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
        return sum(l.key_spec.bits + l.value_spec.bits for l in self.layers) / (2 * len(self.layers))

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
            tensors[f"layers.{i}.key.centroids"] = layer.key_centroids.float().contiguous().cpu()
            tensors[f"layers.{i}.value.centroids"] = layer.value_centroids.float().contiguous().cpu()
            tensors[f"layers.{i}.key.error"] = layer.key_error.float().contiguous().cpu()
            tensors[f"layers.{i}.value.error"] = layer.value_error.float().contiguous().cpu()
            if layer.key_basis is not None:
                tensors[f"layers.{i}.key.basis"] = layer.key_basis.float().contiguous().cpu()
                tensors[f"layers.{i}.key.basis_inv"] = layer.key_basis_inv.float().contiguous().cpu()
            specs.append({"key": layer.key_spec.to_dict(), "value": layer.value_spec.to_dict()})
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
            LayerCodebook(
                tensors[f"layers.{i}.key.centroids"], tensors[f"layers.{i}.value.centroids"],
                PQSpec(**spec["key"]), PQSpec(**spec["value"]),
                tensors[f"layers.{i}.key.error"], tensors[f"layers.{i}.value.error"],
                tensors.get(f"layers.{i}.key.basis"), tensors.get(f"layers.{i}.key.basis_inv"),
            )  # fmt: skip
            for i, spec in enumerate(json.loads(meta["layers"]))
        ]
        books = cls(layers, json.loads(meta["fingerprint"]), json.loads(meta["settings"]))
        if config is not None:
            books.check_model(config)
        return books
