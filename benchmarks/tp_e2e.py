"""End-to-end tensor-parallel decoding on two GPUs: the 2.9B shape (random weights, bf16) of MLRA-4, GLA-2 and MLA
split over 2 ranks by latent block, beside the same model on one GPU and transformers' DeepseekV3 of the same size
with `tp_plan="auto"` on the same two GPUs (its plan splits the MLP; its attention runs whole on every GPU).

Prompts are not prefilled token by token: each cache is filled with random states of exactly the layout the model
writes (per GPU: its latent blocks and the rope key), then generate() streams new tokens. Reported per setup, batch
and prompt: ms per token (median interval between streamed tokens), tokens/s, per-GPU cache bytes, and the share of
a decode step spent in collectives (NCCL kernel time in a profiled step / median step time).

    NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 \
        torchrun --nproc-per-node 2 benchmarks/tp_e2e.py --out benchmarks/results/tp_e2e_h200x2
    torchrun --nproc-per-node 2 benchmarks/tp_e2e.py --quick --out /tmp/tp_e2e    # tiny shapes, CPU, gloo

Writes OUT.json, OUT.md and OUT.png.
"""

import os

# NVLink multicast stays off (shared machines): set before torch.distributed starts NCCL.
for _name, _value in (("NCCL_NVLS_ENABLE", "0"), ("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1"), ("NVSHMEM_DISABLE_NVLS", "1")):
    os.environ.setdefault(_name, _value)

import argparse  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM, DynamicCache  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    IntervalStreamer,
    Panel,
    deepseek_v3_config,
    plot_panels,
    random_model,
    software_versions,
    write_results,
)

from modeling_mlra import MLRACache, MLRAConfig  # noqa: E402  (common puts the repository first)
from modeling_mlra.tensor_parallel import shard_model  # noqa: E402

VARIANTS = ("mlra_4", "gla_2", "mla")


def mlra_config(variant: str, args) -> MLRAConfig:
    overrides = dict(max_position_embeddings=max(args.prompts) + args.new_tokens + 8)
    if args.quick:
        overrides.update(
            hidden_size=64, num_hidden_layers=2, num_attention_heads=4, kv_lora_rank=32, qk_nope_head_dim=16,
            v_head_dim=16, qk_rope_head_dim=8, intermediate_size=128, vocab_size=256,
            q_lora_rank=48 if variant != "mla" else 64,
        )  # fmt: skip
    return MLRAConfig.from_variant(variant, **overrides)


def deepseek_config(args) -> DeepseekV3Config:
    """transformers' DeepseekV3 (dense layers) with MLA's 2.9B shape."""
    return deepseek_v3_config(mlra_config("mla", args))


def mlra_cache(model, config, batch: int, prompt: int, capacity: int, device, dtype):
    """An MLRACache holding `prompt` random tokens in the rank's layout (its blocks + the rope key), and the bytes
    one token takes in it on this GPU (all layers)."""
    shard = getattr(model, "tensor_parallel", None)
    width = shard.shard.cache_width if shard is not None else config.kv_lora_rank + config.qk_rope_head_dim
    cache = MLRACache(config)
    for layer in cache.layers:
        layer.lazy_initialization(torch.empty(batch, capacity, width, dtype=dtype, device=device))
        layer.buffer[:, :prompt].normal_()
        layer.cumulative_length = prompt
    return cache, cache.bytes_per_token


def deepseek_cache(config, batch: int, prompt: int, device, dtype):
    """DeepseekV3's cache: per layer the normalized latent as keys [bsz, 1, S, d_c], the rope key as values."""
    cache = DynamicCache(config=config)
    for layer_idx in range(config.num_hidden_layers):
        latent = torch.randn(batch, 1, prompt, config.kv_lora_rank, dtype=dtype, device=device)
        rope_key = torch.randn(batch, 1, prompt, config.qk_rope_head_dim, dtype=dtype, device=device)
        cache.update(latent, rope_key, layer_idx)
    return cache


