"""Where a conversion reads from: checking and describing SRC (a local folder or a Hub repo, with a subfolder), the
error for a missing config.json, and the tokenizer to write beside the converted weights. Shared by
`mlra convert original` and `mlra convert mla`."""

import os
from pathlib import Path

from transformers import AutoTokenizer
from transformers.utils import cached_file, logging

from .writer import ConversionError

logger = logging.get_logger(__name__)
GPT2_TOKENIZER = "openai-community/gpt2"


def describe_source(src: str, subfolder: str) -> str:
    return f"{src} (subfolder {subfolder})" if subfolder else src


def card_source_name(src: str, subfolder: str) -> str:
    """SRC as a model card names it: a Hub repo in full, a local folder by its name only (no path of this machine)."""
    return describe_source(Path(src).name if os.path.isdir(src) else src, subfolder)


def missing_config_error(src: str, subfolder: str) -> ConversionError:
    where = describe_source(src, subfolder)
    if os.path.isdir(src):
        return ConversionError(f"{os.path.join(src, subfolder, 'config.json')}: no such file")
    offline = " (HF_HUB_OFFLINE is set and it is not in the local cache)" if os.environ.get("HF_HUB_OFFLINE") else ""
    return ConversionError(f"{where}: no config.json, neither a local folder nor a reachable Hub repo{offline}")


def check_source(src: str, subfolder: str) -> None:
    """A local path that does not exist is an error here (a Hub id has the form `namespace/name`)."""
    looks_local = os.path.isabs(src) or src.startswith(".") or src.count("/") > 1
    if looks_local and not os.path.isdir(src):
        raise ConversionError(f"{os.path.join(src, subfolder, 'config.json')}: no such file (no folder {src})")


def find_tokenizer(src: str, subfolder: str, tokenizer: str | None, fallback: str | None = GPT2_TOKENIZER):
    """--tokenizer when given; else one saved in SRC; else `fallback` from the local Hugging Face cache (GPT-2's:
    the published models use it but ship none); else None, with a warning."""
    if tokenizer is not None:
        try:
            return AutoTokenizer.from_pretrained(tokenizer)
        except (OSError, ValueError) as error:
            raise ConversionError(f"--tokenizer {tokenizer}: cannot load a tokenizer ({error})") from error
    candidates = [(fallback, dict(local_files_only=True))] if fallback else []
    has_own = any(
        cached_file(src, name, subfolder=subfolder, _raise_exceptions_for_missing_entries=False,
                    _raise_exceptions_for_connection_errors=False)
        for name in ("tokenizer.json", "tokenizer_config.json")
    )
    if has_own:
        candidates.insert(0, (src, dict(subfolder=subfolder)))
    for location, kwargs in candidates:
        try:
            found = AutoTokenizer.from_pretrained(location, **kwargs)
        except (OSError, ValueError):
            continue
        # without tokenizer files AutoTokenizer may still build one holding only special tokens
        if len(found) > len(found.all_special_tokens):
            return found
    logger.warning(f"no tokenizer found in {describe_source(src, subfolder)} (nor {fallback} in the cache): none written")
    return None
