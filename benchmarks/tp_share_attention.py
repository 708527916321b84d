"""Decode attention of ONE GPU's tensor-parallel share (the paper's Figure 5 setting): 64 query heads, d_h = 128,
rope 64, batch 1, one query token, 128K to 2M cached tokens.

- GQA at 8-way TP: 8 query heads on one KV head of 128 per GPU, PyTorch SDPA.
- MLA: the latent cannot be split: 64 heads on 512 + 64 per GPU.
- GLA-2 at 2-way TP: one head group per GPU: 32 heads on 256 + 64.
- MLRA-4 at 4-way TP: one latent block per GPU, all 64 heads: 64 heads on 128 + 64.

The latent members run the rank's own attention module (`LatentShard.local_config()` -> `MLRAAttention`) through its
absorbed decode path, so whatever that path dispatches to (the fused decode kernel when present) is what is timed:
GPU time of CUDA-graph replays (`common.gpu_time_ms`). Writes OUT.json, OUT.md and OUT.png.

    python benchmarks/tp_share_attention.py --out benchmarks/results/tp_share_attention_h200   # one H200, ~2 min
    python benchmarks/tp_share_attention.py --quick --out /tmp/tp_share_attention              # tiny shapes, CPU
"""

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Panel, median_ms, plot_panels, software_versions, write_results  # noqa: E402

from modeling_mlra import MLRAConfig  # noqa: E402  (common puts the repository first)
from modeling_mlra.modeling_mlra import MLRAAttention, use_decode_kernel  # noqa: E402
from modeling_mlra.tensor_parallel import LatentShard  # noqa: E402

PAPER_RATIOS = {"MLA": (2.76, 2.86), "GQA": (1.05, 1.26), "GLA-2": (1.31, 1.61)}  # x / MLRA-4, paper Figure 5
# member -> (variant, TP degree whose rank-0 share is timed)
LATENT_MEMBERS = {"MLA": ("mla", 1), "GLA-2": ("gla_2", 2), "MLRA-4": ("mlra_4", 4)}


def share_attention(variant: str, degree: int, heads: int, head_dim: int, rope_dim: int, device, dtype):
    """Rank 0's attention module of `variant` at `degree`-way TP, with the paper's Figure 5 head shapes."""
    config = MLRAConfig.from_variant(
        variant, num_attention_heads=heads, qk_nope_head_dim=head_dim, v_head_dim=head_dim,
        qk_rope_head_dim=rope_dim, kv_lora_rank=4 * head_dim, hidden_size=heads * head_dim // 2,
    )  # fmt: skip
    shard = LatentShard.for_rank(config, 0, degree)
    with torch.device(device):
        attention = MLRAAttention(shard.local_config(), layer_idx=0).to(dtype).eval()
    for parameter in attention.parameters():
        torch.nn.init.normal_(parameter, std=0.02)
    return attention, shard


@torch.no_grad()
def measure(context: int, args, device, dtype) -> dict:
    heads, head_dim, rope_dim = args.heads, args.head_dim, args.rope_dim
    row = {"context": context}
    # GQA at 8-way TP: 8 query heads on 1 KV head of head_dim per GPU
    q_heads = heads // 8
    query = torch.randn(1, q_heads, 1, head_dim, device=device, dtype=dtype)
    key = torch.randn(1, 1, context, head_dim, device=device, dtype=dtype)
    value = torch.randn(1, 1, context, head_dim, device=device, dtype=dtype)
    row["GQA_ms"] = median_ms(
        lambda: F.scaled_dot_product_attention(query, key, value, enable_gqa=True), device, args.warmup, args.iters
    )
    row["GQA_bytes"] = 2 * context * head_dim * key.element_size()
    del key, value

    for name, (variant, degree) in LATENT_MEMBERS.items():
        attention, shard = share_attention(variant, degree, heads, head_dim, rope_dim, device, dtype)
        local_heads = len(shard.heads)
        q_nope = torch.randn(1, 1, local_heads, head_dim, device=device, dtype=dtype)
        q_rope = torch.randn(1, 1, local_heads, rope_dim, device=device, dtype=dtype)
        kv_states = torch.randn(1, context, shard.cache_width, device=device, dtype=dtype)
        # the dispatch MLRAModel.forward makes for a decode step: the fused kernel where it runs, else PyTorch
        if use_decode_kernel(attention.config, 1, dtype, device):
            seq_lens = torch.full((1,), context, device=device)
            row[f"{name}_path"] = "fused kernel"
            run = lambda: attention.absorbed_attention(q_nope, q_rope, kv_states, None, (seq_lens, None, None))  # noqa: E731
        else:
            row[f"{name}_path"] = "PyTorch absorbed"
            run = lambda: attention.absorbed_attention(q_nope, q_rope, kv_states, None)  # noqa: E731
        row[f"{name}_ms"] = median_ms(run, device, args.warmup, args.iters)
        row[f"{name}_bytes"] = kv_states.numel() * kv_states.element_size()
        row[f"{name}_shape"] = f"{local_heads} heads on {shard.cache_width - rope_dim} + {rope_dim}"
        del kv_states
    for name in ("MLA", "GQA", "GLA-2"):
        row[f"{name}/MLRA-4"] = row[f"{name}_ms"] / row["MLRA-4_ms"]
    return row


