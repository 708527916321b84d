"""Loading the authors' checkpoints as published (docs/design.md section 4) and our own format."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from modeling_mlra import MLRAForCausalLM

REFERENCE = Path(__file__).parent / "fixtures" / "reference"
VARIANTS = sorted(p.name for p in REFERENCE.iterdir() if (p / "pytorch_model.bin").exists())
REPO_ROOT = Path(__file__).resolve().parents[1]


def expected(variant: str) -> dict:
    return load_file(REFERENCE / variant / "expected.safetensors")


def logits_of(model, input_ids) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids, use_cache=False).logits.float()


def copy_checkpoint(variant: str, folder: Path) -> Path:
    shutil.copytree(REFERENCE / variant, folder)
    for path in folder.iterdir():
        path.chmod(0o644)
    return folder


def rewrite_weights(folder: Path, edit) -> None:
    state_dict = torch.load(folder / "pytorch_model.bin", weights_only=True)
    edit(state_dict)
    torch.save(state_dict, folder / "pytorch_model.bin")


def test_all_twelve_reference_variants_are_present():
    assert len(VARIANTS) == 12


@pytest.mark.parametrize("variant", VARIANTS)
def test_reference_checkpoint_reproduces_authors_logits_and_loss(variant):
    model = MLRAForCausalLM.from_pretrained(REFERENCE / variant)
    reference = expected(variant)
    logits = logits_of(model, reference["input_ids"])
    assert (logits - reference["logits"]).abs().max().item() <= 1e-4
    loss = F.cross_entropy(logits.flatten(0, 1), reference["targets"].flatten())
    assert loss.item() == pytest.approx(reference["loss"].item(), abs=1e-5)
    assert model.config.variant == variant


@pytest.mark.parametrize("variant", VARIANTS)
def test_reference_checkpoint_in_bfloat16_stays_within_bf16_tolerance(variant):
    model = MLRAForCausalLM.from_pretrained(REFERENCE / variant, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    reference = expected(variant)
    logits = logits_of(model, reference["input_ids"])
    # bf16 keeps 8 mantissa bits; two layers of rounding stay within a few percent of the logit scale
    scale = reference["logits"].abs().max().item()
    assert (logits - reference["logits"]).abs().max().item() <= 0.05 * scale
    agreement = (logits.argmax(-1) == reference["logits"].argmax(-1)).float().mean().item()
    assert agreement >= 0.9


def test_loss_through_labels_matches_authors_loss():
    model = MLRAForCausalLM.from_pretrained(REFERENCE / "mlra_4")
    reference = expected("mlra_4")
    with torch.no_grad():
        out = model(reference["input_ids"], labels=reference["targets"], shift_labels=reference["targets"])
    assert out.loss.item() == pytest.approx(reference["loss"].item(), abs=1e-5)


def test_sharded_checkpoint_loads_like_the_single_file():
    model = MLRAForCausalLM.from_pretrained(REFERENCE / "sharded" / "mlra_4")
    reference = load_file(REFERENCE / "sharded" / "mlra_4" / "expected.safetensors")
    assert (logits_of(model, reference["input_ids"]) - reference["logits"]).abs().max().item() <= 1e-4


def test_hub_repo_with_subfolder_loads_offline_from_the_hub_cache(tmp_path):
    """A Hub-style cache (models--Soughing--MLRA/snapshots/<commit>/main/mlra_4) with HF_HUB_OFFLINE=1."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--Soughing--MLRA"
    shutil.copytree(REFERENCE / "sharded" / "mlra_4", repo / "snapshots" / commit / "main" / "mlra_4")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    script = (
        "import torch\n"
        "from safetensors.torch import load_file\n"
        "from modeling_mlra import MLRAForCausalLM\n"
        "model = MLRAForCausalLM.from_pretrained('Soughing/MLRA', subfolder='main/mlra_4')\n"
        f"reference = load_file({str(REFERENCE / 'sharded' / 'mlra_4' / 'expected.safetensors')!r})\n"
        "with torch.no_grad():\n"
        "    diff = (model(reference['input_ids']).logits - reference['logits']).abs().max().item()\n"
        "print(model.config.variant, diff)\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub"), "PYTHONPATH": str(REPO_ROOT)}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    variant, diff = result.stdout.split()[-2:]
    assert variant == "mlra_4" and float(diff) <= 1e-4


def test_explicit_variant_overrides_the_folder_name(tmp_path):
    """`*_no_scale` cannot be told from the weights: a neutral folder name infers the scaled form."""
    folder = copy_checkpoint("mlra_2_no_scale", tmp_path / "checkpoint")
    reference = expected("mlra_2_no_scale")
    inferred = MLRAForCausalLM.from_pretrained(folder)
    assert inferred.config.variant == "mlra_2"
    assert (logits_of(inferred, reference["input_ids"]) - reference["logits"]).abs().max().item() > 1e-2
    explicit = MLRAForCausalLM.from_pretrained(folder, variant="mlra_2_no_scale")
    assert (logits_of(explicit, reference["input_ids"]) - reference["logits"]).abs().max().item() <= 1e-4


