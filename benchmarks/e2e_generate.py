"""End to end on one GPU, in one run: prefill, eager and CUDA-graph decode, and generate() with its compiled static
cache, of every base member of ours (MLA, GLA-2/4, MLRA-2/4) beside transformers' DeepseekV3 (dense, same sizes
as MLRA-4) and Llama with 8 KV heads (GQA), all at the published ~2.9B shape, bfloat16, random weights.

    python benchmarks/e2e_generate.py --out benchmarks/results/e2e_generate_h200     # the GPU run (about 6-7 minutes)
    python benchmarks/e2e_generate.py --quick                               # tiny shapes on the CPU, float32

Measured, one model on the GPU at a time:
- prefill: one forward of a T-token prompt into a fresh cache, as generate() runs it (`logits_to_keep=1`), CUDA
  events after one warm-up forward; MFU = (2 x non-embedding parameters x T + causal attention FLOPs) / time /
  790 TFLOP/s; peak GPU memory of the 32K prefill and one decode step;
- eager decode (growing cache): generate() with a streamer, the median interval between streamed tokens after the
  first two (the prompt's forward and the first decode step); prompts from --fill-from tokens on are not prefilled:
  the cache is filled with random states in the layout the model's forward writes, and generate() gets the prompt
  plus one token, so only that token is computed before decoding;
- CUDA-graph decode (static cache): the model's own decode step captured once and replayed, the cache rewound to
  the prompt length before every replay (outside the timed events), so every replay decodes at exactly the prompt;
- generate(cache_implementation="static") with its automatic torch.compile, and the part generate() adds to the
  CUDA-graph step;
- the weight-read floor of a decode step: parameter bytes / device-to-device copy bandwidth measured in the run.
Every configuration runs in its own try/except (an out-of-memory is recorded, not fatal); each row is printed and the
.md / .json are rewritten as it completes, so a run cut short still leaves its results; the .png comes at the end.
"""

import argparse
import json
import platform
import statistics
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    IntervalStreamer,
    Report,
    check_cache_layout,
    command_line,
    copy_bandwidth,
    deepseek_v3_config,
    error_text,
    fmt,
    llama_gqa_config,
    published_model,
    random_cache,
    release,
    set_cache_length,
    software_versions,
    synchronize,
    timed_ms,
    transformers_model,
)
from transformers import DeepseekV3Config, DynamicCache  # noqa: E402

from modeling_mlra import MLRACache, MLRAConfig, MLRAForCausalLM  # noqa: E402  (common puts the repository first)
from modeling_mlra.modeling_mlra import CACHE_FIELD  # noqa: E402

OURS = ("mlra_4", "mla", "gla_2", "gla_4", "mlra_2")
MODELS = ("mlra_4", "mla", "deepseek_v3", "llama_gqa", "gla_2", "gla_4", "mlra_2")  # the most wanted first
PEAK_BF16_FLOPS = 790e12  # H200 dense bf16, as in issue 8
ESTIMATE_FLOPS = 500e12  # what the estimate assumes a prefill achieves
ESTIMATE_EAGER_STEP_S = 0.030
GB = 1e9
QUICK_SHAPES = dict(
    hidden_size=64, num_attention_heads=4, kv_lora_rank=32, qk_nope_head_dim=16, v_head_dim=16, qk_rope_head_dim=8,
    intermediate_size=128, vocab_size=256,
)  # fmt: skip


# ----------------------------------------------------------------------------------------------- models


def model_config_overrides(name: str, args) -> dict:
    overrides = dict(max_position_embeddings=args.max_positions)
    if args.quick:
        overrides.update(QUICK_SHAPES, q_lora_rank=64 if name == "mla" else 48)
    return overrides


def build_model(name: str, args, device, dtype):
    """Ours from its variant; DeepseekV3 and Llama with MLRA-4's sizes (gpu_check.py's comparison)."""
    if name in OURS:
        return published_model(name, args.layers, device, dtype, **model_config_overrides(name, args))
    reference = MLRAConfig.from_variant(
        "mlra_4", num_hidden_layers=args.layers, **model_config_overrides("mlra_4", args)
    )
    if name == "deepseek_v3":
        return transformers_model(deepseek_v3_config(reference), device, dtype)
    return transformers_model(llama_gqa_config(reference, kv_heads=2 if args.quick else 8), device, dtype)