def collective_share(model, cache, batch: int, vocab: int, device, step_ms: float, steps: int = 4) -> float | None:
    """Share of a decode step spent in collectives: their kernel time (NCCL; CPU time of gloo's all-reduce on the
    CPU) per profiled step over the median step time."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    token = torch.randint(vocab, (batch, 1), device=device)
    with torch.no_grad(), torch.profiler.profile(activities=activities) as profile:
        for _ in range(steps):
            model(input_ids=token, past_key_values=cache, logits_to_keep=1)
        if device.type == "cuda":
            torch.cuda.synchronize()
    total_us = 0.0
    for event in profile.key_averages():
        name = event.key.lower()
        if device.type == "cuda" and "nccl" in name and "kernel" in name:
            total_us += event.device_time_total
        elif device.type == "cpu" and name.startswith("c10d::allreduce"):
            total_us += event.cpu_time_total
    return total_us / steps / 1e3 / step_ms if total_us else None


def decode(model, cache, batch: int, prompt: int, args, vocab: int, device) -> dict:
    """Stream `args.new_tokens` tokens after a cached prompt; ms/token, tokens/s."""
    input_ids = torch.randint(vocab, (batch, prompt + 1), device=device)
    streamer = IntervalStreamer()
    with torch.no_grad():
        model.generate(
            input_ids, attention_mask=torch.ones_like(input_ids), past_key_values=cache, streamer=streamer,
            max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0,
            disable_compile=True,
        )  # fmt: skip
    ms = streamer.median_ms()
    return {"ms_per_token": ms, "tokens_per_s": batch * 1e3 / ms}


def run_setup(name: str, model, make_cache, args, vocab: int, device, record, max_batch_tokens=None) -> None:
    """Every batch x prompt; `max_batch_tokens` skips larger ones (decided alike on every rank, so no rank is left
    waiting in a collective)."""
    for batch in args.batches:
        for prompt in args.prompts:
            row = {"setup": name, "batch": batch, "prompt": prompt}
            if max_batch_tokens is not None and batch * prompt > max_batch_tokens:
                row["error"] = f"skipped: re-expands {batch * prompt:,} cached latents per layer and step"
                record(row)
                continue
            cache = None
            try:
                cache, cache_bytes_per_token = make_cache(batch, prompt)
                row["cache_gb_per_gpu"] = cache_bytes_per_token * batch * prompt / 1e9
                row.update(decode(model, cache, batch, prompt, args, vocab, device))
                if "TP2" in name:
                    cache, _ = make_cache(batch, prompt)
                    row["collective_share"] = collective_share(model, cache, batch, vocab, device, row["ms_per_token"])
            except torch.OutOfMemoryError:
                row["error"] = "out of memory"
            del cache
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            record(row)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="output prefix: OUT.json, OUT.md, OUT.png")
    parser.add_argument("--prompts", type=int, nargs="+", default=[4096, 32768, 131072])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--skip-deepseek", action="store_true")
    parser.add_argument(
        "--deepseek-max-batch-tokens", type=int, default=1 << 20,
        help="DeepseekV3 expands every cached latent to per-head K/V each step (~70 GB at batch 16 x 128K on top of "
        "its cache): larger batch x prompt are skipped",
    )  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="tiny shapes on the CPU (gloo), to check the script")
    args = parser.parse_args()
    if args.quick:
        args.prompts, args.batches, args.new_tokens = [64, 256], [1, 2], 4
    use_cuda = torch.cuda.is_available() and not args.quick
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if use_cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", torch.cuda.current_device()) if use_cuda else torch.device("cpu")
    dtype = torch.bfloat16 if use_cuda else torch.float32
    rows = []

    def record(row):
        rows.append(row)
        if rank == 0:
            print(json.dumps(row), flush=True)

    for variant in args.variants:
        config = mlra_config(variant, args)
        model = random_model(config, device, dtype)

        def make_cache(batch, prompt):
            return mlra_cache(model, config, batch, prompt, prompt + args.new_tokens + 8, device, dtype)

        if rank == 0:  # the same model on one GPU, while the other rank waits
            run_setup(f"{variant} 1 GPU", model, make_cache, args, config.vocab_size, device, record)
        dist.barrier()
        shard_model(model, device=device)
        run_setup(f"{variant} TP{world}", model, make_cache, args, config.vocab_size, device, record)
        del model
        gc.collect()
        if use_cuda:
            torch.cuda.empty_cache()
        dist.barrier()

    if not args.skip_deepseek:
        config = deepseek_config(args)
        folder = Path(tempfile.gettempdir()) / "tp_e2e_deepseek_v3"
        if rank == 0:
            torch.manual_seed(0)
            DeepseekV3ForCausalLM._from_config(config, dtype=dtype).save_pretrained(folder)
        dist.barrier()
        model = DeepseekV3ForCausalLM.from_pretrained(folder, tp_plan="auto", dtype=dtype).eval()
        bytes_per_token = (config.kv_lora_rank + config.qk_rope_head_dim) * torch.finfo(dtype).bits // 8
        run_setup(
            f"DeepseekV3 TP{world} (tp_plan=auto)", model,
            lambda b, p: (deepseek_cache(config, b, p, device, dtype), bytes_per_token * config.num_hidden_layers),
            args, config.vocab_size, device, record, max_batch_tokens=args.deepseek_max_batch_tokens,
        )  # fmt: skip

    if rank == 0:
        meta = {
            "device": torch.cuda.get_device_name() if use_cuda else "cpu",
            "gpus": world, "dtype": str(dtype).removeprefix("torch."), **software_versions(),
            "new_tokens": args.new_tokens,
        }  # fmt: skip
        write_outputs(rows, meta, args.out)
    dist.destroy_process_group()


def write_outputs(rows: list[dict], meta: dict, out: Path) -> None:
    lines = [
        f"# Tensor-parallel decode, {meta['gpus']} x {meta['device']}, {meta['dtype']}, 2.9B shape, random weights",
        "",
        f"torch {meta['torch']}, transformers {meta['transformers']}; generate() with a cache holding the prompt; "
        f"median interval between {meta['new_tokens']} streamed tokens; collectives: NCCL kernel time per step.",
        "",
        "| setup | batch | prompt | ms/token | tokens/s | cache GB per GPU | collectives share |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['setup']} | {row['batch']} | {row['prompt']:,} | {row['error']} | | | |")
            continue
        share = row.get("collective_share")
        lines.append(
            f"| {row['setup']} | {row['batch']} | {row['prompt']:,} | {row['ms_per_token']:.2f} | "
            f"{row['tokens_per_s']:.1f} | {row['cache_gb_per_gpu']:.2f} | {'' if share is None else f'{share:.0%}'} |"
        )
    markdown = "\n".join(lines) + "\n"
    write_results(out, {"meta": meta, "rows": rows}, markdown)
    print(markdown)
    panels = [
        Panel(
            f"batch {batch}", "prompt tokens (cached)", "ms per token",
            {
                setup: [(r["prompt"], r["ms_per_token"]) for r in rows
                        if r["setup"] == setup and r["batch"] == batch and "ms_per_token" in r]
                for setup in dict.fromkeys(row["setup"] for row in rows)
            },
        )  # fmt: skip
        for batch in sorted({row["batch"] for row in rows})
    ]
    plot_panels(out.with_suffix(".png"), panels)


if __name__ == "__main__":
    main()
