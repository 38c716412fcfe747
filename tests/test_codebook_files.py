"""Codebook files are validated when loaded (and codebooks when fitted): every problem of a file is
named, one line each, in one ValueError that names the file."""

import json

import pytest
import torch
from helpers import random_codebooks
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import antkv_compile as ak

FINGERPRINT = {"model_type": "llama", "num_hidden_layers": 2, "num_key_value_heads": 2, "head_dim": 16}


@pytest.fixture
def good(tmp_path):
    books = random_codebooks(2, 2, 16, bits=1.0, key_basis=True)
    books.fingerprint = dict(FINGERPRINT)
    path = tmp_path / "good.safetensors"
    books.save(path)
    return path


def _edit(path, tmp_path, tensors=None, meta=None):
    """A copy of the file at `path` with `tensors(dict)` / `meta(dict)` applied to its contents."""
    t = load_file(str(path))
    with safe_open(str(path), framework="pt") as f:
        m = dict(f.metadata())
    if tensors:
        tensors(t)
    if meta:
        meta(m)
    out = tmp_path / "edited.safetensors"
    save_file(t, str(out), metadata=m)
    return out


def _problems(path):
    with pytest.raises(ValueError) as info:
        ak.Codebooks.load(path)
    message = str(info.value)
    assert message.startswith(str(path)), message
    return message


def test_a_good_file_round_trips(good):
    books = ak.Codebooks.load(good)
    assert len(books) == 2 and books.fingerprint == FINGERPRINT
    assert books[1].key.basis.shape == (2, 16, 16) and books[1].value.basis is None


@pytest.mark.parametrize("name, value", [("centroids", float("nan")), ("centroids", float("inf")), ("error", float("-inf")), ("basis", float("nan"))])
def test_non_finite_tensors_are_rejected(good, tmp_path, name, value):
    def poison(t):
        t[f"layers.1.key.{name}"].view(-1)[1] = value

    assert f"layers.1.key.{name}: 1 non-finite values" in _problems(_edit(good, tmp_path, poison))


def test_bytes_overwritten_in_the_file_are_rejected(good, tmp_path):
    data = bytearray(good.read_bytes())
    data[-64:] = b"\xff" * 64  # the end of the last tensor: NaN bit patterns
    bad = tmp_path / "overwritten.safetensors"
    bad.write_bytes(bytes(data))
    assert "non-finite values" in _problems(bad)


def test_an_edited_spec_no_longer_fits_the_tensors(good, tmp_path):
    def spec(m):
        layers = json.loads(m["layers"])
        layers[0]["value"] = {"sub_dim": 4, "code_bits": 8}  # 2 bits claimed, 1-bit tensors stored
        m["layers"] = json.dumps(layers)

    msg = _problems(_edit(good, tmp_path, meta=spec))
    assert "layers.0.value.centroids: shape [2, 2, 256, 8], expected [2, 4, 256, 4]" in msg


def test_layer_count_error_length_and_missing_tensors(good, tmp_path):
    def tensors(t):
        t["layers.0.value.error"] = torch.rand(3)
        del t["layers.1.key.centroids"]

    def meta(m):
        m["fingerprint"] = json.dumps({**FINGERPRINT, "num_hidden_layers": 3})

    msg = _problems(_edit(good, tmp_path, tensors, meta))
    lines = [l for l in msg.splitlines() if l.startswith("  - ")]
    assert "3 problems" in msg and len(lines) == 3, msg
    assert "2 layers, but the fingerprint's model has num_hidden_layers=3" in msg
    assert "layers.0.value.error: shape [3], expected [2]" in msg
    assert "layers.1.key.centroids: missing" in msg


def test_kv_heads_and_head_dim_come_from_the_fingerprint(good, tmp_path):
    def meta(m):
        m["fingerprint"] = json.dumps({**FINGERPRINT, "num_key_value_heads": 4, "head_dim": 32})

    msg = _problems(_edit(good, tmp_path, meta=meta))
    assert "layers.0.key.centroids: shape [2, 2, 256, 8], expected [4, 4, 256, 8]" in msg
    assert "layers.1.key.basis: shape [2, 16, 16], expected [4, 32, 32]" in msg


@pytest.mark.parametrize("name", ["fingerprint", "layers", "version"])
def test_missing_metadata(good, tmp_path, name):
    assert f"metadata '{name}' is missing" in _problems(_edit(good, tmp_path, meta=lambda m: m.pop(name)))


@pytest.mark.parametrize("version, why", [("x", "not a format version"), ("0", "not a format version"), ("3", "newer than this antkv_compile reads")])
def test_bad_or_too_new_version(good, tmp_path, version, why):
    assert why in _problems(_edit(good, tmp_path, meta=lambda m: m.update(version=version)))


def test_a_basis_inverse_that_is_not_its_inverse_and_a_singular_basis(good, tmp_path):
    def tensors(t):
        t["layers.0.key.basis_inv"] = t["layers.0.key.basis_inv"] * 1.01
        basis = t["layers.1.key.basis"].clone()
        basis[1, :, 0] = basis[1, :, 1]  # two equal columns
        t["layers.1.key.basis"] = basis

    msg = _problems(_edit(good, tmp_path, tensors))
    assert "layers.0.key.basis_inv: not the inverse of basis" in msg
    assert "layers.1.key.basis: singular or nearly so" in msg


def test_a_truncated_file_names_its_path(good, tmp_path):
    bad = tmp_path / "truncated.safetensors"
    bad.write_bytes(good.read_bytes()[:-100])
    with pytest.raises(ValueError, match=r"truncated\.safetensors: cannot read the codebook file .*truncated or corrupt"):
        ak.Codebooks.load(bad)


def test_fitting_rejects_non_finite_calibration_data():
    g = torch.Generator().manual_seed(0)
    keys = [torch.randn(1, 2, 64, 16, generator=g) for _ in range(2)]
    keys[1][0, 1, 5, 3] = float("nan")
    data = ak.CalibrationData(
        keys=keys, values=[torch.randn(1, 2, 64, 16, generator=g) for _ in range(2)],
        s1=[torch.rand(1, 2, 64, generator=g) for _ in range(2)], s0=[torch.rand(1, 2, 64, generator=g) for _ in range(2)],
        probe_q=[torch.randn(1, 4, 8, 16, generator=g) for _ in range(2)], scale=[0.25, 0.25], fingerprint=dict(FINGERPRINT),
    )  # fmt: skip
    with pytest.raises(ValueError, match="calibration data has NaN / Inf in layer 1 keys"):
        ak.fit_codebooks(data, bits=1.0, kv_split="equal", iters=1, kmeans_tokens=64, key_basis=False, progress=False)
    data.keys[1][0, 1, 5, 3] = 0.0
    books = ak.fit_codebooks(data, bits=1.0, kv_split="equal", iters=1, kmeans_tokens=64, key_basis=False, progress=False)
    assert not books.problems()
    books.layers[0].value.centroids[0, 0, 0, 0] = float("nan")  # what a k-means gone wrong would leave
    with pytest.raises(ValueError, match="layers.0.value.centroids: 1 non-finite"):
        books.validate()
