"""Where a data-free / online-refined codebook loses: per layer and side, on FP keys and values.

One FP prefill of a development window (WikiText-2 from --eval-offset, --context tokens) records
every layer's post-RoPE keys, values and queries. For each codebook recipe, each layer's K and V
are quantized whole (no exact window, no anchors: only the codebook's error) and the table gives
the relative squared error of the rows and of the attention output (causal, the last --queries
positions as queries, everything else FP):

- prompt: the data-free codebook fitted to the first --prompt tokens (what refine=None keeps);
- moments: the Gaussian codebook placed by the moments of all tokens (a moment re-fit at the end);
- lloyd: ITERS Lloyd iterations on all tokens from the prompt's codebook;
- moments+lloyd: ITERS Lloyd iterations from the moment re-fit;
- prompt-cov / moments-cov: placed by the mean and the full covariance of each sub-vector.

The first token (the attention sink) is kept exact, as the cache's anchors keep it.

--value-basis quantizes the values in a basis too (the cache has none: attention would have to map
its output back): "rotation", a random orthogonal one as the keys'; "pca", the principal axes of the
prompt's values dealt to the subspaces as the key basis deals its axes (quant/basis.deal_axes).

Development windows only:

    python benchmarks/datafree_probe.py --bits 2 --eval-offset 50000
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from antkv_compile.evaluation import load_smollm2, load_wikitext_ids  # noqa: E402
from antkv_compile.hf import attention_hook  # noqa: E402
from antkv_compile.quant import datafree  # noqa: E402
from antkv_compile.quant.basis import deal_axes  # noqa: E402
from antkv_compile.quant.pq import decode, encode, spec_for_bits  # noqa: E402


def quantized(x, basis, centroids):
    """x [1, H, T, D] through the codebook (in its basis), back in model coordinates."""
    xb = x if basis is None else torch.einsum("bhtd,hde->bhte", x, basis)
    y = decode(encode(xb, centroids), centroids)
    return y if basis is None else torch.einsum("bhte,hde->bhtd", y, basis)


def principal_axes(x, sub_dim):
    """[H, D, D] orthogonal: the principal axes of tokens x [1, H, T, D] per head, dealt to subspaces."""
    axes = []
    for h in range(x.shape[1]):
        z = x[0, h].double() - x[0, h].double().mean(0)
        var, u = torch.linalg.eigh(z.T @ z / z.shape[0])
        axes.append(u[:, deal_axes(var, sub_dim)].float())
    return torch.stack(axes)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bits", type=float, default=2.0)
    p.add_argument("--eval-offset", type=int, default=50_000)
    p.add_argument("--context", type=int, default=2048)
    p.add_argument("--prompt", type=int, default=64)
    p.add_argument("--queries", type=int, default=512)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--value-basis", choices=("none", "rotation", "pca"), default="none",
                   help="quantize values in a random rotation or the prompt's principal axes (default: none, as the cache)")
    p.add_argument("--data")
    args = p.parse_args(argv)
    if args.eval_offset == 100_000:
        raise SystemExit("--eval-offset 100000 is the evaluation slice; develop on --eval-offset 50000")
    torch.set_num_threads(1)
    model, tokenizer = load_smollm2()
    ids = load_wikitext_ids(tokenizer, args.data)[args.eval_offset : args.eval_offset + args.context][None]
    seen = []
    with torch.no_grad(), attention_hook(model, lambda m, q, k, v, mask, scale: seen.append((q.float(), k.float(), v.float(), scale))):
        model(ids, use_cache=False)
    spec = spec_for_bits(args.bits)
    recipes = ("prompt", "prompt-cov", "moments", "moments-cov", "lloyd", "moments+lloyd")
    totals = {r: [0.0, 0.0, 0.0] for r in recipes}
    print(f"| layer | side | " + " | ".join(recipes) + " |  (relative squared error of rows; attention output last)")
    print("|---|---|" + "---|" * len(recipes))
    for i, (q, k, v, scale) in enumerate(seen):
        H, D = k.shape[1], k.shape[-1]
        out = {}
        sides = {}
        for name, x in (("K", k), ("V", v)):
            basis = None
            if name == "K" or args.value_basis == "rotation":
                basis = datafree.random_rotation(H, D, 2 * i + (name == "V")).to(x.device)
            elif args.value_basis == "pca":
                basis = principal_axes(x[:, :, : args.prompt], spec.sub_dim)
            xb = x if basis is None else torch.einsum("bhtd,hde->bhte", x, basis)
            first = datafree.place(xb[:, :, : args.prompt], spec)
            every = datafree.place(xb, spec)
            books = {"prompt": first, "prompt-cov": datafree.place(xb[:, :, : args.prompt], spec, full=True),
                     "moments": every, "moments-cov": datafree.place(xb, spec, full=True),
                     "lloyd": datafree.refine(xb, first, args.iters), "moments+lloyd": datafree.refine(xb, every, args.iters)}
            sides[name] = {r: quantized(x, basis, c) for r, c in books.items()}
            for y in sides[name].values():  # the first token (the attention sink) exact, as an anchor keeps it
                y[:, :, :1] = x[:, :, :1]
            out[name] = [((sides[name][r] - x).pow(2).sum() / x.pow(2).sum()).item() for r in recipes]
        G = q.shape[1] // H
        qs = q[:, :, -args.queries :]
        T = k.shape[2]
        mask = torch.ones(args.queries, T, dtype=torch.bool).tril(T - args.queries)
        ref = F.scaled_dot_product_attention(qs, k.repeat_interleave(G, 1), v.repeat_interleave(G, 1), attn_mask=mask, scale=scale)
        att = []
        for r in recipes:
            o = F.scaled_dot_product_attention(qs, sides["K"][r].repeat_interleave(G, 1), sides["V"][r].repeat_interleave(G, 1),
                                               attn_mask=mask, scale=scale)  # fmt: skip
            att.append(((o - ref).pow(2).sum() / ref.pow(2).sum()).item())
        for j, r in enumerate(recipes):
            totals[r][0] += out["K"][j] / len(seen)
            totals[r][1] += out["V"][j] / len(seen)
            totals[r][2] += att[j] / len(seen)
        print(f"| {i} | K | " + " | ".join(f"{e:.4f}" for e in out["K"]) + " |")
        print(f"| {i} | V | " + " | ".join(f"{e:.4f}" for e in out["V"]) + " |")
        print(f"| {i} | out | " + " | ".join(f"{e:.4f}" for e in att) + " |", flush=True)
    for j, side in enumerate(("K", "V", "out")):
        print(f"| mean | {side} | " + " | ".join(f"{totals[r][j]:.4f}" for r in recipes) + " |")


if __name__ == "__main__":
    main()
