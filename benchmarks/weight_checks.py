"""What checking weights costs on this CPU, on the published 2.9B MLRA-4 shapes in bf16 with fewer layers (a scaled
tensor set; the rates are extrapolated to the full 5.8 GB, and to the authors' 11.6 GB float32 files).

    python benchmarks/weight_checks.py --layers 4 --out benchmarks/results/weight_checks.json

Measures, each with the code the package runs: finiteness (`check_finite`, aminmax) against `isfinite().all()`,
sha256 of the written files (`file_sha256`, as for SHA256SUMS), the zip CRC-32 check of a `pytorch_model.bin`
(`check_zip_checksums`), and `from_pretrained` of the folder for comparison.
"""

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch

from modeling_mlra import MLRAConfig, MLRAForCausalLM
from modeling_mlra.conversion.writer import file_sha256
from modeling_mlra.original_checkpoint import check_finite, check_zip_checksums


def seconds(function) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--out", type=Path)
    options = parser.parse_args()
    torch.set_num_threads(1)
    with torch.device("meta"):
        full = MLRAForCausalLM(MLRAConfig.from_variant("mlra_4"))
    full_bytes = 2 * sum(t.numel() for k, t in full.state_dict().items() if k != "lm_head.weight")
    model = MLRAForCausalLM(MLRAConfig.from_variant("mlra_4", num_hidden_layers=options.layers)).to(torch.bfloat16)
    tensors = {k: t for k, t in model.state_dict().items() if k != "lm_head.weight"}
    nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
    results = dict(layers=options.layers, scaled_bytes=nbytes, full_bytes=full_bytes, threads=1)
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as tmp:
        model.save_pretrained(tmp)
        files = sorted(Path(tmp).glob("*.safetensors"))
        results["from_pretrained_s"] = seconds(lambda: MLRAForCausalLM.from_pretrained(tmp, dtype=torch.bfloat16))
        results["aminmax_s"] = seconds(lambda: [check_finite(t, k) for k, t in tensors.items()])
        sample = tensors["model.embed_tokens.weight"]
        results["isfinite_all_sample_bytes"] = sample.numel() * 2
        results["isfinite_all_sample_s"] = seconds(lambda: bool(torch.isfinite(sample).all()))
        results["sha256_s"] = seconds(lambda: [file_sha256(f) for f in files])
        layer0 = {k: t.float() for k, t in tensors.items() if ".layers.0." in k}
        bin_path = Path(tmp, "pytorch_model.bin")
        torch.save(layer0, bin_path)
        results["crc_bytes"] = bin_path.stat().st_size
        results["crc_s"] = seconds(lambda: check_zip_checksums(str(bin_path)))
    rate = lambda key, size: size / results[key] / 1e9  # noqa: E731
    results["rates_GB_per_s"] = dict(
        aminmax=rate("aminmax_s", nbytes), isfinite_all=rate("isfinite_all_sample_s", results["isfinite_all_sample_bytes"]),
        sha256=rate("sha256_s", nbytes), crc32=rate("crc_s", results["crc_bytes"]), from_pretrained=rate("from_pretrained_s", nbytes),
    )
    results["extrapolated_full_s"] = {
        name: full_bytes / 1e9 / value for name, value in results["rates_GB_per_s"].items() if name != "crc32"
    }
    results["extrapolated_full_s"]["crc32_authors_float32"] = 2 * full_bytes / 1e9 / results["rates_GB_per_s"]["crc32"]
    print(json.dumps(results, indent=2))
    if options.out:
        options.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
