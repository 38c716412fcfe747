"""Codebooks for a whole model, and their file format (safetensors + JSON metadata, never pickle).

One `LayerCodebook` per attention layer holds a `CodebookSide` for keys and one for values: the
centroids [Hkv, S, K, d] with their own `PQSpec` (keys may get more bits than values), the mean
quantization error per kv head (the "expected error" of the Anchor Score) and, optionally, the
basis the centroids live in (quant/basis.py; keys only). The file records the model it was calibrated for,
so loading it onto another model fails with the field that differs.
"""

from __future__ import annotations

import dataclasses
import warnings
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .pq import PQSpec

# 2: optional key basis (a reader of version 1 would ignore it and decode keys in the wrong basis).
FORMAT_VERSION = 2
# basis_inv @ basis may differ from the identity by float32 rounding, never by more than this.
BASIS_INVERSE_TOL = 1e-3


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

    def check_positions(self, tokens: int) -> None:
        """Warn when a cache of these codebooks holds (or is allocated for) more tokens than the
        positions calibration covered (its sequences' length, or calibrate's positions=): its keys
        there are post-RoPE rotations the codebooks never saw,
        so their error grows with the position (SmolLM2, 1 bit, 1024-token sequences,
        benchmarks/position_probe.py: relative key error 0.025-0.038 below position 1024, 0.105 at
        1024-2048, 0.321 at 4096-8192; perplexity 4.96x FP at 8192 tokens). Once per `Codebooks`;
        files without the record are not checked."""
        positions = (self.settings or {}).get("calibration_positions")
        if positions and tokens > positions and not getattr(self, "_warned_positions", False):
            self._warned_positions = True  # once per codebooks: every later step is past it too
            warnings.warn(
                f"antkv: this cache holds {tokens} tokens, but its codebooks were calibrated on positions below {positions}: "
                f"keys past position {positions} are quantized with an error that grows with the position (perplexity "
                f"several times FP's at 8x the calibrated positions). Calibrate over the contexts you generate: "
                f"ak.calibrate(model, texts, positions=N) (the sequences spread over N positions, as cheap as short ones) "
                f"or seq_len=N.",
                stacklevel=3,
            )

    def check_model(self, config) -> None:
        """Raise a ValueError naming every field where `config` differs from the calibrated model."""
        expected, actual = self.fingerprint, model_fingerprint(config)
        diffs = [f"{k}: codebooks have {expected.get(k)!r}, model has {v!r}" for k, v in actual.items() if expected.get(k) != v]
        if diffs:
            raise ValueError(
                "these codebooks were calibrated for a different model (" + "; ".join(diffs) + "). "
                "Calibrate codebooks for this model with antkv_compile.calibrate(model, texts)."
            )

    def problems(self) -> list[str]:
        """Every way these codebooks disagree with their spec and fingerprint, one line each: tensor
        shapes ([kv heads, head_dim / sub_dim subspaces, 2^code_bits centroids, sub_dim], error
        vectors of kv heads, bases [kv heads, head_dim, head_dim]), missing tensors, non-finite
        values, a basis that is singular or whose stored inverse is not its inverse, a layer count
        other than the fingerprint's. Sizes the fingerprint lacks come from each layer's key centroids."""
        fp, problems = self.fingerprint or {}, []
        if "num_hidden_layers" in fp and fp["num_hidden_layers"] != len(self.layers):
            problems.append(f"{len(self.layers)} layers, but the fingerprint's model has num_hidden_layers={fp['num_hidden_layers']}")
        for i, layer in enumerate(self.layers):
            for what, side in layer.sides().items():
                problems += _side_problems(f"layers.{i}.{what}", side, fp, layer.key.centroids)
        return problems

    def validate(self, origin: str = "codebooks") -> "Codebooks":
        """Raise one ValueError listing every problem (see `problems`), naming `origin`; else self."""
        problems = self.problems()
        if problems:
            raise _invalid(origin, problems)
        return self

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
        """Load a codebook file, validated (metadata, every tensor's shape against the spec and the
        fingerprint, finite values, key bases): one ValueError lists every problem found. With
        `config`, also check it matches the model."""
        from safetensors import safe_open

        path = str(path)
        try:
            with safe_open(path, framework="pt") as f:
                meta = f.metadata() or {}
            tensors = load_file(path, device=str(device))
        except FileNotFoundError:
            raise
        except Exception as e:  # safetensors' own error on a truncated or corrupt file
            raise ValueError(f"{path}: cannot read the codebook file ({type(e).__name__}: {e}); it is truncated or corrupt: save or copy it again") from e
        if meta.get("format") != "antkv-codebooks":
            raise ValueError(f"{path} is not an antkv codebook file (no 'antkv-codebooks' metadata)")
        problems = []
        version = meta.get("version")
        if version is None:
            problems.append("metadata 'version' is missing")
        elif not version.isdigit() or int(version) < 1:
            problems.append(f"metadata 'version' is {version!r}, not a format version (1 .. {FORMAT_VERSION})")
        elif int(version) > FORMAT_VERSION:
            problems.append(f"format version {version} is newer than this antkv_compile reads (up to {FORMAT_VERSION}): upgrade antkv_compile")

        def parsed(name, kind, default=None):
            if name not in meta:
                if default is None:
                    problems.append(f"metadata '{name}' is missing")
                return default
            try:
                value = json.loads(meta[name])
            except ValueError as e:
                problems.append(f"metadata '{name}' is not JSON ({e})")
                return default
            if not isinstance(value, kind):
                problems.append(f"metadata '{name}' is a {type(value).__name__}, not a {kind.__name__}")
                return default
            return value

        fingerprint = parsed("fingerprint", dict)
        specs = parsed("layers", list)
        settings = parsed("settings", dict, default={})
        for key in ("num_hidden_layers", "num_key_value_heads", "head_dim"):
            if fingerprint is not None and not isinstance(fingerprint.get(key), int):
                problems.append(f"fingerprint has no integer {key!r} (got {fingerprint.get(key)!r})")
        layers, used = [], set()
        for i, spec in enumerate(specs or []):
            sides = []
            for what in ("key", "value"):
                names = {n: f"layers.{i}.{what}.{n}" for n in CodebookSide.TENSORS}
                used.update(names.values())
                try:
                    pq = PQSpec(**spec[what])
                except (TypeError, KeyError, ValueError) as e:
                    problems.append(f"layers.{i}.{what}: bad spec {spec.get(what) if isinstance(spec, dict) else spec!r} ({e})")
                    pq = None
                sides.append(CodebookSide(pq, **{n: tensors.get(name) for n, name in names.items()}))
            layers.append(LayerCodebook(*sides))
        extra = sorted(set(tensors) - used)
        if extra:
            problems.append(f"tensors no layer spec describes: {', '.join(extra[:8])}{' ...' if len(extra) > 8 else ''}")
        books = cls(layers, fingerprint or {}, settings)
        if specs is not None:
            problems += books.problems()
        if problems:
            raise _invalid(path, problems)
        if config is not None:
            books.check_model(config)
        return books


