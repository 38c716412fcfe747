"""The kernels compile for an H100 (sm_90) at the launchers' block sizes and fit its resources.

No GPU is needed: Triton compiles to a cubin with the ptxas its wheel ships, and cuobjdump reports
registers, spill stack and shared memory. This catches designs that pass in the interpreter but
could never launch (or would spill) on a GPU. Compilation runs in a subprocess because the test
session has TRITON_INTERPRET=1, under which @triton.jit does not build compilable kernels.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

SM90_MAX_SHARED = 227 * 1024

# (kernel, launcher config, shape constexprs, pointer dtypes) for SmolLM2 (D=64, G=3) and a
# Llama-like head (D=128, G=4), both 1 bit per element (d=8, K=256), fp16 cache.
_CACHE_PTRS = {f"{s}{n}_ptr": t for s in "kv" for n, t in
               [("codes", "*u8"), ("cent", "*fp32"), ("slot", "*i16"), ("rows", "*fp16"), ("win", "*fp16")]}
CASES = {
    "decode_d64": ("attention.vq_decode_kernel", ("decode_config", (3, 1, 64, 64)),
                   dict(KK=256, DV_SUB=8, BLOCK_SK=8, HAS_MASK=True, IS_CAUSAL=False),
                   {"q_ptr": "*fp16", "mask_ptr": "*fp32", "lut_ptr": "*fp32", "o_ptr": "*fp32",
                    "lse_ptr": "*fp32", **_CACHE_PTRS}),
    "decode_d128": ("attention.vq_decode_kernel", ("decode_config", (4, 1, 128, 128)),
                    dict(KK=256, DV_SUB=8, BLOCK_SK=16, HAS_MASK=True, IS_CAUSAL=False),
                    {"q_ptr": "*fp16", "mask_ptr": "*fp32", "lut_ptr": "*fp32", "o_ptr": "*fp32",
                     "lse_ptr": "*fp32", **_CACHE_PTRS}),
    "prefill_d128": ("attention.vq_prefill_kernel", ("prefill_config", (128, 128)),
                     dict(DK_SUB=8, DV_SUB=8, HAS_MASK=True, IS_CAUSAL=True),
                     {"q_ptr": "*fp16", "mask_ptr": "*fp32", "o_ptr": "*fp32", "lse_ptr": "*fp32",
                      **_CACHE_PTRS}),
    "window_scores_d128": ("attention.vq_window_scores_kernel", ("window_scores_config", (128, 128)),
                           dict(HAS_MASK=True, IS_CAUSAL=False),
                           {"q_ptr": "*fp16", "mask_ptr": "*fp32", "kwin_ptr": "*fp16", "vwin_ptr": "*fp16",
                            "o_ptr": "*fp32", "lse_ptr": "*fp32", "s0_ptr": "*fp32", "s1_ptr": "*fp32"}),
    "window_scores_d64": ("attention.vq_window_scores_kernel", ("window_scores_config", (64, 64)),
                          dict(HAS_MASK=True, IS_CAUSAL=False),
                          {"q_ptr": "*fp16", "mask_ptr": "*fp32", "kwin_ptr": "*fp16", "vwin_ptr": "*fp16",
                           "o_ptr": "*fp32", "lse_ptr": "*fp32", "s0_ptr": "*fp32", "s1_ptr": "*fp32"}),
    "encode_d8": ("encode.vq_encode_kernel", ("encode_config", (256, 8)), dict(SUB_D=8),
                  {"x_ptr": "*fp16", "cent_ptr": "*fp32", "codes_ptr": "*u8", "err_ptr": "*fp32"}),
}


def _nvidia_tool(name: str) -> Path | None:
    try:
        import triton
    except ImportError:
        return None
    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    return path if path.exists() else None


def _load(module_name: str):
    """A kernels module loaded from its file, without importing the antkv_compile package (whose
    __init__ pulls in transformers: seconds per process)."""
    import importlib.util

    path = Path(__file__).parents[1] / "antkv_compile" / "ops" / "triton" / f"{module_name}.py"
    spec = importlib.util.spec_from_file_location(f"_sm90_{module_name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def compile_and_measure(case: str, cubin_dir: Path) -> dict:
    """Compile one case for sm_90 and return cuobjdump's resource usage (runs in the subprocess)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernel_path, (config_fn, config_args), consts, ptrs = CASES[case]
    module_name, kernel_name = kernel_path.split(".")
    module = _load(module_name)
    kernel = getattr(module, kernel_name)
    config = getattr(module, config_fn)(*config_args)
    num_warps = config.pop("num_warps")
    consts = {**config, **consts}
    signature = {name: "constexpr" if name in consts else ptrs.get(name, "fp32" if name == "scale" else "i32")
                 for name in kernel.arg_names}
    compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=consts),
                              target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})
    cubin = cubin_dir / f"{case}.cubin"
    cubin.write_bytes(compiled.asm["cubin"])
    usage = subprocess.run([str(_nvidia_tool("cuobjdump")), "-res-usage", str(cubin)],
                           capture_output=True, text=True, check=True).stdout
    fields = dict(re.findall(r"(REG|STACK|LOCAL):(\d+)", usage))
    return {"shared": compiled.metadata.shared, **{k: int(v) for k, v in fields.items()}}


@pytest.fixture(scope="module")
def sm90_usage(tmp_path_factory):
    """Resource usage of every case, compiled in one subprocess without TRITON_INTERPRET."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cubin_dir = tmp_path_factory.mktemp("cubin")
    run = subprocess.run([sys.executable, __file__, str(cubin_dir)], capture_output=True, text=True,
                         env=env, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(_nvidia_tool("ptxas") is None or _nvidia_tool("cuobjdump") is None,
                    reason="triton's NVIDIA backend tools (ptxas, cuobjdump) are not installed")
@pytest.mark.parametrize("case", sorted(CASES))
def test_kernel_fits_sm90(case, sm90_usage):
    usage = sm90_usage[case]
    assert usage["shared"] <= SM90_MAX_SHARED, usage
    assert usage["STACK"] == 0 and usage["LOCAL"] == 0, f"register spills: {usage}"


if __name__ == "__main__":
    print(json.dumps({case: compile_and_measure(case, Path(sys.argv[1])) for case in CASES}))
