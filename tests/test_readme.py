"""Every ```python block of README.md runs as written, and every `antkv ...` command line in its
```bash blocks parses, so the README cannot drift from the code.

Each block runs in a fresh namespace on a tiny random-weight Llama (head_dim 16, divisible by
every codebook sub-vector up to 16), after a prelude that defines the names the snippets take as
given: `model` / `hf_model`, `calibration_token_ids`, `input_ids` and `codebooks` calibrated on the
tiny model. Files the snippets write go to a temporary working directory, cached codebooks to a
temporary $ANTKV_CACHE_DIR."""

import re
import shlex
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import antkv_compile as ak
from antkv_compile.cli import build_parser

README = Path(__file__).resolve().parents[1] / "README.md"
TEXT = README.read_text()


def blocks(lang: str) -> list[tuple[int, str]]:
    """(first line number, source) of each ```lang block."""
    return [(TEXT[: m.start()].count("\n") + 2, m.group(1)) for m in re.finditer(rf"^```{lang}\n(.*?)^```$", TEXT, re.S | re.M)]


PYTHON = blocks("python")


def tiny_model():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=2048, pad_token_id=0, eos_token_id=1, bos_token_id=2)  # fmt: skip
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def tiny_codebooks():
    ids = torch.randint(3, 128, (2048,), generator=torch.Generator().manual_seed(1))
    return ak.calibrate(tiny_model(), ids, bits=1.0, seq_len=512, max_tokens=2048, kmeans_tokens=1024, iters=4, progress=False)


def test_readme_has_python_snippets():
    assert len(PYTHON) >= 3, "the README's Usage and Compile snippets were not found"


@pytest.mark.parametrize("line, source", PYTHON, ids=[f"README.md:{line}" for line, _ in PYTHON])
def test_python_snippet_runs_as_written(line, source, tiny_codebooks, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ANTKV_CACHE_DIR", str(tmp_path / "cache"))
    torch._dynamo.reset()
    model = tiny_model()
    g = torch.Generator().manual_seed(2)
    namespace = {
        "model": model,
        "hf_model": model,
        "calibration_token_ids": torch.randint(3, 128, (2048,), generator=g),
        "input_ids": torch.randint(3, 128, (1, 12), generator=g),
        "codebooks": tiny_codebooks,
    }
    code = compile("\n" * (line - 1) + source, str(README), "exec")  # tracebacks point at README lines
    exec(code, namespace)
    # ... and does what the text around it says
    if "out" in namespace:  # generate() made new tokens
        assert namespace["out"].shape[1] > namespace["input_ids"].shape[1]
    sites = namespace.get("sites") or getattr(namespace["model"], "antkv_backend", None) and namespace["model"].antkv_backend.sites
    if sites:  # explain() / patch(): every attention site rewritten, none declined
        assert all(s.rewritten for s in sites), [str(s) for s in sites]
    if "step" in namespace:  # torch.compile(model, backend=...): the cache it wrote back is compressed
        assert all(isinstance(layer.keys, ak.VQTensor) for layer in namespace["cache"].layers)
    if "reused" in namespace:  # cached_calibrate: a fresh cache directory, so calibrated and saved
        assert not namespace["reused"] and namespace["path"].is_file()


def test_command_lines_parse():
    parser = build_parser()
    commands = [cmd for _, src in blocks("bash") for cmd in src.splitlines() if cmd.startswith("antkv ")]
    assert len(commands) >= 4, "the README's command-line examples were not found"
    for cmd in commands:
        argv = shlex.split(cmd, comments=True)[1:]
        try:
            parser.parse_args(argv)
        except SystemExit:
            pytest.fail(f"README command does not parse: {cmd}")
