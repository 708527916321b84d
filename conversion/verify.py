"""`mlra verify FOLDER`: a model folder's files against the SHA256SUMS that `mlra convert` writes, and every weight
finite. Loading checks finiteness too, but not the checksums: hashing runs at about 0.5 GB/s on one CPU core, 12 s
for the 5.8 GB of a 2.9B model in bf16 (benchmarks/results/weight_checks.md)."""

from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from modeling_mlra.original_checkpoint import check_finite, check_zip_checksums

from .writer import CHECKSUMS_FILE, file_sha256


def verify_model_folder(folder: Path) -> tuple[list[str], str]:
    """(problems, summary): each problem is one line naming the file, and the tensor where there is one."""
    folder = Path(folder)
    problems = []
    checksums = folder / CHECKSUMS_FILE
    if checksums.is_file():
        listed = [line.split(maxsplit=1) for line in checksums.read_text(encoding="utf-8").splitlines() if line.strip()]
        for expected, name in listed:
            path = folder / name.lstrip("*")  # sha256sum's binary-mode marker
            if not path.is_file():
                problems.append(f"{path}: listed in {CHECKSUMS_FILE} but missing")
            elif file_sha256(path) != expected:
                problems.append(f"{path}: its sha256 differs from {CHECKSUMS_FILE}: the file is corrupted or was changed")
        summary = f"{len(listed)} files match {CHECKSUMS_FILE}"
    else:
        summary = f"no {CHECKSUMS_FILE} (`mlra convert` writes one), so file checksums were not checked"
    weight_files = sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin"))
    if not weight_files:
        problems.append(f"{folder}: no .safetensors or pytorch_model.bin weight files")
    tensors = 0
    for path in weight_files:
        try:
            if path.suffix == ".safetensors":
                with safe_open(path, framework="pt") as weights:
                    for key in weights.keys():
                        check_finite(weights.get_tensor(key), f"{path}: {key}")
                        tensors += 1
            else:
                check_zip_checksums(str(path))
                for key, tensor in torch.load(path, map_location="cpu", mmap=True, weights_only=True).items():
                    check_finite(tensor, f"{path}: {key}")
                    tensors += 1
        except (SafetensorError, OSError, ValueError, RuntimeError) as error:
            problems.append(str(error) if str(path) in str(error) else f"{path}: cannot read the weights ({error})")
    return problems, f"{folder}: {summary}; {tensors} tensors in {len(weight_files)} weight files, all finite"
