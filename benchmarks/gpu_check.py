"""Correctness on a CUDA GPU, what CI (CPU only) cannot cover, in one run: the authors' reference fixtures (float32,
TF32 off) and their greedy tokens; absorbed decode against the expanded path in bfloat16 at the published layer
shapes (against float32 arithmetic on the same bf16-rounded weights); generate() with a static cache, eager and under
torch.compile, against the plain dynamic cache; continuous batching (`generate_batch`, the fused kernel reading one row
per request) against generate() for each request alone. (Decode timing is `e2e_generate.py`'s.)

    python benchmarks/gpu_check.py --out benchmarks/results/gpu_check_h200
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
    different lengths equal generate()'s for each prompt alone, with the decode steps through the fused kernel
    (one row per request) and through the PyTorch absorbed path (which of the two a mismatch follows)."""
    from transformers import GenerationConfig

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
    report = dict(prompt_lengths=[len(p) for p in prompts])
    for kernel in ("triton", "torch"):
        model.config.decode_kernel = kernel
        batched = model.generate_batch(
            prompts, generation_config=config, continuous_batching_config=ContinuousBatchingConfig(max_batch_tokens=512)
        )
        report[f"tokens_equal_generate_{kernel}"] = [
            result.error is None and result.generated_tokens == tokens for result, tokens in zip(batched.values(), alone)
        ]
    model.config.decode_kernel = "auto"
    return report


def markdown(report: dict) -> str:
    lines = [f"# GPU check: {report['device']}", "", f"torch {report['torch']}, transformers {report['transformers']}", ""]
    lines += ["## Reference fixtures on the GPU (float32, TF32 off)", "", "| variant | max abs logit diff | greedy tokens equal |", "|---|---:|---|"]
    lines += [f"| {r['variant']} | {r['max_abs_logit_diff']:.2e} | {r['greedy_tokens_equal']} |" for r in report["fixtures"]]
    lines += ["", "## Absorbed vs expanded decode, bfloat16, published layer shapes (2 layers, context 4096)", ""]
    lines += ["Differences of the last position's logits relative to the largest float32 logit; the float32 reference",
              "computes on the same bfloat16-rounded weights, so the columns measure arithmetic, not weight rounding.", ""]
    lines += ["| variant | absorbed vs expanded (bf16) | absorbed bf16 vs fp32 | expanded bf16 vs fp32 |", "|---|---:|---:|---:|"]
    lines += [
        f"| {r['variant']} | {r['absorbed_vs_expanded_bf16']:.2e} | {r['absorbed_bf16_vs_fp32']:.2e} | {r['expanded_bf16_vs_fp32']:.2e} |"
        for r in report["absorbed"]
    ]
    lines += ["", f"## generate() with a static cache: {report['static_generate']}", ""]
    lines += [f"## Continuous batching vs generate() per request: {report['continuous_batching']}", ""]
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="output prefix: OUT.json, OUT.md")
    args = parser.parse_args()
    device = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    report = dict(device=torch.cuda.get_device_name(device), **software_versions())
    report["fixtures"] = check_reference_fixtures(device)
    print(report["fixtures"], flush=True)
    report["absorbed"] = check_absorbed_vs_expanded(device)
    print(report["absorbed"], flush=True)
    report["static_generate"] = check_static_compiled_generate(device)
    print(report["static_generate"], flush=True)
    report["continuous_batching"] = check_continuous_batching(device)
    print(report["continuous_batching"], flush=True)
    write_results(args.out, report, markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
