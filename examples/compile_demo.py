"""Demo: the two compiler one-liners on SmolLM2-135M-Instruct.

    python examples/compile_demo.py                       # calibrate, then patch() + generate()
    python examples/compile_demo.py --codebooks cb.safetensors

1. `antkv_compile.patch(model, codebooks)`: generate() runs compiled through antkv_backend on
   transformers' own DynamicCache, which holds compressed caches after the first call. Checked
   against the eager compressed-cache run (same greedy tokens), with the number of graphs compiled
   and the compile time.
2. `torch.compile(fn, backend=antkv_backend)`: `explain()` lists the attention sites of the
   model's decode step, rewritten or declined with the reason.
"""

import argparse
import time
from pathlib import Path

import torch
from transformers import DynamicCache

import antkv_compile as ak
from antkv_compile.evaluation import load_smollm2, load_wikitext_ids

PROMPTS = ["The history of the Roman Empire", "Photosynthesis is the process by which", "In computer science, a hash table"]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--codebooks", type=Path, help="load codebooks from this file if it exists, else save them there")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--window", type=int, default=8, help="recent tokens kept exact")
    args = ap.parse_args()
    torch.set_num_threads(1)

    model, tok = load_smollm2()
    if args.codebooks and args.codebooks.exists():
        books = ak.Codebooks.load(args.codebooks, config=model.config)
    else:
        ids = load_wikitext_ids(tok)[:2048]
        books = ak.calibrate(model, ids, bits=1.0, seq_len=512, max_tokens=2048, kv_split="equal", progress=False)
        if args.codebooks:
            books.save(args.codebooks)

    tok.padding_side = "left"
    batch = tok(PROMPTS, return_tensors="pt", padding=True)
    kw = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)

    ak.use_antkv_attention(model)
    t0 = time.perf_counter()
    eager = model.generate(**batch, past_key_values=ak.AntKVCache(books, window=args.window), **kw)
    t_eager = time.perf_counter() - t0

    torch._dynamo.utils.counters.clear()
    ak.patch(model, books, window=args.window)  # one-liner 1
    t0 = time.perf_counter()
    compiled = model.generate(**batch, **kw)
    t_first = time.perf_counter() - t0
    t0 = time.perf_counter()
    model.generate(**batch, **kw)
    t_again = time.perf_counter() - t0
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    sites = model.antkv_backend.sites
    print(f"patch(): {sum(s.rewritten for s in sites)}/{len(sites)} attention sites rewritten, {graphs} graphs compiled")
    print(f"generate {args.new_tokens} tokens x {len(PROMPTS)} prompts: eager {t_eager:.1f} s, "
          f"compiled {t_first:.1f} s (with compilation), {t_again:.1f} s (compiled, second run)")  # fmt: skip
    print(f"greedy tokens identical to the eager compressed-cache run: {torch.equal(compiled, eager)}")
    for prompt, out in zip(PROMPTS, compiled):
        print(f"  {prompt!r} -> {tok.decode(out[batch.input_ids.shape[1]:], skip_special_tokens=True)!r}")

    # One-liner 2 on the model's forward; explain() reports the sites of one decode step.
    del model.forward
    torch._dynamo.reset()
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(**batch, past_key_values=cache)
        step = dict(input_ids=batch.input_ids[:, -1:], past_key_values=cache)
        sites = ak.explain(model, codebooks=books, window=args.window, **step)
    print(f"explain(): {len(sites)} sites, {sum(s.rewritten for s in sites)} rewritten")


if __name__ == "__main__":
    main()
