"""Triton kernels for the compressed KV cache (tested on CPU with TRITON_INTERPRET=1)."""

from .attention import vq_decode_attention, vq_prefill_attention, vq_window_scores
from .encode import vq_encode

__all__ = ["vq_decode_attention", "vq_encode", "vq_prefill_attention", "vq_window_scores"]
