"""Demo: SmolLM2-135M-Instruct generating with a 1-bit AnTKV cache, next to the full-precision cache.

    python examples/demo.py                 # calibrate on WikiText-2 (cached), generate, compare
    python examples/demo.py --bits 2 --codebooks cb.safetensors

Calibrates codebooks on a slice of WikiText-2 (or loads them), then generates greedily from a few
prompts with the FP cache and with the compressed one, and prints both texts and the bytes each
cache holds. Calibrated codebooks are cached in $ANTKV_CACHE_DIR (else $XDG_CACHE_HOME/antkv,
else ~/.cache/antkv), so the next run skips calibration; --recalibrate fits them again.
"""

import argparse
import time
from pathlib import Path

PROMPTS = [
    "The history of the Roman Empire",
    "Photosynthesis is the process by which",
    "In computer science, a hash table",
]


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bits", type=float, default=1.0, help="average bits per K/V element (default 1.0)")
    ap.add_argument("--codebooks", type=Path, help="load codebooks from this file if it exists, else save them there")
    ap.add_argument("--recalibrate", action="store_true", help="calibrate again instead of reusing the cached codebooks")
    ap.add_argument("--calib-tokens", type=int, default=4096, help="WikiText-2 tokens to calibrate on (default 4096)")
    ap.add_argument("--kmeans-iters", type=int, default=8, help="Lloyd iterations per codebook (default 8; calibrate's own default is 15)")
    ap.add_argument("--data", help="WikiText-2 wiki.test.raw (default: $ANTKV_WIKITEXT or ../shared/data/wikitext-2-raw/)")
    ap.add_argument("--new-tokens", type=int, default=48, help="tokens generated per prompt (default 48)")
    ap.add_argument("--window", type=int, default=32, help="recent tokens kept exact (default 32)")
    return ap.parse_args()


def main():
    args = parse_args()  # before torch and transformers: --help answers at once

    import torch
    from transformers import DynamicCache, StoppingCriteriaList

    import antkv_compile as ak
    from antkv_compile.cli import cache_kwarg, describe, token_bar, waiting
    from antkv_compile.codebook_cache import cached_calibrate
    from antkv_compile.evaluation import cache_nbytes, load_smollm2, load_wikitext_ids

    with waiting("loading SmolLM2-135M-Instruct (GGUF weights, then the tokenizer)"):
        model, tok = load_smollm2()
    if args.codebooks and args.codebooks.exists() and not args.recalibrate:
        books = ak.Codebooks.load(args.codebooks, config=model.config)
        print(f"loaded {args.codebooks}: {describe(books)}")
    else:
        t0 = time.perf_counter()
        ids = load_wikitext_ids(tok, args.data)[: args.calib_tokens]
        # 8 Lloyd iterations (calibrate's default is 15): the cold demo stays under 3 minutes
        books, path, hit = cached_calibrate(model, ids, bits=args.bits, recalibrate=args.recalibrate, seq_len=1024,
                                            max_tokens=args.calib_tokens, iters=args.kmeans_iters)
        what = "reused cached" if hit else f"calibrated on {ids.numel()} tokens in {time.perf_counter() - t0:.0f} s,"
        print(f"{what} {path}: {describe(books)}")
        if args.codebooks:
            books.save(args.codebooks)
            print(f"saved {args.codebooks}")

    ak.use_antkv_attention(model)
    key = cache_kwarg(model)  # past_key_values=, or cache= from transformers 5.24
    for prompt in PROMPTS:
        ids = tok(prompt, return_tensors="pt").input_ids
        results = {}
        ours = ak.AntKVCache(books, window=args.window, max_cache_len=ids.shape[1] + args.new_tokens)  # preallocated
        for name, cache in (("fp", DynamicCache()), (f"antkv {books.average_bits:g}-bit", ours)):
            bar = token_bar(args.new_tokens, f"{name} cache")
            t0 = time.perf_counter()
            with torch.no_grad():
                out = model.generate(ids, max_new_tokens=args.new_tokens, do_sample=False, **{key: cache},
                                     stopping_criteria=StoppingCriteriaList([bar]))  # fmt: skip
            bar.close()
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
