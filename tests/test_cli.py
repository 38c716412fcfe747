"""The `antkv` command line (antkv_compile/cli.py) on a tiny random Llama saved as a Hugging Face
model directory with a word-level tokenizer, so every command runs end to end offline in seconds;
what it prints is checked against the library called directly."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

import antkv_compile as ak
from antkv_compile import cli

ROOT = Path(__file__).resolve().parents[1]
WORDS = [f"w{i}" for i in range(60)]
CALIB = ["--seq-len", "64", "--calib-tokens", "256", "--bits", "1"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A model directory (config, weights, tokenizer) and a calibration text file."""
    root = tmp_path_factory.mktemp("tiny")
    vocab = {"<unk>": 0, "<pad>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", pad_token="<pad>", eos_token="</s>")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(vocab), hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=512, pad_token_id=1, eos_token_id=2, bos_token_id=2)  # fmt: skip
    LlamaForCausalLM(cfg).eval().save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    g = torch.Generator().manual_seed(1)
    (root / "text.txt").write_text(" ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (600,), generator=g)))
    return root


def run_cli(capsys, monkeypatch, tmp_path, *argv):
    monkeypatch.setenv("ANTKV_CACHE_DIR", str(tmp_path / "cache"))
    assert cli.main(list(argv)) == 0
    return capsys.readouterr().out


def _model_args(tiny_dir):
    return ["--model", str(tiny_dir / "model"), "--data", str(tiny_dir / "text.txt"), *CALIB]


def _load(tiny_dir):
    from transformers import AutoTokenizer

    return LlamaForCausalLM.from_pretrained(tiny_dir / "model").eval(), AutoTokenizer.from_pretrained(tiny_dir / "model")


def test_parsing_imports_nothing_heavy_and_every_option_has_help():
    code = ("import sys; from antkv_compile.cli import build_parser; "
            "[build_parser().parse_args(a) for a in (['generate', 'x', '--mode', 'compiled'], ['calibrate'], ['explain'], ['bench', 'speed', '--quick'])]; "
            "print(sorted(m for m in ('torch', 'transformers', 'tqdm') if m in sys.modules))")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT).stdout
    assert out.strip() == "[]"
    for argv in (["--help"], ["generate", "--help"]):
        done = subprocess.run([sys.executable, "-m", "antkv_compile", *argv], capture_output=True, text=True, cwd=ROOT)
        assert done.returncode == 0 and "usage: antkv" in done.stdout
    parser = cli.build_parser()
    subparsers = next(a for a in parser._actions if a.dest == "command").choices
    assert set(subparsers) == {"calibrate", "generate", "explain", "bench"}
    for name, sub in subparsers.items():
        for action in sub._actions:
            assert action.help, f"antkv {name} {action.option_strings or action.dest} has no help"


def test_the_package_loads_its_names_on_first_use_and_submodules_do_not_hide_them():
    code = ("import sys; import antkv_compile as ak; assert 'torch' not in sys.modules; "
            "from antkv_compile.calibrate import fit_codebooks; from antkv_compile.compile.patch import AntKVBackend; "
            "import inspect; assert inspect.isfunction(ak.calibrate) and inspect.isfunction(ak.patch), (ak.calibrate, ak.patch); "
            "import torch; assert torch._dynamo.lookup_backend('antkv') is ak.antkv_backend; "
            "assert sorted(set(ak.__all__) - set(dir(ak))) == []; print('ok')")  # fmt: skip
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert done.stdout.strip() == "ok", done.stderr[-2000:]


def test_calibrate_writes_the_codebooks_calibrate_gives_and_reuses_the_cache(capsys, monkeypatch, tmp_path, tiny_dir):
    out_file = tmp_path / "books.safetensors"
    out = run_cli(capsys, monkeypatch, tmp_path, "calibrate", *_model_args(tiny_dir), "-o", str(out_file))
    assert "calibrated on 256 tokens" in out and f"saved {out_file}" in out
    model, tok = _load(tiny_dir)
    books = ak.Codebooks.load(out_file, config=model.config)
    ids = tok((tiny_dir / "text.txt").read_text(), return_tensors="pt", add_special_tokens=False).input_ids[0, :256]
    ref = ak.calibrate(model, ids, bits=1.0, seq_len=64, max_tokens=256, progress=False)
    assert all(torch.equal(a, b) for a, b in zip(books.tensors(), ref.tensors(), strict=True))
    assert "errors {}" not in out and "attention error per split" not in out  # 1 bit has a single candidate

    again = run_cli(capsys, monkeypatch, tmp_path, "calibrate", *_model_args(tiny_dir))
    assert "reusing cached codebooks" in again and "calibrated on" not in again
    refit = run_cli(capsys, monkeypatch, tmp_path, "calibrate", *_model_args(tiny_dir), "--recalibrate")
    assert "calibrated on 256 tokens" in refit
    spread = run_cli(capsys, monkeypatch, tmp_path, "calibrate", *_model_args(tiny_dir), "--positions", "200", "-o", str(out_file))
    assert "calibrated on 256 tokens" in spread  # another setting: not the cached file
    books = ak.Codebooks.load(out_file, config=model.config)
    ref = ak.calibrate(model, ids, bits=1.0, seq_len=64, max_tokens=256, progress=False, positions=200)
    assert books.settings["calibration_positions"] == 200
    assert all(torch.equal(a, b) for a, b in zip(books.tensors(), ref.tensors(), strict=True))


