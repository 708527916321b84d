"""The decode step against the weight-read floor, and what generate() gives, on one GPU in one run (issue 16).

    python benchmarks/decode_step.py --out benchmarks/results/decode_step_h200    # the GPU run (under 10 minutes)
    python benchmarks/decode_step.py --quick                                        # tiny shapes on the CPU

Ours (MLRA-4, MLA, GLA-2) beside transformers' Llama (8 KV heads) and DeepseekV3 (dense) of the same ~2.9B size,
bfloat16, random weights, 24 layers, a static cache of each model's own kind holding `context` random tokens
(benchmarks/common.py: the layout each model's forward writes, checked). In three phases, so that every shape is
reached before the compiles take the time (--stop-after-s: what is not started is recorded as skipped):
1. graph step of every model at every shape: the model's eager decode step (one token, `logits_to_keep=1`)
   captured in a CUDA graph; the cache is rewound to `context` before every replay (outside the timed events);
   median of replays; floor: (parameter bytes + cached bytes read) / device-to-device copy rate measured in this
   run;
2. compiled step at each --compiled entry, most wanted first: `torch.compile(step, fullgraph=True, dynamic=False)`
   (inductor, default mode; one compiled function per model, recompiled per shape: a static cache's capacity is a
   constant of the graph, ours and transformers' alike), captured the same way; its logits against the eager
   step's (bfloat16); at --profile-shapes the kernels of one compiled step (torch.profiler, outside a graph): how
   many, their summed time, the top ones, and for ours the fused decode kernel's share (`mlra_decode_kernel.py`).
   Ours run their projections through the Triton GEMV there (`decode_gemv.py`, decode_kernel="auto");
3. generate(cache_implementation="static") at batch 1 with each model's automatic compile (ours:
   `MLRAForCausalLM._default_compile_config`; transformers': its `CompileConfig()`), several calls of different
   lengths: the first call's time (compile included), recompiles after it (dynamo's graph count), total tokens/s of
   256 new tokens (16-token prompt) and the median streamed interval (IntervalStreamer: when each token reaches
   the host), ours' greedy tokens against eager generate()'s (generate_interval.py: per-step loop vs deferred), and
   a cProfile of one compiled generate() call of ours (the host's work per token); the compile time again in a
   second process with the compile caches warm; last, MLRA-4's graph and compiled step at the first shape under --variants
   (`variant_setting`): `cublas_projections` (the projections through cuBLAS, as before the GEMV), or an inductor
   setting such as `coordinate_descent_tuning` or `freezing` (weights as constants).
Every part is in its own try/except, rows are written as they come (.json, .md), the plot at the end.
"""

import argparse
import cProfile
import io
import json
import pstats
import statistics
import subprocess
import sys
import time
import unittest.mock
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    IntervalStreamer,
    Panel,
    Report,
    cache_tensors,
    check_cache_layout,
    copy_bandwidth,
    deepseek_v3_config,
    error_text,
    fmt,
    llama_gqa_config,
    plot_panels,
    published_model,
    random_cache,
    release,
    run_setting,
    set_cache_length,
    synchronize,
    timed_ms,
    transformers_model,
)
from transformers import CompileConfig  # noqa: E402

import modeling_mlra.modeling_mlra  # noqa: E402  (common puts the repository first)
from modeling_mlra import MLRAConfig, MLRAForCausalLM  # noqa: E402
from modeling_mlra.modeling_mlra import CACHE_FIELD  # noqa: E402

