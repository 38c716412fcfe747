"""Calibration throughput on SmolLM2-135M-Instruct: what calibrating N tokens costs, per phase.

Phases (antkv_compile.calibrate):
- forward: the model alone over the calibration sequences (no hooks), for scale;
- collect: `collect_calibration`, the same forward with every layer's keys, values, Anchor Score
  sums (blockwise, from the real queries), query moments and probe queries kept;
- fit: `fit_codebooks` per bit budget: per layer a key basis and k-means weighted by the Anchor
  Score for K and V (each candidate K/V split), and the attention error of each candidate on the
  probe queries when there is more than one. Its memo is cleared first, so nothing is reused.

Throughput is calibration tokens per second of each phase; fit also reports seconds per layer
(the k-means runs on a sample of --kmeans-tokens per codebook, so its cost barely depends on N).

    python benchmarks/calibration.py                 # 32768 tokens, writes benchmarks/results/calibration.{json,md}
    python benchmarks/calibration.py --quick         # 2048 tokens, 1 bit, small k-means, writes to a temp dir
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, help="calibration tokens, the first N of WikiText-2 test (default 32768; 2048 with --quick)")
    p.add_argument("--seq-len", type=int, help="tokens per calibration sequence (default 1024; 512 with --quick)")
    p.add_argument("--bits", help="comma list of bit budgets to fit (default '2,1'; '1' with --quick)")
    p.add_argument("--kmeans-tokens", type=int, help="tokens sampled per codebook for k-means (default 4096, calibrate's; 1024 with --quick)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--data", help="path to wiki.test.raw (default: $ANTKV_WIKITEXT or ../shared/data/...)")
    p.add_argument("--out", type=Path, help=f"output directory (default: {RESULTS_DIR}; a temp dir with --quick)")
    p.add_argument("--quick", action="store_true", help="smoke test: 2048 tokens in sequences of 512, 1 bit, k-means on 1024, written to a temp dir")
    args = p.parse_args(argv)
    quick = dict(tokens=2048, seq_len=512, bits="1", kmeans_tokens=1024)
    full = dict(tokens=32768, seq_len=1024, bits="2,1", kmeans_tokens=4096)
    for k, v in (quick if args.quick else full).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    args.bits = [float(b) for b in args.bits.split(",")]
    if args.tokens < args.seq_len:
        p.error(f"--tokens {args.tokens} is less than one sequence of --seq-len {args.seq_len}")
    if args.quick:
        args.out = args.out or Path(tempfile.gettempdir()) / "antkv-calibration-quick"
    args.out = args.out or RESULTS_DIR
    return args


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    import torch
    import transformers

    import antkv_compile as ak
    from antkv_compile.evaluation import code_version, load_smollm2, load_wikitext_ids

    torch.set_num_threads(args.threads)
    command = shlex.join(["python", *sys.argv]) if argv is None else shlex.join(["python", "benchmarks/calibration.py", *argv])
    date, load_start, code = datetime.now().astimezone().isoformat(timespec="seconds"), os.getloadavg()[0], code_version()

    model, tok = load_smollm2()
    ids = load_wikitext_ids(tok, args.data)[: args.tokens]
    n_seq = ids.numel() // args.seq_len
    tokens = n_seq * args.seq_len  # what calibration actually uses
    layers = model.config.num_hidden_layers
    records = []

    def record(phase, seconds, **extra):
        r = dict(phase=phase, tokens=tokens, seconds=round(seconds, 3), tokens_per_s=round(tokens / seconds, 1), **extra)
        records.append(r)
        print(f"{phase:>24}: {seconds:8.1f} s, {r['tokens_per_s']:8.1f} tokens/s" + "".join(f", {k} {v}" for k, v in extra.items()))

    with torch.no_grad():
        t0 = time.perf_counter()
        for seq in ids[:tokens].view(n_seq, args.seq_len):
            model(seq[None], use_cache=False)
        record("forward", time.perf_counter() - t0)

    t0 = time.perf_counter()
    data = ak.collect_calibration(model, ids, seq_len=args.seq_len, max_tokens=tokens)
    record("collect_calibration", time.perf_counter() - t0)

    for bits in args.bits:
        data.fits.clear()  # no k-means result reused across budgets
        t0 = time.perf_counter()
        books = ak.fit_codebooks(data, bits, kmeans_tokens=args.kmeans_tokens)
        seconds = time.perf_counter() - t0
        cands = max(1, len(books.settings["candidate_errors"]))
        record(f"fit_codebooks {bits:g} bit", seconds, seconds_per_layer=round(seconds / layers, 3), layers=layers, kv_candidates=cands)

    header = {
        "command": f"`{command}`",
        "date": date,
        "code": code,
        "machine": f"{platform.platform()}, {os.cpu_count()} CPUs, torch {torch.__version__}, transformers {transformers.__version__}, "
                   f"{args.threads} torch thread(s), load average (1 min) at start {load_start:.2f}, at end {os.getloadavg()[0]:.2f}",
        "model": f"SmolLM2-135M-Instruct (GGUF Q4_1 weights dequantized), {model.dtype}, {layers} layers",
        "data": f"WikiText-2 test, first {tokens} tokens in {n_seq} sequences of {args.seq_len}",
        "k-means": f"{args.kmeans_tokens} tokens sampled per codebook, {books.settings['iters']} Lloyd iterations",
    }
    for r in records:
        r.update(date=date, command=command, code=code)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "calibration.json").write_text(json.dumps({"header": header, "records": records}, indent=2) + "\n")
    lines = ["# Calibration throughput", ""] + [f"- {k}: {v}" for k, v in header.items()] + [
        "",
        "| phase | tokens | seconds | tokens/s | s per layer |",
        "|---|---|---|---|---|",
    ]
    for r in records:
        per_layer = r.get("seconds_per_layer", "")
        lines.append(f"| {r['phase']} | {r['tokens']} | {r['seconds']:.1f} | {r['tokens_per_s']:.1f} | {per_layer} |")
    lines += ["", "forward: the model alone; collect_calibration: the same forward keeping K, V, Anchor Score sums and query "
              "moments; fit_codebooks: key basis, weighted k-means of K and V per layer, K/V split errors when there are candidates."]
    (args.out / "calibration.md").write_text("\n".join(lines) + "\n")
    print(f"\nwrote {args.out / 'calibration.json'} and {args.out / 'calibration.md'}")
    return records


if __name__ == "__main__":
    main()