def parameter_counts(model) -> dict:
    """Parameters (a tied embedding counted once), those outside the embedding and output head, and their bytes."""
    total = sum(p.numel() for p in model.parameters())
    embedding = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    outside = total - embedding.numel() - (0 if head is embedding else head.numel())
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    return dict(parameters=total, non_embedding_parameters=outside, parameter_bytes=nbytes)


def attention_shape(config) -> tuple[int, int, int, int, int]:
    """(layers, heads, softmax branches, q/k head width, v head width)."""
    if isinstance(config, MLRAConfig):
        branches, d_qk, d_v = (
            config.num_softmax_branches,
            config.qk_nope_head_dim + config.qk_rope_head_dim,
            config.v_head_dim,
        )
    elif isinstance(config, DeepseekV3Config):
        branches, d_qk, d_v = 1, config.qk_nope_head_dim + config.qk_rope_head_dim, config.v_head_dim
    else:
        branches, d_qk, d_v = 1, config.head_dim, config.head_dim
    return config.num_hidden_layers, config.num_attention_heads, branches, d_qk, d_v


def prefill_flops(config, non_embedding_parameters: int, tokens: int) -> float:
    """2 x non-embedding parameters x T (the output head computes one position) + causal attention FLOPs
    (layers x heads x branches x 2 x (d_qk + d_v) x T^2 / 2: every softmax branch counted)."""
    layers, heads, branches, d_qk, d_v = attention_shape(config)
    return 2 * non_embedding_parameters * tokens + layers * heads * branches * 2 * (d_qk + d_v) * tokens**2 / 2


def generate_cache(model):
    """The empty growing cache generate() creates for the model."""
    return MLRACache(model.config) if isinstance(model, MLRAForCausalLM) else DynamicCache(config=model.config)


# ----------------------------------------------------------------------------------------------- timing


@contextmanager
def no_host_syncs(device):
    """Raise on any operation that waits for the GPU (`.item()`, a device-to-host copy, ...): a step that does one
    cannot be captured in a CUDA graph, and trying would leave the capture broken."""
    if device.type != "cuda":
        yield
        return
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


def prefill(model, tokens: int, counts: dict, device, peak_memory: bool) -> dict:
    """One forward of a `tokens`-token prompt into a fresh cache (batch 1), and optionally the peak memory of it and
    one decode step after it."""
    ids = torch.randint(0, model.config.vocab_size, (1, tokens), device=device)
    cache = generate_cache(model)
    if peak_memory and device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with torch.no_grad():
        output, ms = timed_ms(lambda: model(ids, logits_to_keep=1, **{CACHE_FIELD: cache}), device)
        row = dict(seconds=ms / 1e3)
        if peak_memory:
            model(output.logits[:, -1:].argmax(-1), logits_to_keep=1, **{CACHE_FIELD: cache})
            synchronize(device)
            row["peak_gb"] = torch.cuda.max_memory_allocated(device) / GB if device.type == "cuda" else None
    flops = prefill_flops(model.config, counts["non_embedding_parameters"], tokens)
    row.update(tflops=flops / 1e12, mfu=flops / row["seconds"] / PEAK_BF16_FLOPS)
    return row


def eager_decode(model, batch: int, prompt: int, args, device) -> dict:
    """generate() with the growing cache: median ms between streamed tokens after the first two intervals. From
    --fill-from tokens on, the cache holds `prompt` random tokens and generate() gets prompt + 1 ids, so it computes
    only the last one before decoding (checked: the cache ends at prompt + new tokens)."""
    vocab = model.config.vocab_size
    cache = None
    if prompt >= args.fill_from:
        cache = random_cache(model, batch, prompt, reserve=args.new_tokens + 8)
        ids = torch.randint(0, vocab, (batch, prompt + 1), device=device)
    else:
        ids = torch.randint(0, vocab, (batch, prompt), device=device)
    streamer = IntervalStreamer()
    extra = {} if cache is None else {CACHE_FIELD: cache}
    with torch.no_grad():
        output = model.generate(
            ids, attention_mask=torch.ones_like(ids), streamer=streamer, max_new_tokens=args.new_tokens,
            min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0, disable_compile=True,
            max_time=args.decode_max_s, **extra,
        )  # fmt: skip
    new_tokens = output.shape[1] - ids.shape[1]
    if cache is not None and int(cache.get_seq_length()) != prompt + new_tokens:
        raise RuntimeError(
            f"generate() left {int(cache.get_seq_length())} tokens in the cache, expected {prompt} + {new_tokens}: "
            "it did not continue from the filled cache"
        )
    intervals = streamer.intervals_ms()[2:]
    if not intervals:
        raise RuntimeError(f"only {new_tokens} tokens within --decode-max-s {args.decode_max_s}")
    return dict(ms=statistics.median(intervals), tokens=new_tokens, intervals=len(intervals))


