"""Correctness on a CUDA GPU, what CI (CPU only) cannot cover, in one run: the authors' reference fixtures (float32,
TF32 off) and their greedy tokens; absorbed decode against the expanded path in bfloat16 at the published layer
shapes (against float32 arithmetic on the same bf16-rounded weights); generate() with a static cache, eager and under
torch.compile, against the plain dynamic cache; continuous batching (`generate_batch`, the fused kernel reading one row
per request) against generate() for each request alone; and the finding behind an earlier continuous-batching
mismatch: CUDA's memory-efficient sdpa kernel reading an attention mask whose rows lie far apart. (Decode timing is
`e2e_generate.py`'s.)

    python benchmarks/gpu_check.py --out benchmarks/results/gpu_check_h200
    python benchmarks/gpu_check.py --checks sdpa_mask_rows continuous_batching --out ...  # a subset
"""

import argparse
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import published_model, software_versions, write_results  # noqa: E402

from modeling_mlra import MLRACache, MLRAForCausalLM  # noqa: E402  (common puts the repository first)
from modeling_mlra.modeling_mlra import CACHE_FIELD  # noqa: E402

REFERENCE = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "reference"


def check_reference_fixtures(device) -> list[dict]:
    rows = []
    for folder in sorted(p for p in REFERENCE.iterdir() if (p / "pytorch_model.bin").exists()):
        expected = load_file(folder / "expected.safetensors")
        model = MLRAForCausalLM.from_pretrained(folder).to(device)
        with torch.no_grad():
            logits = model(expected["input_ids"].to(device), use_cache=False).logits.cpu()
        generated = model.generate(expected["greedy_prompt"].to(device), max_new_tokens=12, do_sample=False).cpu()
        rows.append(
            dict(
                variant=folder.name,
                max_abs_logit_diff=(logits - expected["logits"]).abs().max().item(),
                greedy_tokens_equal=torch.equal(generated, expected["greedy_tokens"]),
            )
        )
    return rows


def check_absorbed_vs_expanded(device, context: int = 4096) -> list[dict]:
    rows = []
    for variant in ("mla", "gla_2", "gla_4", "mlra_2", "mlra_4", "mlra_4_gated"):
        model = published_model(variant, 2, device, torch.bfloat16)
        ids = torch.randint(0, 50304, (2, context + 1), device=device)
        outputs = {}
        for path, max_query in (("absorbed", 16), ("expanded", 0)):
            model.config.absorbed_max_query_len = max_query
            cache = MLRACache(model.config)
            with torch.no_grad():
                model(ids[:, :context], **{CACHE_FIELD: cache})
                outputs[path] = model(ids[:, context:], **{CACHE_FIELD: cache}).logits.float()
        # float32 compute on the same bfloat16-rounded weights: isolates the arithmetic from weight rounding
        with torch.no_grad():
            full = model.float()(ids, use_cache=False).logits[:, -1:]
        scale = full.abs().max().item()
        rows.append(
            dict(
                variant=variant,
                context=context,
                absorbed_vs_expanded_bf16=(outputs["absorbed"] - outputs["expanded"]).abs().max().item() / scale,
                absorbed_bf16_vs_fp32=(outputs["absorbed"] - full).abs().max().item() / scale,
                expanded_bf16_vs_fp32=(outputs["expanded"] - full).abs().max().item() / scale,
            )
        )
    return rows


def check_static_compiled_generate(device) -> dict:
    """In float32 (TF32 off): bf16 greedy decoding of a random model flips near-tied argmaxes on rounding alone."""
    model = published_model("mlra_4", 2, device, torch.float32)
    prompt = torch.randint(0, 50304, (2, 32), device=device)
    dynamic = model.generate(prompt, max_new_tokens=48, do_sample=False)
    static = model.generate(prompt, max_new_tokens=48, do_sample=False, cache_implementation="static")
    model.forward = torch.compile(model.forward, fullgraph=True)
    compiled = model.generate(prompt, max_new_tokens=48, do_sample=False, cache_implementation="static")
    return dict(static_equals_dynamic=torch.equal(static, dynamic), compiled_equals_dynamic=torch.equal(compiled, dynamic))


def check_continuous_batching(device) -> dict:
    """float32 (TF32 off), 2 layers of the published MLRA-4 shape: generate_batch's greedy tokens for prompts of very
    different lengths (the long ones prefilled in chunks beside the others' decode steps) equal generate()'s for each
    prompt alone, with the short sequences through the fused kernel (one row per request) and through the PyTorch
    absorbed path, one request at a time. Also counts the kernel's launches on the pages read in place (`LatentPages`)
    and on rows (the first step: nothing cached)."""
    from transformers import GenerationConfig

    import modeling_mlra.modeling_mlra as modeling
    from modeling_mlra.mlra_decode_kernel import LatentPages

    try:
        from transformers import ContinuousBatchingConfig
    except ImportError:  # transformers 5.17
        from transformers.generation.configuration_utils import ContinuousBatchingConfig

    model = published_model("mlra_4", 2, device, torch.float32)
    generator = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 50304, (length,), generator=generator).tolist() for length in (3, 40, 700, 1800)]
    config = GenerationConfig(max_new_tokens=24, do_sample=False, eos_token_id=-1, pad_token_id=0)
    alone = []
    for prompt in prompts:
        input_ids = torch.tensor([prompt], device=device)
        output = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), generation_config=config)
        alone.append(output[0, len(prompt) :].tolist())
    report = dict(prompt_lengths=[len(p) for p in prompts], kernel_launches_on={"pages in place": 0, "rows": 0})
    decode_attention = modeling.mlra_decode_attention

    def counted(q_absorbed, q_rope, kv_cache, *args, **kwargs):
        report["kernel_launches_on"]["pages in place" if isinstance(kv_cache, LatentPages) else "rows"] += 1
        return decode_attention(q_absorbed, q_rope, kv_cache, *args, **kwargs)

    modeling.mlra_decode_attention = counted
    for kernel in ("triton", "torch"):
        model.config.decode_kernel = kernel
        batched = model.generate_batch(
            prompts, generation_config=config, continuous_batching_config=ContinuousBatchingConfig(max_batch_tokens=512)
        )
        report[f"tokens_equal_generate_{kernel}"] = [
            result.error is None and result.generated_tokens == tokens for result, tokens in zip(batched.values(), alone)
        ]
    model.config.decode_kernel = "auto"
    modeling.mlra_decode_attention = decode_attention
    return report


