"""The fused decode kernel on a CUDA GPU: correctness, latency and achieved bandwidth against a copy, bf16 and fp8 caches.

    python benchmarks/decode_kernel.py --out benchmarks/results/decode_kernel_h200 [--sweep]
    TRITON_INTERPRET=1 python benchmarks/decode_kernel.py --tiny --out /tmp/dk   # the harness itself, on the CPU

Shapes (bfloat16 model, cache filled with random values; fp8: the same values through the fp8 cache's quantization):
  (a) the per-GPU share of MLRA-4 under 4-way TP: 64 query heads, one latent block of 128 + rope 64, batch 1,
      128K-1M cached tokens;
  (b) MLA on the same GPU: 64 heads on 512 + 64;
  (c) one layer of the 2.9B MLRA-4 on one GPU: 24 heads, 4 x 128 + 64, batch 1-64 x 4K-1M tokens;
  (d) with --only: (c)'s grid and tile without its shared rope key, 24 heads on one block of 128 + 64 (at batch 4x
      (c)'s, the same programs per split), the control of docs/decode_kernel.md, "Why 16 x 32K missed before session 5";
  (e) with --only: (c) with a rope key of 16 instead of 64 (a diagnostic: the same programs and token blocks, each
      requesting 18 instead of 24 KB, the rows 8% fewer DRAM bytes), whether the time follows the requested bytes.
Times are GPU time (CUDA-graph replays after a device synchronisation, median); the eager call time (host launch
overhead included) is a column of its own. Bandwidth = cache bytes read / kernel time, against a device-to-device copy
timed in the same run. Also timed: the model's whole absorbed attention (W_UK and W_UV included) through the kernel
and, up to 512K cached tokens, through the PyTorch path; for (c) one launch per latent block on per-block caches
[block | rope key] (the authors' structure). The kernel's two launches are timed apart (the split attention and the
merge of the splits, torch.profiler). --sweep times other launch choices at a few large shapes; --only runs the given
(case, batch, context) points alone and --choices replaces the sweep's launch choices, e.g.

    python benchmarks/decode_kernel.py --only c:16x32K d:64x32K --sweep --choices MIN_ROWS=32 num_splits=8
"""

import argparse
import sys
import time
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from modeling_mlra import MLRAConfig  # noqa: E402
from modeling_mlra.mlra_decode_kernel import _decode_attention, launch_plan, mlra_decode_attention  # noqa: E402
from modeling_mlra.modeling_mlra import MLRAAttention, dequantize_latent_rows, quantize_latent_rows  # noqa: E402

from common import Panel, Report, copy_bandwidth, error_text, fmt, gpu_time_ms, plot_panels  # noqa: E402

K = 1024
FP8 = torch.float8_e4m3fn
SHARE = ("a: MLRA-4 TP-4 share", 64, 1, 1, 128, 64)  # name, heads, latent blocks, branches, block width, rope width
MLA = ("b: MLA", 64, 1, 1, 512, 64)
LAYER = ("c: MLRA-4 2.9B layer", 24, 4, 4, 128, 64)
LAYER_ONE_BLOCK = ("d: 2.9B layer's grid, one block per row", 24, 1, 1, 128, 64)
LAYER_NARROW_ROPE = ("e: 2.9B layer, rope key 16 wide", 24, 4, 4, 128, 16)
CASES = {case[0][0]: case for case in (SHARE, MLA, LAYER, LAYER_ONE_BLOCK, LAYER_NARROW_ROPE)}

# launch choices timed by --sweep (modeling_mlra.mlra_decode_kernel.launch_config), per latent block width; the split
# count follows each choice's occupancy unless programs_per_sm is given
SWEEP = {
    128: [dict(num_stages=2), dict(num_stages=4), dict(BLOCK_N=128, num_stages=2), dict(BLOCK_N=32, num_stages=4),
          dict(MIN_ROWS=64), dict(programs_per_sm=1)],
    512: [dict(BLOCK_N=64, num_stages=2), dict(BLOCK_N=32, num_stages=3), dict(BLOCK_N=32, num_stages=2),
          dict(BLOCK_N=16, num_stages=4)],
}


