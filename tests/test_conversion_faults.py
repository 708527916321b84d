"""`mlra convert` and loading under faults: corrupted weights, signals, concurrent runs, a folder appearing at OUT,
a failing final move, a full disk. The faults happen for real (a process killed mid-write, two processes, a small
filesystem, a failing rename), not as code paths."""

import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from modeling_mlra import MLRAForCausalLM
from modeling_mlra.cli import main as mlra_main
from modeling_mlra.conversion import writer
from modeling_mlra.conversion.writer import partial_folders

REPO_ROOT = Path(__file__).resolve().parents[1]
REFERENCE = REPO_ROOT / "tests" / "fixtures" / "reference"
SOURCE = REFERENCE / "mla"  # 400 KB of float32 weights: 9 shards of 50KB
SHARDS = ("--max-shard-size", "50KB")


def run_mlra(*argv) -> int:
    try:
        mlra_main([*map(str, argv)])
    except SystemExit as exit_:
        return exit_.code
    return 0


def copy_source(folder: Path, edit=None) -> Path:
    """The reference MLA checkpoint in the authors' format, its weights changed by `edit(state_dict)`."""
    folder.mkdir()
    (folder / "config.json").write_text((SOURCE / "config.json").read_text())
    state_dict = torch.load(SOURCE / "pytorch_model.bin", weights_only=True)
    if edit is not None:
        edit(state_dict)
    torch.save(state_dict, folder / "pytorch_model.bin")
    return folder


def overwrite_bytes(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


# --- broken weights ----------------------------------------------------------------------------------------------


def test_nan_in_an_authors_weight_is_refused_by_convert_naming_file_and_key(tmp_path, capsys):
    src = copy_source(tmp_path / "src", lambda sd: sd["transformer.h.1.attn.q_b_proj.weight"].view(-1)[7].fill_(float("nan")))
    assert run_mlra("convert", "original", src, tmp_path / "out") == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]  # after the progress bar
    assert error.startswith("mlra convert: error: ")
    assert f"{src / 'pytorch_model.bin'}: transformer.h.1.attn.q_b_proj.weight" in error and "NaN or Inf" in error
    assert sorted(path.name for path in tmp_path.iterdir()) == ["src"]


def test_inf_in_an_authors_weight_is_refused_by_from_pretrained_naming_file_and_key(tmp_path):
    src = copy_source(tmp_path / "mla", lambda sd: sd["transformer.wte.weight"].view(-1)[3].fill_(float("-inf")))
    with pytest.raises(ValueError, match=r"pytorch_model.bin: transformer.wte.weight.*NaN or Inf"):
        MLRAForCausalLM.from_pretrained(src)


def test_weights_that_overflow_the_target_dtype_are_refused(tmp_path, capsys):
    src = copy_source(tmp_path / "src", lambda sd: sd["transformer.h.0.mlp.c_fc1.weight"].view(-1)[0].fill_(1e6))
    assert run_mlra("convert", "original", src, tmp_path / "out", "--dtype", "fp16") == 2
    error = capsys.readouterr().err
    assert "transformer.h.0.mlp.c_fc1.weight (as float16) holds NaN or Inf" in error
    assert not (tmp_path / "out").exists()


def test_overwritten_bytes_inside_pytorch_model_bin_fail_its_crc_check(tmp_path, capsys):
    src = copy_source(tmp_path / "src")
    # finite garbage (16777216.0 as float32): no finiteness check could see it
    overwrite_bytes(src / "pytorch_model.bin", 4000, b"\x00\x00\x80\x4b" * 25)
    assert run_mlra("convert", "original", src, tmp_path / "out") == 2
    error = capsys.readouterr().err
    assert f"{src / 'pytorch_model.bin'}: pytorch_model/data/" in error and "fails its CRC-32 check" in error
    assert run_mlra("verify", src) == 1
    assert "fails its CRC-32 check" in capsys.readouterr().err


def test_nan_in_a_deepseek_source_is_refused_by_convert_mla_naming_file_and_key(tmp_path, capsys):
    from test_conversion import deepseek_model
    from transformers import DeepseekV3Config

    source = deepseek_model(DeepseekV3Config, q_lora_rank=24, yarn=False)
    with torch.no_grad():
        source.model.layers[1].self_attn.kv_b_proj.weight[0, 0] = float("nan")
    source.save_pretrained(tmp_path / "src")
    assert run_mlra("convert", "mla", tmp_path / "src", tmp_path / "out", "--mode", "exact") == 2
    assert f"{tmp_path / 'src' / 'model.safetensors'}: model.layers.1.self_attn.kv_b_proj.weight holds NaN" in capsys.readouterr().err


