"""The fused decode kernel on a CUDA GPU: correctness in bfloat16, latency and achieved bandwidth against a copy.

    python benchmarks/decode_kernel.py --out benchmarks/results/decode_kernel_h200

Shapes (bfloat16, cache filled with random values):
  (a) the per-GPU share of MLRA-4 under 4-way TP: 64 query heads, one latent block of 128 + rope 64, batch 1,
      128K-2M cached tokens;
  (b) MLA on the same GPU: 64 heads on 512 + 64;
  (c) one layer of the 2.9B MLRA-4 on one GPU: 24 heads, 4 x 128 + 64, batch 1-64, 4K-128K tokens.
Times are GPU time (CUDA-graph replays, median); the eager call time (host launch overhead included) is a column of
its own. Each is timed as the kernel alone (bandwidth = cache bytes / time against a device-to-device copy timed in the same
run), as the model's whole absorbed attention (W_UK and W_UV included) through the kernel and through the PyTorch
path, and, for (c), against one launch per latent block on per-block caches [block | rope key] (the authors'
structure, which reads the rope key once per block).
"""

import argparse
import sys
import time
from pathlib import Path

import torch
import triton
import triton.testing

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from modeling_mlra import MLRAConfig  # noqa: E402
from modeling_mlra.mlra_decode_kernel import _decode_attention, mlra_decode_attention  # noqa: E402
from modeling_mlra.modeling_mlra import MLRAAttention  # noqa: E402

from common import Panel, copy_bandwidth, gpu_time_ms, plot_panels, write_results  # noqa: E402

K = 1024


def eager_call_us(fn, calls: int = 50) -> float:
    """Wall microseconds per eager call, back to back (host launch overhead included)."""
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / calls * 1e6


SWEEP = [
    dict(BLOCK_N=32, num_warps=4, num_stages=3),
    dict(BLOCK_N=16, num_warps=4, num_stages=3),
    dict(BLOCK_N=64, num_warps=4, num_stages=3),
    dict(BLOCK_N=32, num_warps=8, num_stages=2),
    dict(BLOCK_N=64, num_warps=8, num_stages=2),
]


def attention_module(heads, blocks, branches, block_dim, device):
    config = MLRAConfig(
        hidden_size=3072, num_attention_heads=heads, kv_lora_rank=blocks * block_dim, num_latent_blocks=blocks,
        num_softmax_branches=branches, q_lora_rank=1024, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
    )
    module = MLRAAttention(config, 0).to(device=device, dtype=torch.bfloat16)
    with torch.no_grad():
        module.kv_b_proj.weight.normal_(0, 0.05)
    return module


