"""The regular (non-editable) wheel: the top-level eval/ and conversion/ folders install inside the package, and the
embedded default model ships and runs from it."""

import os
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT / "tests" / "fixtures" / "reference"
SETUPTOOLS = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    """The wheel built from a copy of the sources (the build writes build/ and *.egg-info next to them)."""
    work = tmp_path_factory.mktemp("wheel")
    source = work / "source"
    for folder in sorted(set(SETUPTOOLS["package-dir"].values())):
        shutil.copytree(ROOT / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", work / "dist"]
    subprocess.run([*map(str, command), str(source)], check=True, capture_output=True, timeout=300)
    (path,) = (work / "dist").glob("modeling_mlra-*.whl")
    return path


def test_wheel_holds_eval_conversion_with_its_card_template_and_the_default_model(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    for package, folder in SETUPTOOLS["package-dir"].items():
        expected = {
            f"{package.replace('.', '/')}/{path.relative_to(ROOT / folder).as_posix()}"
            for path in (ROOT / folder).glob("*.py")
        }
        assert expected <= set(names), package
    assert "modeling_mlra/eval/paper_results.json" in names
    assert zipfile.ZipFile(wheel).read("modeling_mlra/conversion/hub_card.md") == (ROOT / "hub_card.md").read_bytes()
    for name in ("model.safetensors", "config.json", "generation_config.json", "tokenizer.json", "README.md"):
        assert f"modeling_mlra/default_model/{name}" in names
    assert not [name for name in names if name.startswith("modeling_mlra/default_model/") and name.endswith(".py")]
    (entry_points,) = [name for name in names if name.endswith(".dist-info/entry_points.txt")]
    assert "mlra = modeling_mlra.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory):
    """The wheel installed into a folder of its own (no dependencies: those of this environment serve)."""
    target = tmp_path_factory.mktemp("site")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    return target


def test_mlra_eval_runs_from_the_installed_wheel_without_the_repository(installed, tmp_path):
    environment = {**os.environ, "PYTHONPATH": str(installed), "OMP_NUM_THREADS": "1"}
    # What the installed `mlra` script runs (entry point modeling_mlra.cli:main), from outside the repository.
    program = (
        "import sys, modeling_mlra.eval.paper_results as paper, modeling_mlra.cli as cli\n"
        "paper.load_paper_results()\n"
        "print(paper.__file__)\n"
        "cli.main(['eval', 'ppl', '--help'])\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, env=environment, cwd=tmp_path, timeout=300
    )
    assert result.returncode == 0, result.stderr
    location, usage = result.stdout.split("\n", 1)
    assert Path(location).is_relative_to(installed)
    assert "--block-size" in usage and "--max-tokens" in usage


def test_mlra_generate_runs_the_embedded_model_from_the_installed_wheel(installed, tmp_path):
    """The default model folder inside the installed package loads through the package (it holds no code)."""
    environment = {**os.environ, "PYTHONPATH": str(installed), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    program = (
        "import modeling_mlra.cli as cli\n"
        "print(cli.DEFAULT_MODEL)\n"
        "cli.main(['generate', '--max-new-tokens', '4', '--device', 'cpu'])\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, env=environment, cwd=tmp_path, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    location, output = result.stdout.split("\n", 1)
    assert Path(location).is_relative_to(installed)
    assert output.startswith("def fibonacci(n):") and "[4 tokens in " in output


def test_mlra_convert_runs_from_the_installed_wheel_without_the_repository(installed, tmp_path):
    """The model card template comes from inside the installed package."""
    environment = {**os.environ, "PYTHONPATH": str(installed), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    program = "import modeling_mlra.conversion.hub_card as h, sys; print(h.__file__); from modeling_mlra.cli import main; main(sys.argv[1:])"
    result = subprocess.run(
        [sys.executable, "-c", program, "convert", "original", str(REFERENCE / "mla"), str(tmp_path / "out")],
        env=environment, cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert Path(result.stdout.split("\n", 1)[0]).is_relative_to(installed)
    assert "# out" in (tmp_path / "out" / "README.md").read_text()