@pytest.mark.parametrize("variant", ["mla_gated", "gla_2", "gla_4", "mlra_2", "mlra_4_gated"])
def test_variant_is_inferred_from_weight_shapes(tmp_path, variant):
    folder = copy_checkpoint(variant, tmp_path / "weights")
    assert MLRAForCausalLM.from_pretrained(folder).config.variant == variant


def test_variant_contradicting_the_weights_raises():
    with pytest.raises(ValueError, match="does not match the weights .* 'mlra_4'"):
        MLRAForCausalLM.from_pretrained(REFERENCE / "mlra_4", variant="mla")


def test_unknown_variant_raises():
    with pytest.raises(ValueError, match="unknown variant 'mlra_3'"):
        MLRAForCausalLM.from_pretrained(REFERENCE / "mlra_4", variant="mlra_3")


def test_lm_head_may_be_absent_since_it_is_tied(tmp_path):
    folder = copy_checkpoint("gla_4", tmp_path / "gla_4")
    rewrite_weights(folder, lambda sd: sd.pop("lm_head.weight"))
    model = MLRAForCausalLM.from_pretrained(folder)
    reference = expected("gla_4")
    assert (logits_of(model, reference["input_ids"]) - reference["logits"]).abs().max().item() <= 1e-4
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_missing_key_raises_naming_key_and_file(tmp_path):
    folder = copy_checkpoint("mlra_4", tmp_path / "mlra_4")
    rewrite_weights(folder, lambda sd: sd.pop("transformer.h.1.mlp.c_fc2.weight"))
    with pytest.raises(KeyError, match=r"transformer\.h\.1\.mlp\.c_fc2\.weight.*pytorch_model\.bin"):
        MLRAForCausalLM.from_pretrained(folder)


def test_unexpected_key_raises_naming_key_and_file(tmp_path):
    folder = copy_checkpoint("mla", tmp_path / "mla")
    rewrite_weights(folder, lambda sd: sd.update({"transformer.h.0.attn.extra.weight": torch.zeros(2)}))
    with pytest.raises(ValueError, match=r"unexpected key 'transformer\.h\.0\.attn\.extra\.weight' in .*pytorch_model\.bin"):
        MLRAForCausalLM.from_pretrained(folder)


def test_wrong_shape_raises_naming_key_and_shapes(tmp_path):
    folder = copy_checkpoint("mlra_2", tmp_path / "mlra_2")
    rewrite_weights(folder, lambda sd: sd.update({"transformer.h.0.attn.q_b_proj.weight": torch.zeros(90, 48)}))
    with pytest.raises(ValueError, match=r"transformer\.h\.0\.attn\.q_b_proj\.weight.*\(90, 48\).*\(96, 48\)"):
        MLRAForCausalLM.from_pretrained(folder)