def reference_attention(q_absorbed, q_rope, cache, num_groups, scaling):
    """float32 PyTorch absorbed attention of the kernel's inputs (no mask, one new token)."""
    bsz, _, branches, heads, block_dim = q_absorbed.shape
    blocks = branches * num_groups
    latent = cache[..., : blocks * block_dim].float().unflatten(-1, (branches, num_groups, block_dim))
    rope_key = cache[..., blocks * block_dim :].float()
    q = q_absorbed[:, 0].float().unflatten(2, (num_groups, heads // num_groups))  # [bsz, B, G, hpg, d_l]
    scores = torch.einsum("nbgid,nsbgd->nbgis", q, latent)
    scores = scores + torch.einsum("nhr,nsr->nhs", q_rope[:, 0].float(), rope_key).view(bsz, 1, num_groups, -1, cache.shape[1])
    probs = torch.softmax(scores * scaling, dim=-1)
    return torch.einsum("nbgis,nsbgd->nbgid", probs, latent).reshape(bsz, 1, branches, heads, block_dim)


def run_case(
    name, heads, blocks, branches, block_dim, bsz, context, copy_gbs, device, per_block=False, module=None, sweep=False
):
    rope = 64
    groups = blocks // branches
    width = blocks * block_dim + rope
    cache = torch.randn(bsz, context, width, device=device, dtype=torch.bfloat16)
    q_absorbed = torch.randn(bsz, 1, branches, heads, block_dim, device=device, dtype=torch.bfloat16)
    q_rope = torch.randn(bsz, 1, heads, rope, device=device, dtype=torch.bfloat16)
    seq_lens = torch.full((bsz,), context, device=device)
    scaling = 192**-0.5
    row = dict(case=name, heads=heads, blocks=blocks, branches=branches, block_dim=block_dim, batch=bsz, context=context)

    out = mlra_decode_attention(q_absorbed, q_rope, cache, seq_lens, None, groups, scaling)
    if bsz * context <= 256 * K:
        ref = reference_attention(q_absorbed, q_rope, cache, groups, scaling)
        row["rel_err_vs_fp32"] = ((out.float() - ref).norm() / ref.norm()).item()
    ms = gpu_time_ms(lambda: mlra_decode_attention(q_absorbed, q_rope, cache, seq_lens, None, groups, scaling))
    row["kernel_us"] = ms * 1e3
    row["kernel_gbs"] = cache.nbytes / ms / 1e6
    row["of_copy"] = row["kernel_gbs"] / copy_gbs
    row["eager_call_us"] = eager_call_us(
        lambda: mlra_decode_attention(q_absorbed, q_rope, cache, seq_lens, None, groups, scaling)
    )
    if sweep:
        variants = [dict(v) for v in SWEEP] + [dict(v, BRANCHES_PER_PROGRAM=bpp) for v in SWEEP[:2] for bpp in (1, 4)
                                               if bpp <= branches and bpp != 2 and branches > 1]
        variants += [dict(SWEEP[0], num_splits=f) for f in (66, 132, 264)]
        results = []
        for overrides in variants:
            splits = overrides.pop("num_splits", 0)
            try:
                us = gpu_time_ms(lambda: _decode_attention(
                    q_absorbed, q_rope, cache, seq_lens, None, groups, scaling, splits, overrides)) * 1e3
            except Exception as error:  # a config that does not compile or fit: recorded, not fatal
                us = None
                overrides["error"] = str(error)[:80]
            results.append(dict(overrides, num_splits=splits, us=us))
            print("  sweep", name, bsz, context, results[-1], flush=True)
        row["sweep"] = results
    if per_block:
        block_caches = [
            torch.cat([cache[..., l * block_dim : (l + 1) * block_dim], cache[..., blocks * block_dim :]], -1)
            for l in range(blocks)
        ]
        q_blocks = [q_absorbed[:, :, l // groups : l // groups + 1].contiguous() for l in range(blocks)]

        def one_launch_per_block():
            for l in range(blocks):
                mlra_decode_attention(q_blocks[l], q_rope, block_caches[l], seq_lens, None, 1, scaling)

        row["per_block_us"] = gpu_time_ms(one_launch_per_block) * 1e3
        row["fused_speedup_vs_per_block"] = row["per_block_us"] / row["kernel_us"]
        del block_caches
    if module is not None:
        q_nope = torch.randn(bsz, 1, heads, 128, device=device, dtype=torch.bfloat16)
        with torch.no_grad():
            row["attention_kernel_us"] = gpu_time_ms(
                lambda: module.absorbed_attention(q_nope, q_rope, cache, None, (seq_lens, None))
            ) * 1e3
            try:
                if bsz * context > 512 * K:
                    raise torch.OutOfMemoryError("not timed: the PyTorch path's fp32 scores at this size")
                # plain event timing: capturing this path in a CUDA graph at >= 1M tokens left the process faulting
                row["attention_torch_us"] = triton.testing.do_bench(
                    lambda: module.absorbed_attention(q_nope, q_rope, cache, None), return_mode="median"
                ) * 1e3
                row["kernel_speedup_vs_torch"] = row["attention_torch_us"] / row["attention_kernel_us"]
            except torch.OutOfMemoryError:
                row["attention_torch_us"] = None
    del cache
    torch.cuda.empty_cache()
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/decode_kernel_h200")
    parser.add_argument("--quick", action="store_true", help="few sizes (a smoke run)")
    parser.add_argument("--sweep", action="store_true", help="also time other tile configurations at a few sizes")
    options = parser.parse_args()
    device = torch.device("cuda")
    torch.manual_seed(0)
    copy_gbs = copy_bandwidth(device)
    machine = torch.cuda.get_device_name()
    print(f"{machine}, torch {torch.__version__}, triton {triton.__version__}; copy {copy_gbs:.0f} GB/s", flush=True)

    long_contexts = [128 * K, 512 * K] if options.quick else [128 * K, 256 * K, 512 * K, 1024 * K, 2048 * K]
    rows = []
    share = attention_module(64, 1, 1, 128, device)
    mla = attention_module(64, 1, 1, 512, device)
    for context in long_contexts:
        rows.append(run_case("a: MLRA-4 TP-4 share", 64, 1, 1, 128, 1, context, copy_gbs, device, module=share))
        rows.append(run_case("b: MLA", 64, 1, 1, 512, 1, context, copy_gbs, device, module=mla))
        print(rows[-2], rows[-1], sep="\n", flush=True)
    layer = attention_module(24, 4, 4, 128, device)
    for bsz in [1, 16] if options.quick else [1, 8, 64]:
        for context in [4 * K, 32 * K] if options.quick else [4 * K, 32 * K, 128 * K]:
            sweep = options.sweep and context == 32 * K and bsz in (1, 8)
            rows.append(
                run_case(
                    "c: MLRA-4 2.9B layer", 24, 4, 4, 128, bsz, context, copy_gbs, device, True, module=layer, sweep=sweep
                )
            )
            print(rows[-1], flush=True)

    out = Path(options.out)
    lines = [
        f"# Fused decode kernel, {machine} (torch {torch.__version__}, triton {triton.__version__})",
        "",
        f"Device-to-device copy in the same run: {copy_gbs:.0f} GB/s. bfloat16, one new token per row.",
        "",
        "| case | batch | context | kernel us | GB/s | of copy | eager call us | per-block us | fused vs per-block | attention (kernel) us "
        "| attention (PyTorch) us | kernel vs PyTorch | rel. err vs fp32 |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def fmt(value, spec):
        return "" if value is None else format(value, spec)

    for row in rows:
        lines.append(
            f"| {row['case']} | {row['batch']} | {row['context'] // K}K | {row['kernel_us']:.1f} | "
            f"{row['kernel_gbs']:.0f} | {row['of_copy']:.2f} | {row['eager_call_us']:.0f} | "
            f"{fmt(row.get('per_block_us'), '.1f')} | "
            f"{fmt(row.get('fused_speedup_vs_per_block'), '.2f')} | {fmt(row.get('attention_kernel_us'), '.1f')} | "
            f"{fmt(row.get('attention_torch_us'), '.1f')} | {fmt(row.get('kernel_speedup_vs_torch'), '.1f')} | "
            f"{fmt(row.get('rel_err_vs_fp32'), '.1e')} |"
        )
    ratios = [
        (a["context"], b["kernel_us"] / a["kernel_us"])
        for a, b in zip(rows[0::2], rows[1::2])
        if a["case"].startswith("a") and b["case"].startswith("b")
    ]
    lines += ["", "MLA (b) / MLRA-4 share (a) kernel time: " + ", ".join(f"{c // K}K: {r:.2f}x" for c, r in ratios)]
    table = "\n".join(lines) + "\n"
    write_results(out, dict(machine=machine, copy_gbs=copy_gbs, rows=rows), table)
    print(table)
    plot(rows, copy_gbs, machine, out.with_suffix(".png"))


def plot(rows, copy_gbs, machine, path):
    series = {}
    for row in rows:
        series.setdefault(f"{row['case']}, batch {row['batch']}", []).append(row)
    times = {label: [(p["context"], p["kernel_us"]) for p in points] for label, points in series.items()}
    rates = {label: [(p["context"], p["kernel_gbs"]) for p in points] for label, points in series.items()}
    panels = [
        Panel("kernel time", "cached tokens", "kernel time (us)", times, yscale="log"),
        Panel("achieved bandwidth", "cached tokens", "GB/s", rates, references={"device-to-device copy": copy_gbs}),
    ]
    plot_panels(path, panels, title=f"MLRA fused decode kernel, bfloat16, {machine}")

if __name__ == "__main__":
    main()
