"""Compile the fused decode kernel for Hopper without a GPU and report what the compiled code holds.

    python benchmarks/compile_decode_kernel.py [--sass DIR]

For each benchmark shape (benchmarks/decode_kernel.py) the launch `mlra_decode_attention` would make is recorded
(tensors on the meta device: only shapes, strides and dtypes matter), compiled by Triton for sm_90
(`GPUTarget("cuda", 90, 32)`, the H200) with the same specialization a real launch gets, and reported: registers per
thread, spilled bytes, shared memory, and in the SASS the loads in flight: cp.async (LDGSTS), TMA (UTMALDG), plain
global loads (LDG) and local-memory traffic (LDL/STL, spills), and the instructions per warp of the pipelined token
loop (one token block). Shared memory that grows with `num_stages` and LDGSTS/UTMALDG in the token loop mean the loop
is software-pipelined; only LDG means latency is hidden by occupancy alone. Works with the Triton that runs the kernel on the device (3.6) as with newer ones.

A second table does the launch arithmetic of each compiled kernel at the benchmark's batch sizes and contexts: the grid
(programs x splits) against the slots of 132 multiprocessors (waves), the tokens and token blocks each program walks,
the bytes one program requests per token block (its latent block, its scales, the rope key) against its share of the
DRAM bytes (the programs of a row's other latent blocks request the same rope key), the loads in flight per
multiprocessor ((stages - 1) tiles per program: Triton's pipeliner issues a block's loads that many iterations ahead)
against Little's law at the copy rate, and the time the launch would take at the best rate of requested bytes the
kernel has reached on the H200 (docs/decode_kernel.md, "Why 16 x 32K missed before session 5").
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
H200_COPY_GBS = 4278  # device-to-device copy, benchmarks/results/decode_kernel_h200_quick.md
DRAM_LATENCY_NS = (600, 800)  # loaded HBM latency assumed for Little's law
BEST_REQUESTED_TBS = 4.0  # the most requested bytes per second the kernel reached (2.9B layer 16 x 32K, 64 rows)

# (batch, context) pairs of benchmarks/decode_kernel.py --quick for the launch arithmetic, by shape name
ARITHMETIC_POINTS = {
    "MLRA-4 TP-4 share": [(1, 128 * K), (1, 512 * K), (1, 1024 * K)],
    "MLA": [(1, 128 * K), (1, 512 * K), (1, 1024 * K)],
    "2.9B MLRA-4 layer": [(1, 32 * K), (16, 4 * K), (16, 32 * K)],
}

# (name, heads, latent blocks, branches, block width, batch, context, cache dtype or "pages")
SHAPES = [
    ("MLRA-4 TP-4 share", 64, 1, 1, 128, 1, 1024 * K, torch.bfloat16),
    ("MLA", 64, 1, 1, 512, 1, 512 * K, torch.bfloat16),
    ("2.9B MLRA-4 layer", 24, 4, 4, 128, 16, 32 * K, torch.bfloat16),
    # the 2.9B layer's grid and tile (64 programs per split) without the shared rope key: one latent block per row
    ("2.9B grid, one block per row", 24, 1, 1, 128, 64, 32 * K, torch.bfloat16),
    # continuous batching's pages read in place (`LatentPages`, bf16): the largest pipelined loop reported is then the
    # one of the block that straddles the key and value pages (two loads per tile)
    ("2.9B MLRA-4 layer, pages in place", 24, 4, 4, 128, 16, 32 * K, "pages"),
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


def record_launches(heads, blocks, branches, block_dim, bsz, context, cache_dtype, choices=None, per_sm=2):
    """The launches of one `_decode_attention` call on meta tensors: [(kernel, grid, args, kwargs)]; per_sm: the
    programs per multiprocessor the split count assumes (the compiled kernel's, once known)."""
    recorders = {}
    for name in ("_mlra_decode_kernel", "_merge_splits_kernel"):
        recorders[name] = _Recorder(getattr(mlra_decode_kernel, name))
        setattr(mlra_decode_kernel, name, recorders[name])
    saved = mlra_decode_kernel._num_sms, mlra_decode_kernel._programs_per_sm
    mlra_decode_kernel._num_sms = lambda index: H200_SMS
    mlra_decode_kernel._programs_per_sm = lambda device, args, constexprs: per_sm
    try:
        meta = dict(device="meta", dtype=torch.bfloat16)
        pages = {}
        if cache_dtype == "pages":  # the rows' halves in key and value pages, read through the rows' slots
            half = (blocks * block_dim + 64) // 2
            cache = torch.empty(bsz * context, half, **meta)
            pages = dict(row_starts=torch.empty(bsz, device="meta", dtype=torch.long), value_pages=torch.empty_like(cache),
                         slots=torch.empty(bsz * context, device="meta", dtype=torch.long))
        elif cache_dtype == torch.float8_e4m3fn:  # packed rows: e4m3 latent, float32 scales, bf16 rope key
            row_bytes = mlra_decode_kernel.fp8_cache_layout(blocks, block_dim, 64, torch.bfloat16).row_bytes
            cache = torch.empty(bsz, context, row_bytes, device="meta", dtype=torch.uint8)
        else:
            cache = torch.empty(bsz, context, blocks * block_dim + 64, **meta)
        q_absorbed = torch.empty(bsz, 1, branches, heads, block_dim, **meta)
        q_rope = torch.empty(bsz, 1, heads, 64, **meta)
        seq_lens = torch.empty(bsz, device="meta", dtype=torch.long)
        mlra_decode_kernel._decode_attention(
            q_absorbed, q_rope, cache, seq_lens, None, blocks // branches, 0.07, 0, choices, **pages
        )
    finally:
        for name, recorder in recorders.items():
            setattr(mlra_decode_kernel, name, recorder.kernel)
        mlra_decode_kernel._num_sms, mlra_decode_kernel._programs_per_sm = saved
    return [call for recorder in recorders.values() for call in recorder.calls]


def compile_for_hopper(kernel, args, kwargs):
    """Triton's own argument specialization (16-byte alignment, divisibility by 16, constexprs), then compile."""
    backend = make_backend(HOPPER)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound_args, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound_args, specialization, options)
    return triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=HOPPER, options=options.__dict__)