def test_truncated_weight_file_raises_naming_the_file(tmp_path):
    folder = copy_checkpoint("mlra_4", tmp_path / "mlra_4")
    data = (folder / "pytorch_model.bin").read_bytes()
    (folder / "pytorch_model.bin").write_bytes(data[: len(data) // 2])
    with pytest.raises(OSError, match=r"pytorch_model\.bin: cannot read the weights"):
        MLRAForCausalLM.from_pretrained(folder)


def test_config_lacking_nanogpt_fields_raises_naming_the_field(tmp_path):
    folder = copy_checkpoint("mlra_4", tmp_path / "mlra_4")
    config = json.loads((folder / "config.json").read_text())
    del config["n_head"]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(KeyError, match=r"config\.json lacks the nanoGPT fields \['n_head'\]"):
        MLRAForCausalLM.from_pretrained(folder)


def test_missing_shard_raises_naming_index_and_shard(tmp_path):
    folder = tmp_path / "mlra_4"
    shutil.copytree(REFERENCE / "sharded" / "mlra_4", folder)
    (folder / "pytorch_model-00003-of-00005.bin").unlink()
    with pytest.raises(OSError, match=r"index\.json lists pytorch_model-00003-of-00005\.bin"):
        MLRAForCausalLM.from_pretrained(folder)


def test_save_and_load_round_trip_in_our_format(tmp_path):
    original = MLRAForCausalLM.from_pretrained(REFERENCE / "mlra_2_gated")
    original.save_pretrained(tmp_path / "ours")
    assert (tmp_path / "ours" / "model.safetensors").exists()
    assert not list((tmp_path / "ours").glob("*.bin"))
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ours")
    assert isinstance(loaded, MLRAForCausalLM)
    reference = expected("mlra_2_gated")
    assert torch.equal(logits_of(loaded, reference["input_ids"]), logits_of(original, reference["input_ids"]))


def test_auto_class_loads_our_format_without_trust_remote_code_in_a_fresh_process(tmp_path):
    MLRAForCausalLM.from_pretrained(REFERENCE / "gla_2").save_pretrained(tmp_path / "ours")
    script = (
        "import torch, modeling_mlra\n"
        "from safetensors.torch import load_file\n"
        "from transformers import AutoModelForCausalLM\n"
        f"model = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'ours')!r})\n"
        f"reference = load_file({str(REFERENCE / 'gla_2' / 'expected.safetensors')!r})\n"
        "with torch.no_grad():\n"
        "    diff = (model(reference['input_ids']).logits - reference['logits']).abs().max().item()\n"
        "print(type(model).__module__, diff)\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO_ROOT)}
    result = subprocess.run([sys.executable, "-c", script], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    module, diff = result.stdout.split()[-2:]
    assert module == "modeling_mlra.modeling_mlra" and float(diff) <= 1e-4


def test_trust_remote_code_loads_in_a_process_that_never_imported_the_package(tmp_path):
    MLRAForCausalLM.from_pretrained(REFERENCE / "mlra_4").save_pretrained(tmp_path / "ours")
    config = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_mlra.MLRAForCausalLM"
    script = (
        "import sys, torch\n"
        "from safetensors.torch import load_file\n"
        "from transformers import AutoModelForCausalLM\n"
        f"model = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'ours')!r}, trust_remote_code=True)\n"
        f"reference = load_file({str(REFERENCE / 'mlra_4' / 'expected.safetensors')!r})\n"
        "with torch.no_grad():\n"
        "    diff = (model(reference['input_ids']).logits - reference['logits']).abs().max().item()\n"
        "assert 'modeling_mlra' not in sys.modules, 'the installed package was imported'\n"
        "print(type(model).__module__, diff)\n"
    )
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"))
    result = subprocess.run(
        [sys.executable, "-I", "-c", script], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    module, diff = result.stdout.split()[-2:]
    assert module.startswith("transformers_modules.") and float(diff) <= 1e-4


def write_authors_mlra_4(folder: Path, d=512, heads=8, d_n=64, d_r=32, d_c=256, d_cq=256, inter=1536, layers=4, vocab=8192):
    """An authors'-format MLRA-4 checkpoint of about 90 MB in float32, keys and shapes as their code writes them."""
    folder.mkdir()
    config = dict(
        model_type="gpt2", architectures=["GPT"], n_layer=layers, n_head=heads, n_embd=d, intermediate_size=inter,
        block_size=256, bias=False, dropout=0.0, q_lora_rank=d_cq, kv_lora_rank=d_c, qk_nope_head_dim=d_n,
        qk_rope_head_dim=d_r, vocab_size=vocab,
    )
    (folder / "config.json").write_text(json.dumps(config))
    shapes = {"transformer.wte.weight": (vocab, d), "layernorm.weight": (d,)}
    for i in range(layers):
        p = f"transformer.h.{i}."
        shapes.update({
            p + "attn.q_a_proj.weight": (d_cq, d), p + "attn.q_a_layernorm.weight": (d_cq,),
            p + "attn.q_b_proj.weight": (heads * (d_n + d_r), d_cq), p + "attn.kv_a_proj_with_mqa.weight": (d_c + d_r, d),
            p + "attn.kv_b_proj": (4, d_c // 4, heads * 2 * d_n), p + "attn.c_proj.weight": (d, heads * d_n),
            p + "mlp.c_fc1.weight": (inter, d), p + "mlp.c_fc2.weight": (inter, d), p + "mlp.c_proj.weight": (d, inter),
            p + "input_layernorm.weight": (d,), p + "post_attention_layernorm.weight": (d,),
            **{p + f"attn.kv_a_layernorms.{n}.weight": (d_c // 4,) for n in range(4)},
        })
    state_dict = {key: torch.randn(shape) * 0.02 for key, shape in shapes.items()}
    state_dict["lm_head.weight"] = state_dict["transformer.wte.weight"]  # tied: stored once by torch.save
    torch.save(state_dict, folder / "pytorch_model.bin")
    return sum(t.numel() for k, t in state_dict.items() if k != "lm_head.weight") * 4


def test_loading_to_bfloat16_holds_less_than_two_copies_of_the_weights(tmp_path):
    file_bytes = write_authors_mlra_4(tmp_path / "mlra_4")
    script = (
        "import re, torch\n"
        "from modeling_mlra import MLRAForCausalLM\n"
        "def status(field):\n"
        "    return int(re.search(field + r':\\s+(\\d+) kB', open('/proc/self/status').read()).group(1)) * 1024\n"
        "before = status('VmRSS')\n"
        f"model = MLRAForCausalLM.from_pretrained({str(tmp_path / 'mlra_4')!r}, dtype=torch.bfloat16)\n"
        "assert {p.dtype for p in model.parameters()} == {torch.bfloat16}\n"
        "print(status('VmHWM') - before)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    peak_growth = int(result.stdout.split()[-1])
    # float32 pages mapped from the file (1x) + the bfloat16 model (0.5x); a load-then-convert path needs >= 2x
    assert peak_growth < 1.75 * file_bytes, f"peak grew {peak_growth / 2**20:.0f} MiB for a {file_bytes / 2**20:.0f} MiB file"
