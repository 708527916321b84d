"""`mlra convert`: the authors' checkpoints and MLA models into folders that plain transformers loads."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import DeepseekV2Config, DeepseekV2ForCausalLM, DeepseekV3Config, DeepseekV3ForCausalLM

from modeling_mlra import VARIANTS, MLRAConfig, MLRAForCausalLM
from modeling_mlra.cli import main as mlra_main
from modeling_mlra.conversion.hub_card import CardInfo, render_hub_card
from modeling_mlra.conversion.mla import to_tensor_parallel
from modeling_mlra.conversion.original import convert_original
from modeling_mlra.conversion.writer import ConversionError
from modeling_mlra.eval.paper_results import load_paper_results
from test_loading import write_authors_mlra_4

REPO_ROOT = Path(__file__).resolve().parents[1]
REFERENCE = REPO_ROOT / "tests" / "fixtures" / "reference"
VARIANT_FOLDERS = sorted(p.name for p in REFERENCE.iterdir() if (p / "pytorch_model.bin").exists())
HELDOUT = REPO_ROOT / "tests" / "fixtures" / "heldout_python.txt"
TINY_MLA = REPO_ROOT / "models" / "tiny_mla"


def isolated_env(tmp_path: Path) -> dict:
    """A process that cannot import this package from the working tree (-I also ignores PYTHONPATH)."""
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"))
    return env


def run_cli(*argv) -> int:
    try:
        mlra_main(["convert", *map(str, argv)])
    except SystemExit as exit_:
        return exit_.code
    return 0


def char_tokenizer(folder: Path):
    """A character-level tokenizer of < 128 ids, so its ids fit the reference models' vocabulary."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 ():=_,.+-*\n"))
    vocab = {"<unk>": 0, **{char: i + 1 for i, char in enumerate(alphabet)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", eos_token="<unk>")
    fast.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """Every reference variant converted in float32 and bfloat16 (and the sharded one), then loaded in ONE fresh
    process that never imports this package, with `trust_remote_code=True`; that process also runs the model
    card's plain-transformers usage code. Returns the folders and what the process measured."""
    root = tmp_path_factory.mktemp("converted")
    tokenizer = char_tokenizer(root / "tokenizer")
    folders = {}
    for variant in VARIANT_FOLDERS:
        for dtype in ("float32", "bfloat16"):
            folders[f"{variant}/{dtype}"] = convert_original(
                str(REFERENCE / variant), root / dtype / variant, dtype=getattr(torch, dtype), max_shard_size="50KB",
                tokenizer=str(tokenizer) if variant == "mlra_4" and dtype == "float32" else None,
            )
    folders["sharded/float32"] = convert_original(str(REFERENCE / "sharded" / "mlra_4"), root / "sharded" / "mlra_4")
    sources = {**{name: name.split("/")[0] for name in folders}, "sharded/float32": "sharded/mlra_4"}
    readme = (folders["mlra_4/float32"] / "README.md").read_text()
    usage = re.findall(r"```python\n(.*?)```", readme, re.S)
    checks = {
        name: (str(folder), str(REFERENCE / sources[name] / "expected.safetensors"))
        for name, folder in folders.items()
    }
    script = f"""
import json, sys, torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM
results = {{}}
for name, (folder, expected) in {checks!r}.items():
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
    reference = load_file(expected)
    with torch.no_grad():
        logits = model(reference['input_ids']).logits.float()
    results[name] = dict(
        diff=(logits - reference['logits']).abs().max().item(), scale=reference['logits'].abs().max().item(),
        agreement=(logits.argmax(-1) == reference['logits'].argmax(-1)).float().mean().item(),
        module=type(model).__module__, dtype=str(next(model.parameters()).dtype),
    )
exec({usage[0]!r})
results['usage_output'] = tokenizer.decode(output[0])
results['package_imported'] = 'modeling_mlra' in sys.modules
print(json.dumps(results))
"""
    result = subprocess.run(
        [sys.executable, "-I", "-c", script], env=isolated_env(root), cwd=root, capture_output=True, text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return folders, json.loads(result.stdout.splitlines()[-1]), usage


@pytest.mark.parametrize("variant", VARIANT_FOLDERS + ["sharded"])
def test_converted_reference_loads_with_plain_transformers_and_gives_authors_logits(converted, variant):
    folders, results, _ = converted
    measured = results[f"{variant}/float32"]
    assert measured["module"].startswith("transformers_modules.")
    assert measured["diff"] <= 1e-4, measured


@pytest.mark.parametrize("variant", VARIANT_FOLDERS)
def test_bfloat16_conversion_stays_within_bf16_tolerance(converted, variant):
    measured = converted[1][f"{variant}/bfloat16"]
    assert measured["dtype"] == "torch.bfloat16"
    assert measured["diff"] <= 0.05 * measured["scale"] and measured["agreement"] >= 0.9, measured


def test_fresh_process_never_imported_the_package(converted):
    assert converted[1]["package_imported"] is False


def test_converted_folder_holds_shards_index_modeling_files_and_card(converted):
    folder = converted[0]["mlra_4/float32"]
    names = {path.name for path in folder.iterdir()}
    assert {"config.json", "generation_config.json", "README.md", "model.safetensors.index.json"} <= names
    assert {"modeling_mlra.py", "configuration_mlra.py", "original_checkpoint.py", "mlra_decode_kernel.py"} <= names
    assert len([name for name in names if name.endswith(".safetensors")]) > 1
    config = json.loads((folder / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_mlra.MLRAForCausalLM"
    assert config["variant"] == "mlra_4" and config["model_type"] == "mlra"
    assert {"tokenizer.json", "tokenizer_config.json"} <= names
    assert not list(folder.parent.glob(".*partial"))


def test_card_usage_with_the_package_installed_runs(converted, tmp_path):
    folders, results, usage = converted
    assert results["usage_output"].startswith("def fibonacci(n):")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO_ROOT)}
    result = subprocess.run([sys.executable, "-c", usage[1]], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith("def fibonacci(n):")


def test_conversion_peak_memory_stays_below_one_and_a_half_checkpoints(tmp_path):
    file_bytes = write_authors_mlra_4(tmp_path / "mlra_4")
    script = (
        "import re, torch\n"
        "from modeling_mlra.conversion.original import convert_original\n"
        "def status(field):\n"
        "    return int(re.search(field + r':\\s+(\\d+) kB', open('/proc/self/status').read()).group(1)) * 1024\n"
        "before = status('VmRSS')\n"
        f"convert_original({str(tmp_path / 'mlra_4')!r}, {str(tmp_path / 'out')!r}, max_shard_size='20MB')\n"
        "print(status('VmHWM') - before)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    peak_growth = int(result.stdout.split()[-1])
    # the memory-mapped float32 source (1x) plus one 20 MB shard; holding two copies would be >= 2x
    assert peak_growth < 1.5 * file_bytes, f"peak grew {peak_growth / 2**20:.0f} MiB for a {file_bytes / 2**20:.0f} MiB file"
    assert len(list((tmp_path / "out").glob("model-*.safetensors"))) >= 4


# --- bad input ---------------------------------------------------------------------------------------------------


def test_existing_output_is_refused_without_overwrite(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    assert run_cli("original", REFERENCE / "mla", out) == 2
    assert capsys.readouterr().err.strip() == f"mlra convert: error: output folder {out} exists; pass --overwrite to replace it"
    assert run_cli("original", REFERENCE / "mla", out, "--overwrite") == 0
    assert (out / "config.json").exists()


def test_missing_weights_are_named(tmp_path, capsys):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "config.json").write_text((REFERENCE / "mla" / "config.json").read_text())
    assert run_cli("original", tmp_path / "src", tmp_path / "out") == 2
    error = capsys.readouterr().err
    assert "no pytorch_model.bin" in error and str(tmp_path / "src") in error and len(error.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_missing_source_folder_names_the_config_file(tmp_path, capsys):
    assert run_cli("original", tmp_path / "nowhere", tmp_path / "out") == 2
    assert str(tmp_path / "nowhere" / "config.json") in capsys.readouterr().err


def test_unknown_architecture_is_refused(tmp_path, capsys):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert run_cli("mla", tmp_path / "src", tmp_path / "out", "--mode", "exact") == 2
    assert "unknown architecture (model_type 'llama')" in capsys.readouterr().err
    assert run_cli("original", tmp_path / "src", tmp_path / "out") == 2
    assert "not the authors' format" in capsys.readouterr().err


def test_failure_midway_leaves_nothing_behind_and_keeps_the_old_output(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text((REFERENCE / "mla" / "config.json").read_text())
    state_dict = torch.load(REFERENCE / "mla" / "pytorch_model.bin", weights_only=True)
    del state_dict["transformer.h.1.mlp.c_proj.weight"]  # late in the stream: earlier shards are written by then
    torch.save(state_dict, src / "pytorch_model.bin")
    with pytest.raises(KeyError, match="transformer.h.1.mlp.c_proj.weight"):
        convert_original(str(src), tmp_path / "new", max_shard_size="20KB")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["src"]
    old = tmp_path / "old"
    old.mkdir()
    (old / "keep.txt").write_text("previous conversion")
    with pytest.raises(KeyError):
        convert_original(str(src), old, max_shard_size="20KB", overwrite=True)
    assert [path.name for path in old.iterdir()] == ["keep.txt"]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["old", "src"]


def test_unreachable_hub_repo_while_offline_is_one_clear_line(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "empty"), "PYTHONPATH": str(REPO_ROOT)}
    result = subprocess.run(
        [sys.executable, "-m", "modeling_mlra", "convert", "original", "Soughing/MLRA", str(tmp_path / "out"),
         "--subfolder", "main/mlra_4"],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        "mlra convert: error: Soughing/MLRA (subfolder main/mlra_4): no config.json, neither a local folder nor a "
        "reachable Hub repo (HF_HUB_OFFLINE is set and it is not in the local cache)"
    )
    assert not (tmp_path / "out").exists()


def test_push_to_hub_uploads_the_folder_through_huggingface_hub(tmp_path, monkeypatch):
    import huggingface_hub

    calls = []
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", lambda self, repo_id, **kw: calls.append(("create", repo_id, kw)) or huggingface_hub.RepoUrl(f"https://huggingface.co/{repo_id}"))
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", lambda self, **kw: calls.append(("upload", kw)) or "commit-url")
    assert run_cli("original", REFERENCE / "gla_2", tmp_path / "out", "--push-to-hub", "someone/gla_2-hf") == 0
    assert calls[0] == ("create", "someone/gla_2-hf", {"exist_ok": True})
    assert calls[1][1]["folder_path"] == tmp_path / "out" and calls[1][1]["repo_id"] == "someone/gla_2-hf"
    assert 'from_pretrained("someone/gla_2-hf", trust_remote_code=True)' in (tmp_path / "out" / "README.md").read_text()


# --- MLA models into the family ----------------------------------------------------------------------------------

DEEPSEEK_CASES = {
    "v3_q_lora_interleaved_yarn": (DeepseekV3Config, dict(q_lora_rank=24, rope_interleave=True, yarn=True)),
    "v3_no_q_lora_rotate_half": (DeepseekV3Config, dict(q_lora_rank=None, rope_interleave=False, yarn=False)),
    "v2_q_lora_yarn": (DeepseekV2Config, dict(q_lora_rank=24, yarn=True)),
    "v2_no_q_lora": (DeepseekV2Config, dict(q_lora_rank=None, yarn=False)),
}


def deepseek_model(config_class, q_lora_rank, yarn, rope_interleave=None, layers=2, dense_layers=2):
    """A tiny DeepSeek-V2/V3 model, dense layers, every weight random (d_v != d_n on purpose)."""
    fields = dict(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=4, q_lora_rank=q_lora_rank, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4,
        v_head_dim=6, first_k_dense_replace=dense_layers, max_position_embeddings=64, tie_word_embeddings=False,
        n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, n_group=1, topk_group=1,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
        rope_parameters=dict(
            rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=16, mscale=0.707,
            mscale_all_dim=1.0, beta_fast=32, beta_slow=1,
        ) if yarn else dict(rope_type="default", rope_theta=10000.0),
    )
    if rope_interleave is not None:
        fields["rope_interleave"] = rope_interleave
    config = config_class(**fields)
    config._attn_implementation = "eager"
    model = (DeepseekV3ForCausalLM if config_class is DeepseekV3Config else DeepseekV2ForCausalLM)(config)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            param.copy_(1 + 0.1 * noise if name.endswith("norm.weight") else 0.3 * noise)
    return model.eval()


@pytest.mark.parametrize("case", DEEPSEEK_CASES)
def test_exact_conversion_of_deepseek_equals_transformers_forward_and_greedy_tokens(case, tmp_path):
    config_class, options = DEEPSEEK_CASES[case]
    source = deepseek_model(config_class, **options)
    source.save_pretrained(tmp_path / "src")
    assert run_cli("mla", tmp_path / "src", tmp_path / "out", "--mode", "exact") == 0
    ours = MLRAForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert ours.config.num_latent_blocks == 1 and ours.config.attn_output_scale == 1.0
    ids = torch.randint(3, 64, (2, 40), generator=torch.Generator().manual_seed(1))  # past YaRN's 16 positions
    with torch.no_grad():
        expected = source(ids).logits
        logits = ours(ids, use_cache=False).logits
        assert (logits - expected).abs().max().item() <= 1e-4
        greedy = dict(max_new_tokens=10, do_sample=False, pad_token_id=0)
        assert torch.equal(ours.generate(ids[:, :8], **greedy), source.generate(ids[:, :8], **greedy))


def test_yarn_correction_changes_the_softmax_scale_as_deepseek_does():
    from modeling_mlra.modeling_mlra import MLRAAttention

    yarn = dict(rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=16, mscale_all_dim=1.0)
    config = MLRAConfig(qk_nope_head_dim=8, qk_rope_head_dim=4, rope_parameters=yarn, max_position_embeddings=64)
    mscale = 0.1 * 1.0 * torch.log(torch.tensor(4.0)).item() + 1.0
    assert MLRAAttention(config, 0).scaling == pytest.approx(12**-0.5 * mscale**2)


def test_mixture_of_experts_layers_are_refused_naming_the_layer(tmp_path, capsys):
    deepseek_model(DeepseekV3Config, q_lora_rank=24, yarn=False, dense_layers=1).config.save_pretrained(tmp_path / "src")
    assert run_cli("mla", tmp_path / "src", tmp_path / "out", "--mode", "exact") == 2
    error = capsys.readouterr().err
    assert "layer 1 is a mixture-of-experts layer" in error and "not supported yet" in error


def test_exact_conversion_of_the_authors_mla_reproduces_their_logits(tmp_path):
    assert run_cli("mla", REFERENCE / "mla", tmp_path / "out", "--mode", "exact") == 0
    reference = load_file(REFERENCE / "mla" / "expected.safetensors")
    with torch.no_grad():
        logits = MLRAForCausalLM.from_pretrained(tmp_path / "out")(reference["input_ids"]).logits
    assert (logits - reference["logits"]).abs().max().item() <= 1e-4


def test_authors_non_mla_checkpoint_is_refused_by_convert_mla(tmp_path, capsys):
    assert run_cli("mla", REFERENCE / "mlra_2", tmp_path / "out", "--mode", "exact") == 2
    assert "the weights are mlra_2, not MLA" in capsys.readouterr().err


@pytest.mark.parametrize("rotation", ["none", "hadamard", "pca"])
def test_folding_and_rotating_the_latent_is_exact_before_slicing(rotation):
    """With one block the TPLA rewrite changes only the basis of the latent: the logits must not move."""
    source = MLRAForCausalLM.from_pretrained(TINY_MLA).eval()
    ids = torch.randint(0, 2048, (2, 32), generator=torch.Generator().manual_seed(0))
    converted = to_tensor_parallel(source, blocks=1, rotation=rotation, calibration_ids=ids)
    assert converted.config.latent_norm == "shared"
    with torch.no_grad():
        assert (converted(ids).logits - source(ids).logits).abs().max().item() <= 1e-4


def test_tp_conversion_of_tiny_mla_writes_four_blocks_and_prints_its_measured_error(tmp_path, capsys):
    assert run_cli(
        "mla", TINY_MLA, tmp_path / "out", "--mode", "tp", "--blocks", "4", "--rotation", "pca",
        "--calibration", HELDOUT,
    ) == 0
    printed = capsys.readouterr().out
    match = re.search(r"perplexity ([\d.]+) -> ([\d.]+), KL ([\d.]+)", printed)
    assert match, printed
    before, after, kl = map(float, match.groups())
    print(f"tp conversion (4 blocks, pca) of tiny_mla: perplexity {before} -> {after}, KL {kl}")
    assert 0 < kl < 1 and after == pytest.approx(before, rel=0.5)
    converted = MLRAForCausalLM.from_pretrained(tmp_path / "out")
    assert (converted.config.num_latent_blocks, converted.config.num_softmax_branches) == (4, 4)
    assert converted.config.latent_norm == "shared" and converted.config.attn_output_scale == 1.0
    assert "TPLA form" in (tmp_path / "out" / "README.md").read_text()


# --- the model card and the wheel --------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
def test_hub_card_renders_for_every_variant_with_the_papers_numbers_where_reported(variant):
    config = MLRAConfig.from_variant(variant, dtype="bfloat16")
    card = render_hub_card(config, CardInfo(repo_id="someone/model", provenance="test", tokenizer_id="openai-community/gpt2"))
    metadata = yaml.safe_load(card.split("---")[1])
    assert metadata["library_name"] == "transformers" and metadata["pipeline_tag"] == "text-generation"
    assert metadata["license"] and variant in metadata["tags"]
    assert "@inproceedings{" in card and "## Limitations" in card
    per_gpu = {1: 576, 2: 576, 4: 576, 8: 576} if variant.startswith("mla") else None
    if per_gpu:
        assert "| 4 | 576 |" in card
    elif variant.startswith("gla_2"):
        assert "| 2 | 320 |" in card and "| 4 | 320 |" in card
    else:
        assert "| 4 | 192 |" in card
    rows = load_paper_results()["perplexity"]["rows"]
    if variant in rows:
        results = metadata["model-index"][0]["results"]
        values = {r["dataset"]["name"]: r["metrics"][0]["value"] for r in results}
        assert values["Wikipedia"] == rows[variant]["Wikipedia"]
        assert all("authors" in r["source"]["name"] for r in results)
        assert "Results reported by the authors" in card
    else:
        assert "model-index" not in metadata and "Results reported by the authors" not in card
