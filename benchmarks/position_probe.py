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
    python benchmarks/position_probe.py --bits 1 --calib-seq-len 1024 --calib-positions 8192

No calibration (--online N): what a cache without codebooks holds after its last refinement switch
at N tokens (hf.REFINE_TOKENS caps the schedule at 2048): each layer's data-free codebook (keys in a
random rotation, values as they are) placed by the moments of the window's first N tokens, then
--online-iters Lloyd iterations on them (0: the data-free row's moment re-fit; 10: the refined
row's); every token encoded with it:

    python benchmarks/position_probe.py --bits 2 --online 2048 --online-iters 0
"""

from __future__ import annotations

import argparse

import torch

import antkv_compile as ak
from antkv_compile.evaluation import load_smollm2, load_wikitext_ids
from antkv_compile.hf import attention_hook
from antkv_compile.quant import datafree, rope
from antkv_compile.quant.basis import to_basis
from antkv_compile.quant.pq import decode, encode, spec_for_bits


def online_sides(k, v, bits, tokens, iters, layer, augment=None, inv_freq=None):
    """(basis [H, D, D] or None, centroids) for keys and values of one layer [1, H, T, D]: the
    data-free codebook placed by the moments of the first `tokens` tokens, then `iters` Lloyd
    iterations on them (hf's online refinement at its last switch). With `augment` = N, the keys
    also count at later offsets spread up to N - tokens (quant/rope.py, as the cache's last switch
    given the model's RoPE): the positions a context of N tokens reaches."""
    spec = spec_for_bits(bits)
    sides = []
    for x, basis in ((k, datafree.random_rotation(k.shape[1], k.shape[-1], 2 * layer)), (v, None)):
        x = x[:, :, :tokens]
        if augment and basis is not None:
            x = rope.augment(x, torch.zeros(x.shape[1], 0, 0), torch.zeros(x.shape[1], 0, 0), rope.Rope(inv_freq, augment))
        xb = x if basis is None else to_basis(x, basis)
        sides.append((basis, datafree.refine(xb, datafree.place(xb, spec), iters) if iters else datafree.place(xb, spec)))
    return sides


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--books", help="a codebook file (default: calibrate here)")
    p.add_argument("--online", type=int, metavar="N", help="no calibration: data-free codebooks placed on the window's first N tokens")
    p.add_argument("--online-iters", type=int, default=0, help="Lloyd iterations after --online's moment placement (default 0)")
    p.add_argument("--online-augment", type=int, metavar="N",
                   help="--online's keys also at later positions up to N (RoPE-rotated copies): the fit sees a context of N")
    p.add_argument("--bits", type=float, default=1.0)
    p.add_argument("--calib-tokens", type=int, default=32768)
    p.add_argument("--calib-seq-len", type=int, default=1024)
    p.add_argument("--calib-positions", type=int, help="calibration sequences spread over this many positions (default: their length)")
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
    if args.books and args.online:
        raise SystemExit("--books and --online exclude each other: calibrated codebooks or data-free ones, not both")
    books = None
    if args.books:
        books = ak.Codebooks.load(args.books, config=model.config)
    elif not args.online:
        books = ak.calibrate(model, ids[: args.calib_tokens], bits=args.bits, seq_len=args.calib_seq_len, max_tokens=None, positions=args.calib_positions,
                             kmeans_tokens=args.kmeans_tokens, iters=args.iters)  # fmt: skip
    window = ids[args.eval_offset : args.eval_offset + args.context][None]
    seen = []
    with torch.no_grad(), attention_hook(model, lambda m, q, k, v, mask, scale: seen.append((k.float(), v.float()))):
        model(window, use_cache=False)
    edges = [0, *(int(e) for e in args.buckets.split(",") if int(e) < args.context), args.context]
    err = {"K": torch.zeros(len(edges) - 1), "V": torch.zeros(len(edges) - 1)}
    for layer, (k, v) in enumerate(seen):
        if books is None:
            sides = online_sides(k, v, args.bits, args.online, args.online_iters, layer, args.online_augment,
                                 model.model.rotary_emb.inv_freq)  # fmt: skip
        else:
            sides = [(side.basis, side.centroids) for side in (books.layers[layer].key, books.layers[layer].value)]
        for name, x, (basis, centroids) in zip("KV", (k, v), sides):
            xb = x if basis is None else to_basis(x, basis)
            e = (decode(encode(xb, centroids), centroids) - xb).pow(2).sum(-1) / xb.pow(2).sum(-1).clamp_min(1e-12)
            for j in range(len(edges) - 1):
                err[name][j] += e[..., edges[j] : edges[j + 1]].mean() / len(seen)
    if books is None:
        what = (f"data-free codebooks {args.bits:g} bit placed on the window's first {args.online} tokens"
                + (f", {args.online_iters} Lloyd iterations" if args.online_iters else "")
                + (f", keys also RoPE-shifted up to {args.online_augment}" if args.online_augment else ""))
    else:
        st = books.settings
        what = (f"codebooks {books.average_bits:g} bit, calibrated on {st.get('calibration_seq_len', '?')}-token sequences "
                f"over positions [0, {st.get('calibration_positions', '?')})")
    print(f"{what}; window of {args.context} "
          f"tokens from {args.eval_offset}; relative squared error per position")
    print("| side | " + " | ".join(f"{edges[j]}-{edges[j + 1]}" for j in range(len(edges) - 1)) + " |")
    print("|---|" + "---|" * (len(edges) - 1))
    for name, e in err.items():
        print(f"| {name} | " + " | ".join(f"{x:.3f}" for x in e.tolist()) + " |")


if __name__ == "__main__":
    main()
