"""Decode-step time and KV-cache memory: MLRA (absorbed decode on the compressed cache) vs transformers'
DeepseekV3 (MLA that re-expands the cached latent every step) vs transformers' Llama (GQA), on the CPU.

All models use the published 2.9B layer shapes (d=3072, 24 heads, d_n=128, d_r=64, d_c=512, d_cq=1024) with
only a few layers, the same vocabulary (50304, tied embeddings), the same dtype and the same process.
Caches are filled directly with random, correctly shaped states (no long prefill), so the timing is the decode
step alone: one token through the whole model (embedding, layers, final norm, lm_head) with the cache
prefilled to the context length. See benchmarks/README.md.

    python benchmarks/decode_cpu.py                      # full run: 2 layers, 1K/4K/16K/64K, fp32
    python benchmarks/decode_cpu.py --contexts 1024 4096 --layers 1 --steps 3    # quick

Writes OUT.md and OUT.json (default benchmarks/results/decode_cpu_DTYPE).
"""

import argparse
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    cache_tensors,
    check_cache_layout,
    deepseek_v3_config,
    llama_gqa_config,
    published_model,
    random_cache,
    transformers_model,
    write_results,
)

from modeling_mlra import MLRAConfig  # noqa: E402  (common puts the repository first)
from modeling_mlra.cli import DTYPE_NAMES  # noqa: E402
from modeling_mlra.modeling_mlra import CACHE_FIELD  # noqa: E402

RESULTS_DIR = Path(__file__).resolve().parent / "results"
# The published shapes (MLRA-4): 24 heads, d_n = 128, d_r = 64, d_v = 128, d_c = 512; for the memory estimates.
PUBLISHED = MLRAConfig.from_variant("mlra_4")
HEADS, D_N, D_R, D_V, D_C = (
    PUBLISHED.num_attention_heads, PUBLISHED.qk_nope_head_dim, PUBLISHED.qk_rope_head_dim, PUBLISHED.v_head_dim,
    PUBLISHED.kv_lora_rank,
)  # fmt: skip
EXPANDED_MLA_VALUES = HEADS * (D_N + D_R + D_V)  # 7680 values per token per layer in an expanded MLA K/V cache
MAX_POSITIONS = 1 << 17  # 128K: every context fits


@dataclass
class Result:
    model: str
    context: int
    step_ms: float | None = None  # median decode step, whole model
    attn_ms_per_layer: float | None = None  # median of the attention modules' time per layer within a step
    cache_bytes_per_token_per_layer: int | None = None  # the persistent cache, as allocated by the model's own cache
    cache_mb: float | None = None  # persistent cache at this context, all layers
    steps: int = 0
    step_ms_all: list = field(default_factory=list)
    skipped: str | None = None


# ----------------------------------------------------------------------------------------------- model setups
# Each setup returns (model, fill_cache) where fill_cache(context) returns a cache holding `context` random tokens in
# exactly the layout the model's own forward writes (common.random_cache; checked once against a real forward by
# common.check_cache_layout).


def published_shapes(layers: int) -> MLRAConfig:
    """MLRA-4's published shapes with `layers` layers: the size transformers' DeepseekV3 and Llama are built at."""
    return MLRAConfig.from_variant("mlra_4", num_hidden_layers=layers, max_position_embeddings=MAX_POSITIONS)


def setup_mlra(variant: str, layers: int, dtype: torch.dtype, reserve: int):
    """Ours: MLRAForCausalLM with the published shapes of `variant`; an MLRACache filled with random latents."""
    model = published_model(variant, layers, "cpu", dtype, max_position_embeddings=MAX_POSITIONS)

    def fill_cache(context: int):
        # Room for the timed steps, so no capacity doubling (an amortized copy) lands inside the timing.
        return random_cache(model, 1, context, reserve)

    return model, fill_cache


def setup_deepseek_v3(layers: int, dtype: torch.dtype):
    """transformers' DeepseekV3 (dense MLA layers only) with the same shapes as MLRA-4.

    Its attention caches the compressed latent, as two single-head tensors in a DynamicCache: keys
    [bsz, 1, S, d_c] (the normalized latent) and values [bsz, 1, S, d_r] (the rotated rope key); every step it
    re-expands all cached latents through kv_b_proj into per-head K [bsz, h, S, d_n + d_r] and V [bsz, h, S, d_v].
    """
    model = transformers_model(deepseek_v3_config(published_shapes(layers)), "cpu", dtype)

    def fill_cache(context: int):
        return random_cache(model, 1, context, reserve=0)

    return model, fill_cache


def setup_llama(layers: int, dtype: torch.dtype, kv_heads: int):
    """transformers' Llama with GQA of the same size: 24 query heads, `kv_heads` KV heads of 128, hidden 3072."""
    model = transformers_model(llama_gqa_config(published_shapes(layers), kv_heads), "cpu", dtype)

    def fill_cache(context: int):
        return random_cache(model, 1, context, reserve=0)

    return model, fill_cache


