"""Compile the fused decode kernel for Hopper without a GPU and report what the compiled code holds.

    python benchmarks/compile_decode_kernel.py [--sass DIR]

For each benchmark shape (benchmarks/decode_kernel.py) the launch `mlra_decode_attention` would make is recorded
(tensors on the meta device: only shapes, strides and dtypes matter), compiled by Triton for sm_90
(`GPUTarget("cuda", 90, 32)`, the H200) with the same specialization a real launch gets, and reported: registers per
thread, spilled bytes, shared memory, and in the SASS the loads in flight: cp.async (LDGSTS), TMA (UTMALDG), plain
global loads (LDG) and local-memory traffic (LDL/STL, spills). Shared memory that grows with `num_stages` and
LDGSTS/UTMALDG in the token loop mean the loop is software-pipelined; only LDG means latency is hidden by occupancy
alone. Works with the Triton that runs the kernel on the device (3.6) as with newer ones.
"""

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)
import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.jit import create_function_from_signature  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from modeling_mlra import mlra_decode_kernel  # noqa: E402

K = 1024
HOPPER = GPUTarget("cuda", 90, 32)
H200_SMS = 132
H200_SHARED_PER_SM = 233472  # bytes (228 KB); every program reserves 1 KB more

# (name, heads, latent blocks, branches, block width, batch, context, cache dtype)
SHAPES = [
    ("MLRA-4 TP-4 share", 64, 1, 1, 128, 1, 1024 * K, torch.bfloat16),
    ("MLA", 64, 1, 1, 512, 1, 512 * K, torch.bfloat16),
    ("2.9B MLRA-4 layer", 24, 4, 4, 128, 16, 32 * K, torch.bfloat16),
    ("MLRA-4 TP-4 share fp8", 64, 1, 1, 128, 1, 1024 * K, torch.float8_e4m3fn),
    ("MLA fp8", 64, 1, 1, 512, 1, 512 * K, torch.float8_e4m3fn),
    ("2.9B MLRA-4 layer fp8", 24, 4, 4, 128, 16, 32 * K, torch.float8_e4m3fn),
]


class _Recorder:
    """Stands in for a Triton kernel: `kernel[grid](*args, **kwargs)` records the call instead of launching."""

    def __init__(self, kernel):
        self.kernel, self.calls = kernel, []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.calls.append((self.kernel, grid, args, kwargs))


def record_launches(heads, blocks, branches, block_dim, bsz, context, cache_dtype, choices=None):
    """The launches of one `_decode_attention` call on meta tensors: [(kernel, grid, args, kwargs)]."""
    recorders = {}
    for name in ("_mlra_decode_kernel", "_merge_splits_kernel"):
        recorders[name] = _Recorder(getattr(mlra_decode_kernel, name))
        setattr(mlra_decode_kernel, name, recorders[name])
    num_sms, per_sm = mlra_decode_kernel._num_sms, mlra_decode_kernel._programs_per_sm
    mlra_decode_kernel._num_sms = lambda index: H200_SMS
    mlra_decode_kernel._programs_per_sm = lambda device, args, constexprs: 2
    try:
        meta = dict(device="meta", dtype=torch.bfloat16)
        if cache_dtype == torch.float8_e4m3fn:  # packed rows: e4m3 latent, float32 scales, bf16 rope key
            row_bytes = mlra_decode_kernel.fp8_cache_layout(blocks, block_dim, 64, torch.bfloat16).row_bytes
            cache = torch.empty(bsz, context, row_bytes, device="meta", dtype=torch.uint8)
        else:
            cache = torch.empty(bsz, context, blocks * block_dim + 64, **meta)
        q_absorbed = torch.empty(bsz, 1, branches, heads, block_dim, **meta)
        q_rope = torch.empty(bsz, 1, heads, 64, **meta)
        seq_lens = torch.empty(bsz, device="meta", dtype=torch.long)
        mlra_decode_kernel._decode_attention(
            q_absorbed, q_rope, cache, seq_lens, None, blocks // branches, 0.07, 0, choices
        )
    finally:
        for name, recorder in recorders.items():
            setattr(mlra_decode_kernel, name, recorder.kernel)
        mlra_decode_kernel._num_sms, mlra_decode_kernel._programs_per_sm = num_sms, per_sm
    return [call for recorder in recorders.values() for call in recorder.calls]


