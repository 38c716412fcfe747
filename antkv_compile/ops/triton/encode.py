"""Quantize-on-write: nearest centroid per (token, head, subspace).

The kernel body `vq_encode_kernel` takes plain pointers and strides so its source can be reused as
an Inductor template; `vq_encode` is the thin launcher that checks inputs and picks block sizes.
"""

import torch
import triton
import triton.language as tl


@triton.jit
def vq_encode_kernel(
    x_ptr, stride_xb, stride_xh, stride_xt, stride_xd,
    cent_ptr, stride_ch, stride_cs, stride_ck, stride_cd,
    codes_ptr, stride_ob, stride_oh, stride_ot, stride_os,
    err_ptr, stride_eb, stride_eh, stride_et,
    H, T, S, K,
    SUB_D: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One program encodes BLOCK_T tokens of one (batch, head).

    Distances are formed directly as sum((x - c)^2) rather than ||c||^2 - 2 x.c: sub-vectors are
    short (d <= 16, below tl.dot's minimum) and the direct form gives the exact error the Anchor
    Score needs. Centroids are scanned in BLOCK_K tiles keeping a running argmin, so K = 2^c is
    unbounded; strict `<` keeps the first minimum, like torch.argmin.
    """
    pid_bh = tl.program_id(0)
    b = pid_bh // H
    h = pid_bh % H
    offs_t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_j = tl.arange(0, SUB_D)
    t_mask = offs_t < T

    x_base = x_ptr + b * stride_xb + h * stride_xh + offs_t[:, None] * stride_xt
    c_base = cent_ptr + h * stride_ch
    err = tl.zeros([BLOCK_T], dtype=tl.float32)
    for s in range(S):
        x = tl.load(x_base + (s * SUB_D + offs_j[None, :]) * stride_xd,
                    mask=t_mask[:, None], other=0.0).to(tl.float32)
        best = tl.full([BLOCK_T], float("inf"), dtype=tl.float32)
        best_k = tl.zeros([BLOCK_T], dtype=tl.int32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            c = tl.load(c_base + s * stride_cs + offs_k[:, None] * stride_ck
                        + offs_j[None, :] * stride_cd,
                        mask=(offs_k < K)[:, None], other=float("inf"))
            diff = x[:, None, :] - c[None, :, :]
            dist = tl.sum(diff * diff, axis=2)
            tile_best, tile_k = tl.min(dist, axis=1, return_indices=True)
            better = tile_best < best
            best = tl.where(better, tile_best, best)
            best_k = tl.where(better, tile_k + k0, best_k)
        tl.store(codes_ptr + b * stride_ob + h * stride_oh + offs_t * stride_ot + s * stride_os,
                 best_k.to(codes_ptr.dtype.element_ty), mask=t_mask)
        err += best
    tl.store(err_ptr + b * stride_eb + h * stride_eh + offs_t * stride_et, tl.sqrt(err), mask=t_mask)


def codes_dtype(num_centroids: int) -> torch.dtype:
    """uint8 holds up to 256 centroids (c <= 8); int16 up to 2^15 (c <= 15)."""
    if num_centroids <= 256:
        return torch.uint8
    if num_centroids <= 2**15:
        return torch.int16
    raise ValueError(f"at most 2^15 centroids per subspace are supported, got {num_centroids}")


def encode_config(K: int, d: int) -> dict:
    """Launch configuration: the [BLOCK_T, BLOCK_K, d] distance tile stays at 16K elements.
    Checked for sm_90 resources by tests/test_triton_sm90.py."""
    return dict(BLOCK_T=16, BLOCK_K=min(triton.next_power_of_2(K), max(16, 1024 // d)), num_warps=4)


def vq_encode(
    x: torch.Tensor,
    centroids: torch.Tensor,
    *,
    out: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Encode head vectors with product VQ.

    x: [B, H, T, D] or [N, H, D] (fp32/fp16/bf16); centroids: float32 [H, S, K, d] with S*d = D.
    Returns (codes, err): codes [B, H, T, S] (or [N, H, S]) uint8 for K <= 256 else int16, the
    nearest centroid per subspace by squared L2; err float32 [B, H, T] (or [N, H]) the per-token
    error ||x - decode(codes)|| that the Anchor Score needs. `out=(codes, err)` writes into
    existing tensors (any strides, e.g. a slice of the cache's code buffer) instead of allocating.
    """
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"x must be float32/float16/bfloat16, got {x.dtype}")
    if centroids.dtype != torch.float32 or centroids.dim() != 4:
        raise TypeError(f"centroids must be float32 [H, S, K, d], got {centroids.dtype} "
                        f"{tuple(centroids.shape)}")
    if x.dim() not in (3, 4):
        raise ValueError(f"x must be [B, H, T, D] or [N, H, D], got {tuple(x.shape)}")
    H, S, K, d = centroids.shape
    head_dim = x.shape[-1]
    if x.shape[-2 if x.dim() == 3 else 1] != H:
        raise ValueError(f"x has {x.shape[-2 if x.dim() == 3 else 1]} heads, centroids have {H}")
    if head_dim % d != 0 or head_dim // d != S:
        raise ValueError(f"head_dim {head_dim} is not S*d = {S}*{d}")
    if d & (d - 1):
        raise ValueError(f"subspace dim d must be a power of two, got {d}")
    if x.device != centroids.device:
        raise ValueError("x and centroids must be on the same device")

    lead = x.shape[:-1]
    if out is None:
        codes = torch.empty(*lead, S, dtype=codes_dtype(K), device=x.device)
        err = torch.empty(lead, dtype=torch.float32, device=x.device)
    else:
        codes, err = out
        if codes.shape != (*lead, S) or err.shape != lead:
            raise ValueError(f"out shapes {tuple(codes.shape)}, {tuple(err.shape)} do not match "
                             f"{(*lead, S)}, {tuple(lead)}")
        if codes.dtype not in (torch.uint8, torch.int16) or err.dtype != torch.float32:
            raise TypeError("out must be (uint8/int16 codes, float32 err)")
        if codes.dtype == torch.uint8 and K > 256:
            raise TypeError(f"{K} centroids do not fit uint8 codes")

    # [N, H, ...] is viewed as [1, H, N, ...]: the kernel only sees strides.
    x4, codes4, err3 = x, codes, err
    if x.dim() == 3:
        x4 = x.transpose(0, 1).unsqueeze(0)
        codes4 = codes.transpose(0, 1).unsqueeze(0)
        err3 = err.transpose(0, 1).unsqueeze(0)
    B, _, T, _ = x4.shape
    if B * T == 0:
        return codes, err

    cfg = encode_config(K, d)
    grid = (B * H, triton.cdiv(T, cfg["BLOCK_T"]))
    vq_encode_kernel[grid](
        x4, *x4.stride(),
        centroids, *centroids.stride(),
        codes4, *codes4.stride(),
        err3, *err3.stride(),
        H, T, S, K,
        SUB_D=d, **cfg,
    )
    return codes, err