def graph_decode(model, batch: int, prompt: int, args, device, check_logits: bool) -> dict:
    """The model's decode step on a static cache holding `prompt` random tokens, captured in a CUDA graph (on the
    CPU, --quick, the same step called eagerly). Three eager steps first (the first compiles kernels; the other two
    under `no_host_syncs`); before every replay the cache is rewound to `prompt`. Replays: up to --replays, fewer
    when a step is slow (--replay-budget-s). check_logits: the replayed step's logits against an eager step's."""
    cache = random_cache(model, batch, prompt, reserve=args.static_reserve, static=True)
    ids = torch.randint(0, model.config.vocab_size, (batch, 1), device=device)

    def step():
        return model(ids, logits_to_keep=1, **{CACHE_FIELD: cache}).logits

    with torch.no_grad():
        if device.type == "cuda":
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                for warmup in range(3):
                    set_cache_length(cache, prompt)
                    if warmup == 0:
                        step()
                    else:
                        with no_host_syncs(device):
                            step()
            torch.cuda.current_stream(device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                logits = step()
            replay = graph.replay
        else:
            graph, logits = None, step()

            def replay():
                logits.copy_(step())

        def rewound_replay():
            set_cache_length(cache, prompt)
            return timed_ms(replay, device)[1]

        first = min(rewound_replay() for _ in range(2))
        replays = max(3, min(args.replays, int(args.replay_budget_s * 1e3 / max(first, 1e-3))))
        times = [rewound_replay() for _ in range(replays)]
        row = dict(ms=statistics.median(times), replays=replays)
        if check_logits:
            set_cache_length(cache, prompt)
            replay()
            replayed = logits.float().clone()
            set_cache_length(cache, prompt)
            eager = step().float()
            row["graph_vs_eager"] = ((replayed - eager).abs().max() / eager.abs().max()).item()
    return row


def compiled_generate(model, args, device) -> dict:
    """generate(cache_implementation="static") with its automatic torch.compile (on CUDA): a first call compiles, the
    second is timed (median streamed interval after the first two)."""
    ids = torch.randint(0, model.config.vocab_size, (1, args.compiled_prompt), device=device)
    kwargs = dict(
        attention_mask=torch.ones_like(ids), max_new_tokens=args.compiled_new_tokens,
        min_new_tokens=args.compiled_new_tokens, do_sample=False, pad_token_id=0, cache_implementation="static",
    )  # fmt: skip
    start = time.perf_counter()
    with torch.no_grad():
        model.generate(ids, **kwargs)
        synchronize(device)
        first_call_s = time.perf_counter() - start
        streamer = IntervalStreamer()
        model.generate(ids, streamer=streamer, **kwargs)
    return dict(ms=statistics.median(streamer.intervals_ms()[2:]), first_call_s=first_call_s)


# ----------------------------------------------------------------------------------------------- estimate


def estimate_seconds(args, counts: dict[str, tuple]) -> dict:
    """Rough seconds per part on the H200: prefill FLOPs at 500 TFLOP/s, eager decode at ~30 ms per token,
    a CUDA-graph configuration ~1.5 s (fill, 3 eager steps, capture, replays), ~2 s per Triton compile of the decode
    kernel (per variant and batch, a single-split and a split launch), torch.compile ~60 s per model."""
    parts = dict(build=4.0 * len(args.models), copy=2.0)
    if not args.skip_prefill:
        parts["prefill"] = sum(
            prefill_flops(config, non_embedding, tokens) / ESTIMATE_FLOPS
            for name, (config, non_embedding) in counts.items()
            for tokens in args.prefill + (args.long_prefill if name in args.long_prefill_models else [])
        )
    configs = len(args.models) * len(args.batches) * len(args.prompts)
    if not args.skip_eager:
        parts["eager decode"] = configs * ((args.new_tokens + 3) * ESTIMATE_EAGER_STEP_S + 0.3)
    if not args.skip_graph:
        parts["CUDA-graph decode"] = (configs + 2) * 1.5
    if not (args.skip_eager and args.skip_graph):
        parts["decode kernel compiles"] = 2.0 * 2 * len(args.batches) * len([m for m in args.models if m in OURS])
    if args.compiled_generate:
        parts["compiled generate()"] = 60.0 * len(args.compiled_models)
    parts["total"] = sum(parts.values())
    return parts


# ----------------------------------------------------------------------------------------------- report


def count_label(count: int) -> str:
    return f"{count / 1e9:.3f}B" if count >= 1e8 else f"{count / 1e6:.3f}M"


def tokens_label(tokens: int) -> str:
    return f"{tokens // 1024}K" if tokens >= 1024 and tokens % 1024 == 0 else str(tokens)


def markdown(meta: dict, rows: list[dict]) -> str:
    models = {r["model"]: r for r in rows if r["part"] == "model"}
    prefills = [r for r in rows if r["part"] == "prefill"]
    decodes = [r for r in rows if r["part"] == "decode"]
    compiled = [r for r in rows if r["part"] == "compiled_generate"]
    lines = [
        f"# generate() end to end: {meta['device']}, {meta['dtype']}, "
        + ("tiny shapes (--quick)" if meta["quick"] else "published ~2.9B shape")
        + f", {meta['layers']} layers, random weights",
        "",
        f"Machine: {meta['machine']}  ",
        f"Versions: torch {meta['torch']}, transformers {meta['transformers']}, triton {meta['triton']}, "
        f"CUDA {meta['cuda']}, Python {meta['python']}  ",
        f"Device-to-device copy in this run: {fmt(meta.get('copy_gb_s'), '.0f')} GB/s (bytes read + written). "
        f"Estimated run time {meta['estimate_s']['total']:.0f} s; elapsed {fmt(meta.get('elapsed_s'), '.0f')} s.",
        "",
        "Models: ours (`MLRAForCausalLM`, the fused Triton decode kernel on CUDA unless the row says `torch decode`); "
        "`deepseek_v3` = transformers' DeepseekV3ForCausalLM, every layer dense, MLRA-4's sizes (caches the same "
        "576 latent values per token and re-expands them every step); `llama_gqa` = transformers' LlamaForCausalLM "
        "with MLRA-4's sizes and 8 KV heads of 128. The weight-read floor of a decode step = parameter bytes (a tied "
        "embedding once) / copy bandwidth.",
        "",
        "| model | parameters | non-embedding | parameter GB | weight-read floor ms |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, r in models.items():
        lines.append(
            f"| {name} | {count_label(r['parameters'])} | {count_label(r['non_embedding_parameters'])} | "
            f"{r['parameter_bytes'] / GB:.3g} | {fmt(r.get('floor_ms'), '.3f')} |"
        )
    lines += [
        "",
        "## Prefill (batch 1, one forward into a fresh cache, `logits_to_keep=1`)",
        "",
        f"MFU = (2 x non-embedding parameters x T + causal attention FLOPs) / time / {PEAK_BF16_FLOPS / 1e12:.0f} "
        "TFLOP/s; attention FLOPs = layers x heads x softmax branches x 2 x (d_qk + d_v) x T^2 / 2. Peak GB: "
        "`max_memory_allocated` over the prefill and one decode step after it (weights included).",
        "",
        "| model | T | seconds | TFLOP | MFU | peak GB | vs deepseek_v3 |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    reference = {r["tokens"]: r.get("seconds") for r in prefills if r["model"] == "deepseek_v3"}
    for r in prefills:
        if "error" in r:
            lines.append(f"| {r['model']} | {tokens_label(r['tokens'])} | {r['error']} | | | | |")
            continue
        versus = reference.get(r["tokens"])
        lines.append(
            f"| {r['model']} | {tokens_label(r['tokens'])} | {r['seconds']:.3f} | {r['tflops']:.4g} | {r['mfu']:.2f} | "
            f"{fmt(r.get('peak_gb'), '.1f')} | {fmt(versus and r['seconds'] / versus, '.2f')} |"
        )
    lines += [
        "",
        "## Decode, ms per token",
        "",
        f"eager: generate() with the growing cache, median interval between streamed tokens after the first two "
        f"(up to {meta['new_tokens']} new tokens, greedy; fewer when a step is slow: --decode-max-s); prompts of "
        f"{tokens_label(meta['fill_from'])} tokens and more are random-filled caches, shorter ones a real prefill. "
        "CUDA graph: the model's own decode step on a static cache captured once, median of replays, the cache "
        "rewound to the prompt before each (outside the timing). floor: weight-read floor of the model.",
        "",
        "| model | batch | prompt | eager ms | CUDA-graph ms | floor ms | graph / floor | graph vs eager logits |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    table = {}
    for r in decodes:
        table.setdefault((r["model"], r["batch"], r["prompt"]), {})[r["cache"]] = r
    for (model, batch, prompt), kinds in table.items():
        cells = []
        for kind in ("eager", "graph"):
            r = kinds.get(kind)
            cells.append("" if r is None else r.get("error") or f"{r['ms']:.2f}")
        floor = models.get(model.split(" ")[0], {}).get("floor_ms")
        graph_ms = kinds.get("graph", {}).get("ms")
        check = kinds.get("graph", {}).get("graph_vs_eager")
        lines.append(
            f"| {model} | {batch} | {tokens_label(prompt)} | {cells[0]} | {cells[1]} | {fmt(floor, '.2f')} | "
            f"{fmt(graph_ms and floor and graph_ms / floor, '.2f')} | {fmt(check, '.1e')} |"
        )
    lines += ["", "## Ratios (decode ms per token; below 1: the first model is faster)", ""]
    lines += [
        "| cache | batch | prompt | mlra_4 / mla | mlra_4 / deepseek_v3 | mla / deepseek_v3 | mlra_4 / llama_gqa |"
    ]
    lines += ["|---|---:|---:|---:|---:|---:|---:|"]
    ms = {(r["model"], r["cache"], r["batch"], r["prompt"]): r.get("ms") for r in decodes}
    for cache, batch, prompt in dict.fromkeys((r["cache"], r["batch"], r["prompt"]) for r in decodes):
        cells = []
        for a, b in (("mlra_4", "mla"), ("mlra_4", "deepseek_v3"), ("mla", "deepseek_v3"), ("mlra_4", "llama_gqa")):
            x, y = ms.get((a, cache, batch, prompt)), ms.get((b, cache, batch, prompt))
            cells.append(fmt(x and y and x / y, ".2f"))
        lines.append(f"| {cache} | {batch} | {tokens_label(prompt)} | " + " | ".join(cells) + " |")
    if compiled:
        lines += [
            "",
            f'## generate(cache_implementation="static") with its automatic torch.compile (batch 1, '
            f"{meta['compiled_prompt']}-token prompt, {meta['compiled_new_tokens']} new tokens)",
            "",
            "Added by generate() = its median streamed interval - the model's CUDA-graph step at the same prompt.",
            "",
            "| model | ms per token | CUDA-graph step ms | added by generate() ms | first call (compile) s |",
            "|---|---:|---:|---:|---:|",
        ]
        for r in compiled:
            if "error" in r:
                lines.append(f"| {r['model']} | {r['error']} | | | |")
                continue
            step = ms.get((r["model"], "graph", 1, meta["compiled_prompt"]))
            lines.append(
                f"| {r['model']} | {r['ms']:.2f} | {fmt(step, '.2f')} | {fmt(step and r['ms'] - step, '.2f')} | "
                f"{r['first_call_s']:.1f} |"
            )
    lines += ["", "## Targets (issues 7 and 8)", "", *targets(meta, rows), ""]
    errors = [r for r in rows if r["part"] == "error"]
    if errors:
        lines += ["## Errors outside a configuration", "", *[f"- {r['model']}: {r['error']}" for r in errors], ""]
    return "\n".join(lines)


def targets(meta: dict, rows: list[dict]) -> list[str]:
    """The issues' targets that this run measures, each MET / MISSED / not measured."""

    def verdict(ok):
        return "not measured" if ok is None else ("MET" if ok else "MISSED")

    prefill = {(r["model"], r["tokens"]): r for r in rows if r["part"] == "prefill" and "error" not in r}
    decode = {
        (r["model"], r["cache"], r["batch"], r["prompt"]): r["ms"] for r in rows if r["part"] == "decode" and "ms" in r
    }
    at = 32768 if not meta["quick"] else max(meta["prefill"])
    lines = []
    mfus = {m: prefill[(m, at)]["mfu"] for m in OURS if (m, at) in prefill}
    lines.append(
        f"- {tokens_label(at)} prefill MFU >= 0.60 for every member: {verdict(min(mfus.values()) >= 0.6 if mfus else None)} "
        f"({', '.join(f'{m} {v:.2f}' for m, v in mfus.items())})"
    )
    mla, ds = prefill.get(("mla", at)), prefill.get(("deepseek_v3", at))
    lines.append(
        f"- {tokens_label(at)} prefill, our MLA no slower than DeepseekV3: "
        f"{verdict(mla['seconds'] <= ds['seconds'] if mla and ds else None)}"
        + (f" ({mla['seconds']:.3f} s vs {ds['seconds']:.3f} s)" if mla and ds else "")
    )
    peaks = {m: prefill[(m, at)].get("peak_gb") for m in (*OURS, "deepseek_v3") if (m, at) in prefill}
    if peaks.get("deepseek_v3") is not None:
        over = [m for m in OURS if peaks.get(m) is not None and peaks[m] > peaks["deepseek_v3"]]
        lines.append(
            f"- Peak memory of a {tokens_label(at)} prefill + decode step at most DeepseekV3's "
            f"({peaks['deepseek_v3']:.1f} GB): {verdict(not over)}" + (f" (above: {', '.join(over)})" if over else "")
        )
    slower = [
        f"{m} b{b} {tokens_label(p)}" for (m, c, b, p), v in decode.items()
        if c == "eager" and m in OURS and decode.get(("deepseek_v3", "eager", b, p)) is not None
        and v > decode[("deepseek_v3", "eager", b, p)]
    ]  # fmt: skip
    compared = any(c == "eager" and m == "deepseek_v3" for m, c, _, _ in decode)
    lines.append(
        "- Eager decode no slower than DeepseekV3 at every context: "
        + verdict(not slower if compared else None)
        + (f" (slower: {', '.join(slower)})" if slower else "")
    )
    short, long_ = min(meta["prompts"]), (32768 if not meta["quick"] else sorted(meta["prompts"])[-2])
    for cache in ("eager", "graph"):
        a, b = decode.get(("mlra_4", cache, 1, short)), decode.get(("mlra_4", cache, 1, long_))
        lines.append(
            f"- {cache}, batch 1: MLRA-4 at {tokens_label(long_)} at most 10% above its own at a {short}-token prompt: "
            f"{verdict(b <= 1.1 * a if a and b else None)}" + (f" ({b:.2f} vs {a:.2f} ms)" if a and b else "")
        )
        pairs = [(p, decode.get(("mlra_4", cache, 1, p)), decode.get(("mla", cache, 1, p))) for p in meta["prompts"]]
        pairs = [(p, x, y) for p, x, y in pairs if x and y]
        lines.append(
            f"- {cache}, batch 1: MLRA-4 no slower than our MLA at any context: "
            f"{verdict(all(x <= y for _, x, y in pairs) if pairs else None)} ("
            + ", ".join(f"{tokens_label(p)}: {x:.2f} vs {y:.2f}" for p, x, y in pairs)
            + ")"
        )
    return lines


def plot(meta: dict, rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    decodes = [r for r in rows if r["part"] == "decode" and "ms" in r]
    prefills = [r for r in rows if r["part"] == "prefill" and "seconds" in r]
    batches = sorted({r["batch"] for r in decodes}) or [1]
    figure, axes = plt.subplots(1, len(batches) + 1, figsize=(6 * (len(batches) + 1), 4.5), squeeze=False)
    names = list(dict.fromkeys(r["model"] for r in rows if r["part"] in ("decode", "prefill")))
    colors = {name: f"C{i}" for i, name in enumerate(names)}
    for axis, batch in zip(axes[0], batches):
        for name in names:
            for cache, style in (("eager", "-"), ("graph", "--")):
                points = sorted((r["prompt"], r["ms"]) for r in decodes if r["model"] == name and r["batch"] == batch
                                and r["cache"] == cache)  # fmt: skip
                if points:
                    axis.plot(*zip(*points), style, marker="o", color=colors[name], label=f"{name}, {cache}")
        floor = next((r.get("floor_ms") for r in rows if r["part"] == "model" and r["model"] == "mlra_4"), None)
        if floor:
            axis.axhline(floor, color="black", linestyle=":", label="mlra_4 weight-read floor")
        axis.set(xscale="log", yscale="log", xlabel="prompt tokens", ylabel="ms per token",
                 title=f"decode, batch {batch} (solid: eager generate(), dashed: CUDA graph)")  # fmt: skip
        prompts = sorted({r["prompt"] for r in decodes})
        axis.set_xticks(prompts, [tokens_label(p) for p in prompts])
        axis.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        axis.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=6, ncol=2)
    axis = axes[0][-1]
    lengths = sorted({r["tokens"] for r in prefills})
    width = 0.8 / max(len(names), 1)
    for i, name in enumerate(names):
        seconds = {r["tokens"]: r["seconds"] for r in prefills if r["model"] == name}
        xs = [j + i * width for j, t in enumerate(lengths) if t in seconds]
        if xs:
            axis.bar(xs, [seconds[t] for t in lengths if t in seconds], width, color=colors[name], label=name)
    axis.set_xticks([j + 0.4 - width / 2 for j in range(len(lengths))], [tokens_label(t) for t in lengths])
    axis.set(yscale="log", xlabel="prompt tokens", ylabel="seconds", title="prefill, batch 1")
    axis.legend(fontsize=6)
    figure.suptitle(f"{meta['device']}, {meta['dtype']}, {meta['layers']} layers, random weights")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


# ----------------------------------------------------------------------------------------------- run


def run_model(name: str, args, device, dtype, report: Report, started: float) -> None:
    """Everything for one model: build, layout checks, prefill, eager and CUDA-graph decode."""

    def out_of_time() -> bool:
        return time.perf_counter() - started > args.stop_after_s

    def attempt(row: dict, measure, *arguments) -> None:
        if out_of_time():
            row["error"] = f"skipped: past --stop-after-s {args.stop_after_s:.0f}"
        else:
            try:
                row.update(measure(*arguments))
            except Exception as error:  # noqa: BLE001 - one configuration's failure must not lose the rest
                row["error"] = error_text(error)
        release(device)
        report.record(row)

    if out_of_time():
        report.record(dict(part="error", model=name, error=f"skipped: past --stop-after-s {args.stop_after_s:.0f}"))
        return
    model = build_model(name, args, device, dtype)
    counts = parameter_counts(model)
    floor = counts["parameter_bytes"] / (report.meta["copy_gb_s"] * GB) * 1e3 if report.meta.get("copy_gb_s") else None
    report.record(dict(part="model", model=name, floor_ms=floor, **counts))
    for static in (False, True):
        check_cache_layout(model, static=static)

    if not args.skip_prefill:
        with torch.no_grad():
            model(torch.randint(0, model.config.vocab_size, (1, args.warmup_tokens), device=device), logits_to_keep=1,
                  **{CACHE_FIELD: generate_cache(model)})  # fmt: skip
        lengths = args.prefill + (args.long_prefill if name in args.long_prefill_models else [])
        for tokens in lengths:
            peak = tokens == args.peak_memory_tokens
            attempt(dict(part="prefill", model=name, tokens=tokens), prefill, model, tokens, counts, device, peak)

    variants = [(name, None)]
    if name == "mlra_4":
        variants.append(("mlra_4 (torch decode)", "torch"))
    for label, decode_kernel in variants:
        if decode_kernel is not None:
            model.config.decode_kernel = decode_kernel
        batches = args.batches if decode_kernel is None else [1]
        prompts = args.prompts if decode_kernel is None else args.torch_decode_prompts
        for batch in batches:
            for prompt in prompts:
                if not args.skip_eager:
                    row = dict(part="decode", model=label, cache="eager", batch=batch, prompt=prompt)
                    attempt(row, eager_decode, model, batch, prompt, args, device)
                if not args.skip_graph:
                    row = dict(part="decode", model=label, cache="graph", batch=batch, prompt=prompt)
                    check = isinstance(model, MLRAForCausalLM)
                    attempt(row, graph_decode, model, batch, prompt, args, device, check)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="output prefix (.md, .json, .png); default benchmarks/results/"
                        "e2e_generate_h200, or /tmp/e2e_quick with --quick")  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="tiny shapes, float32, on the CPU: checks the script")
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--prefill", type=int, nargs="*", default=[4096, 32768], help="prefill lengths, every model")
    parser.add_argument("--long-prefill", type=int, nargs="*", default=[131072])
    parser.add_argument("--long-prefill-models", nargs="*", default=["mla", "mlra_4", "deepseek_v3", "llama_gqa"])
    parser.add_argument("--peak-memory-tokens", type=int, default=32768, help="the prefill whose peak memory is kept")
    parser.add_argument("--prompts", type=int, nargs="*", default=[16, 4096, 32768, 131072])
    parser.add_argument("--batches", type=int, nargs="*", default=[1, 16])
    parser.add_argument("--torch-decode-prompts", type=int, nargs="*", default=[16, 32768],
                        help="mlra_4 with decode_kernel='torch' (batch 1) at these prompts")  # fmt: skip
    parser.add_argument("--fill-from", type=int, default=4096, help="prompts this long get a random-filled cache")
    parser.add_argument("--new-tokens", type=int, default=24)
    parser.add_argument("--decode-max-s", type=float, default=5.0, help="generate()'s max_time per configuration")
    parser.add_argument("--static-reserve", type=int, default=64, help="static cache capacity beyond the prompt")
    parser.add_argument("--replays", type=int, default=20)
    parser.add_argument("--replay-budget-s", type=float, default=1.0)
    parser.add_argument("--warmup-tokens", type=int, default=256)
    parser.add_argument("--skip-prefill", action="store_true")
    parser.add_argument("--skip-eager", action="store_true")
    parser.add_argument("--skip-graph", action="store_true")
    parser.add_argument("--compiled-generate", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--compiled-models", nargs="*", default=["mlra_4", "deepseek_v3"])
    parser.add_argument("--compiled-prompt", type=int, default=16)
    parser.add_argument("--compiled-new-tokens", type=int, default=32)
    parser.add_argument("--compiled-before-s", type=float, default=330.0,
                        help="start compiled generate() for a model only this soon after the start")  # fmt: skip
    parser.add_argument("--estimate", action="store_true", help="print the estimated run time and exit")
    parser.add_argument("--stop-after-s", type=float, default=420.0,
                        help="configurations not started by then are recorded as skipped")  # fmt: skip
    args = parser.parse_args(argv)
    if args.quick:
        args.layers, args.prefill, args.long_prefill, args.peak_memory_tokens = 2, [64, 128], [256], 128
        args.prompts, args.batches, args.torch_decode_prompts, args.fill_from = [16, 64, 128], [1, 2], [16, 128], 64
        args.new_tokens, args.warmup_tokens, args.replays, args.compiled_new_tokens = 5, 16, 3, 5
    out = args.out or Path("/tmp/e2e_quick" if args.quick else "benchmarks/results/e2e_generate_h200")
    args.max_positions = max([*args.prefill, *args.long_prefill, *args.prompts]) + args.static_reserve + 64

    started = time.perf_counter()
    dtype = torch.float32 if args.quick else torch.bfloat16
    sizes = {}
    for name in args.models:  # on the meta device: sizes for the estimate, nothing allocated
        meta_model = build_model(name, args, "meta", dtype)
        sizes[name] = (meta_model.config, parameter_counts(meta_model)["non_embedding_parameters"])
    estimate = estimate_seconds(args, sizes)
    print("estimated seconds on an H200:", json.dumps({k: round(v) for k, v in estimate.items()}), flush=True)
    if args.estimate:
        return
    device = torch.device("cuda" if torch.cuda.is_available() and not args.quick else "cpu")
    if device.type != "cuda" and not args.quick:
        parser.error("no CUDA device: the measurement needs a GPU (--quick checks the script on the CPU)")
    torch.manual_seed(0)
    if args.quick:
        torch.set_num_threads(1)  # a shared few-core CPU: one thread keeps the check from waiting on busy cores
    meta = dict(
        command=command_line(argv),
        device=torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU",
        machine=f"{platform.node()}, {platform.processor() or platform.machine()}",
        dtype=str(dtype).removeprefix("torch."), layers=args.layers, quick=args.quick, **software_versions(),
        new_tokens=args.new_tokens, fill_from=args.fill_from,
        prompts=args.prompts, prefill=args.prefill, compiled_prompt=args.compiled_prompt,
        compiled_new_tokens=args.compiled_new_tokens, estimate_s=estimate,
    )  # fmt: skip
    report = Report(out, meta, markdown, plot)
    if device.type == "cuda":
        meta["copy_gb_s"] = copy_bandwidth(device)
        release(device)
    for name in args.models:
        try:
            run_model(name, args, device, dtype, report, started)
        except Exception as error:  # noqa: BLE001 - a model that fails to build or check must not lose the others
            report.record(dict(part="error", model=name, error=error_text(error)))
        release(device)

    if args.compiled_generate:
        for name in args.compiled_models:
            row = dict(part="compiled_generate", model=name)
            if time.perf_counter() - started > args.compiled_before_s:
                row["error"] = f"skipped: past --compiled-before-s {args.compiled_before_s:.0f}"
            else:
                try:
                    model = build_model(name, args, device, dtype)
                    row.update(compiled_generate(model, args, device))
                except Exception as error:  # noqa: BLE001
                    row["error"] = error_text(error)
                model = None
                release(device)
            report.record(row)
    meta["elapsed_s"] = time.perf_counter() - started
    report.finish()
    print("\n" + out.with_suffix(".md").read_text(), flush=True)
    print(f"wrote {out}.md, .json, .png in {meta['elapsed_s']:.0f} s")


if __name__ == "__main__":
    main()