def test_generate_eager_prints_what_generate_with_the_compressed_cache_gives(capsys, monkeypatch, tmp_path, tiny_dir):
    books_file = tmp_path / "books.safetensors"
    prompts = ["w1 w2 w3 w4 w5", "w7 w8"]
    out = run_cli(capsys, monkeypatch, tmp_path, "generate", *prompts, *_model_args(tiny_dir), "--codebooks", str(books_file),
                  "--new-tokens", "12", "--window", "2", "--compare-fp")  # fmt: skip
    model, tok = _load(tiny_dir)
    books = ak.Codebooks.load(books_file, config=model.config)
    tok.padding_side = "left"
    batch = tok(prompts, return_tensors="pt", padding=True)
    kw = dict(max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id)
    with torch.no_grad():
        fp = model.generate(**batch, **kw)
        ak.use_antkv_attention(model)
        ours = model.generate(**batch, **kw, **{cli.cache_kwarg(model): ak.AntKVCache(books, window=2)})
    n = batch.input_ids.shape[1]
    for i, prompt in enumerate(prompts):
        block = out.split(f"=== {prompt!r}\n")[1]
        assert f"[fp] {tok.decode(fp[i, n:], skip_special_tokens=True)!r}" in block
        assert f"[antkv 1-bit] {tok.decode(ours[i, n:], skip_special_tokens=True)!r}" in block
    same = sum(torch.equal(a, b) for a, b in zip(fp, ours))
    assert f"greedy tokens identical to the FP cache for {same}/2 prompts" in out

    # the file now exists: loaded, not calibrated again
    out = run_cli(capsys, monkeypatch, tmp_path, "generate", "w1", *_model_args(tiny_dir), "--codebooks", str(books_file), "--new-tokens", "2")
    assert f"loaded {books_file}" in out and "calibrated" not in out


def test_generate_compiled_gives_the_eager_tokens(capsys, monkeypatch, tmp_path, tiny_dir):
    args = ["w1 w2 w3 w4 w5 w6", "w9", *_model_args(tiny_dir), "--new-tokens", "6", "--window", "2"]
    eager = run_cli(capsys, monkeypatch, tmp_path, "generate", *args)
    torch._dynamo.reset()
    compiled = run_cli(capsys, monkeypatch, tmp_path, "generate", *args, "--mode", "compiled")
    assert "the first compiled call takes minutes on CPU" in compiled
    assert "4/4 attention sites rewritten" in compiled  # 2 layers x (prefill, decode)
    texts = lambda out: [line.split("] ", 1)[1] for line in out.splitlines() if line.startswith("[antkv")]  # noqa: E731
    assert texts(compiled) == texts(eager) and len(texts(eager)) == 2


@pytest.mark.parametrize("step", ["prefill", "decode"])
def test_explain_rewrites_every_site_under_no_grad_with_a_cache(capsys, monkeypatch, tmp_path, tiny_dir, step):
    torch._dynamo.reset()
    out = run_cli(capsys, monkeypatch, tmp_path, "explain", *_model_args(tiny_dir), "--prompt", "w1 w2 w3 w4", "--step", step)
    sites = [line for line in out.splitlines() if line.startswith("graph ")]
    assert len(sites) == 2 and all(f": rewritten: {step}" in s for s in sites), out
    assert "2/2 attention sites rewritten" in out


def test_bench_passes_arguments_through_and_explains_a_missing_checkout(capsys, monkeypatch, tmp_path):
    bench = tmp_path / "benchmarks"
    bench.mkdir()
    (bench / "echo.py").write_text("import sys, pathlib; pathlib.Path(sys.argv[1]).write_text(repr(sys.argv[2:])); sys.exit(3)")
    monkeypatch.setattr(cli, "BENCHMARKS", bench)
    record = tmp_path / "argv.txt"
    assert cli.main(["bench", "echo", str(record), "--quick", "-x", "1"]) == 3  # its exit status
    assert record.read_text() == repr(["--quick", "-x", "1"])
    with pytest.raises(SystemExit, match="no benchmark 'nope'.*available: echo"):
        cli.main(["bench", "nope"])
    monkeypatch.setattr(cli, "BENCHMARKS", tmp_path / "absent")
    with pytest.raises(SystemExit, match="ship with the repository.*clone it"):
        cli.main(["bench", "speed"])