def time_ms(fn, device) -> float:
    """GPU time per call from CUDA-graph replays; on the CPU (the interpreter, --tiny) the wall time of one call."""
    if device.type == "cuda":
        return gpu_time_ms(fn, rep=20)
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def launch_times_us(fn, calls: int = 10) -> dict:
    """GPU microseconds per call of each kernel fn launches (torch.profiler), by kernel name."""
    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profile:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    return {event.key: event.device_time_total / calls for event in profile.key_averages() if event.device_time_total}


def eager_call_us(fn, device, calls: int = 20) -> float:
    """Wall microseconds per eager call, back to back (host launch overhead included)."""
    fn()
    if device.type != "cuda":
        return float("nan")
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / calls * 1e6


def attention_module(heads, blocks, branches, block_dim, rope, device, dtype):
    config = MLRAConfig(
        hidden_size=3072, num_attention_heads=heads, kv_lora_rank=blocks * block_dim, num_latent_blocks=blocks,
        num_softmax_branches=branches, q_lora_rank=1024, qk_nope_head_dim=128, qk_rope_head_dim=rope, v_head_dim=128,
    )
    module = MLRAAttention(config, 0).to(device=device, dtype=dtype)
    with torch.no_grad():
        module.kv_b_proj.weight.normal_(0, 0.05)
    return module


def random_cache(bsz, context, blocks, block_dim, rope, fp8, device, dtype, chunk_tokens=64 * K):
    """A cache of random states [bsz, context, L * d_l + d_r], or their fp8 rows, filled in chunks (no full-size
    float32 temporaries at 1M tokens)."""
    width = blocks * block_dim + rope
    if not fp8:
        return torch.randn(bsz, context, width, device=device, dtype=dtype)
    first = quantize_latent_rows(torch.randn(bsz, 1, width, device=device, dtype=dtype), block_dim, rope)
    rows = torch.empty(bsz, context, first.shape[-1], device=device, dtype=torch.uint8)
    for start in range(0, context, chunk_tokens):
        end = min(context, start + chunk_tokens)
        states = torch.randn(bsz, end - start, width, device=device, dtype=dtype)
        rows[:, start:end] = quantize_latent_rows(states, block_dim, rope)
    return rows


