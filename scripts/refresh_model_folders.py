"""Re-save the model folders the repository ships through the package's own `save_pretrained`, so that the modeling
files beside their weights and the `auto_map` of their config.json are those of the current sources.

    python scripts/refresh_model_folders.py        # after any change to modeling_mlra/*.py

`save_pretrained` writes the modules of the config and model classes and every module they import relatively
(transformers' discovery, `custom_object_save`), which is what `AutoModelForCausalLM.from_pretrained(folder,
trust_remote_code=True)` needs without this package. The weights, tokenizer and model card are kept as they are
(re-saving writes the same weight bytes). `tests/test_default_model.py` fails while a shipped copy is stale.
"""

import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from transformers.utils import logging  # noqa: E402

from modeling_mlra import MLRAForCausalLM  # noqa: E402

SHIPPED_MODEL_FOLDERS = (REPO / "modeling_mlra" / "default_model", REPO / "models" / "tiny_mla")


def refresh(folder: Path) -> list[str]:
    """Re-save `folder`'s model into it through `save_pretrained`; return the names of the files that changed.

    The model is saved to a temporary folder first, so a failure leaves `folder` as it was; modules that
    `save_pretrained` no longer writes are removed.
    """
    model = MLRAForCausalLM.from_pretrained(folder)
    changed = []
    with tempfile.TemporaryDirectory() as saved:
        model.save_pretrained(saved)
        written = {path.name: path for path in Path(saved).iterdir()}
        for stale in folder.glob("*.py"):
            if stale.name not in written:
                stale.unlink()
                changed.append(stale.name)
        for name, path in sorted(written.items()):
            target = folder / name
            if not target.exists() or target.read_bytes() != path.read_bytes():
                shutil.copyfile(path, target)
                changed.append(name)
    return changed


def main() -> None:
    logging.disable_progress_bar()
    for folder in SHIPPED_MODEL_FOLDERS:
        changed = refresh(folder)
        print(f"{folder.relative_to(REPO)}: {', '.join(changed) if changed else 'up to date'}")


if __name__ == "__main__":
    main()