def cache_bytes(cache) -> int:
    """Bytes the filled part of the cache takes, all layers."""
    return sum(t.nbytes for layer in cache_tensors(cache) for t in layer)


# ----------------------------------------------------------------------------------------------- timing


def instrument_attention(model) -> list[float]:
    """Forward hooks on every layer's attention module; returns the list they append each call's ms to."""
    log, starts = [], {}

    def pre_hook(module, args):
        starts[id(module)] = time.perf_counter()

    def post_hook(module, args, output):
        log.append((time.perf_counter() - starts.pop(id(module))) * 1e3)

    for layer in model.model.layers:
        layer.self_attn.register_forward_pre_hook(pre_hook)
        layer.self_attn.register_forward_hook(post_hook)
    return log


def decode_step(model, cache, attention_log: list[float]) -> tuple[float, float]:
    """The timing helper: one token through the whole model with `cache` (which it appends to, as in generation).
    Returns the step's ms and the attention modules' ms per layer within it."""
    attention_log.clear()
    token = torch.randint(0, model.config.vocab_size, (1, 1))
    with torch.no_grad():
        start = time.perf_counter()
        model(input_ids=token, use_cache=True, logits_to_keep=1, **{CACHE_FIELD: cache})
        elapsed = (time.perf_counter() - start) * 1e3
    return elapsed, sum(attention_log) / len(model.model.layers)


# ----------------------------------------------------------------------------------------------- feasibility


def available_bytes() -> int:
    with open("/proc/meminfo") as f:
        info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
    return info["MemAvailable"]


def peak_extra_bytes(family: str, context: int, layers: int, elem: int, kv_heads: int) -> int:
    """Rough bytes a decode step at `context` needs beyond the weights: the cache, a per-step copy of one layer's
    cache (DynamicCache appends with torch.cat) and the largest per-layer temporaries."""
    latent = context * (D_C + D_R) * elem
    if family == "mlra":
        return layers * latent + context * 4 * HEADS * 4 * 3  # scores/probs in fp32, per branch
    if family == "deepseek_v3":
        # kv_b_proj output [S, h*(d_n+d_v)], new K [S, h, d_n+d_r], and the attention's contiguous copies of K/V
        expanded = context * HEADS * ((D_N + D_V) + (D_N + D_R) + (D_N + D_R + D_V)) * elem
        return layers * latent + latent + expanded + context * HEADS * 4 * 2
    gqa = context * kv_heads * 128 * 2 * elem
    return layers * gqa + gqa + context * HEADS * 128 * 2 * elem  # + repeat_kv to 24 heads if SDPA cannot do GQA


# ----------------------------------------------------------------------------------------------- run and report


def machine_description() -> dict:
    cpu = "unknown"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    flags = open("/proc/cpuinfo").read()
    return {
        "cpu": cpu,
        "logical_cores": os.cpu_count(),
        "avx512_bf16": "avx512_bf16" in flags,
        "amx": "amx_tile" in flags,
        "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "torch_threads": torch.get_num_threads(),
    }


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return "load average: " + " ".join(f"{x:.2f}" for x in os.getloadavg())


@dataclass
class Contender:
    name: str
    family: str
    model: torch.nn.Module
    fill_cache: object
    attention_log: list
    weight_bytes: int


def build(name: str, family: str, setup) -> Contender:
    print(f"building {name}", flush=True)
    model, fill_cache = setup()
    check_cache_layout(model)
    weight_bytes = sum(p.nbytes for p in model.parameters())
    return Contender(name, family, model, fill_cache, instrument_attention(model), weight_bytes)


def skip_reason(contender: Contender, context: int, args, elem: int) -> str | None:
    """Why a configuration is not run: by request, or its estimated memory need (beyond what is allocated now:
    all weights and the caches already filled for the other models at this context)."""
    if contender.name in args.skip:
        return "skipped by --skip"
    need = peak_extra_bytes(contender.family, context, args.layers, elem, args.llama_kv_heads)
    have = available_bytes()
    if need > args.memory_fraction * have:
        return (
            f"needs ~{need / 2**30:.1f} GiB beyond the weights (cache + per-step temporaries), "
            f"{have / 2**30:.1f} GiB available x {args.memory_fraction}"
        )
    return None


