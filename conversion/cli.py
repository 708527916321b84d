"""`mlra convert original SRC OUT ...` and `mlra convert mla SRC OUT --mode exact|tp ...`."""

import argparse
import signal
import sys
from pathlib import Path

from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id

from modeling_mlra.arguments import check_hub_reachable
from modeling_mlra.cli import DTYPE_NAMES

from .writer import DEFAULT_MAX_SHARD_SIZE, ConversionError, check_shard_size

DTYPE_CHOICES = tuple(DTYPE_NAMES)


def add_convert_arguments(parser: argparse.ArgumentParser) -> None:
    sources = parser.add_subparsers(dest="source", required=True)
    original = sources.add_parser(
        "original", help="the authors' checkpoint (nanoGPT format, e.g. Soughing/MLRA --subfolder main/mlra_4)"
    )
    original.add_argument("src", help="local folder or Hub repo id")
    original.add_argument("out", type=Path, help="output folder (written whole, or not at all)")
    original.add_argument("--subfolder", default="", help="folder inside SRC holding the checkpoint")
    original.add_argument("--variant", help="family member, e.g. mlra_2_no_scale (default: folder name, then shapes)")
    original.add_argument(
        "--tokenizer", help="tokenizer folder or Hub id to save beside the weights (default: SRC's, then GPT-2's "
        "from the local cache)"
    )
    mla = sources.add_parser(
        "mla", help="an MLA model (transformers deepseek_v2/deepseek_v3 with dense MLPs, our mla, the authors' mla)"
    )
    mla.add_argument("src", help="local folder or Hub repo id")
    mla.add_argument("out", type=Path, help="output folder (written whole, or not at all)")
    mla.add_argument("--subfolder", default="", help="folder inside SRC holding the checkpoint")
    mla.add_argument("--mode", choices=("exact", "tp"), required=True,
                     help="exact: the family member MLA; tp: L = B = --blocks with a shared latent norm (TPLA)")
    mla.add_argument("--blocks", type=int, choices=(2, 4), help="tp: latent blocks = softmax branches (default 4)")
    mla.add_argument("--rotation", choices=("none", "hadamard", "pca"),
                     help="tp: orthogonal rotation of the latent before it is sliced (default hadamard)")
    mla.add_argument("--calibration", type=Path, help="tp with --rotation pca: a text file to fit the rotation on")
    mla.add_argument("--tokenizer", help="tokenizer folder or Hub id (default: SRC's); tp's calibration needs one")
    for command in (original, mla):
        command.add_argument("--dtype", default="float32", choices=DTYPE_CHOICES, help="dtype of the written weights")
        command.add_argument("--max-shard-size", default=DEFAULT_MAX_SHARD_SIZE, help="e.g. 5GB, 500MB")
        command.add_argument("--push-to-hub", metavar="REPO", help="upload the folder to this Hub repo afterwards")
        command.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")


def push_to_hub(folder: Path, repo_id: str) -> str:
    """Create the repo if needed and upload the folder; returns the commit URL."""
    from huggingface_hub import HfApi

    api = HfApi()
    repo_id = api.create_repo(repo_id, exist_ok=True).repo_id
    commit = api.upload_folder(folder_path=folder, repo_id=repo_id, commit_message=f"Upload {folder.name} (mlra convert)")
    return str(commit)


def is_repo_id(location: str) -> bool:
    try:
        validate_repo_id(location)
    except HFValidationError:
        return False
    return True


def check_convert_options(options) -> None:
    """Options that cannot apply, checked before any work."""
    from huggingface_hub import is_offline_mode

    check_shard_size(options.max_shard_size)
    if options.push_to_hub and is_offline_mode():
        raise ConversionError(f"--push-to-hub {options.push_to_hub}: HF_HUB_OFFLINE is set; unset it to upload")
    for option, location in (("SRC", options.src), ("--tokenizer", options.tokenizer)):
        if location is not None and not Path(location).is_dir() and is_repo_id(location):
            check_hub_reachable(option, location)
    if options.source != "mla":
        return
    if options.mode == "exact":
        given = [f"--{name}" for name in ("blocks", "rotation", "calibration") if getattr(options, name) is not None]
        if given:
            raise ConversionError(f"{', '.join(given)}: only for --mode tp (--mode exact converts into MLA as it is)")
        return
    options.blocks = 4 if options.blocks is None else options.blocks
    options.rotation = options.rotation or "hadamard"
    if options.rotation == "pca" and options.calibration is None:
        raise ConversionError("--rotation pca needs --calibration FILE (text to fit the rotation on)")


def run_convert(options) -> None:
    """Dispatch `mlra convert ...`; bad input prints one line and exits with status 2; SIGINT, SIGTERM and SIGHUP
    one line and 128 + the signal's number. Neither leaves anything at OUT."""
    from .mla import convert_mla
    from .original import convert_original

    dtype = DTYPE_NAMES[options.dtype]
    common = dict(
        subfolder=options.subfolder, dtype=dtype, tokenizer=options.tokenizer, max_shard_size=options.max_shard_size,
        overwrite=options.overwrite, repo_id=options.push_to_hub,
    )
    try:
        check_convert_options(options)
        if options.source == "original":
            out = convert_original(options.src, options.out, variant=options.variant, **common)
        else:
            out = convert_mla(
                options.src, options.out, mode=options.mode, blocks=options.blocks, rotation=options.rotation,
                calibration=options.calibration, **common,
            )
    except (ConversionError, OSError, KeyError, ValueError) as error:
        message = error.args[0] if isinstance(error, KeyError) and error.args else error
        print(f"mlra convert: error: {message}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt as interrupt:
        signum = getattr(interrupt, "signum", signal.SIGINT)
        print(f"mlra convert: stopped by {signal.Signals(signum).name}; nothing was written to {options.out}", file=sys.stderr)
        sys.exit(128 + signum)
    print(f"wrote {out}")
    if options.push_to_hub:
        try:
            commit = push_to_hub(out, options.push_to_hub)
        except Exception as error:  # the network, the token, the repo's permissions: the folder is complete anyway
            print(f"mlra convert: error: --push-to-hub {options.push_to_hub}: the upload failed ({type(error).__name__}: "
                  f"{' '.join(str(error).split())}); the converted folder is {out}", file=sys.stderr)
            sys.exit(2)
        print(f"uploaded to {options.push_to_hub}: {commit}")
