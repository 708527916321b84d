"""Continuous batching (transformers' ContinuousBatchingManager, the engine of `generate_batch` and `transformers
serve --continuous-batching`): decode throughput and memory for many concurrent requests, ours (pages holding the
latent) against transformers' DeepseekV3 and Llama (8 KV heads) of the same size, through the same manager.

For each model one manager is built with transformers' own sizing (`max_memory_percent` of the free GPU memory after the
weights), which gives the paged cache's capacity, its bytes per token and the number of 32K-token requests that fit.
Then, for each (requests, context) point that fits, the requests run to `--new-tokens`; decode throughput is the tokens
generated once every request has its first token, over that time window (per-token timestamps of the manager), i.e. all
requests decoding together. Prefilling R x C distinct tokens through transformers' packed sdpa path (Llama, DeepseekV3)
costs O((R x C)^2) (every step's queries meet every key of the batch), minutes at 64 x 8K; so the prompts share a random
C-token prefix (whole pages), prefilled once (prefix sharing on), and differ in a 16-token suffix each. Every request
still reads its whole context at every decode step (ours: the fused kernel reads it in the pages; the others: the paged
cache gathers it per request); the shared pages may be read from L2 where they fit, for every model alike. "cache GiB"
is the size the requests' contexts take unshared. Last for each model: as many 32K-token requests as its pages hold.

transformers' DeepseekV3 cannot run under continuous batching in 5.17 to 5.24 (its paged cache is sized from
`head_dim` = qk_rope_head_dim while the layer caches other widths: "index_copy_(): Source/destination tensor must
have same slice shapes"); the attempt and its error are recorded, and `mha_deepseek_v3_bytes` stands in for it: an
MHA (Llama class) whose pages hold exactly DeepseekV3's expanded keys and values, 24 heads x (160 + 160) values per
token and layer = 24 x (192 + 128).

    timeout 350 python benchmarks/continuous_batching.py --out $OUT/continuous_batching_h200 --stop-after-s 240  # H200
    python benchmarks/continuous_batching.py --models mlra_4 --points 64x8192 --out ...  # a subset, in that order
    python benchmarks/continuous_batching.py --quick --out /tmp/cb_quick                                # CPU, tiny
"""

import argparse
import gc
import time
from pathlib import Path

import torch
from common import (
    REPOSITORY,
    Panel,
    command_line,
    deepseek_v3_config,
    llama_gqa_config,
    plot_panels,
    published_model,
    software_versions,
    transformers_model,
    write_results,
)
from transformers import GenerationConfig

from modeling_mlra import MLRAConfig
from modeling_mlra.paged_cache import paged_cache_bytes_per_token

try:
    from transformers import ContinuousBatchingConfig
except ImportError:
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

# (requests, context) points, cheapest first; a point runs if its tokens fit the model's paged cache
POINTS = [
    (1, 1024), (16, 1024), (64, 1024), (256, 1024), (1, 8192), (16, 8192), (64, 8192), (1, 32768), (8, 32768),
    (256, 8192), (32, 32768),
]  # fmt: skip
QUICK_POINTS = [(1, 24), (4, 24), (8, 48)]
SUFFIX = 16  # distinct tokens at the end of each prompt
FIT_CONTEXT = 32768


def build_models(quick: bool, device, dtype) -> dict:
    """name -> zero-argument builder (models are built one at a time, each freed before the next)."""
    layers = 2 if quick else 24
    overrides = dict(hidden_size=64, num_attention_heads=4, intermediate_size=96, q_lora_rank=32, kv_lora_rank=32,
                     qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, vocab_size=256) if quick else {}
    ours = lambda: published_model("mlra_4", layers, device, dtype, **overrides)  # noqa: E731
    reference = MLRAConfig.from_variant("mlra_4", num_hidden_layers=layers, **overrides)
    head = (reference.qk_nope_head_dim + reference.qk_rope_head_dim + reference.v_head_dim) // 2
    mha = llama_gqa_config(reference, kv_heads=reference.num_attention_heads)
    mha.head_dim = head  # pages of 24 x (160 + 160) values: DeepseekV3's expanded 24 x (192 + 128)
    return {
        "mlra_4": ours,
        "deepseek_v3": lambda: transformers_model(deepseek_v3_config(reference), device, dtype),
        "mha_deepseek_v3_bytes": lambda: transformers_model(mha, device, dtype),
        "llama_gqa8": lambda: transformers_model(
            llama_gqa_config(reference, kv_heads=min(8, reference.num_attention_heads)), device, dtype
        ),
    }