def run_context(contenders: list[Contender], context: int, args, elem: int) -> list[Result]:
    """Time every model at one context, interleaved step by step (model A, B, C, A, B, C, ...), so that a change
    in the load of the shared CPU hits all models alike. Models whose first step is slower than
    --slow-step-s run 1 warmup step and at most 3 timed steps."""
    results, caches, timings = {}, {}, {}
    for c in contenders:
        result = results[c.name] = Result(model=c.name, context=context)
        result.skipped = skip_reason(c, context, args, elem)
        if result.skipped is None:
            try:
                caches[c.name] = c.fill_cache(context)
            except (RuntimeError, MemoryError) as error:
                result.skipped = f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"
        if result.skipped is None:
            result.cache_bytes_per_token_per_layer = cache_bytes(caches[c.name]) // (context * args.layers)
            result.cache_mb = cache_bytes(caches[c.name]) / 2**20
            timings[c.name] = []
    plan = {name: (args.warmup, args.steps) for name in caches}
    for round_ in range(args.warmup + args.steps):
        for c in contenders:
            if c.name not in caches or round_ >= sum(plan[c.name]):
                continue
            try:
                step_ms, attn_ms = decode_step(c.model, caches[c.name], c.attention_log)
            except (RuntimeError, MemoryError) as error:  # an allocation failure becomes a skip, not a crash
                results[c.name].skipped = f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"
                del caches[c.name]
                gc.collect()
                continue
            if round_ == 0 and step_ms > args.slow_step_s * 1e3:
                plan[c.name] = (1, min(args.steps, 3))
            if round_ >= plan[c.name][0]:
                timings[c.name].append((step_ms, attn_ms))
    for c in contenders:
        result = results[c.name]
        if result.skipped is None and timings.get(c.name):
            step_ms, attn_ms = zip(*timings[c.name])
            result.step_ms, result.attn_ms_per_layer = statistics.median(step_ms), statistics.median(attn_ms)
            result.steps, result.step_ms_all = len(step_ms), [round(x, 3) for x in step_ms]
            print(
                f"{context:>6} {c.name:12s} step {result.step_ms:9.2f} ms  attn/layer {result.attn_ms_per_layer:9.2f} "
                f"ms  cache {result.cache_mb:8.1f} MB  ({result.steps} steps)",
                flush=True,
            )
        else:
            print(f"{context:>6} {c.name:12s} SKIPPED ({result.skipped})", flush=True)
    caches.clear()
    gc.collect()
    return list(results.values())


def fmt(value, spec):
    return "-" if value is None else format(value, spec)


def ratio(a: Result | None, b: Result | None, key: str):
    if a is None or b is None or getattr(a, key) is None or getattr(b, key) is None:
        return None
    return getattr(a, key) / getattr(b, key)


