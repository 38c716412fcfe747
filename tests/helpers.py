"""Shared test helpers (not tests themselves): a hand-written nanoGPT-style decoder with a user tuple
cache, in the attention variants the compiler pass must see through (GQA by enable_gqa / repeat_kv
(expand + reshape) / repeat_interleave, causal or bool / additive masks, default or explicit
scale); random codebooks; random raw cache sides for the kernel tests."""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

import transformers as tf

from antkv_compile import CacheSettings, Codebooks, CodebookSide, LayerCodebook, VQTensor
from antkv_compile.quant.codebook import model_fingerprint
from antkv_compile.quant.pq import spec_for_bits
from antkv_compile.state import Side


def repeat_kv(x, n_rep):
    B, H, T, D = x.shape
    return x[:, :, None, :, :].expand(B, H, n_rep, T, D).reshape(B, H * n_rep, T, D)


class Attention(nn.Module):
    def __init__(self, dim, n_head, n_kv_head, gqa="enable_gqa", scale=None, dropout=0.0, score_mod=False, seq_dim=2):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = n_head, n_kv_head, dim // n_head
        self.q = nn.Linear(dim, dim, bias=False)
        self.kv = nn.Linear(dim, 2 * n_kv_head * self.head_dim, bias=False)
        self.o = nn.Linear(dim, dim, bias=False)
        self.gqa, self.scale, self.dropout, self.score_mod, self.seq_dim = gqa, scale, dropout, score_mod, seq_dim

    def forward(self, x, past, mask):
        B, L, _ = x.shape
        q = self.q(x).view(B, L, self.n_head, self.head_dim).transpose(1, 2)
        k, v = self.kv(x).view(B, L, 2 * self.n_kv_head, self.head_dim).transpose(1, 2).chunk(2, dim=1)
        pk, pv = past
        if self.seq_dim == 1:  # a [B, T, H, D] cache, transposed for SDPA
            k = torch.cat([pk, k.transpose(1, 2)], dim=1)
            v = torch.cat([pv, v.transpose(1, 2)], dim=1)
            kk, vv = k.transpose(1, 2), v.transpose(1, 2)
        else:
            k, v = torch.cat([pk, k], dim=-2), torch.cat([pv, v], dim=2)
            kk, vv = k, v
        G = self.n_head // self.n_kv_head
        if self.gqa == "repeat_kv":
            kk, vv = repeat_kv(kk, G), repeat_kv(vv, G)
        elif self.gqa == "repeat_interleave":
            kk, vv = kk.repeat_interleave(G, dim=1), torch.repeat_interleave(vv, G, dim=1)
        if self.score_mod:
            kk = kk * 0.5  # a key / score modification the pass must not see through
        causal = mask is None and L > 1
        out = F.scaled_dot_product_attention(
            q, kk, vv, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0, is_causal=causal,
            scale=self.scale, enable_gqa=self.gqa == "enable_gqa",
        )  # fmt: skip
        return self.o(out.transpose(1, 2).reshape(B, L, -1)), (k, v)


class Block(nn.Module):
    def __init__(self, dim, **attn):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = Attention(dim, **attn)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x, past, mask):
        a, present = self.attn(self.ln1(x), past, mask)
        x = x + a
        return x + self.mlp(self.ln2(x)), present


class NanoGPT(nn.Module):
    """forward(idx, past) -> (logits, present): `past` a tuple of (k, v) per layer."""

    def __init__(self, vocab=64, dim=64, n_layer=2, n_head=4, n_kv_head=2, **attn):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList(Block(dim, n_head=n_head, n_kv_head=n_kv_head, **attn) for _ in range(n_layer))
        self.ln, self.head = nn.LayerNorm(dim), nn.Linear(dim, vocab, bias=False)
        self.n_kv_head, self.head_dim = n_kv_head, dim // n_head

    def forward(self, idx, past, mask=None):
        x = self.emb(idx)
        present = []
        for block, layer_past in zip(self.blocks, past):
            x, p = block(x, layer_past, mask)
            present.append(p)
        return self.head(self.ln(x)), tuple(present)

    def empty_past(self, batch, seq_dim=2):
        shape = (batch, 0, self.n_kv_head, self.head_dim) if seq_dim == 1 else (batch, self.n_kv_head, 0, self.head_dim)
        return tuple((torch.zeros(shape), torch.zeros(shape)) for _ in self.blocks)