def write_outputs(rows: list[dict], meta: dict, out: Path) -> None:
    names = ("GQA", "MLA", "GLA-2", "MLRA-4")
    lines = [
        f"# Per-GPU share of decode attention ({meta['device']}, {meta['dtype']}, batch 1, {meta['heads']} query heads)",
        "",
        "Shares: " + "; ".join(f"{k}: {v}" for k, v in meta["shares"].items()),
        "",
        "| tokens | " + " | ".join(f"{n} ms" for n in names) + " | MLA/MLRA-4 | GQA/MLRA-4 | GLA-2/MLRA-4 | MLRA-4 GB/s |",
        "|---" * (len(names) + 5) + "|",
    ]
    for row in rows:
        bandwidth = row["MLRA-4_bytes"] / row["MLRA-4_ms"] / 1e6
        lines.append(
            f"| {row['context']:,} | " + " | ".join(f"{row[n + '_ms']:.3f}" for n in names)
            + f" | {row['MLA/MLRA-4']:.2f} | {row['GQA/MLRA-4']:.2f} | {row['GLA-2/MLRA-4']:.2f} | {bandwidth:.0f} |"
        )  # fmt: skip
    lines += ["", "Paper (Figure 5, 128K-2M): " + ", ".join(f"{k}/MLRA-4 {a}-{b}x" for k, (a, b) in PAPER_RATIOS.items())]
    markdown = "\n".join(lines) + "\n"
    write_results(out, {"meta": meta, "rows": rows}, markdown)
    print(markdown)
    lines_by_member = {name: [(r["context"], r[f"{name}_ms"]) for r in rows] for name in names}
    panel = Panel(f"one GPU's share, {meta['device']}, {meta['dtype']}", "cached tokens", "ms per decode step", lines_by_member, yscale="log")
    plot_panels(out.with_suffix(".png"), [panel])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="output prefix: OUT.json, OUT.md, OUT.png")
    parser.add_argument("--contexts", type=int, nargs="+", default=[1 << 17, 1 << 18, 1 << 19, 1 << 20, 1 << 21])
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--quick", action="store_true", help="tiny shapes on the CPU, to check that the script runs")
    args = parser.parse_args()
    args.heads, args.head_dim, args.rope_dim = 64, 128, 64
    if args.quick:
        args.heads, args.head_dim, args.rope_dim = 16, 32, 16
        args.contexts, args.warmup, args.iters = [256, 1024], 1, 3
    device = torch.device("cuda" if torch.cuda.is_available() and not args.quick else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    meta = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "dtype": str(dtype).removeprefix("torch."),
        "heads": args.heads, "head_dim": args.head_dim, "rope_dim": args.rope_dim,
        **software_versions(),
        "shares": {
            "GQA": f"8-way TP: {args.heads // 8} query heads on 1 KV head of {args.head_dim}",
            **{
                name: f"{degree}-way TP" for name, (_, degree) in LATENT_MEMBERS.items()
            },
        },
    }  # fmt: skip
    rows = []
    for context in args.contexts:
        rows.append(measure(context, args, device, dtype))
        if device.type == "cuda":
            torch.cuda.empty_cache()
        print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in rows[-1].items()}, flush=True)
    for name, (variant, degree) in LATENT_MEMBERS.items():
        meta["shares"][name] += f": {rows[0][name + '_shape']} ({rows[0][name + '_path']})"
    write_outputs(rows, meta, args.out)


if __name__ == "__main__":
    main()
