"""Quantization error by token position: do calibrated codebooks serve positions past their
calibration sequences?

Keys are quantized after RoPE, which rotates each pair of channels by an angle proportional to the
position: a codebook fitted to sequences of L tokens has seen the angles of positions below L only.
One FP prefill of a --context-token window (WikiText-2 from --eval-offset) records every layer's
keys and values; each is encoded with the codebooks (keys in their key basis) and the relative
squared error of the rows, mean over layers and heads, is printed per position bucket.

Codebooks: a file (--books, e.g. one of accuracy.py's --calib-cache), or calibrated here on
WikiText-2 [0, --calib-tokens) in sequences of --calib-seq-len tokens:

    python benchmarks/position_probe.py --bits 1 --calib-seq-len 1024    # development window
    python benchmarks/position_probe.py --bits 1 --calib-seq-len 8192
"""

from __future__ import annotations

import argparse

import torch

import antkv_compile as ak
from antkv_compile.evaluation import load_smollm2, load_wikitext_ids
from antkv_compile.hf import attention_hook
from antkv_compile.quant.basis import to_basis
from antkv_compile.quant.pq import decode, encode


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--books", help="a codebook file (default: calibrate here)")
    p.add_argument("--bits", type=float, default=1.0)
    p.add_argument("--calib-tokens", type=int, default=32768)
    p.add_argument("--calib-seq-len", type=int, default=1024)
    p.add_argument("--kmeans-tokens", type=int, default=4096)
    p.add_argument("--iters", type=int, default=15)
    p.add_argument("--eval-offset", type=int, default=50_000)
    p.add_argument("--context", type=int, default=8192)
    p.add_argument("--buckets", default="512,1024,2048,4096", help="bucket edges between 0 and --context")
    p.add_argument("--data")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    model, tokenizer = load_smollm2()
    ids = load_wikitext_ids(tokenizer, args.data)
    if args.books:
        books = ak.Codebooks.load(args.books, config=model.config)
    else:
        books = ak.calibrate(model, ids[: args.calib_tokens], bits=args.bits, seq_len=args.calib_seq_len, max_tokens=None,
                             kmeans_tokens=args.kmeans_tokens, iters=args.iters)  # fmt: skip
    positions = books.settings.get("calibration_positions", "?")
    window = ids[args.eval_offset : args.eval_offset + args.context][None]
    seen = []
    with torch.no_grad(), attention_hook(model, lambda m, q, k, v, mask, scale: seen.append((k.float(), v.float()))):
        model(window, use_cache=False)
    edges = [0, *(int(e) for e in args.buckets.split(",") if int(e) < args.context), args.context]
    err = {"K": torch.zeros(len(edges) - 1), "V": torch.zeros(len(edges) - 1)}
    for (k, v), book in zip(seen, books.layers):
        for name, x, side in (("K", k, book.key), ("V", v, book.value)):
            basis = side.basis if side.basis is not None else torch.zeros(x.shape[1], 0, 0)
            xb = to_basis(x, basis)
            e = (decode(encode(xb, side.centroids), side.centroids) - xb).pow(2).sum(-1) / xb.pow(2).sum(-1).clamp_min(1e-12)
            for j in range(len(edges) - 1):
                err[name][j] += e[..., edges[j] : edges[j + 1]].mean() / len(seen)
    print(f"codebooks {books.average_bits:g} bit, calibrated on {positions}-token sequences; window of {args.context} "
          f"tokens from {args.eval_offset}; relative squared error per position")
    print("| side | " + " | ".join(f"{edges[j]}-{edges[j + 1]}" for j in range(len(edges) - 1)) + " |")
    print("|---|" + "---|" * (len(edges) - 1))
    for name, e in err.items():
        print(f"| {name} | " + " | ".join(f"{x:.3f}" for x in e.tolist()) + " |")


if __name__ == "__main__":
    main()