def random_codebooks(n_layer, kv_heads, head_dim, bits=1.0, seed=0, key_basis=False) -> Codebooks:
    """Random centroids; with key_basis, a random well-conditioned key basis per layer too."""
    g = torch.Generator().manual_seed(seed)
    spec = spec_for_bits(bits)
    S = spec.num_subspaces(head_dim)

    def side():
        return torch.randn(kv_heads, S, spec.num_centroids, spec.sub_dim, generator=g)

    def basis():
        if not key_basis:
            return None, None
        a = torch.eye(head_dim) + 0.3 * torch.randn(kv_heads, head_dim, head_dim, generator=g) / head_dim**0.5
        return a, torch.linalg.inv(a)

    def layer():
        k, v = side(), side()
        return LayerCodebook(CodebookSide(spec, k, torch.rand(kv_heads, generator=g), *basis()),
                             CodebookSide(spec, v, torch.rand(kv_heads, generator=g)))

    return Codebooks([layer() for _ in range(n_layer)], {})


def vq_past(books: Codebooks, batch, settings: CacheSettings, seq_dim=2):
    """The eager reference's starting cache: empty VQTensors with the same codebooks (and layout)."""
    return tuple(
        tuple(VQTensor.empty(batch, side, settings, seq_dim=seq_dim) for side in (b.key, b.value)) for b in books.layers
    )


def full_side(codes, centroids, anchor_rows, anchor_pos, window, window_err=None) -> Side:
    """A `state.Side` from the raw tensors the attention kernels read; the rest zero (window error,
    scores, expected error) or empty (no key basis)."""
    B, H, A = anchor_pos.shape
    Tw = window.shape[2]
    none = torch.zeros(H, 0, 0)
    err = torch.zeros(B, H, Tw) if window_err is None else window_err
    return Side(codes, anchor_rows, anchor_pos, torch.zeros(B, H, A), window, err, torch.zeros(B, H, Tw),
                centroids, torch.zeros(H), none, none)


def random_parts(g, B, H, T, Tw, A, S, K, d, dtype, window_err=False) -> Side:
    """Random codes, centroids and exact rows; A anchor slots per (b, h) at distinct encoded
    positions, a random share of them empty (-1), ragged across (b, h); with `window_err`, a random
    quantization error per window token."""
    D = S * d
    codes = torch.randint(0, K, (B, H, T, S), generator=g).to(torch.uint8 if K <= 256 else torch.int16)
    pos = torch.full((B, H, A), -1, dtype=torch.int32)
    T_enc = T - Tw
    for b in range(B):
        for h in range(H):
            n = min(A, T_enc, int(torch.randint(0, A + 1, (), generator=g)))
            slots = torch.randperm(A, generator=g)[:n]
            pos[b, h, slots] = torch.randperm(T_enc, generator=g)[:n].int()
    return full_side(
        codes=codes,
        centroids=torch.randn(H, S, K, d, generator=g),
        anchor_rows=torch.randn(B, H, A, D, generator=g).to(dtype),
        anchor_pos=pos,
        window=torch.randn(B, H, Tw, D, generator=g).to(dtype),
        window_err=torch.rand(B, H, Tw, generator=g) if window_err else None,
    )


def prefix_mask(pad, L, T, additive=False, g=None):
    """Left padding + causal, as SDPA masks [B, 1, L, T]: query i sits at position T - L + i."""
    keep = torch.ones(len(pad), 1, L, T, dtype=torch.bool).tril(T - L)
    keep &= torch.arange(T)[None, None, None, :] >= pad[:, None, None, None]
    if not additive:
        return keep
    return torch.where(keep, 0.0, float("-inf")) + 0.1 * torch.randn(keep.shape, generator=g)


def softmax_scale(head_dim):
    return 1 / math.sqrt(head_dim) * 0.7


# --- tiny Hugging Face decoders (random weights, no download) ---------------------------------

TINY = dict(vocab_size=96, hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=1024, pad_token_id=0)
GQA = dict(num_key_value_heads=2)
ARCHS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", GQA),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(GQA, sliding_window=None)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", GQA),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(GQA, head_dim=16)),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", GQA),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", {}),
    "stablelm": ("StableLmConfig", "StableLmForCausalLM", GQA),
    "olmo": ("OlmoConfig", "OlmoForCausalLM", GQA),
}



def tiny_hf_model(arch, **overrides):
    """A tiny random-weight HF decoder of `arch` (ARCHS) and random codebooks (head_dim 16) for it."""
    config_cls, model_cls, kw = ARCHS[arch]
    torch.manual_seed(0)
    config = getattr(tf, config_cls)(**{**TINY, **kw, **overrides})
    model = getattr(tf, model_cls)(config).eval()
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    books = random_codebooks(config.num_hidden_layers, kv_heads, 16)
    books.fingerprint = model_fingerprint(config)
    return model, books


def tiny_llama():
    """A tiny random Llama (2 layers, 6 query heads on 2 kv heads, head_dim 32, vocab 96), seed 0."""
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(
        vocab_size=96, hidden_size=192, intermediate_size=128, num_hidden_layers=2, num_attention_heads=6,
        num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0, eos_token_id=1, bos_token_id=2,
    )  # fmt: skip
    return tf.LlamaForCausalLM(cfg).eval()
