"""Demo: the two compiler entry points on SmolLM2-135M-Instruct (alternatives, not steps).

    python examples/compile_demo.py                       # calibrate (cached), then patch() + generate()
    python examples/compile_demo.py --codebooks cb.safetensors --bits 2

1. `antkv_compile.patch(model, codebooks)`: generate() runs compiled through antkv_backend on
   transformers' own DynamicCache, which holds compressed caches after the first call. Checked
   against the eager compressed-cache run (same greedy tokens), with the number of graphs compiled
   and the compile time. The first compiled generate compiles for minutes on CPU.
2. `torch.compile(fn, backend=antkv_backend)` on a forward you call yourself: `explain()` lists the
   attention sites of the model's decode step, rewritten or declined with the reason.

Calibrated codebooks are cached as in examples/demo.py ($ANTKV_CACHE_DIR, else
$XDG_CACHE_HOME/antkv, else ~/.cache/antkv); --recalibrate fits them again.
"""

import argparse
import time
from pathlib import Path

PROMPTS = ["The history of the Roman Empire", "Photosynthesis is the process by which", "In computer science, a hash table"]


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bits", type=float, default=1.0, help="average bits per K/V element (default 1.0)")
    ap.add_argument("--codebooks", type=Path, help="load codebooks from this file if it exists, else save them there")
    ap.add_argument("--recalibrate", action="store_true", help="calibrate again instead of reusing the cached codebooks")
    ap.add_argument("--calib-tokens", type=int, default=2048, help="WikiText-2 tokens to calibrate on, in sequences of 512 (default 2048)")
    ap.add_argument("--data", help="WikiText-2 wiki.test.raw (default: $ANTKV_WIKITEXT or ../shared/data/wikitext-2-raw/)")
    ap.add_argument("--new-tokens", type=int, default=64, help="tokens generated per prompt (default 64)")
    ap.add_argument("--window", type=int, default=8, help="recent tokens kept exact (default 8)")
    return ap.parse_args()


def main():
    args = parse_args()  # before torch and transformers: --help answers at once

    import torch
    from transformers import DynamicCache, StoppingCriteriaList

    import antkv_compile as ak
    from antkv_compile.cli import COMPILE_NOTE, cache_kwarg, describe, token_bar, waiting
    from antkv_compile.codebook_cache import cached_calibrate
    from antkv_compile.evaluation import load_smollm2, load_wikitext_ids

    torch.set_num_threads(1)
    with waiting("loading SmolLM2-135M-Instruct (GGUF weights, then the tokenizer)"):
        model, tok = load_smollm2()
    if args.codebooks and args.codebooks.exists() and not args.recalibrate:
        books = ak.Codebooks.load(args.codebooks, config=model.config)
        print(f"loaded {args.codebooks}: {describe(books)}")
    else:
        ids = load_wikitext_ids(tok, args.data)[: args.calib_tokens]
        books, path, hit = cached_calibrate(model, ids, bits=args.bits, recalibrate=args.recalibrate, seq_len=512,
                                            max_tokens=args.calib_tokens, kv_split="equal")  # fmt: skip
        print(f"{'reused cached' if hit else 'calibrated'} {path}: {describe(books)}")
        if args.codebooks:
            books.save(args.codebooks)
            print(f"saved {args.codebooks}")

    tok.padding_side = "left"
    batch = tok(PROMPTS, return_tensors="pt", padding=True)
    kw = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)

    def generate(desc, compiling=False, **extra):
        bar = token_bar(args.new_tokens, desc, compiling)
        t0 = time.perf_counter()
        out = model.generate(**batch, **kw, **extra, stopping_criteria=StoppingCriteriaList([bar]))
        bar.close()
        return out, time.perf_counter() - t0

    ak.use_antkv_attention(model)
    eager, t_eager = generate("eager, compressed cache", **{cache_kwarg(model): ak.AntKVCache(books, window=args.window)})

    torch._dynamo.utils.counters.clear()
    ak.patch(model, books, window=args.window)  # entry point 1: generate() runs compiled
    print(COMPILE_NOTE)
    compiled, t_first = generate("compiled", compiling=True)
    _, t_again = generate("compiled, second run")
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    sites = model.antkv_backend.sites
    print(f"patch(): {sum(s.rewritten for s in sites)}/{len(sites)} attention sites rewritten, {graphs} graphs compiled")
    print(f"generate {args.new_tokens} tokens x {len(PROMPTS)} prompts: eager {t_eager:.1f} s, "
          f"compiled {t_first:.1f} s (with compilation), {t_again:.1f} s (compiled, second run)")  # fmt: skip
    print(f"greedy tokens identical to the eager compressed-cache run: {torch.equal(compiled, eager)}")
    for prompt, out in zip(PROMPTS, compiled):
        print(f"  {prompt!r} -> {tok.decode(out[batch.input_ids.shape[1]:], skip_special_tokens=True)!r}")

    # Entry point 2, on the model's forward (undo the patch first); explain() reports the sites of
    # one decode step, under no_grad and with a cache as in generation.
    del model.forward
    torch._dynamo.reset()
    cache = DynamicCache(config=model.config)
    key = cache_kwarg(model)
    with torch.no_grad():
        model(**batch, **{key: cache})
        step = dict(input_ids=batch.input_ids[:, -1:], **{key: cache})
        sites = ak.explain(model, codebooks=books, window=args.window, **step)
    print(f"explain(): {len(sites)} sites, {sum(s.rewritten for s in sites)} rewritten")


if __name__ == "__main__":
    main()