OURS = ("mlra_4", "mla", "gla_2")
MODELS = ("mlra_4", "llama_gqa", "deepseek_v3", "mla", "gla_2")  # the most wanted first
SHAPES = ("1x16", "1x32768", "16x16", "16x32768", "1x131072")
# compiled steps, most wanted first: the targets' shapes, then each model's 1 x 16, then the references at 16 x 32K
COMPILED = (
    "mlra_4:1x16", "mlra_4:16x32768", "mlra_4:1x32768", "llama_gqa:1x16", "deepseek_v3:1x16", "mla:1x16",
    "gla_2:1x16", "llama_gqa:16x32768", "deepseek_v3:16x32768", "mlra_4:16x16", "mlra_4:1x131072",
    "llama_gqa:1x32768", "deepseek_v3:1x32768",
)
GB = 1e9
QUICK_SHAPES = dict(
    hidden_size=64, num_attention_heads=4, kv_lora_rank=32, qk_nope_head_dim=16, v_head_dim=16, qk_rope_head_dim=8,
    intermediate_size=128, vocab_size=256,
)  # fmt: skip
DECODE_KERNEL_NAMES = ("_mlra_decode_kernel", "_merge_splits_kernel")


def build_model(name: str, args, device, dtype):
    overrides = dict(max_position_embeddings=args.max_positions)
    if args.quick:
        overrides.update(QUICK_SHAPES, q_lora_rank=64 if name == "mla" else 48)
    if name in OURS:
        return published_model(name, args.layers, device, dtype, **overrides)
    reference = MLRAConfig.from_variant("mlra_4", num_hidden_layers=args.layers, **overrides)
    if name == "deepseek_v3":
        return transformers_model(deepseek_v3_config(reference), device, dtype)
    return transformers_model(llama_gqa_config(reference, kv_heads=2 if args.quick else 8), device, dtype)


def parameter_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())  # a tied embedding once


def cache_bytes_read(cache, context: int) -> int:
    """Bytes of the cached tokens a step reads: `context` tokens of every cached tensor, all layers."""
    return sum(t.element_size() * t.numel() // t.shape[-2 if t.dim() == 4 else 1] * context
               for layer in cache_tensors(cache) for t in layer)  # fmt: skip


class Step:
    """One decode step of `model` on `cache` (rewound to `context` before every run), eager or compiled, and its
    CUDA-graph capture (on the CPU, --quick: called directly)."""

    def __init__(self, model, compiled, cache, batch: int, context: int, device):
        self.model, self.compiled, self.cache, self.context, self.device = model, compiled, cache, context, device
        self.ids = torch.randint(0, model.config.vocab_size, (batch, 1), device=device)

    def eager(self):
        return self.model(self.ids, logits_to_keep=1, **{CACHE_FIELD: self.cache}).logits

    def run(self, fn):
        set_cache_length(self.cache, self.context)
        return fn()

    def graph(self, fn, warmups: int = 3):
        """(replay, logits): `fn` warmed up on a side stream, then captured; replay() reruns it (rewind the cache to
        `context` first: `time_replays` does)."""
        if self.device.type != "cuda":
            out = self.run(fn)
            return (lambda: out.copy_(fn())), out
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(warmups):
                self.run(fn)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        set_cache_length(self.cache, self.context)
        with torch.cuda.graph(graph):
            out = fn()
        self._graph = graph  # kept alive with its memory pool as long as this step

        def replay():
            graph.replay()
            return out

        return replay, out

    def time_replays(self, replay, args) -> float:
        """Median milliseconds of replays, each from `context`: the rewind (one small kernel per layer, launched from
        the host) before the timed events, not inside them."""

        def timed() -> float:
            set_cache_length(self.cache, self.context)
            return timed_ms(replay, self.device)[1]

        first = min(timed() for _ in range(2))
        replays = max(3, min(args.replays, int(args.replay_budget_s * 1e3 / max(first, 1e-3))))
        return statistics.median(timed() for _ in range(replays))