def finished(manager, request_ids: list[str], timeout: float) -> dict:
    results = {}
    deadline = time.monotonic() + timeout
    while len(results) < len(request_ids):
        output = manager.get_result(timeout=max(1.0, deadline - time.monotonic()))
        if output is None:
            raise TimeoutError(f"{len(results)} of {len(request_ids)} requests finished within {timeout:.0f} s")
        if output.is_finished():
            if output.error is not None:
                raise RuntimeError(output.error)
            results[output.request_id] = output
    return results


def decode_throughput(outputs) -> tuple[float, int]:
    """Tokens per second once every request has its first token (all decoding together), and that token count."""
    start = max(output.timestamps[0] for output in outputs)
    times = [stamp for output in outputs for stamp in output.timestamps if stamp > start]
    if not times:
        return 0.0, 0
    return len(times) / (max(times) - start), len(times)


def run_model(name: str, build, points, args, device, time_share: float) -> dict:
    row = {"model": name, "points": []}
    started = time.monotonic()
    try:
        model = build()
    except Exception as error:  # noqa: BLE001 - recorded in the results
        return {**row, "error": f"build: {error}"}
    generation = GenerationConfig(max_new_tokens=args.new_tokens, do_sample=False, eos_token_id=-1, pad_token_id=0)
    cb_config = ContinuousBatchingConfig(
        max_batch_tokens=args.max_batch_tokens, max_memory_percent=args.max_memory_percent,
        allow_block_sharing=True, **({"num_blocks": 64} if args.quick else {}),
        # ours reads its pages through read/write indices, never a flash block table (used where flash-attn is)
        **({"max_blocks_per_request": 0} if name == "mlra_4" else {}),
    )  # fmt: skip
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    manager = model.init_continuous_batching(generation_config=generation, continuous_batching_config=cb_config)
    manager.start()
    try:
        first = manager.add_request([1, 2, 3], max_new_tokens=2)
        finished(manager, [first], timeout=120)
        cache = manager.batch_processor.cache
        # tokens the cache holds (every layer's pages): 5.17 counts blocks of block_size, 5.2x whole-model blocks
        page_size = getattr(cache, "block_size", None) or manager.continuous_batching_config.page_size
        tokens = cache.num_blocks * page_size
        row.update(
            bytes_per_token=paged_cache_bytes_per_token(cache), capacity_tokens=tokens,
            fit_32k_requests=tokens // (FIT_CONTEXT + args.new_tokens),
            cache_gib=tokens * paged_cache_bytes_per_token(cache) / 2**30,
        )  # fmt: skip
        print(name, {key: value for key, value in row.items() if key != "points"}, flush=True)
        generator = torch.Generator().manual_seed(0)
        most = tokens // (FIT_CONTEXT + SUFFIX + args.new_tokens + page_size)  # the fit rule below
        fullest = [(most, FIT_CONTEXT)] if most and (most, FIT_CONTEXT) not in points else []
        for requests, context in [*points, *fullest]:
            if requests * (context + SUFFIX + args.new_tokens + page_size) > tokens:
                row["points"].append(dict(requests=requests, context=context, skipped="does not fit the cache"))
                continue
            if time.monotonic() - started > time_share:
                row["points"].append(dict(requests=requests, context=context, skipped="time budget"))
                continue
            vocab = model.config.vocab_size
            prefix = torch.randint(3, vocab, (context,), generator=generator).tolist()  # whole pages: all shared
            suffixes = torch.randint(3, vocab, (requests + 1, SUFFIX), generator=generator).tolist()
            # one request prefills the shared prefix; its complete pages are then matched by the others
            finished(manager, [manager.add_request(prefix + suffixes[-1], max_new_tokens=1)], args.stop_after_s)
            begin = time.perf_counter()
            prompts = [prefix + suffix for suffix in suffixes[:-1]]
            ids = manager.add_requests(prompts, max_new_tokens=args.new_tokens, record_timestamps=True)
            outputs = list(finished(manager, ids, timeout=args.stop_after_s).values())
            wall = time.perf_counter() - begin
            throughput, counted = decode_throughput(outputs)
            point = dict(
                requests=requests, context=context, decode_tokens_per_s=throughput, decode_tokens_counted=counted,
                wall_s=wall,
                cache_gib_used=requests * (context + SUFFIX + args.new_tokens) * row["bytes_per_token"] / 2**30,
                peak_gib=torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None,
            )  # fmt: skip
            row["points"].append(point)
            print(name, point, flush=True)
    except Exception as error:  # noqa: BLE001 - recorded in the results (DeepseekV3 fails under continuous batching)
        row["error"] = " ".join(str(error).split())[:500]
        print(name, "error:", row["error"], flush=True)
    finally:
        manager.stop(block=True, timeout=60)
        manager.destroy() if hasattr(manager, "destroy") else None
        del manager, model
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return row


