"""The cost of the TP-friendly (TPLA) conversion of an MLA model, per rotation and block count.

    python -m modeling_mlra.conversion.measure_tp_conversion   # the table of conversion/tp_conversion_results.md

The rotation (PCA) is fitted on the first half of the held-out text, and every model is measured on the second
half: perplexity before and after, and the mean per-token KL(source || converted) of the next-token distributions.
"""

import argparse
from pathlib import Path

import torch
from transformers import AutoTokenizer

from modeling_mlra import MLRAForCausalLM

from .mla import compare_logits, to_tensor_parallel, token_blocks

REPO_ROOT = Path(__file__).resolve().parents[1]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(REPO_ROOT / "models" / "tiny_mla"))
    parser.add_argument("--text", default=str(REPO_ROOT / "tests" / "fixtures" / "heldout_python.txt"))
    parser.add_argument("--block-size", type=int, default=128)
    options = parser.parse_args(argv)
    torch.manual_seed(0)
    model = MLRAForCausalLM.from_pretrained(options.model).eval()
    tokenizer = AutoTokenizer.from_pretrained(options.model)
    blocks = token_blocks(tokenizer, Path(options.text).read_text(encoding="utf-8"), options.block_size)
    calibration, evaluation = blocks[: len(blocks) // 2], blocks[len(blocks) // 2 :]
    print("| latent blocks | rotation | perplexity before | perplexity after | mean KL (nats/token) |")
    print("|---|---|---|---|---|")
    for num_blocks in (2, 4):
        for rotation in ("none", "hadamard", "pca"):
            converted = to_tensor_parallel(model, num_blocks, rotation, calibration)
            measured = compare_logits(model, converted, evaluation)
            print(
                f"| {num_blocks} | {rotation} | {measured['perplexity_before']:.3f} | "
                f"{measured['perplexity_after']:.3f} | {measured['kl']:.4f} |"
            )
    print(f"\n{len(calibration)} calibration and {len(evaluation)} evaluation blocks of {options.block_size} tokens "
          f"({measured['tokens']} predicted tokens); model {Path(options.model).name}.")


if __name__ == "__main__":
    main()