def kernel_profile(fn, device, rewind, top: int = 16) -> dict:
    """Kernels of one call of `fn` (after warm-up; `rewind()` before each call, outside the profile): count, summed
    device time, the top ones, the decode kernel's."""
    if device.type != "cuda":
        return {}
    from torch.profiler import ProfilerActivity, profile

    rewind()
    fn()
    rewind()
    synchronize(device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        synchronize(device)
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    kernels = [e for e in kernels if not e.name.startswith(("Memcpy", "Memset"))]
    by_name = {}
    for e in kernels:
        by_name[e.name] = by_name.get(e.name, 0.0) + e.device_time
    total = sum(by_name.values())
    decode = sum(t for name, t in by_name.items() if any(k in name for k in DECODE_KERNEL_NAMES))
    tops = sorted(by_name.items(), key=lambda item: -item[1])[:top]
    return dict(kernels=len(kernels), kernel_us=total, decode_kernel_us=decode,
                top=[dict(name=name[:90], us=us, count=sum(e.name == name for e in kernels)) for name, us in tops])  # fmt: skip


def measure_graph(model, name, batch, context, args, device, report, floor_of) -> dict:
    """The graph step of `model` at batch x context: its row, recorded."""
    row = dict(part="step", model=name, batch=batch, context=context)
    cache = random_cache(model, batch, context, reserve=args.reserve, static=True)
    step = Step(model, None, cache, batch, context, device)
    row["floor_ms"] = floor_of(cache, context)
    with torch.no_grad():
        replay, _ = step.graph(step.eager)
        row["graph_ms"] = step.time_replays(replay, args)
        step._graph = None
    report.record(row)
    return row


def measure_compiled(model, compiled, row, args, device, report) -> None:
    """The compiled step at the shape of `row` (its first call timed, its logits against the eager step's, its
    replays and kernels), added to `row`."""
    batch, context = row["batch"], row["context"]
    cache = random_cache(model, batch, context, reserve=args.reserve, static=True)
    step = Step(model, compiled, cache, batch, context, device)
    with torch.no_grad():
        compile_fn = lambda: compiled(step.ids, cache)  # noqa: E731
        start = time.perf_counter()
        step.run(compile_fn)
        synchronize(device)
        row["first_compiled_call_s"] = time.perf_counter() - start
        reference = step.run(step.eager).float()
        compiled_logits = step.run(compile_fn).float()
        row["compiled_vs_eager"] = ((compiled_logits - reference).abs().max() / reference.abs().max()).item()
        replay, _ = step.graph(compile_fn)
        row["compiled_ms"] = step.time_replays(replay, args)
        step._graph = None
        if (batch, context) in args.profile_shapes:
            row.update(kernel_profile(compile_fn, device, lambda: set_cache_length(cache, context)))
    report.write()
    print(json.dumps(row), flush=True)


def variant_setting(variant: str):
    """What a --variants entry changes: `cublas_projections`, the step with the projections through cuBLAS (the Triton
    GEMV of `modeling_mlra/decode_gemv.py` off); `gemv_without_pdl`, the GEMV launched without programmatic
    dependent launch (`decode_gemv.programmatic_launch`); `gemv_without_preload`, the one-row launches asking their
    first 8 KB into L2 before they wait instead of loading their first weight tile (`gemv_config`'s `preload`);
    `gemv_prefetch_BYTES`, those asking BYTES (`prefetch_bytes`); `gemv_lookahead`, the one-row launches loading
    the next weight tile ahead in their loop (`lookahead`); `gemv_picks=PATH`, the launches per shape in PATH
    (`gemv_choices_from`); `fold_apart`, the W_UK fold in a launch of its own, not in the cache write's; `w_uk_without_pdl`, the W_UK fold's launch without
    PDL; any other name, that inductor setting set to True (e.g. `triton.enable_pdl`: inductor's own kernels as
    programmatic dependent launches too)."""
    if variant == "cublas_projections":
        return unittest.mock.patch.object(modeling_mlra.modeling_mlra, "use_decode_gemv", lambda config, x: False)
    if variant == "gemv_without_pdl":
        return unittest.mock.patch.object(modeling_mlra.decode_gemv, "programmatic_launch", lambda index: False)
    if variant.startswith("gemv_prefetch_"):
        prefetch = int(variant.removeprefix("gemv_prefetch_"))
        return gemv_choices_where(lambda rows, *shape: rows == 1, preload=False, prefetch_bytes=prefetch)
    if variant == "gemv_without_preload":
        return gemv_choices_where(lambda rows, *shape: rows == 1, preload=False)
    if variant.startswith("gemv_picks="):
        return gemv_choices_from(Path(variant.removeprefix("gemv_picks=")))
    if variant == "fold_apart":  # the W_UK fold in a GEMV launch of its own, as before it joined the cache write's
        layer = modeling_mlra.modeling_mlra.MLRALatentCacheLayer
        write = layer.write_projected
        return unittest.mock.patch.object(layer, "write_projected", lambda self, *args: write(self, *args[:7]))
    if variant == "gemv_lookahead":
        return gemv_choices_where(lambda rows, *shape: rows == 1, lookahead=True)
    if variant == "w_uk_without_pdl":  # the fold is the one launch of many weight batches without segments
        return gemv_choices_where(lambda rows, outputs, reduction, batches, mode, segments: batches > 1 and segments == 1,
                                  pdl=False)
    return torch._inductor.config.patch({variant: True})


def gemv_choices_where(selected, **choices):
    """A patch of `decode_gemv.gemv_config` that adds `choices` to the launches whose (rows, outputs, reduction,
    batches, mode, segments) `selected` accepts."""
    defaults = modeling_mlra.decode_gemv.gemv_config

    def chosen(rows, outputs, reduction, batches, mode, num_sms, segments=1, **given):
        extra = choices if selected(rows, outputs, reduction, batches, mode, segments) else {}
        return defaults(rows, outputs, reduction, batches, mode, num_sms, segments=segments, **{**extra, **given})

    return unittest.mock.patch.object(modeling_mlra.decode_gemv, "gemv_config", chosen)


def gemv_choices_from(path: Path):
    """A patch of `decode_gemv.gemv_config` that takes the GEMV's launches at the shapes in `path` (benchmarks/gemv.py's
    `_picks.json`, the sweep's fastest per shape, or a list of some of its entries) in place of the defaults."""
    picks = {tuple(pick["key"]): pick["choices"] for pick in json.loads(path.read_text())}
    defaults = modeling_mlra.decode_gemv.gemv_config

    def picked(rows, outputs, reduction, batches, mode, num_sms, segments=1, **choices):
        chosen = picks.get((rows, outputs, reduction, batches, mode, segments), {})
        return defaults(rows, outputs, reduction, batches, mode, num_sms, segments=segments, **{**chosen, **choices})

    return unittest.mock.patch.object(modeling_mlra.decode_gemv, "gemv_config", picked)
    print(f"GEMV launches from {path}: {picks}", flush=True)


def compiled_step(model, args):
    def step(ids, cache):
        return model(ids, logits_to_keep=1, **{CACHE_FIELD: cache}).logits

    return torch.compile(step, fullgraph=True, dynamic=False, backend=args.backend)


def measure_generate(model, name, args, device, report) -> None:
    """generate() with a static cache and the model's automatic compile, at batch 1, over calls of several lengths."""
    vocab = model.config.vocab_size
    options = dict(do_sample=False, pad_token_id=0, cache_implementation="static")
    if args.quick:  # generate() compiles only on accelerators unless told; the eager backend keeps the check fast
        config = CompileConfig(fullgraph=True, dynamic=False, backend="eager", mode=None)
        config._compile_all_devices = True
        model.generation_config.compile_config = config

    def prompt(length, seed):
        return torch.randint(1, vocab, (1, length), generator=torch.Generator().manual_seed(seed)).to(device)

    def generate(ids, new_tokens, **extra):
        return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                              min_new_tokens=new_tokens, **options, **extra)  # fmt: skip

    row = dict(part="generate", model=name, batch=1, context=args.prompt, new_tokens=args.new_tokens)
    stats = torch._dynamo.utils.counters["stats"]
    with torch.no_grad():
        start = time.perf_counter()
        first = generate(prompt(args.prompt, 0), args.new_tokens)
        synchronize(device)
        row["first_call_s"] = time.perf_counter() - start
        graphs = stats["unique_graphs"]
        generate(prompt(args.prompt + 8, 1), args.new_tokens // 2)  # other lengths, within the first call's cache
        generate(prompt(args.prompt - 8, 2), args.new_tokens // 2)
        synchronize(device)
        start = time.perf_counter()
        again = generate(prompt(args.prompt, 0), args.new_tokens)
        synchronize(device)
        total_s = time.perf_counter() - start
        row.update(total_s=total_s, tokens_per_s=args.new_tokens / total_s, ms_per_token=total_s / args.new_tokens * 1e3)
        streamer = IntervalStreamer()
        generate(prompt(args.prompt, 3), args.new_tokens, streamer=streamer)
        row["streamed_ms"] = streamer.median_ms(skip=2)
        row["recompiles_after_first_call"] = stats["unique_graphs"] - graphs
        row["same_tokens_as_first_call"] = bool(torch.equal(first, again))
        if name in OURS:
            eager = model.generate(prompt(args.prompt, 0), max_new_tokens=args.check_tokens, do_sample=False,
                                   pad_token_id=0, disable_compile=True)  # fmt: skip
            n = args.check_tokens + args.prompt
            row["tokens_equal_to_eager"] = int((first[0, args.prompt : n] == eager[0, args.prompt : n]).cumprod(0).sum())
            row["tokens_compared"] = args.check_tokens
        if name == "mlra_4" and args.out is not None:
            profiler = cProfile.Profile()
            profiler.enable()
            generate(prompt(args.prompt, 4), min(64, args.new_tokens))
            synchronize(device)
            profiler.disable()
            text = io.StringIO()
            pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(30)
            path = Path(str(args.out) + "_generate_profile.txt")
            path.write_text(f"cProfile of one compiled generate() call of {name}, {args.prompt}-token prompt, "
                            f"{min(64, args.new_tokens)} new tokens\n"
                            + text.getvalue())  # fmt: skip
            row["profile"] = path.name
    report.record(row)


def warm_compile_child(args) -> dict:
    """In this (second) process: build mlra_4, compile its step at 1 x prompt with the caches the first process
    filled, and return the seconds of the first compiled call."""
    device = torch.device("cuda")
    model = build_model("mlra_4", args, device, torch.bfloat16)
    cache = random_cache(model, 1, args.prompt, reserve=args.reserve, static=True)
    compiled = compiled_step(model, args)
    ids = torch.randint(0, model.config.vocab_size, (1, 1), device=device)
    start = time.perf_counter()
    with torch.no_grad():
        set_cache_length(cache, args.prompt)
        compiled(ids, cache)
    torch.cuda.synchronize()
    return dict(warm_compile_s=time.perf_counter() - start)


# ----------------------------------------------------------------------------------------------- report


def shape_label(batch: int, context: int) -> str:
    return f"{batch} x " + (f"{context // 1024}K" if context >= 1024 and context % 1024 == 0 else str(context))


def ratio(a, b):
    return a / b if a is not None and b else None


def markdown(meta: dict, rows: list[dict]) -> str:
    steps = [r for r in rows if r["part"] == "step"]
    gens = [r for r in rows if r["part"] == "generate"]
    lines = [
        f"# Decode step and generate(): {meta['device']}, {meta['dtype']}, {meta['layers']} layers, random weights",
        "",
        f"Versions: torch {meta['torch']}, transformers {meta['transformers']}, triton {meta['triton']}, "
        f"CUDA {meta['cuda']}, Python {meta['python']}  ",
        f"Copy rate in this run: {fmt(meta.get('copy_gb_s'), '.0f')} GB/s (read + written); elapsed "
        f"{fmt(meta.get('elapsed_s'), '.0f')} s. How each number is made: the docstring of benchmarks/decode_step.py.",
        "",
        "## Decode step, ms",
        "",
        "| model | batch x context | graph | compiled | floor | compiled / floor | compiled vs llama_gqa "
        "| compiled vs deepseek_v3 | graph vs llama_gqa | graph vs deepseek_v3 | compiled vs eager logits | kernels "
        "| kernel ms | decode kernel ms |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    compiled = {(r["model"], r["batch"], r["context"]): r.get("compiled_ms") for r in steps}
    graph = {(r["model"], r["batch"], r["context"]): r.get("graph_ms") for r in steps}
    for r in steps:
        if "error" in r:
            lines.append(f"| {r['model']} | {shape_label(r['batch'], r['context'])} | {r['error']} |" + " |" * 12)
            continue
        key = (r["batch"], r["context"])
        compiled_cell = fmt(r.get("compiled_ms"), ".2f")
        if "compiled_error" in r:
            compiled_cell = r["compiled_error"][:60]
        lines.append(
            f"| {r['model']} | {shape_label(*key)} | {fmt(r.get('graph_ms'), '.2f')} | {compiled_cell} "
            f"| {fmt(r.get('floor_ms'), '.2f')} | {fmt(ratio(r.get('compiled_ms'), r.get('floor_ms')), '.2f')} "
            f"| {fmt(ratio(r.get('compiled_ms'), compiled.get(('llama_gqa', *key))), '.2f')} "
            f"| {fmt(ratio(r.get('compiled_ms'), compiled.get(('deepseek_v3', *key))), '.2f')} "
            f"| {fmt(ratio(r.get('graph_ms'), graph.get(('llama_gqa', *key))), '.2f')} "
            f"| {fmt(ratio(r.get('graph_ms'), graph.get(('deepseek_v3', *key))), '.2f')} "
            f"| {fmt(r.get('compiled_vs_eager'), '.1e')} | {fmt(r.get('kernels'), 'd')} "
            f"| {fmt(r.get('kernel_us') and r['kernel_us'] / 1e3, '.2f')} "
            f"| {fmt(r.get('decode_kernel_us') and r['decode_kernel_us'] / 1e3, '.2f')} |"
        )
    lines += [
        "",
        "## generate(cache_implementation=\"static\"), batch 1, automatic compile",
        "",
        "| model | first call s | recompiles after it | ms/token (256 new, total) | tokens/s | streamed interval ms "
        "| compiled step ms | total / step | streamed / step | greedy tokens as eager |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in gens:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['error']} |" + " |" * 8)
            continue
        step = compiled.get((r["model"], 1, r["context"]))
        same = f"{r['tokens_equal_to_eager']} / {r['tokens_compared']}" if "tokens_compared" in r else "-"
        lines.append(
            f"| {r['model']} | {r['first_call_s']:.1f} | {r['recompiles_after_first_call']} | {r['ms_per_token']:.2f} "
            f"| {r['tokens_per_s']:.0f} | {r['streamed_ms']:.2f} | {fmt(step, '.2f')} "
            f"| {fmt(ratio(r['ms_per_token'], step), '.2f')} | {fmt(ratio(r['streamed_ms'], step), '.2f')} | {same} |"
        )
    profiled = [r for r in steps if r.get("top")]
    if profiled:
        lines += ["", "## Top kernels of one compiled step (torch.profiler, outside a CUDA graph)", ""]
        for r in profiled:
            lines.append(f"- {r['model']}, {shape_label(r['batch'], r['context'])}: {r['kernels']} kernels, "
                         f"{r['kernel_us'] / 1e3:.2f} ms: " + "; ".join(
                             f"{t['name']} x{t['count']} {t['us']:.0f} us" for t in r["top"]))  # fmt: skip
    others = [r for r in rows if r["part"] not in ("step", "generate")]
    if others:
        lines += ["", "## Other", "", *[f"- {json.dumps(r)}" for r in others]]
    return "\n".join(lines) + "\n"


def plot(meta: dict, rows: list[dict], path: Path) -> None:
    """Per batch: every model's graph step and compiled step (where measured), and our floor, against the context."""
    steps = [r for r in rows if r["part"] == "step" and "graph_ms" in r]
    panels = []
    for batch in sorted({r["batch"] for r in steps}):
        lines = {}
        for r in steps:
            if r["batch"] == batch:
                lines.setdefault(f"{r['model']} graph", []).append((r["context"], r["graph_ms"]))
                if r.get("compiled_ms"):
                    lines.setdefault(f"{r['model']} compiled", []).append((r["context"], r["compiled_ms"]))
                if r["model"] == "mlra_4" and r.get("floor_ms"):
                    lines.setdefault("mlra_4 floor", []).append((r["context"], r["floor_ms"]))
        panels.append(Panel(f"decode step, batch {batch}", "context tokens", "ms per step", lines, yscale="log"))
    plot_panels(path, panels, title=f"{meta['device']}, {meta['dtype']}, {meta['layers']} layers")


# ----------------------------------------------------------------------------------------------- run


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--quick", action="store_true", help="tiny shapes, float32, on the CPU: checks the script")
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), help="batch x context, e.g. 1x16 16x32768")
    parser.add_argument("--compiled", nargs="*", default=list(COMPILED),
                        help="compiled steps, most wanted first, as model:batch x context (e.g. mlra_4:1x16)")
    parser.add_argument("--profile-shapes", nargs="*", default=["1x16", "16x32768", "1x32768"])
    parser.add_argument("--generate-models", nargs="*", default=["mlra_4", "llama_gqa", "deepseek_v3"])
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--prompt", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--check-tokens", type=int, default=64)
    parser.add_argument("--reserve", type=int, default=64, help="static cache capacity beyond the context")
    parser.add_argument("--replays", type=int, default=30)
    parser.add_argument("--replay-budget-s", type=float, default=1.0)
    parser.add_argument("--backend", default="inductor")
    parser.add_argument("--stop-after-s", type=float, default=470.0)
    parser.add_argument("--variants", nargs="*", default=["cublas_projections", "coordinate_descent_tuning"],
                        help="MLRA-4's compiled step at the first shape under other settings (`variant_setting`)")
    parser.add_argument("--no-warm-compile", action="store_true", help="skip the compile in a second process")
    parser.add_argument("--warm-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--gemv-choices", type=Path, help="the GEMV's launches per shape (`gemv_choices_from`)")
    args = parser.parse_args(argv)
    if args.gemv_choices is not None:  # for the whole process: one call measures the launches it has just picked
        gemv_choices_from(args.gemv_choices).start()
    parse = lambda shapes: [tuple(int(x) for x in s.split("x")) for s in shapes]  # noqa: E731
    if args.quick:
        args.layers, args.shapes, args.new_tokens, args.check_tokens = 2, ["1x16", "1x64", "2x64"], 24, 8
        args.backend, args.replays, args.profile_shapes = "eager", 3, []
        args.compiled = [f"{name}:1x16" for name in args.models] + ["mlra_4:2x64"]
        args.variants = args.variants[:1]
    args.shapes, args.profile_shapes = parse(args.shapes), parse(args.profile_shapes)
    args.compiled = [(entry.split(":")[0], *parse([entry.split(":")[1]])[0]) for entry in args.compiled]
    args.max_positions = max(c for _, c in args.shapes) + args.reserve + args.new_tokens + 64
    if args.warm_child:
        print(json.dumps(warm_compile_child(args)))
        return
    out = args.out or Path("/tmp/decode_step_quick" if args.quick else "benchmarks/results/decode_step_h200")
    args.out = out
    started = time.perf_counter()
    device, dtype, meta = run_setting(parser, args, argv, args.layers)
    report = Report(out, meta, markdown, plot)
    meta["copy_gb_s"] = copy_bandwidth(device) if device.type == "cuda" else None
    release(device)

    def out_of_time() -> bool:
        return time.perf_counter() - started > args.stop_after_s

    def skipped(row):
        report.record(dict(row, error=f"skipped: past --stop-after-s {args.stop_after_s:.0f}"))

    models, rows = {}, {}  # built models (with their floor function), step rows by (model, batch, context)

    def model_of(name):
        if name not in models:
            model = build_model(name, args, device, dtype)
            check_cache_layout(model, static=True)
            weights, copy = parameter_bytes(model), meta["copy_gb_s"]
            floor_of = lambda cache, context: (weights + cache_bytes_read(cache, context)) / (copy * GB) * 1e3 if copy else None  # noqa: E731,E501
            models[name] = (model, floor_of, compiled_step(model, args))
        return models[name]

    # 1. The graph step of every model at every shape: cheap, so every shape is reached before the compiles.
    for name in args.models:
        for batch, context in args.shapes:
            if out_of_time():
                skipped(dict(part="step", model=name, batch=batch, context=context))
                continue
            try:
                model, floor_of, _ = model_of(name)
                rows[name, batch, context] = measure_graph(model, name, batch, context, args, device, report, floor_of)
            except Exception as error:  # noqa: BLE001 - one shape's failure must not lose the rest
                report.record(dict(part="step", model=name, batch=batch, context=context, error=error_text(error)))
            release(device)
    # 2. Compiled steps, most wanted first (each shape a compile of its own: a static cache's capacity is a constant
    #    of the graph, ours and transformers' alike).
    for name, batch, context in args.compiled:
        row = rows.get((name, batch, context))
        if name not in args.models or row is None or "error" in row:
            continue
        if out_of_time():
            row["compiled_error"] = f"skipped: past --stop-after-s {args.stop_after_s:.0f}"
            report.write()
            continue
        try:
            model, _, compiled = model_of(name)
            measure_compiled(model, compiled, row, args, device, report)
        except Exception as error:  # noqa: BLE001
            row["compiled_error"] = error_text(error)
            report.write()
        release(device)
    # 3. generate(), the compile in a second process, the variants.
    for name in args.generate_models:
        if name not in args.models:
            continue
        if out_of_time():
            skipped(dict(part="generate", model=name))
            continue
        try:
            measure_generate(model_of(name)[0], name, args, device, report)
        except Exception as error:  # noqa: BLE001
            report.record(dict(part="generate", model=name, error=error_text(error)))
        release(device)
    if "mlra_4" in args.models and device.type == "cuda" and not args.no_warm_compile and not out_of_time():
        child = [sys.executable, __file__, "--warm-child", "--layers", str(args.layers), "--prompt",
                 str(args.prompt), "--shapes", *[f"{b}x{c}" for b, c in args.shapes]]  # fmt: skip
        result = subprocess.run(child, capture_output=True, text=True, timeout=240)
        lines = result.stdout.strip().splitlines()
        row = dict(part="compile", model="mlra_4")
        row.update(json.loads(lines[-1]) if result.returncode == 0 and lines else
                   dict(error=result.stderr.strip().splitlines()[-1][:200] if result.stderr.strip() else "?"))
        first = next((r.get("first_compiled_call_s") for r in report.rows if r["part"] == "step"
                      and r["model"] == "mlra_4" and "first_compiled_call_s" in r), None)  # fmt: skip
        row["first_process_compile_s"] = first
        report.record(row)
    if args.variants and "mlra_4" in args.models:
        model, floor_of, _ = model_of("mlra_4")
        batch, context = args.shapes[0]
        for variant in args.variants:
            name = f"mlra_4 [{variant}]"
            if out_of_time():
                skipped(dict(part="step", model=name, batch=batch, context=context))
                continue
            torch._dynamo.reset()
            try:
                with variant_setting(variant):
                    row = measure_graph(model, name, batch, context, args, device, report, floor_of)
                    measure_compiled(model, compiled_step(model, args), row, args, device, report)
            except Exception as error:  # noqa: BLE001
                report.record(dict(part="step", model=name, batch=batch, context=context, error=error_text(error)))
            release(device)
    models.clear()
    release(device)
    meta["elapsed_s"] = time.perf_counter() - started
    report.finish()
    print("\n" + out.with_suffix(".md").read_text(), flush=True)


if __name__ == "__main__":
    main()
