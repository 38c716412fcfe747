"""Demo: SmolLM2-135M-Instruct generating with a 1-bit AnTKV cache, next to the full-precision cache.

    python examples/demo.py                 # calibrate on WikiText-2, generate, compare
    python examples/demo.py --bits 2 --codebooks cb.safetensors

Calibrates codebooks on a slice of WikiText-2 (or loads them), then generates greedily from a few
prompts with the FP cache and with the compressed one, and prints both texts and the bytes each
cache holds.
"""

import argparse
import time
from pathlib import Path

import torch
from transformers import DynamicCache

import antkv_compile as ak
from antkv_compile.evaluation import cache_nbytes, load_smollm2, load_wikitext_ids

PROMPTS = [
    "The history of the Roman Empire",
    "Photosynthesis is the process by which",
    "In computer science, a hash table",
]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bits", type=float, default=1.0, help="average bits per K/V element (default 1.0)")
    ap.add_argument("--codebooks", type=Path, help="load codebooks from this file if it exists, else save them there")
    ap.add_argument("--calib-tokens", type=int, default=4096, help="WikiText-2 tokens to calibrate on")
    ap.add_argument("--data", help="WikiText-2 wiki.test.raw (default: ../shared/data/wikitext-2-raw/)")
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--window", type=int, default=32, help="recent tokens kept exact")
    args = ap.parse_args()

    model, tok = load_smollm2()
    if args.codebooks and args.codebooks.exists():
        books = ak.Codebooks.load(args.codebooks, config=model.config)
        print(f"loaded {args.codebooks}: {books.average_bits:g} bits, split {books.settings['chosen'][0]}")
    else:
        t0 = time.perf_counter()
        ids = load_wikitext_ids(tok, args.data)[: args.calib_tokens]
        books = ak.calibrate(model, ids, bits=args.bits, seq_len=1024, max_tokens=args.calib_tokens)
        print(f"calibrated {args.bits:g}-bit codebooks on {ids.numel()} tokens in {time.perf_counter() - t0:.0f} s; "
              f"K/V split {books.settings['chosen'][0]} (errors {books.settings['candidate_errors']})")  # fmt: skip
        if args.codebooks:
            books.save(args.codebooks)
            print(f"saved {args.codebooks}")

    ak.use_antkv_attention(model)
    for prompt in PROMPTS:
        ids = tok(prompt, return_tensors="pt").input_ids
        results = {}
        for name, cache in (("fp", DynamicCache()), (f"antkv {books.average_bits:g}-bit", ak.AntKVCache(books, window=args.window))):
            t0 = time.perf_counter()
            with torch.no_grad():
                out = model.generate(ids, max_new_tokens=args.new_tokens, do_sample=False, past_key_values=cache)
            text = tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
            results[name] = (text, cache_nbytes(cache, exclude=books.tensors()), time.perf_counter() - t0)
        print(f"\n=== {prompt!r}")
        for name, (text, nbytes, secs) in results.items():
            print(f"[{name:>13}] {nbytes / 1024:8.1f} KiB cache, {secs:5.1f} s | {text!r}")
    print(f"\ncodebooks: {books.nbytes / 2**20:.1f} MiB for the whole model (shared by every sequence)")
    print("The window keeps the most recent tokens exact, so short generations are mostly window; "
          "the cache shrinks toward the code size as the context grows (see benchmarks/results/accuracy.md).")


if __name__ == "__main__":
    main()