def reference_attention(q_absorbed, q_rope, cache, num_groups, scaling):
    """float32 PyTorch absorbed attention of the kernel's inputs (no mask, one new token)."""
    bsz, _, branches, heads, block_dim = q_absorbed.shape
    blocks = branches * num_groups
    latent = cache[..., : blocks * block_dim].float().unflatten(-1, (branches, num_groups, block_dim))
    rope_key = cache[..., blocks * block_dim :].float()
    q = q_absorbed[:, 0].float().unflatten(2, (num_groups, heads // num_groups))  # [bsz, B, G, hpg, d_l]
    scores = torch.einsum("nbgid,nsbgd->nbgis", q, latent)
    rope_scores = torch.einsum("nhr,nsr->nhs", q_rope[:, 0].float(), rope_key)
    scores = scores + rope_scores.view(bsz, 1, num_groups, -1, cache.shape[1])
    probs = torch.softmax(scores * scaling, dim=-1)
    return torch.einsum("nbgis,nsbgd->nbgid", probs, latent).reshape(bsz, 1, branches, heads, block_dim)


def run_case(case, bsz, context, fp8, copy_gbs, device, dtype, module=None, per_block=False, sweep=()):
    """One table row; sweep: launch choices also timed (launch_config's keyword arguments)."""
    name, heads, blocks, branches, block_dim, rope = case
    groups = blocks // branches
    cache = random_cache(bsz, context, blocks, block_dim, rope, fp8, device, dtype)
    q_absorbed = torch.randn(bsz, 1, branches, heads, block_dim, device=device, dtype=dtype)
    q_rope = torch.randn(bsz, 1, heads, rope, device=device, dtype=dtype)
    seq_lens = torch.full((bsz,), context, device=device)
    scaling = 192**-0.5
    row = dict(case=name, cache="fp8" if fp8 else "bf16", heads=heads, blocks=blocks, branches=branches,
               block_dim=block_dim, batch=bsz, context=context, cache_bytes=cache.nbytes)
    plan = launch_plan(q_absorbed, q_rope, cache, seq_lens, None, groups, scaling)
    row["launch"] = {k: plan[k] for k in ("BLOCK_M", "BLOCK_N", "num_splits", "programs_per_sm", "num_warps",
                                          "num_stages")}

    def kernel():
        return mlra_decode_attention(q_absorbed, q_rope, cache, seq_lens, None, groups, scaling)

    out = kernel()
    if bsz * context <= 256 * K:
        held = dequantize_latent_rows(cache, blocks, block_dim, rope, dtype) if fp8 else cache
        ref = reference_attention(q_absorbed, q_rope, held, groups, scaling)
        row["rel_err_vs_fp32"] = ((out.float() - ref).norm() / ref.norm()).item()
    if sweep:
        row["sweep"] = []
        for choices in sweep:
            try:
                us = time_ms(lambda: _decode_attention(
                    q_absorbed, q_rope, cache, seq_lens, None, groups, scaling, 0, choices), device) * 1e3
                splits = launch_plan(q_absorbed, q_rope, cache, seq_lens, None, groups, scaling, 0, choices)["num_splits"]
            except Exception as error:  # a choice that does not compile or fit: recorded, not fatal
                us, splits = error_text(error), None
            row["sweep"].append(dict(choices, us=us, splits=splits))
            print("  sweep", name, row["cache"], bsz, context, row["sweep"][-1], flush=True)
    ms = time_ms(kernel, device)
    row["kernel_us"] = ms * 1e3
    if device.type == "cuda":
        try:
            launches = launch_times_us(kernel)
        except Exception as error:  # the profiler is a diagnosis: the table goes on without it
            print("profiler:", error_text(error), flush=True)
            launches = {}
        for kernel_name, us in launches.items():
            if "merge" in kernel_name:
                row["merge_us"] = us
            elif "decode" in kernel_name:
                row["split_kernel_us"] = us
    row["kernel_gbs"] = cache.nbytes / ms / 1e6
    row["of_copy"] = row["kernel_gbs"] / copy_gbs
    row["eager_call_us"] = eager_call_us(kernel, device, calls=20 if ms < 5 else 3)
    if per_block and cache.nbytes <= 4 * 2**30 and not fp8:
        block_caches = [
            torch.cat([cache[..., l * block_dim : (l + 1) * block_dim], cache[..., blocks * block_dim :]], -1)
            for l in range(blocks)
        ]
        q_blocks = [q_absorbed[:, :, l // groups : l // groups + 1].contiguous() for l in range(blocks)]

        def one_launch_per_block():
            for l in range(blocks):
                mlra_decode_attention(q_blocks[l], q_rope, block_caches[l], seq_lens, None, 1, scaling)

        row["per_block_us"] = time_ms(one_launch_per_block, device) * 1e3
        row["fused_speedup_vs_per_block"] = row["per_block_us"] / row["kernel_us"]
        del block_caches
    if module is not None:
        q_nope = torch.randn(bsz, 1, heads, 128, device=device, dtype=dtype)
        with torch.no_grad():
            row["attention_kernel_us"] = time_ms(
                lambda: module.absorbed_attention(q_nope, q_rope, cache, None, (seq_lens, None, None)), device
            ) * 1e3
            if bsz * context <= 512 * K and not fp8 and device.type == "cuda":
                # plain event timing: capturing this path in a CUDA graph at >= 1M tokens left the process faulting
                row["attention_torch_us"] = triton.testing.do_bench(
                    lambda: module.absorbed_attention(q_nope, q_rope, cache, None), return_mode="median"
                ) * 1e3
                row["kernel_speedup_vs_torch"] = row["attention_torch_us"] / row["attention_kernel_us"]
    del cache
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def plan(tiny: bool, quick: bool):
    """(case, batch, context) in the order they run; --tiny: a few small shapes for the interpreter."""
    if tiny:
        return [(SHARE, 1, 512), (MLA, 1, 256), (LAYER, 2, 256)]
    long_contexts = [128 * K, 512 * K, 1024 * K]
    runs = [(case, 1, context) for context in long_contexts for case in (SHARE, MLA)]
    layer_batches, layer_contexts = ([1, 16], [4 * K, 32 * K]) if quick else ([1, 4, 16, 64], [4 * K, 32 * K, 128 * K, 1024 * K])
    runs += [(LAYER, bsz, context) for bsz in layer_batches for context in layer_contexts]
    return runs


SWEEP_POINTS = {(SHARE[0], 1, 512), (SHARE[0], 1, 1024 * K), (MLA[0], 1, 512 * K), (LAYER[0], 16, 32 * K)}


def parse_point(text):
    """'c:16x32K' -> (LAYER, 16, 32768)."""
    letter, size = text.split(":")
    bsz, context = size.lower().split("x")
    scale = {"k": K, "m": K * K}.get(context[-1], 1)
    return CASES[letter], int(bsz), int(context.rstrip("km")) * scale


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/decode_kernel_h200")
    parser.add_argument("--quick", action="store_true", help="fewer sizes (a smoke run)")
    parser.add_argument("--tiny", action="store_true", help="small shapes on the CPU (TRITON_INTERPRET=1): the harness")
    parser.add_argument("--sweep", action="store_true", help="also time other launch choices at a few large shapes")
    parser.add_argument("--no-fp8", action="store_true", help="bf16 caches only")
    parser.add_argument("--only", nargs="*",
                        help="only these points, case letter:batch x context, e.g. c:16x32K d:64x32K")
    parser.add_argument("--choices", nargs="*",
                        help="with --sweep: these launch choices at every point run instead of the built-in sweep, "
                             "e.g. MIN_ROWS=32 BLOCK_N=128,num_stages=2 num_splits=8")
    parser.add_argument("--sweep-cache", choices=("both", "bf16", "fp8"), default="both",
                        help="with --sweep: the caches whose launches are swept")
    options = parser.parse_args()
    device = torch.device("cpu" if options.tiny else "cuda")
    dtype = torch.float32 if options.tiny else torch.bfloat16  # the interpreter computes bf16 dots wrongly
    torch.manual_seed(0)
    copy_gbs = copy_bandwidth(device) if device.type == "cuda" else float("nan")
    machine = torch.cuda.get_device_name() if device.type == "cuda" else "CPU (Triton interpreter)"
    header = f"{machine}, torch {torch.__version__}, triton {triton.__version__}; copy {copy_gbs:.0f} GB/s"
    print(header, flush=True)

    meta = dict(machine=machine, copy_gbs=copy_gbs, started=time.time())
    report = Report(Path(options.out), meta, report_markdown, plot)
    modules = {}
    runs = [parse_point(text) for text in options.only] if options.only else plan(options.tiny, options.quick)
    custom_sweep = [
        {key: int(value) for key, value in (item.split("=") for item in text.split(","))}
        for text in options.choices or []
    ]
    for case, bsz, context in runs:
        if case not in modules:
            modules[case] = attention_module(*case[1:], device, dtype)
        for fp8 in (False,) if options.no_fp8 else (False, True):
            sweep = ()
            swept_cache = options.sweep_cache in ("both", "fp8" if fp8 else "bf16")
            if options.sweep and swept_cache and (custom_sweep or (case[0], bsz, context) in SWEEP_POINTS):
                sweep = custom_sweep or SWEEP[case[4]]
            report.record(run_case(case, bsz, context, fp8, copy_gbs, device, dtype, module=modules[case],
                                   per_block=case is LAYER, sweep=sweep))
    meta["seconds"] = time.time() - meta["started"]
    report.finish()
    print(report_markdown(meta, report.rows))


def report_markdown(meta, rows) -> str:
    elapsed = meta.get("seconds", time.time() - meta["started"])
    lines = [
        f"# Fused decode kernel, {meta['machine']} (torch {torch.__version__}, triton {triton.__version__})",
        "",
        f"{elapsed:.0f} s. Device-to-device copy in the same run: {meta['copy_gbs']:.0f} GB/s. bf16 model, one new "
        "token per row; cache bf16 (1152 bytes per token of the 2.9B layer) or fp8 (672).",
        "",
        "| case | cache | batch | context | MB read | kernel us | GB/s | of copy | split kernel / merge us (profiler) "
        "| eager call us | per-block us | fused vs per-block | attention (kernel) us | attention (PyTorch) us "
        "| kernel vs PyTorch | rel. err vs fp32 | launch (M, N, splits, programs per SM, warps, stages) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        launch = row["launch"]
        lines.append(
            f"| {row['case']} | {row['cache']} | {row['batch']} | {row['context'] // K}K | "
            f"{row['cache_bytes'] / 1e6:.0f} | {row['kernel_us']:.1f} | {row['kernel_gbs']:.0f} | {row['of_copy']:.2f} | "
            f"{fmt(row.get('split_kernel_us'), '.1f')} / {fmt(row.get('merge_us'), '.1f')} | "
            f"{row['eager_call_us']:.0f} | {fmt(row.get('per_block_us'), '.1f')} | "
            f"{fmt(row.get('fused_speedup_vs_per_block'), '.2f')} | {fmt(row.get('attention_kernel_us'), '.1f')} | "
            f"{fmt(row.get('attention_torch_us'), '.1f')} | {fmt(row.get('kernel_speedup_vs_torch'), '.1f')} | "
            f"{fmt(row.get('rel_err_vs_fp32'), '.1e')} | {launch['BLOCK_M']}, {launch['BLOCK_N']}, "
            f"{launch['num_splits']}, {launch['programs_per_sm']}, {launch['num_warps']}, {launch['num_stages']} |"
        )
    by_key = {(r["case"][0], r["cache"], r["batch"], r["context"]): r for r in rows}
    ratios, fp8_ratios = [], []
    for (case, cache, bsz, context), row in by_key.items():
        if case == "b" and ("a", cache, bsz, context) in by_key:
            ratios.append(f"{cache} {context // K}K: {row['kernel_us'] / by_key['a', cache, bsz, context]['kernel_us']:.2f}x")
        if cache == "fp8" and (case, "bf16", bsz, context) in by_key:
            bf16 = by_key[case, "bf16", bsz, context]
            fp8_ratios.append(
                f"{case} {bsz}x{context // K}K: kernel {row['kernel_us'] / bf16['kernel_us']:.2f}, attention "
                f"{row['attention_kernel_us'] / bf16['attention_kernel_us']:.2f}"
            )
    lines += ["", "MLA (b) / MLRA-4 share (a) kernel time (byte ratio 3.0): " + ", ".join(ratios)]
    lines += ["", "fp8 / bf16 cache time: " + "; ".join(fp8_ratios)]
    sweeps = [r for r in rows if r.get("sweep")]
    if sweeps:
        lines += ["", "## Launch-choice sweep (kernel us, splits; the defaults are the table's launch column)", ""]
        for r in sweeps:
            cells = ", ".join(
                f"{ {k: v for k, v in s.items() if k not in ('us', 'splits')} }: "
                f"{s['us'] if isinstance(s['us'], str) else fmt(s['us'], '.1f')} ({s['splits']})"
                for s in r["sweep"]
            )
            lines.append(f"- {r['case']} {r['cache']} {r['batch']}x{r['context'] // K}K (default {r['kernel_us']:.1f}): {cells}")
    return "\n".join(lines) + "\n"


def plot(meta, rows, path):
    series = {}
    for row in rows:
        series.setdefault(f"{row['case']}, {row['cache']}, batch {row['batch']}", []).append(row)
    times = {label: [(p["context"], p["kernel_us"]) for p in points] for label, points in series.items()}
    rates = {label: [(p["context"], p["kernel_gbs"]) for p in points] for label, points in series.items()}
    panels = [
        Panel("kernel time", "cached tokens", "kernel time (us)", times, yscale="log"),
        Panel("cache bytes read / time", "cached tokens", "GB/s", rates,
              references={"device-to-device copy": meta["copy_gbs"]}),
    ]
    plot_panels(path, panels, title=f"MLRA fused decode kernel, bf16 and fp8 latent caches, {meta['machine']}")


if __name__ == "__main__":
    main()