def pipelined_loop_instructions(sass: str) -> int:
    """SASS instructions of the largest loop (a backward branch) that issues cp.async (LDGSTS): the decode kernel's
    unmasked token loop, per warp and token block; 0 if there is none."""
    instructions = [(int(address, 16), text) for address, text in re.findall(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", sass)]
    index = {address: i for i, (address, _) in enumerate(instructions)}
    sizes = [0]
    for i, (address, text) in enumerate(instructions):
        branch = re.search(r"\bBRA\b.*?0x([0-9a-f]+)", text)
        if branch and int(branch.group(1), 16) < address and int(branch.group(1), 16) in index:
            body = instructions[index[int(branch.group(1), 16)] : i + 1]
            if any("LDGSTS" in line for _, line in body):
                sizes.append(len(body))
    return max(sizes)


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
    counts["loop instructions"] = pipelined_loop_instructions(sass)
    return counts


def launch_arithmetic(name, choices, shape, per_sm, bsz, context) -> str:
    """One row of the launch-arithmetic table: the decode kernel's launch for (bsz, context) with per_sm programs per
    multiprocessor (see the module docstring)."""
    heads, blocks, branches, block_dim, _, _, cache_dtype = shape
    per_sm = (choices or {}).get("programs_per_sm", per_sm)  # the split count's assumption, when a choice sets it
    if per_sm == 0:
        return f"| {name} {choices or ''} | {bsz} x {context // K}K | does not fit one multiprocessor |"
    (_, (programs, splits), _, kwargs), *_ = record_launches(
        heads, blocks, branches, block_dim, bsz, context, cache_dtype, choices, per_sm
    )
    fp8 = cache_dtype == torch.float8_e4m3fn
    block_n, stages = kwargs["BLOCK_N"], kwargs["num_stages"]
    chunk = triton.cdiv(triton.cdiv(context, splits), block_n) * block_n  # the kernel's tokens per split
    if fp8:
        row_bytes = mlra_decode_kernel.fp8_cache_layout(blocks, block_dim, 64, torch.bfloat16).row_bytes
        requested = block_n * (block_dim + 4 + 64 * 2)  # the e4m3 block, its float32 scale, the bf16 rope key
    else:
        row_bytes = (blocks * block_dim + 64) * 2
        requested = block_n * (block_dim + 64) * 2
    # each token row is read from DRAM once, shared by the programs of the row's latent blocks
    dram = block_n * row_bytes / blocks
    in_flight = (stages - 1) * requested * per_sm
    little = [H200_COPY_GBS / H200_SMS * ns for ns in DRAM_LATENCY_NS]  # bytes per SM
    total_requested = programs * context / block_n * requested  # every program of a split walks the whole row
    slots = per_sm * H200_SMS
    return (
        f"| {name} {choices or ''} | {bsz} x {context // K}K | {programs} x {splits} = {programs * splits} | {slots} | "
        f"{programs * splits / slots:.2f} | {chunk} ({triton.cdiv(context, chunk)} non-empty) | {chunk // block_n} | "
        f"{requested / 1024:.1f} | {dram / 1024:.1f} | {requested / dram:.2f} | {in_flight / 1024:.0f} | "
        f"{little[0] / 1024:.0f}-{little[1] / 1024:.0f} | {in_flight / little[1]:.1f} | "
        f"{bsz * context * row_bytes / H200_COPY_GBS / 1e3:.1f} | {total_requested / BEST_REQUESTED_TBS / 1e6:.1f} |"
    )


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
          "| LDGSTS | UTMALDG | LDG | LDL/STL | HGMMA | HMMA | token loop instructions per warp |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    arithmetic = []  # (name, choices, shape, programs per SM) of each compiled decode kernel
    for name, *shape in SHAPES:
        if options.shapes and not any(part in name for part in options.shapes):
            continue
        for choices in variants:
            try:
                launches = record_launches(*shape, choices=choices)
            except ValueError as error:  # a choice that does not apply to this shape
                print(f"| {name} {choices} | - | not applicable: {error} |")
                continue
            for kernel, grid, args, kwargs in launches:
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
                if kernel is mlra_decode_kernel._mlra_decode_kernel:
                    per_sm = counts["programs per SM"]
                    arithmetic.append((name, choices, shape, per_sm))
                    grid = record_launches(*shape, choices=choices, per_sm=per_sm)[0][1]  # the split count it gets
                tile = "x".join(str(kwargs[k]) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_D") if k in kwargs)
                print(
                    f"| {name} {choices or ''} | {kernel.__name__} | {grid} | {tile} | {kwargs.get('num_warps')} | "
                    f"{kwargs.get('num_stages')} | " + " | ".join(str(v) for v in counts.values()) + " |",
                    flush=True,
                )
    print(f"\nLaunch arithmetic (H200: {H200_SMS} multiprocessors, copy {H200_COPY_GBS} GB/s; Little's law at "
          f"{DRAM_LATENCY_NS[0]}-{DRAM_LATENCY_NS[1]} ns; requested: what one program loads per token block, DRAM: its "
          "share of the cache rows)\n")
    print("| shape | batch x context | programs x splits | slots | waves | tokens per split | blocks per program "
          "| requested KB per block | DRAM KB per block | requested / DRAM | in flight KB per SM | Little KB per SM "
          f"| in flight / Little (800 ns) | us at copy | us at {BEST_REQUESTED_TBS} TB/s requested |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name, choices, shape, per_sm in arithmetic:
        base = name.removesuffix(" fp8")
        for bsz, context in ARITHMETIC_POINTS.get(base, [tuple(shape[4:6])]):
            print(launch_arithmetic(name, choices, shape, per_sm, bsz, context), flush=True)


if __name__ == "__main__":
    main()