def compile_for_hopper(kernel, args, kwargs):
    """Triton's own argument specialization (16-byte alignment, divisibility by 16, constexprs), then compile."""
    backend = make_backend(HOPPER)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound_args, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound_args, specialization, options)
    return triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=HOPPER, options=options.__dict__)


def resources_and_sass(compiled, sass_path=None) -> dict:
    """Registers, stack (spills) and static shared memory from `cuobjdump --dump-resource-usage`, Triton's dynamic
    shared memory, and counts of the SASS instructions that say how the loads run."""
    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        usage = subprocess.run([str(cuobjdump), "--dump-resource-usage", cubin.name], capture_output=True, text=True)
        sass = subprocess.run([str(cuobjdump), "-sass", cubin.name], capture_output=True, text=True).stdout
    if sass_path is not None:
        sass_path.write_text(sass)
    registers = int(re.search(r"REG:(\d+)", usage.stdout).group(1))
    warps = compiled.metadata.num_warps
    counts = {
        "registers": registers,
        "stack bytes": int(re.search(r"STACK:(\d+)", usage.stdout).group(1)),
        "shared bytes": compiled.metadata.shared,
        "programs per SM": min(
            65536 // (-(-registers * 32 // 256) * 256 * warps),
            H200_SHARED_PER_SM // (compiled.metadata.shared + 1024),
            64 // warps,
        ),
    }
    for label, pattern in (("LDGSTS", r"\bLDGSTS"), ("UTMALDG", r"\bUTMALDG"), ("LDG", r"\bLDG\."),
                           ("LDL/STL", r"\b(LDL|STL)\b"), ("HGMMA", r"\bHGMMA"), ("HMMA", r"\bHMMA")):
        counts[label] = len(re.findall(pattern, sass))
    return counts


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sass", type=Path, help="write each kernel's SASS into this folder")
    parser.add_argument("--choices", nargs="*", default=[],
                        help="also compile these launch choices, e.g. num_stages=4,BLOCK_N=32 (launch_config)")
    parser.add_argument("--shapes", nargs="*", help="only the shapes whose name contains one of these")
    parser.add_argument("--skip-defaults", action="store_true", help="only the --choices, not the default launches")
    options = parser.parse_args()
    variants = ([] if options.skip_defaults else [None]) + [
        {key: int(value) for key, value in (item.split("=") for item in text.split(","))} for text in options.choices
    ]
    if options.sass:
        options.sass.mkdir(parents=True, exist_ok=True)
    print(f"triton {triton.__version__}, target sm_90 (H200: {H200_SMS} multiprocessors)")
    print("| shape | kernel | grid | tile | warps | stages | registers | stack bytes | shared bytes | programs per SM "
          "| LDGSTS | UTMALDG | LDG | LDL/STL | HGMMA | HMMA |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name, *shape in SHAPES:
        if options.shapes and not any(part in name for part in options.shapes):
            continue
        for choices in variants:
            for kernel, grid, args, kwargs in record_launches(*shape, choices=choices):
                if choices is not None and kernel is not mlra_decode_kernel._mlra_decode_kernel:
                    continue
                try:
                    compiled = compile_for_hopper(kernel, args, kwargs)
                except Exception as error:  # e.g. out of shared memory: reported, the others go on
                    print(f"| {name} | {kernel.__name__} | {choices} | failed: {str(error)[:100]} |")
                    continue
                sass_path = None
                if options.sass:
                    label = "default" if choices is None else "_".join(f"{k}{v}" for k, v in choices.items())
                    sass_path = options.sass / f"{name.replace(' ', '_')}_{kernel.__name__}_{label}.sass"
                counts = resources_and_sass(compiled, sass_path)
                tile = "x".join(str(kwargs[k]) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_D") if k in kwargs)
                print(
                    f"| {name} {choices or ''} | {kernel.__name__} | {grid} | {tile} | {kwargs.get('num_warps')} | "
                    f"{kwargs.get('num_stages')} | " + " | ".join(str(v) for v in counts.values()) + " |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