def check_sdpa_mask_rows(device, rows: int = 256, row_stride: int = 2**25 + 64) -> dict:
    """Continuous batching gives sdpa models its block-diagonal mask as a view [1, 1, T, S] of a buffer [max batch
    tokens, pages + max batch tokens]: rows (pages + max batch tokens) elements apart, millions on a large GPU. Here
    the memory-efficient kernel (the one for float32) gets such a view, rows `row_stride` elements apart, and the same
    mask made contiguous; the query rows whose outputs differ are reported (a 32-bit row offset wraps from row
    2^32 / row_stride on). The buffer is zeros outside the mask: a misread row lets a query see later keys."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    buffer = torch.zeros(rows, row_stride, dtype=torch.bfloat16, device=device)  # 16 GiB for the defaults
    mask = buffer[:, :rows]
    mask.copy_(torch.full((rows, rows), float("-inf"), device=device).triu(1))
    generator = torch.Generator(device).manual_seed(0)
    query, key, value = (
        torch.randn(1, 1, rows, 64, device=device, dtype=torch.bfloat16, generator=generator) for _ in range(3)
    )
    with sdpa_kernel(SDPBackend.EFFICIENT_ATTENTION):
        strided = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=mask[None, None])
        contiguous = torch.nn.functional.scaled_dot_product_attention(
            query, key, value, attn_mask=mask.contiguous()[None, None]
        )
    wrong = ((strided - contiguous).abs().amax(-1)[0, 0] > 0).nonzero().flatten().tolist()
    del buffer, mask
    torch.cuda.empty_cache()
    return dict(
        row_stride=row_stride, rows=rows, first_row_past_2_32_elements=-(-(2**32) // row_stride),
        wrong_rows=len(wrong), first_wrong_row=wrong[0] if wrong else None,
    )  # fmt: skip


def markdown(report: dict) -> str:
    lines = [f"# GPU check: {report['device']}", "", f"torch {report['torch']}, transformers {report['transformers']}", ""]
    if "fixtures" in report:
        lines += ["## Reference fixtures on the GPU (float32, TF32 off)", "", "| variant | max abs logit diff | greedy tokens equal |", "|---|---:|---|"]
        lines += [f"| {r['variant']} | {r['max_abs_logit_diff']:.2e} | {r['greedy_tokens_equal']} |" for r in report["fixtures"]]
    if "absorbed" in report:
        lines += ["", "## Absorbed vs expanded decode, bfloat16, published layer shapes (2 layers, context 4096)", ""]
        lines += ["Differences of the last position's logits relative to the largest float32 logit; the float32 reference",
                  "computes on the same bfloat16-rounded weights, so the columns measure arithmetic, not weight rounding.", ""]
        lines += ["| variant | absorbed vs expanded (bf16) | absorbed bf16 vs fp32 | expanded bf16 vs fp32 |", "|---|---:|---:|---:|"]
        lines += [
            f"| {r['variant']} | {r['absorbed_vs_expanded_bf16']:.2e} | {r['absorbed_bf16_vs_fp32']:.2e} | {r['expanded_bf16_vs_fp32']:.2e} |"
            for r in report["absorbed"]
        ]
    if "static_generate" in report:
        lines += ["", f"## generate() with a static cache: {report['static_generate']}", ""]
    if "sdpa_mask_rows" in report:
        lines += [f"## sdpa (memory-efficient kernel) on a mask view with rows far apart: {report['sdpa_mask_rows']}", ""]
    if "continuous_batching" in report:
        lines += [f"## Continuous batching vs generate() per request: {report['continuous_batching']}", ""]
    return "\n".join(lines) + "\n"


CHECKS = {
    "fixtures": check_reference_fixtures,
    "absorbed": check_absorbed_vs_expanded,
    "static_generate": check_static_compiled_generate,
    "sdpa_mask_rows": check_sdpa_mask_rows,
    "continuous_batching": check_continuous_batching,
}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="output prefix: OUT.json, OUT.md")
    parser.add_argument("--checks", nargs="*", choices=list(CHECKS), help="a subset (default: all)")
    args = parser.parse_args()
    device = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    report = dict(device=torch.cuda.get_device_name(device), **software_versions())
    for name, check in CHECKS.items():
        if not args.checks or name in args.checks:
            report[name] = check(device)
            print(name, report[name], flush=True)
    write_results(args.out, report, markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