@pytest.fixture(scope="module")
def converted_mla(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("converted") / "mla"
    assert run_mlra("convert", "original", SOURCE, out, *SHARDS) == 0
    return out


def copy_folder(folder: Path, target: Path) -> Path:
    target.mkdir()
    for path in folder.iterdir():
        (target / path.name).write_bytes(path.read_bytes())
    return target


def test_converted_folder_lists_every_file_in_sha256sums_and_verifies(converted_mla, capsys):
    listed = {line.split()[1] for line in (converted_mla / "SHA256SUMS").read_text().splitlines()}
    assert listed == {path.name for path in converted_mla.iterdir()} - {"SHA256SUMS"}
    result = subprocess.run(["sha256sum", "--quiet", "-c", "SHA256SUMS"], cwd=converted_mla, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert run_mlra("verify", converted_mla) == 0
    assert "files match SHA256SUMS" in capsys.readouterr().out


def test_verify_names_a_shard_whose_bytes_were_overwritten(converted_mla, tmp_path, capsys):
    folder = copy_folder(converted_mla, tmp_path / "copy")
    shard = folder / "model-00002-of-00009.safetensors"
    overwrite_bytes(shard, shard.stat().st_size - 200, b"\x00\x4b" * 50)  # finite bfloat16 garbage
    assert run_mlra("verify", folder) == 1
    assert capsys.readouterr().err.strip() == (
        f"mlra verify: {shard}: its sha256 differs from SHA256SUMS: the file is corrupted or was changed"
    )


def test_from_pretrained_refuses_nan_in_our_format_naming_the_tensor(converted_mla, tmp_path):
    folder = copy_folder(converted_mla, tmp_path / "copy")
    shard = next(path for path in sorted(folder.glob("model-*.safetensors")) if "model.norm.weight" in load_file(path))
    tensors = load_file(shard)
    tensors["model.norm.weight"][5] = float("nan")
    save_file(tensors, shard, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"copy: model.norm.weight holds NaN or Inf"):
        MLRAForCausalLM.from_pretrained(folder)


# --- the output folder: signals, concurrent runs, a folder appearing, a failing move, a full disk ---------------

PAUSED_CONVERSION = """
import sys, time
from pathlib import Path
from modeling_mlra.conversion import writer
from modeling_mlra.cli import main

control = Path(sys.argv[1])
save_file = writer.save_file

def save_then_wait(*args, **kwargs):
    save_file(*args, **kwargs)
    (control / "written").touch()  # a shard is on disk in the partial folder
    while not (control / "go").exists():
        time.sleep(0.02)

writer.save_file = save_then_wait
main(sys.argv[2:])
"""


class PausedConversion:
    """`mlra convert original SOURCE out` in another process, paused after its first shard until `resume()`."""

    def __init__(self, tmp_path: Path, out: Path, *options):
        self.control = tmp_path / "control"
        self.control.mkdir()
        env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "HF_HUB_OFFLINE": "1"}
        self.process = subprocess.Popen(
            [sys.executable, "-c", PAUSED_CONVERSION, str(self.control), "convert", "original", str(SOURCE), str(out),
             *SHARDS, *options],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        deadline = time.monotonic() + 300
        while not (self.control / "written").exists():
            assert self.process.poll() is None, self.process.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "the conversion never wrote a shard"
            time.sleep(0.05)

    def resume(self) -> tuple[int, str]:
        (self.control / "go").touch()
        _, stderr = self.process.communicate(timeout=300)
        return self.process.returncode, stderr


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_sigterm_mid_write_removes_the_partial_folder(tmp_path, signum):
    out = tmp_path / "outputs" / "out"
    conversion = PausedConversion(tmp_path, out)
    assert len(partial_folders(out)) == 1
    conversion.process.send_signal(signum)
    _, stderr = conversion.process.communicate(timeout=120)
    assert conversion.process.returncode == 128 + signum
    assert stderr.strip().splitlines()[-1] == (
        f"mlra convert: stopped by {signal.Signals(signum).name}; nothing was written to {out}"
    )
    assert list(out.parent.iterdir()) == []


def test_a_later_run_removes_the_partial_folder_of_a_killed_one(tmp_path):
    out = tmp_path / "outputs" / "out"
    conversion = PausedConversion(tmp_path, out)
    conversion.process.kill()
    conversion.process.wait(timeout=60)
    left = partial_folders(out)
    assert len(left) == 1 and any(left[0].glob("*.safetensors"))  # SIGKILL leaves it: nothing can run
    assert run_mlra("convert", "original", SOURCE, out, *SHARDS) == 0
    assert sorted(path.name for path in out.parent.iterdir()) == ["out"]
    MLRAForCausalLM.from_pretrained(out)


def test_of_two_concurrent_runs_into_one_folder_the_second_is_refused(tmp_path, capsys):
    out = tmp_path / "outputs" / "out"
    first = PausedConversion(tmp_path, out)
    for options in ((), ("--overwrite",)):
        assert run_mlra("convert", "original", SOURCE, out, *SHARDS, *options) == 2
        error = capsys.readouterr().err
        assert f"another conversion is writing {out} now" in error, error
    returncode, stderr = first.resume()
    assert returncode == 0, stderr[-3000:]
    assert sorted(path.name for path in out.parent.iterdir()) == ["out"]
    MLRAForCausalLM.from_pretrained(out)


@pytest.mark.parametrize("contents", [[], ["mine.txt"]])
def test_a_folder_made_at_out_during_a_run_is_left_untouched(tmp_path, contents):
    out = tmp_path / "outputs" / "out"
    conversion = PausedConversion(tmp_path, out)
    out.mkdir()  # an empty folder too: a plain rename would replace it
    for name in contents:
        (out / name).write_text("not the conversion's")
    returncode, stderr = conversion.resume()
    assert returncode == 2
    assert stderr.strip().splitlines()[-1] == (
        f"mlra convert: error: output folder {out} appeared while converting; it was left as it is (pass --overwrite "
        "to replace it)"
    )
    assert sorted(path.name for path in out.iterdir()) == contents
    assert sorted(path.name for path in out.parent.iterdir()) == ["out"]


def test_overwrite_keeps_the_old_folder_when_the_final_move_fails(tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("previous conversion")

    def failing_rename(source, target, flags):
        raise OSError(errno.EIO, "Input/output error", str(source), None, str(target))

    monkeypatch.setattr(writer, "renameat2", failing_rename)
    assert run_mlra("convert", "original", SOURCE, out, "--overwrite") == 2
    assert "Input/output error" in capsys.readouterr().err
    assert [path.name for path in out.iterdir()] == ["keep.txt"]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["out"]


def test_overwrite_without_renameat2_restores_the_old_folder_when_the_move_fails(tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("previous conversion")
    rename = os.rename

    def no_renameat2(source, target, flags):
        raise OSError(errno.ENOSYS, "renameat2 is not available")

    def failing_move_of_the_new_folder(source, target):
        if str(source).endswith(".partial"):
            raise OSError(errno.EIO, "Input/output error", str(source))
        rename(source, target)

    monkeypatch.setattr(writer, "renameat2", no_renameat2)
    monkeypatch.setattr(os, "rename", failing_move_of_the_new_folder)
    assert run_mlra("convert", "original", SOURCE, out, "--overwrite") == 2
    assert [path.name for path in out.iterdir()] == ["keep.txt"]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["out"]
    monkeypatch.setattr(os, "rename", rename)
    assert run_mlra("convert", "original", SOURCE, out, "--overwrite") == 0
    assert (out / "config.json").exists() and sorted(path.name for path in tmp_path.iterdir()) == ["out"]


@pytest.fixture
def full_disk(tmp_path, monkeypatch):
    """A folder on a 128 KB tmpfs (mounted when this process may mount), else one where writing a shard fails as
    safetensors does on a full disk."""
    mount = tmp_path / "small"
    mount.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=128k", "tmpfs", str(mount)], capture_output=True)
    if mounted.returncode != 0:
        from safetensors import SafetensorError

        def no_space(*args, **kwargs):
            raise SafetensorError('Error while serializing: I/O error: No space left on device (os error 28)')

        monkeypatch.setattr(writer, "save_file", no_space)
    yield mount
    if mounted.returncode == 0:
        subprocess.run(["umount", str(mount)], check=True)


def test_a_full_disk_is_one_line_and_leaves_nothing(full_disk, capsys):
    out = full_disk / "out"
    assert run_mlra("convert", "original", SOURCE, out, *SHARDS) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]  # after the progress bar
    assert error.startswith(f"mlra convert: error: {out.parent}/.out.")
    assert "cannot write the shard" in error and ("No space left on device" in error or "StorageFull" in error)
    assert list(full_disk.iterdir()) == []