def markdown_table(results: list[Result], reference: str, layers: int) -> str:
    by_key = {(r.model, r.context): r for r in results}
    lines = [
        f"| model | context | step ms | attn ms/layer | cache B/token/layer | cache MB ({layers} layers) "
        f"| step vs {reference} | attn vs {reference} | cache vs {reference} |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        ours = by_key.get((reference, r.context))
        if r.skipped:
            lines.append(f"| {r.model} | {r.context} | skipped: {r.skipped} | | | | | | |")
            continue
        lines.append(
            f"| {r.model} | {r.context} | {fmt(r.step_ms, '.2f')} | {fmt(r.attn_ms_per_layer, '.2f')} "
            f"| {r.cache_bytes_per_token_per_layer} | {fmt(r.cache_mb, '.1f')} "
            f"| {fmt(ratio(r, ours, 'step_ms'), '.2f')}x | {fmt(ratio(r, ours, 'attn_ms_per_layer'), '.2f')}x "
            f"| {fmt(ratio(r, ours, 'cache_mb'), '.2f')}x |"
        )
    return "\n".join(lines)


def targets(results: list[Result], reference: str, elem: int) -> list[str]:
    by_key = {(r.model, r.context): r for r in results}
    lines = []
    ours = [r for r in results if r.model == reference and not r.skipped]
    if ours:
        got = ours[0].cache_bytes_per_token_per_layer
        want = (D_C + D_R) * elem
        lines.append(
            f"- Cache per token per layer = (d_c + d_r) x dtype = {want} B: "
            f"{'MET' if got == want else 'MISSED'} (measured {got} B; "
            f"{EXPANDED_MLA_VALUES * elem / got:.1f}x less than an expanded MLA K/V cache of "
            f"{EXPANDED_MLA_VALUES} values = {EXPANDED_MLA_VALUES * elem} B)."
        )
    mine, theirs = by_key.get((reference, 16384)), by_key.get(("deepseek_v3", 16384))
    speedup = ratio(theirs, mine, "step_ms")
    if speedup is None:
        lines.append("- Decode at 16K >= 10x faster than DeepseekV3: NOT MEASURED (16K not run or skipped).")
    else:
        attn = ratio(theirs, mine, "attn_ms_per_layer")
        lines.append(
            f"- Decode step at 16K >= 10x faster than DeepseekV3: {'MET' if speedup >= 10 else 'MISSED'} "
            f"(whole step {speedup:.1f}x; attention alone {attn:.1f}x)."
        )
    return lines


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096, 16384, 65536])
    parser.add_argument("--dtype", choices=DTYPE_NAMES, default="fp32")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: see README, shared CPU)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5, help="timed decode steps per configuration (median)")
    parser.add_argument("--slow-step-s", type=float, default=5.0, help="a step slower than this: warmup 1, <= 3 steps")
    parser.add_argument("--llama-kv-heads", type=int, default=8)
    parser.add_argument("--models", nargs="+", default=["mlra_4", "mla", "deepseek_v3", "llama_gqa"],
                        choices=["mlra_4", "mla", "mlra_2", "gla_2", "gla_4", "deepseek_v3", "llama_gqa"])
    parser.add_argument("--skip", nargs="*", default=[], help="models to list as skipped without running")
    parser.add_argument("--memory-fraction", type=float, default=0.6,
                        help="skip a configuration needing more than this fraction of available memory")
    parser.add_argument("--out", type=Path, help="output prefix (default benchmarks/results/decode_cpu_DTYPE)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    args.out = args.out or RESULTS_DIR / f"decode_cpu_{args.dtype}"

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    dtype = DTYPE_NAMES[args.dtype]
    elem = torch.empty((), dtype=dtype).element_size()
    machine = machine_description()
    load_before = uptime()
    print(json.dumps(machine), "\n", load_before, flush=True)

    reference = args.models[0]
    reserve = args.warmup + args.steps + 1
    setups = {
        "deepseek_v3": ("deepseek_v3", lambda: setup_deepseek_v3(args.layers, dtype)),
        "llama_gqa": ("llama", lambda: setup_llama(args.layers, dtype, args.llama_kv_heads)),
    }
    started = time.time()
    contenders = []
    for name in args.models:
        family, setup = setups.get(name, ("mlra", lambda name=name: setup_mlra(name, args.layers, dtype, reserve)))
        contenders.append(build(name, family, setup))
    results: list[Result] = []
    for context in args.contexts:
        results += run_context(contenders, context, args, elem)
    results.sort(key=lambda r: args.models.index(r.model))  # table: grouped by model, contexts ascending
    load_after = uptime()

    table = markdown_table(results, reference, args.layers)
    summary = targets(results, reference, elem)
    report = "\n".join([
        f"# Decode step on the CPU: {args.layers} layer(s) of the published 2.9B shapes, {args.dtype}",
        "",
        f"Machine: {machine['cpu']}, {machine['logical_cores']} logical cores (torch threads {args.threads}), "
        f"{machine['memory_gb']} GB RAM, avx512_bf16={machine['avx512_bf16']}, amx={machine['amx']}; "
        f"Python {machine['python']}, torch {machine['torch']}, transformers {machine['transformers']}.  ",
        f"Load before: `{load_before}`  ",
        f"Load after: `{load_after}` (the CPU is shared; wall time {time.time() - started:.0f} s)  ",
        f"Steps: median of {args.steps} timed decode steps after {args.warmup} warmup steps, the models "
        "interleaved step by step at each context "
        f"(steps slower than {args.slow_step_s:g} s: 1 warmup, at most 3 timed), torch.no_grad, batch 1.",
        "",
        "Models: `mlra_4`, `mla` = ours (MLRAForCausalLM, absorbed decode on MLRACache); `deepseek_v3` = "
        "transformers DeepseekV3ForCausalLM, dense MLA with the same shapes as mlra_4 (caches the latent, "
        f"re-expands it through kv_b_proj every step); `llama_gqa` = transformers LlamaForCausalLM, 24 query "
        f"heads / {args.llama_kv_heads} KV heads of 128. step ms: one token through the whole model (embedding, "
        "layers, final norm, lm_head over 50304 tokens); attn ms/layer: the attention modules alone. Ratios are "
        f"model / {reference} (above 1: {reference} is faster or smaller).",
        "",
        table,
        "",
        "## Targets",
        "",
        *summary,
        f"- Reference: an expanded MLA K/V cache (per-head K of d_n + d_r and V of d_v, 24 heads) would take "
        f"{EXPANDED_MLA_VALUES * elem} B per token per layer. transformers' DeepseekV3 does not keep that cache: "
        "it caches the same 576 latent values as ours and materializes the expanded K/V as per-step temporaries "
        "(S x 7680 values per layer, every step).",
        "",
    ])
    raw = {
        "machine": machine, "load_before": load_before, "load_after": load_after, "args": {
            k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
        }, "results": [asdict(r) for r in results],
    }
    write_results(args.out, raw, report)
    print("\n" + table + "\n\n" + "\n".join(summary))
    print(f"\nwrote {args.out.with_suffix('.md')} and {args.out.with_suffix('.json')}")


if __name__ == "__main__":
    main()
