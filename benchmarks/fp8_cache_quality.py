"""What the fp8 latent cache costs in accuracy, against the cache in the model's dtype (CPU, the PyTorch path).

    python benchmarks/fp8_cache_quality.py --out benchmarks/results/fp8_cache_quality

Models: the shipped tiny MLRA-4 (modeling_mlra/default_model) and MLA (models/tiny_mla) on held-out Python
(tests/fixtures/heldout_python.txt, windows of their 128-token context), and every reference fixture of the authors
(tests/fixtures/reference) on its own tokens. Each is run in bf16 and in fp32, with a cache in the model's dtype and
with the fp8 cache, teacher-forced through the cache: a prefill, then one token per step, so that every later token
attends to what the cache holds. Reported: the decode positions' logits error (max abs, relative L2) and perplexity
change of fp8 against the model-dtype cache, and greedy agreement over 256 generated tokens (generate(), same prompt).
"""

import argparse
import json
import math
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from modeling_mlra import MLRACache, MLRAForCausalLM  # noqa: E402
from modeling_mlra.modeling_mlra import CACHE_FIELD  # noqa: E402

FP8 = torch.float8_e4m3fn
SHIPPED = {"default_model (MLRA-4)": ROOT / "modeling_mlra" / "default_model", "tiny_mla (MLA)": ROOT / "models" / "tiny_mla"}
HELDOUT = ROOT / "tests" / "fixtures" / "heldout_python.txt"
REFERENCE = ROOT / "tests" / "fixtures" / "reference"


@torch.no_grad()
def decode_logits(model, tokens: torch.Tensor, prefill: int, cache_dtype) -> torch.Tensor:
    """Logits [bsz, T - prefill, vocab] of positions prefill-1 ... T-2 (predicting tokens prefill ... T-1): the
    prefill in one forward, then one token per step through the cache."""
    cache = MLRACache(model.config, dtype=cache_dtype)
    logits = [model(tokens[:, :prefill], **{CACHE_FIELD: cache}).logits[:, -1:]]
    for position in range(prefill, tokens.shape[1] - 1):
        logits.append(model(tokens[:, position : position + 1], **{CACHE_FIELD: cache}).logits)
    return torch.cat(logits, dim=1).float()


def perplexity(logits: torch.Tensor, targets: torch.Tensor) -> float:
    return math.exp(torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten()).item())


@torch.no_grad()
def greedy(model, prompt: torch.Tensor, new_tokens: int, cache_dtype) -> torch.Tensor:
    out = model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                         cache_config={"dtype": cache_dtype}, pad_token_id=0)
    return out[:, prompt.shape[1] :]


def measure(name, model, tokens, prefill, prompt, new_tokens) -> list[dict]:
    rows = []
    for dtype in (torch.bfloat16, torch.float32):
        model = model.to(dtype)
        reference = decode_logits(model, tokens, prefill, None)
        quantized = decode_logits(model, tokens, prefill, FP8)
        targets = tokens[:, prefill:]
        reference_tokens, fp8_tokens = greedy(model, prompt, new_tokens, None), greedy(model, prompt, new_tokens, FP8)
        same = reference_tokens == fp8_tokens
        first_difference = [int((~row).nonzero()[0]) if (~row).any() else new_tokens for row in same]
        ppl, ppl_fp8 = perplexity(reference, targets), perplexity(quantized, targets)
        rows.append(dict(
            model=name, dtype=str(dtype).removeprefix("torch."), decoded_tokens=targets.numel(),
            cache_bytes_per_token=dict(model_dtype=cache_bytes(model, None), fp8=cache_bytes(model, FP8)),
            logits_max_abs_err=(quantized - reference).abs().max().item(),
            logits_rel_err=((quantized - reference).norm() / reference.norm()).item(),
            ppl=ppl, ppl_fp8=ppl_fp8, ppl_change=ppl_fp8 / ppl - 1,
            greedy_agreement=same.float().mean().item(), greedy_first_difference=first_difference,
        ))
        print(rows[-1], flush=True)
    return rows


def cache_bytes(model, cache_dtype) -> int:
    cache = MLRACache(model.config, dtype=cache_dtype)
    with torch.no_grad():
        model(torch.zeros(1, 1, dtype=torch.long), **{CACHE_FIELD: cache})
    return cache.bytes_per_token


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/fp8_cache_quality")
    parser.add_argument("--windows", type=int, default=8, help="128-token windows of held-out text per shipped model")
    parser.add_argument("--new-tokens", type=int, default=256)
    options = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    rows = []
    for name, folder in SHIPPED.items():
        model = MLRAForCausalLM.from_pretrained(folder, local_files_only=True).eval()
        ids = AutoTokenizer.from_pretrained(folder, local_files_only=True)(HELDOUT.read_text())["input_ids"]
        window = model.config.max_position_embeddings
        stride = len(ids) // options.windows
        tokens = torch.tensor([ids[i * stride : i * stride + window] for i in range(options.windows)])
        rows += measure(name, model, tokens, prefill=16, prompt=tokens[:4, :32], new_tokens=options.new_tokens)
    for folder in sorted(p for p in REFERENCE.iterdir() if (p / "pytorch_model.bin").exists()):
        model = MLRAForCausalLM.from_pretrained(folder).eval()
        expected = load_file(folder / "expected.safetensors")
        tokens = torch.cat([expected["input_ids"], expected["targets"][:, -1:]], dim=1)
        rows += measure(f"reference {folder.name}", model, tokens, prefill=4, prompt=expected["greedy_prompt"],
                        new_tokens=options.new_tokens)

    out = Path(options.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    command = "python " + " ".join(sys.argv)
    out.with_suffix(".json").write_text(json.dumps(dict(command=command, torch=torch.__version__, rows=rows), indent=1))
    lines = [
        "# fp8 latent cache against the cache in the model's dtype (CPU, PyTorch path)",
        "",
        f"Command: `{command}` (torch {torch.__version__}). Teacher-forced decoding through the cache (prefill, then "
        "one token per step); greedy: generate() from the same prompts, new tokens compared position by position.",
        "",
        "| model | dtype | decoded tokens | bytes/token (model dtype / fp8) | logits max abs err | logits rel. err | ppl "
        "| ppl fp8 | ppl change | greedy agreement | first difference |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        b = r["cache_bytes_per_token"]
        lines.append(
            f"| {r['model']} | {r['dtype']} | {r['decoded_tokens']} | {b['model_dtype']} / {b['fp8']} | "
            f"{r['logits_max_abs_err']:.3g} | {r['logits_rel_err']:.2e} | {r['ppl']:.4f} | {r['ppl_fp8']:.4f} | "
            f"{100 * r['ppl_change']:+.3f}% | {100 * r['greedy_agreement']:.1f}% | {r['greedy_first_difference']} |"
        )
    table = "\n".join(lines) + "\n"
    out.with_suffix(".md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