def _invalid(origin: str, problems: list[str]) -> ValueError:
    lines = "\n".join(f"  - {p}" for p in problems)
    return ValueError(
        f"{origin}: invalid antkv codebooks ({len(problems)} problem{'s' * (len(problems) > 1)}):\n{lines}\n"
        "Calibrate again (antkv_compile.calibrate) and save, or restore the file."
    )


def _side_problems(where: str, side: CodebookSide, fp: dict, key_centroids) -> list[str]:
    """The problems of one side (see Codebooks.problems)."""
    spec = side.spec
    if spec is None:
        return []  # its spec is already reported
    fallback = key_centroids if isinstance(key_centroids, torch.Tensor) and key_centroids.dim() == 4 else None
    heads = fp.get("num_key_value_heads") if isinstance(fp.get("num_key_value_heads"), int) else (fallback.shape[0] if fallback is not None else None)
    head_dim = fp.get("head_dim") if isinstance(fp.get("head_dim"), int) else (fallback.shape[1] * fallback.shape[3] if fallback is not None else None)
    problems = []
    subspaces = None
    if head_dim is not None:
        if head_dim % spec.sub_dim:
            problems.append(f"{where}: sub_dim {spec.sub_dim} does not divide head_dim {head_dim}")
        else:
            subspaces = head_dim // spec.sub_dim
    want = {
        "centroids": ((heads, subspaces, spec.num_centroids, spec.sub_dim), "[kv heads, head_dim / sub_dim, 2^code_bits, sub_dim]"),
        "error": ((heads,), "[kv heads]"),
        "basis": ((heads, head_dim, head_dim), "[kv heads, head_dim, head_dim]"),
        "basis_inv": ((heads, head_dim, head_dim), "[kv heads, head_dim, head_dim]"),
    }
    ok = {}
    for name, (shape, meaning) in want.items():
        t = getattr(side, name)
        if t is None:
            if name in ("centroids", "error"):
                problems.append(f"{where}.{name}: missing")
            continue
        if t.dim() != len(shape) or any(w is not None and w != g for w, g in zip(shape, t.shape)):
            expected = "[" + ", ".join("?" if w is None else str(w) for w in shape) + "]"
            problems.append(f"{where}.{name}: shape {list(t.shape)}, expected {expected} {meaning} for {spec.code_bits}-bit codes of {spec.sub_dim} dims")
        elif not torch.isfinite(t).all():
            problems.append(f"{where}.{name}: {int((~torch.isfinite(t)).sum())} non-finite values (NaN / Inf)")
        else:
            ok[name] = t
    if (side.basis is None) != (side.basis_inv is None):
        problems.append(f"{where}: a key basis needs both basis and basis_inv, the file has only {'basis' if side.basis is not None else 'basis_inv'}")
    elif "basis" in ok and "basis_inv" in ok:
        a, a_inv = ok["basis"].double(), ok["basis_inv"].double()
        cond = torch.linalg.cond(a)
        if not bool((cond < 1e6).all()):
            problems.append(f"{where}.basis: singular or nearly so (condition number {cond.max().item():.3g}): keys could not be mapped back")
        else:
            eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
            off = (a_inv @ a - eye).abs().amax().item()
            if off > BASIS_INVERSE_TOL:
                problems.append(f"{where}.basis_inv: not the inverse of basis (max |basis_inv @ basis - I| = {off:.3g} > {BASIS_INVERSE_TOL:g})")
    return problems
