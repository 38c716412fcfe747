"""Where the loss of online refinement is: per-position NLL of data-free / refined caches against FP.

Decodes WikiText-2 windows as benchmarks/accuracy.py does (a --prompt prefill, then --chunk tokens
per call, the windows batched into one cache) and keeps the NLL of every scored position, so the
ratio to FP can be read per position bucket (e.g. before and after a refinement switch). Run it on
development windows only (--eval-offset 50000):

    python benchmarks/refine_probe.py --configs 'fp,2:none,2:512' --eval-offset 50000 --windows 2 \
        --out /tmp/probe.json

A config is `fp` or `BITS:REFINE[:ITERS]` (AntKVCache(bits=BITS, refine=REFINE, refine_iters=ITERS));
REFINE is `none`, `default`, a token count N, or FIRST-CAP (a doubling schedule: refine=(FIRST, CAP)).
Configs already in --out are not rerun (one process may add configs to a file another wrote).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm
from transformers import DynamicCache

sys.path.insert(0, str(Path(__file__).resolve().parent))

import antkv_compile as ak  # noqa: E402
from antkv_compile.evaluation import load_smollm2, load_wikitext_ids  # noqa: E402
from antkv_compile.hf import REFINE_ITERS  # noqa: E402


def parse_config(spec: str, model):
    """A function making a fresh cache for the config `spec` (see the module doc)."""
    if spec == "fp":
        return lambda: DynamicCache(config=model.config)
    parts = spec.split(":")
    if len(parts) not in (2, 3):
        raise SystemExit(f"config {spec!r}: want fp or BITS:REFINE[:ITERS]")
    bits, refine = float(parts[0]), parts[1]
    iters = int(parts[2]) if len(parts) == 3 else REFINE_ITERS
    kwargs = {"bits": bits, "refine_iters": iters}
    if refine == "none":
        kwargs["refine"] = None
    elif "-" in refine:
        kwargs["refine"] = tuple(int(v) for v in refine.split("-"))
    elif refine != "default":
        kwargs["refine"] = int(refine)
    return lambda: ak.AntKVCache(**kwargs)


@torch.no_grad()
def position_nll(model, windows: torch.Tensor, make_cache, chunk: int, prompt: int) -> torch.Tensor:
    """NLL [B, n - prompt] of each scored prediction (from the prompt's last position on), decoded
    like evaluation.decode_nll."""
    keyword = ak.cache_keyword(model)
    cache, n = make_cache(), windows.shape[1]
    first = prompt - 1
    out = torch.zeros(windows.shape[0], n - 1 - first, dtype=torch.float64)
    bounds = [0, prompt] + list(range(prompt + chunk, n, chunk)) + [n]
    for start, end in tqdm(list(zip(bounds[:-1], bounds[1:])), leave=False):
        logits = model(windows[:, start:end], **{keyword: cache}, use_cache=True).logits
        lo, hi = max(start, first), min(end, n - 1)
        if lo >= hi:
            continue
        logp = F.log_softmax(logits[:, lo - start : hi - start].float(), dim=-1)
        out[:, lo - first : hi - first] = -logp.gather(-1, windows[:, lo + 1 : hi + 1, None])[..., 0].double()
    return out


def bucket_table(results: dict, edges: list[int]) -> str:
    """Markdown: ppl / FP per bucket of scored positions [a, b) (token index of the predicted token)."""
    fp = torch.tensor(results["fp"]["nll"])
    offset = results["fp"]["prompt"]  # scored prediction j predicts token offset + j
    n = fp.shape[1]
    bounds = [e for e in edges if offset < e < n + offset]
    bounds = [offset] + bounds + [n + offset]
    head = "| config | " + " | ".join(f"{a}-{b}" for a, b in zip(bounds[:-1], bounds[1:])) + " | all |"
    lines = [head, "|" + "---|" * (len(bounds) + 1)]
    for name, r in results.items():
        nll = torch.tensor(r["nll"])
        cells = []
        for a, b in list(zip(bounds[:-1], bounds[1:])) + [(bounds[0], bounds[-1])]:
            s = slice(a - offset, b - offset)
            cells.append(f"{math.exp((nll[:, s].mean() - fp[:, s].mean()).item()):.3f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", required=True, help="comma list of configs (see above)")
    p.add_argument("--out", type=Path, required=True, help="JSON file of per-position NLL (extended, not overwritten)")
    p.add_argument("--eval-offset", type=int, default=50_000)
    p.add_argument("--windows", type=int, default=2)
    p.add_argument("--context", type=int, default=2048)
    p.add_argument("--prompt", type=int, default=64)
    p.add_argument("--chunk", type=int, default=1)
    p.add_argument("--buckets", default="128,256,512,1024", help="bucket edges (token positions) of the table")
    p.add_argument("--data", help="path to wiki.test.raw (default: as accuracy.py)")
    args = p.parse_args(argv)
    if args.eval_offset == 100_000:
        raise SystemExit("--eval-offset 100000 is the evaluation slice; develop on --eval-offset 50000")
    torch.set_num_threads(1)
    results = json.loads(args.out.read_text()) if args.out.exists() else {}
    todo = [c for c in args.configs.split(",") if c not in results]
    if todo:
        model, tokenizer = load_smollm2()
        ak.use_antkv_attention(model)
        ids = load_wikitext_ids(tokenizer, args.data)
        windows = torch.stack([ids[args.eval_offset + i * args.context : args.eval_offset + (i + 1) * args.context]
                               for i in range(args.windows)])
        for spec in todo:
            nll = position_nll(model, windows, parse_config(spec, model), args.chunk, args.prompt)
            results[spec] = {"nll": nll.tolist(), "prompt": args.prompt, "chunk": args.chunk,
                             "offset": args.eval_offset, "windows": args.windows}
            args.out.write_text(json.dumps(results))
            print(spec, f"ppl {math.exp(nll.mean().item()):.3f}", flush=True)
    if "fp" in results:
        print(bucket_table(results, [int(e) for e in args.buckets.split(",")]))


if __name__ == "__main__":
    main()
