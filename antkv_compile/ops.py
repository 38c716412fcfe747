"""The compressed cache's work as torch.library custom ops, so it can live inside a traced graph.

Every op takes the cache as its plain inner tensors (the fields of `VQTensor`) and returns new
tensors, never views of its inputs. The fake kernels give output shapes without running the
quantizer. The window and anchor lengths after an append follow the flush rule: computed when the
sizes are concrete, fresh unbacked sizes when they are symbolic, so a traced decode step never
specializes on them and a growing cache does not recompile it.

`VQTensor` (cache.py) calls these ops in eager mode as well; the graph pass (passes/kv_cache.py)
puts them in place of `cat` + `scaled_dot_product_attention` in a compiled model.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch._library.fake_impl import allocate_size

# Order of a cache's state after an append (the codebook is not returned: it never changes).
STATE = ("codes", "anchor_rows", "anchor_pos", "anchor_score", "window", "window_err", "window_score")


def _fresh(outs, inputs):
    """Custom ops must not return views of their inputs: copy the ones that are."""
    seen = {t.untyped_storage().data_ptr() for t in inputs}
    fresh = []
    for t in outs:
        ptr = t.untyped_storage().data_ptr()
        fresh.append(t.clone() if ptr in seen or t.numel() == 0 else t)
        seen.add(ptr)
    return tuple(fresh)


@torch.library.custom_op("antkv::append", mutates_args=())
def append(
    codes: Tensor, anchor_rows: Tensor, anchor_pos: Tensor, anchor_score: Tensor,
    window: Tensor, window_err: Tensor, window_score: Tensor, centroids: Tensor, expected_err: Tensor,
    new: Tensor, window_size: int, anchor_frac: float, error: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    """Quantize-on-write of `new` [B, H, n, D] (in the cache's key basis, if any) onto a cache: the
    state after `VQTensor.append`."""
    from .cache import CacheSettings, VQTensor
    from .quant.basis import identity

    inner = (codes, anchor_rows, anchor_pos, anchor_score, window, window_err, window_score)
    none = identity(codes.shape[1], codes.device)  # `new` arrives in the basis already
    cache = VQTensor(*inner, centroids, expected_err, none, none, CacheSettings(window_size, anchor_frac, error))
    out = cache.append_eager(new)
    return _fresh(tuple(getattr(out, n) for n in STATE), inner)


def _lengths_after_append(T, A, Tw, n, window_size, anchor_frac):
    """(anchors, window) lengths after `VQTensor.append` (cache.py's flush rule) for concrete sizes."""
    n_leave = Tw - window_size
    if n_leave <= 0:
        return A, Tw + n
    return min(math.ceil(anchor_frac * (T - Tw + n_leave)), A + n_leave), window_size + n


def _append_fake(codes, anchor_rows, anchor_pos, anchor_score, window, window_err, window_score, new, window_size, anchor_frac):
    B, H, T, S = codes.shape
    D, n, A, Tw = window.shape[3], new.shape[2], anchor_rows.shape[2], window.shape[2]
    if all(isinstance(x, int) for x in (T, A, Tw, n)):
        A, Tw = _lengths_after_append(T, A, Tw, n, window_size, anchor_frac)
    else:
        # Symbolic: fresh unbacked sizes, allocated directly rather than by ctx.new_dynamic_size(),
        # which Dynamo only allows under capture_dynamic_output_shape_ops: they are sizes of
        # inner tensors of the cache, never data-dependent outputs the user sees.
        shape_env = torch.library.get_ctx()._shape_env
        A, Tw = allocate_size(shape_env), allocate_size(shape_env)
        torch._check(Tw >= n)
    f32 = dict(dtype=torch.float32, device=codes.device)
    return (
        codes.new_empty(B, H, T + n, S),
        anchor_rows.new_empty(B, H, A, D),
        anchor_pos.new_empty(B, H, A),
        anchor_score.new_empty(B, H, A),
        window.new_empty(B, H, Tw, D),
        torch.empty(B, H, Tw, **f32),
        torch.empty(B, H, Tw, **f32),
    )


@append.register_fake
def _(codes, anchor_rows, anchor_pos, anchor_score, window, window_err, window_score, centroids, expected_err, new, window_size, anchor_frac, error):
    return _append_fake(codes, anchor_rows, anchor_pos, anchor_score, window, window_err, window_score, new, window_size, anchor_frac)


@torch.library.custom_op("antkv::start", mutates_args=())
def start(
    past: Tensor, new: Tensor, centroids: Tensor, expected_err: Tensor, window_size: int, anchor_frac: float, error: str
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """A compressed cache from a dense `past` (empty, or [B, H, Tp, D]) and the call's `new` tokens,
    both in the key basis of the codebook, if it has one."""
    from .cache import CacheSettings, VQTensor

    settings = CacheSettings(window_size, anchor_frac, error)
    cache = VQTensor.empty(new.shape[0], centroids, expected_err, settings, dtype=new.dtype, device=new.device)
    if past.numel():
        cache = cache.append_eager(past)
    out = cache.append_eager(new)
    return _fresh(tuple(getattr(out, n) for n in STATE), (past, new, centroids, expected_err))


@start.register_fake
def _(past, new, centroids, expected_err, window_size, anchor_frac, error):
    B, H, n, D = new.shape
    S, K = centroids.shape[1], centroids.shape[2]
    Tp = past.shape[2] if past.dim() == 4 else 0
    empty = torch.empty(B, H, 0, S, dtype=torch.uint8 if K <= 256 else torch.int16, device=new.device)
    f32 = dict(dtype=torch.float32, device=new.device)
    state = (empty, new.new_empty(B, H, 0, D), torch.empty(B, H, 0, dtype=torch.int32, device=new.device),
             torch.empty(B, H, 0, **f32), new.new_empty(B, H, 0, D), torch.empty(B, H, 0, **f32), torch.empty(B, H, 0, **f32))  # fmt: skip
    if not (isinstance(Tp, int) and Tp == 0):
        state = _append_fake(*state, past, window_size, anchor_frac)
    return _append_fake(*state, new, window_size, anchor_frac)


@torch.library.custom_op("antkv::learn_start", mutates_args=())
def learn_start(
    past: Tensor, new: Tensor, sub_dim: int, code_bits: int, window_size: int, anchor_frac: float, error: str, seed: int
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """`start` with a codebook learned from these tokens (k-means per kv head and subspace, no
    calibration data): the state, then the centroids and the mean error per head."""
    from .quant.kmeans import weighted_kmeans
    from .quant.pq import decode, encode

    x = (torch.cat([past, new], 2) if past.numel() else new).float()
    B, H, T, D = x.shape
    S = D // sub_dim
    sub = x.transpose(0, 1).reshape(H, B * T, S, sub_dim).transpose(1, 2).reshape(H * S, B * T, sub_dim)
    centroids = weighted_kmeans(sub, 1 << code_bits, iters=10, seed=seed).view(H, S, 1 << code_bits, sub_dim)
    expected_err = (x - decode(encode(x, centroids), centroids)).norm(dim=-1).mean((0, 2))
    return (*start(past, new, centroids, expected_err, window_size, anchor_frac, error), centroids, expected_err)


@learn_start.register_fake
def _(past, new, sub_dim, code_bits, window_size, anchor_frac, error, seed):
    H, D = new.shape[1], new.shape[3]
    centroids = torch.empty(H, D // sub_dim, 1 << code_bits, sub_dim, device=new.device)
    expected_err = torch.empty(H, device=new.device)
    return (*torch.ops.antkv.start(past, new, centroids, expected_err, window_size, anchor_frac, error), centroids, expected_err)


@torch.library.custom_op("antkv::attention", mutates_args=())
def attention(
    q: Tensor,
    k_codes: Tensor, k_centroids: Tensor, k_anchor_rows: Tensor, k_anchor_pos: Tensor, k_window: Tensor, k_window_err: Tensor,
    v_codes: Tensor, v_centroids: Tensor, v_anchor_rows: Tensor, v_anchor_pos: Tensor, v_window: Tensor, v_window_err: Tensor,
    attn_mask: Tensor | None, is_causal: bool, scale: float | None,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """SDPA of q over a compressed K and V (VQ attention, GQA when q has more heads).

    Returns (out, score): `score` [B, Hkv, Tw] is this call's Anchor Score of the window tokens,
    which the caller adds to both window_score tensors. This body (the PyTorch reference of
    attention.py) runs on every device but CPU, whose kernel is registered below.
    """
    return _attention_reference(q, k_codes, k_centroids, k_anchor_rows, k_anchor_pos, k_window, k_window_err,
                                v_codes, v_centroids, v_anchor_rows, v_anchor_pos, v_window, v_window_err,
                                attn_mask, is_causal, scale)  # fmt: skip


def _attention_reference(
    q, k_codes, k_centroids, k_anchor_rows, k_anchor_pos, k_window, k_window_err,
    v_codes, v_centroids, v_anchor_rows, v_anchor_pos, v_window, v_window_err, attn_mask, is_causal, scale,
):  # fmt: skip
    from .attention import VQParts, vq_attention

    k = VQParts(k_codes, k_centroids, k_anchor_rows, k_anchor_pos, k_window)
    v = VQParts(v_codes, v_centroids, v_anchor_rows, v_anchor_pos, v_window)
    out, s1, s0 = vq_attention(q, k, v, attn_mask, is_causal, scale)
    if s1 is None:
        return out, k_window_err.new_zeros(k_window_err.shape)
    return out, k_window_err * s1 + v_window_err * s0


@attention.register_kernel("cpu")
def _(q, k_codes, k_centroids, k_anchor_rows, k_anchor_pos, k_window, k_window_err, v_codes, v_centroids, v_anchor_rows, v_anchor_pos, v_window, v_window_err, attn_mask, is_causal, scale):
    """On CPU: the C++ kernel (cpu/attention.cpp) for decode and chunks of up to
    cpu.MAX_ROWS query rows per kv head; the reference for larger calls or where the kernel
    cannot be built."""
    from . import cpu

    args = (q, k_codes, k_centroids, k_anchor_rows, k_anchor_pos, k_window, k_window_err,
            v_codes, v_centroids, v_anchor_rows, v_anchor_pos, v_window, v_window_err, attn_mask, is_causal, scale)  # fmt: skip
    return (cpu.attention if cpu.supported(q, k_codes) else _attention_reference)(*args)


@attention.register_fake
def _(q, k_codes, k_centroids, k_anchor_rows, k_anchor_pos, k_window, k_window_err, v_codes, v_centroids, v_anchor_rows, v_anchor_pos, v_window, v_window_err, attn_mask, is_causal, scale):
    return torch.empty_like(q, memory_format=torch.contiguous_format), torch.empty_like(k_window_err)


@torch.library.custom_op("antkv::dequantize", mutates_args=())
def dequantize(codes: Tensor, anchor_rows: Tensor, anchor_pos: Tensor, window: Tensor, centroids: Tensor, dtype: torch.dtype) -> Tensor:
    """The dense [B, H, T, D] tensor a cache stands for, in `dtype` (the fallback of every other op).
    `dtype` is the cache's, which may be wider than the exact rows' (CacheSettings.exact_dtype)."""
    from .quant.pq import decode

    B, H, T, _ = codes.shape
    D = window.shape[3]
    Tc = T - window.shape[2]
    dense = torch.cat([decode(codes[:, :, :Tc], centroids), window.float()], 2)
    dense = torch.cat([dense, dense.new_zeros(B, H, 1, D)], 2)  # dummy row for empty anchor slots
    idx = torch.where(anchor_pos >= 0, anchor_pos.long(), T)[..., None].expand(-1, -1, -1, D)
    dense.scatter_(2, idx, anchor_rows.float())
    return dense[:, :, :T].to(dtype).contiguous()


@dequantize.register_fake
def _(codes, anchor_rows, anchor_pos, window, centroids, dtype):
    B, H, T, _ = codes.shape
    return window.new_empty(B, H, T, window.shape[3], dtype=dtype)
