"""Development sweep of online refinement (AntKVCache(refine=N, refine_iters=I)): the accuracy
benchmark (benchmarks/accuracy.py, same protocol and options) with extra rows
`refined-{bits}bit-r{N}-i{I}` (one switch) and `refined-{bits}bit-r{FIRST}-{CAP}-i{I}` (a schedule).
Per-position buckets (where the loss is): benchmarks/refine_probe.py. Run it on development windows only (--eval-offset 50000), e.g.

    python benchmarks/refine_sweep.py --rows 'fp,antkv-datafree-1bit,refined-1bit-r512-*' \
        --eval-offset 50000 --windows 2 --context 2048 --chunk 32 --out /tmp/refine-dev

What it gave is in antkv_compile/hf.py next to REFINE_TOKENS.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import accuracy  # noqa: E402

import antkv_compile as ak  # noqa: E402


def refined_row(bits: float, tokens: int | tuple[int, int], iters: int) -> accuracy.Row:
    def setup(ctx: accuracy.Context) -> accuracy.Setup:
        ak.use_antkv_attention(ctx.model)
        return accuracy.Setup(lambda n: ak.AntKVCache(bits=bits, refine=tokens, refine_iters=iters, max_cache_len=n),
                              codebooks=lambda cache: [t for layer in cache.layers for t in layer.codebook.tensors()])

    label = "-".join(map(str, tokens)) if isinstance(tokens, tuple) else tokens
    return accuracy.Row(f"refined-{bits:g}bit-r{label}-i{iters}", bits, setup, kind="ours", notes=f"refine={tokens}, refine_iters={iters}")


for _bits in (4.0, 2.0, 1.0):
    # one switch after N tokens, or a doubling schedule (FIRST, CAP): rows refined-2bit-r128-2048-i10
    for _tokens in (64, 128, 256, 512, 1024, (64, 2048), (128, 1024), (128, 2048), (256, 2048)):
        for _iters in (0, 1, 3, 5, 10, 20, 40):
            accuracy.register(refined_row(_bits, _tokens, _iters))

if __name__ == "__main__":
    accuracy.main()
