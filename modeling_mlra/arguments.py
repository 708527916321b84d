"""Checks of `mlra` command-line arguments, shared by its subcommands.

A bad argument raises `CommandLineError` naming the argument and the real cause; `mlra` reports it as one line on
stderr with exit code 2, without a traceback.
"""

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id


class CommandLineError(Exception):
    """A bad command-line argument; the message names it and says what to do."""


@contextmanager
def reported_as(argument: str) -> Iterator[None]:
    """Turn a ValueError or OSError raised inside (a loader refusing a file, a config refusing a size) into a
    CommandLineError about `argument`, e.g. `"--model my_folder"`."""
    try:
        yield
    except CommandLineError:
        raise
    except (ValueError, OSError) as error:
        raise CommandLineError(f"{argument}: {error}") from error


def check_model_location(option: str, location: str, subfolder: str = "") -> None:
    """`location` (the value of `option`) must be an existing folder (holding `subfolder`, if given) or a Hub repo
    id; a Hub repo id is left to the loader, which knows whether it is cached or reachable."""
    path = Path(location).expanduser()
    if path.is_dir():
        if subfolder and not (path / subfolder).is_dir():
            raise CommandLineError(f"{option} {location}: the folder has no subfolder {subfolder!r} (--subfolder)")
        return
    if path.exists():
        raise CommandLineError(f"{option} {location} is a file, not a folder (or a Hub repo id)")
    try:
        validate_repo_id(location)
    except HFValidationError:
        raise CommandLineError(f"{option} {location}: the folder does not exist") from None
    check_hub_reachable(option, location)


def check_hub_reachable(option: str, repo_id: str) -> None:
    """A Hub repo id needs the Hub unless HF_HUB_OFFLINE is set: one request without retries tells, where the loaders
    would retry every file for about a minute and then report a missing file."""
    from huggingface_hub import constants, get_session, is_offline_mode

    if is_offline_mode():
        return
    try:
        get_session().head(constants.ENDPOINT, timeout=10)
    except Exception as error:  # the HTTP client's connection, proxy and timeout errors
        raise CommandLineError(
            f"{option} {repo_id}: the Hugging Face Hub ({constants.ENDPOINT}) is unreachable ({type(error).__name__}: "
            f"{error}); connect to it, pass a local folder, or set HF_HUB_OFFLINE=1 to use the local Hugging Face "
            "cache only"
        ) from None


def check_files(option: str, paths: list[str]) -> None:
    """Every path given to `option` must be an existing file."""
    for path in paths:
        if not Path(path).is_file():
            state = "is a folder, not a file" if Path(path).is_dir() else "does not exist"
            raise CommandLineError(f"{option} {path}: the file {state}")


def check_text(option: str, text: str) -> None:
    """Command-line text must be UTF-8 (Python keeps other bytes as lone surrogates, which no tokenizer encodes)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        byte = ord(text[error.start]) - 0xDC00
        shown = f"byte 0x{byte:02x}" if 0x80 <= byte <= 0xFF else f"character {text[error.start]!r}"
        raise CommandLineError(f"{option}: {shown} at position {error.start} is not UTF-8: pass the text in UTF-8") from None


def check_at_least(option: str, value: float | None, minimum: float) -> None:
    if value is not None and value < minimum:
        raise CommandLineError(f"{option} {value}: must be at least {minimum}")


def check_vocabulary_fits(tokenizer_name: str, tokenizer_size: int, vocab_size: int) -> None:
    """Every id the tokenizer can produce must index the model's embedding."""
    if tokenizer_size > vocab_size:
        raise CommandLineError(
            f"{tokenizer_name} has {tokenizer_size} tokens but the model's vocabulary holds {vocab_size} "
            "(config.vocab_size): use the tokenizer the model was trained with"
        )


__all__ = [
    "CommandLineError", "check_at_least", "check_files", "check_model_location", "check_text", "check_vocabulary_fits"
]
