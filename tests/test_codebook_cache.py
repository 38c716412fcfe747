"""Codebooks cached per model and calibration settings (antkv_compile.codebook_cache)."""

import warnings
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from antkv_compile import calibrate as ak_calibrate
from antkv_compile.codebook_cache import cache_dir, cached_calibrate

FIT = dict(seq_len=64, max_tokens=128, kmeans_tokens=128, iters=2)


def _tiny(seed):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, max_position_embeddings=128)  # fmt: skip
    return LlamaForCausalLM(cfg).eval()


def _same(a, b):
    return all(torch.equal(x, y) for x, y in zip(a.tensors(), b.tensors(), strict=True))


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("ANTKV_CACHE_DIR", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home/.cache/antkv"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg/antkv"
    monkeypatch.setenv("ANTKV_CACHE_DIR", str(tmp_path / "mine"))
    assert cache_dir() == tmp_path / "mine"


def test_cached_codebooks_are_reused_only_for_the_same_model_data_and_settings(monkeypatch, tmp_path):
    monkeypatch.setenv("ANTKV_CACHE_DIR", str(tmp_path))
    model, ids = _tiny(0), torch.randint(0, 64, (128,))
    books, path, hit = cached_calibrate(model, ids, bits=1.0, progress=False, **FIT)
    assert not hit and path.parent == tmp_path and path.exists()
    # what was cached is what calibrate() gives for the same arguments
    assert _same(books, ak_calibrate(model, ids, bits=1.0, progress=False, **FIT))

    again, path2, hit = cached_calibrate(model, ids, bits=1.0, progress=False, **FIT)
    assert hit and path2 == path and _same(again, books) and again.settings == books.settings
    # a setting passed at calibrate's default is the same calibration as one left out
    _, path3, hit = cached_calibrate(model, ids, bits=1, kv_split="auto", anchor_frac=0.01, progress=False, **FIT)
    assert hit and path3 == path
    with pytest.raises(TypeError, match="unknown calibration settings.*'itres'"):
        cached_calibrate(model, ids, itres=3, **FIT)

    # anything the codebooks depend on gives another file
    other_ids = ids.clone()
    other_ids[5] = (other_ids[5] + 1) % 64
    tuned = _tiny(0)
    with torch.no_grad():
        tuned.model.layers[1].self_attn.k_proj.weight[3, 7] += 0.5
    for m, i, bits, fit in [(model, other_ids, 1.0, FIT), (model, ids, 2.0, FIT), (model, ids, 1.0, {**FIT, "iters": 3}),
                            (tuned, ids, 1.0, FIT), (_tiny(1), ids, 1.0, FIT)]:  # fmt: skip
        _, p, hit = cached_calibrate(m, i, bits=bits, progress=False, **fit)
        assert not hit and p != path
    assert len(list(Path(tmp_path).glob("*.safetensors"))) == 6


def test_recalibrate_and_an_unreadable_file_refit(monkeypatch, tmp_path):
    monkeypatch.setenv("ANTKV_CACHE_DIR", str(tmp_path))
    model, ids = _tiny(2), torch.randint(0, 64, (128,))
    books, path, _ = cached_calibrate(model, ids, progress=False, **FIT)
    before = path.stat().st_mtime_ns
    again, _, hit = cached_calibrate(model, ids, recalibrate=True, progress=False, **FIT)
    assert not hit and path.stat().st_mtime_ns > before and _same(again, books)  # same seed, same fit

    path.write_bytes(path.read_bytes()[:100])  # truncated
    with pytest.warns(UserWarning, match="could not be loaded"):
        fixed, _, hit = cached_calibrate(model, ids, progress=False, **FIT)
    assert not hit and _same(fixed, books)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert cached_calibrate(model, ids, progress=False, **FIT)[2]