def markdown(results: dict) -> str:
    lines = [
        "# Continuous batching: decode throughput and memory, ours vs DeepseekV3 and Llama (same manager)",
        "",
        f"{results['device']}; {results['versions']}; {results['dtype']}; {results['new_tokens']} new tokens per "
        f"request; max_batch_tokens {results['max_batch_tokens']}.",
        "",
        "| model | bytes/token in the pages | cache capacity (tokens) | 32K-token requests that fit | error |",
        "|---|---|---|---|---|",
    ]
    for row in results["models"]:
        lines.append(
            f"| {row['model']} | {row.get('bytes_per_token', '-')} | {row.get('capacity_tokens', '-')} | "
            f"{row.get('fit_32k_requests', '-')} | {row.get('error', '')} |"
        )
    lines += ["", "| model | requests | context | decode tokens/s (all requests) | cache GiB used | peak GiB |",
              "|---|---|---|---|---|---|"]
    for row in results["models"]:
        for point in row["points"]:
            if "skipped" in point:
                lines.append(f"| {row['model']} | {point['requests']} | {point['context']} | {point['skipped']} | | |")
            else:
                peak = "-" if point["peak_gib"] is None else f"{point['peak_gib']:.1f}"
                lines.append(
                    f"| {row['model']} | {point['requests']} | {point['context']} | "
                    f"{point['decode_tokens_per_s']:.0f} | {point['cache_gib_used']:.2f} | {peak} |"
                )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(REPOSITORY / "benchmarks" / "results" / "continuous_batching"))
    parser.add_argument("--quick", action="store_true", help="tiny models on the CPU (checks that the script works)")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--max-batch-tokens", type=int, default=2048)
    parser.add_argument("--max-memory-percent", type=float, default=0.9)
    parser.add_argument("--stop-after-s", type=float, default=300, help="time budget of the whole run")
    parser.add_argument("--models", nargs="*", help="a subset of: mlra_4 deepseek_v3 mha_deepseek_v3_bytes llama_gqa8")
    parser.add_argument("--points", nargs="*", help="REQUESTSxCONTEXT points to run, in order (default: all)")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.quick else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if args.quick:
        args.new_tokens = min(args.new_tokens, 6)
        args.max_batch_tokens = min(args.max_batch_tokens, 64)
    builders = build_models(args.quick, device, dtype)
    points = QUICK_POINTS if args.quick else POINTS
    if args.points:
        points = [tuple(int(part) for part in point.split("x")) for point in args.points]
    results = dict(
        device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu", versions=software_versions(),
        dtype=str(dtype), new_tokens=args.new_tokens, max_batch_tokens=args.max_batch_tokens, models=[],
    )  # fmt: skip
    names = [name for name in builders if not args.models or name in args.models]
    for name in names:  # each model gets an equal share of the time budget (DeepseekV3 fails at once)
        share = args.stop_after_s / max(1, len(names) - ("deepseek_v3" in names))
        results["models"].append(run_model(name, builders[name], points, args, device, share))
    write_results(args.out, results, markdown(results), command_line())
    panels = []
    for context in sorted({context for _, context in points}):
        lines = {
            row["model"]: [(p["requests"], p["decode_tokens_per_s"]) for p in row["points"]
                           if "decode_tokens_per_s" in p and p["context"] == context]
            for row in results["models"]
        }  # fmt: skip
        panels.append(Panel(f"decode throughput, {context}-token context", "concurrent requests", "tokens/s", lines))
    plot_panels(Path(args.out).with_suffix(".png"), panels)
    print(markdown(results))


if __name__ == "__main__":
    main()
