"""`mlra train` and its pieces: token shards, the paper's recipe on the Trainer, checkpoints and resuming."""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import TrainerCallback

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from modeling_mlra import MLRAForCausalLM  # noqa: E402
from modeling_mlra.cli import main  # noqa: E402
from modeling_mlra.data import TokenBlockDataset, read_bin_tokens, write_bin_tokens  # noqa: E402
from modeling_mlra.training import build_model, train, training_arguments  # noqa: E402

TINY = dict(
    vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
    q_lora_rank=24, kv_lora_rank=32, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8,
    max_position_embeddings=32,
)  # fmt: skip
BLOCK = 32
# A learnable stream: a fixed random permutation of the vocabulary, repeated.
TOKENS = np.tile(np.random.default_rng(0).permutation(64), 40)


class StepCounter(TrainerCallback):
    count = 0

    def on_step_end(self, args, state, control, **kwargs):
        self.count += 1


def tiny_args(output_dir, max_steps, **overrides):
    arguments = dict(batch_size=4, learning_rate=1e-2, warmup_steps=2, logging_steps=1, save_steps=5, seed=0)
    arguments.update(overrides)
    return training_arguments(output_dir, max_steps=max_steps, disable_tqdm=True, **arguments)


def test_bin_shard_round_trips_in_the_authors_format(tmp_path):
    write_bin_tokens(tmp_path / "shard.bin", TOKENS)
    header = np.fromfile(tmp_path / "shard.bin", dtype=np.int32, count=3)
    assert header.tolist() == [20240520, 1, len(TOKENS)]
    np.testing.assert_array_equal(read_bin_tokens(tmp_path / "shard.bin"), TOKENS)


def test_bin_reader_names_the_file_it_rejects(tmp_path):
    (tmp_path / "bad.bin").write_bytes(np.zeros(300, dtype=np.int32).tobytes())
    with pytest.raises(ValueError, match="bad.bin"):
        read_bin_tokens(tmp_path / "bad.bin")


def test_recipe_defaults_follow_the_paper(tmp_path):
    args = training_arguments(tmp_path, max_steps=10)
    assert (args.adam_beta1, args.adam_beta2, args.weight_decay, args.max_grad_norm) == (0.9, 0.95, 0.1, 1.0)
    assert args.lr_scheduler_type == "cosine_with_min_lr" and args.lr_scheduler_kwargs == {"min_lr_rate": 0.1}
    assert args.bf16 == (torch.cuda.is_available() and torch.cuda.is_bf16_supported())


@pytest.mark.parametrize("variant", ["mla", "mlra_4"])
def test_fresh_model_starts_with_zero_output_projections(variant):
    model = build_model(variant, **TINY)
    layer = model.model.layers[0]
    assert not layer.self_attn.o_proj.weight.any() and not layer.mlp.down_proj.weight.any()


def test_a_few_training_steps_reduce_the_loss(tmp_path):
    model = build_model("mlra_4", **TINY)
    trainer = train(model, tiny_args(tmp_path, max_steps=30), TokenBlockDataset(TOKENS, BLOCK))
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert losses[-1] < 0.7 * losses[0]


def test_checkpoint_loads_and_training_resumes_from_it(tmp_path):
    dataset = TokenBlockDataset(TOKENS, BLOCK)
    train(build_model("mlra_4", **TINY), tiny_args(tmp_path, max_steps=5), dataset)
    checkpoint = tmp_path / "checkpoint-5"
    reloaded = MLRAForCausalLM.from_pretrained(checkpoint)
    assert reloaded.config.variant == "mlra_4" and reloaded.model.layers[0].self_attn.o_proj.weight.any()

    steps_run = StepCounter()
    resumed = train(
        build_model("mlra_4", **TINY), tiny_args(tmp_path, max_steps=8), dataset, resume=True, callbacks=[steps_run]
    )
    assert resumed.state.global_step == 8 and steps_run.count == 3
    assert (tmp_path / "checkpoint-8").is_dir()


def test_resume_without_checkpoint_names_the_output_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        train(build_model("mla", **TINY), tiny_args(tmp_path, max_steps=2), TokenBlockDataset(TOKENS, BLOCK), resume=True)


def test_cli_train_on_bin_shards_saves_a_loadable_model(tmp_path):
    write_bin_tokens(tmp_path / "train.bin", TOKENS)
    sizes = [
        "--vocab-size", "64", "--hidden-size", "32", "--num-layers", "2", "--num-heads", "4",
        "--intermediate-size", "64", "--q-lora-rank", "24", "--kv-lora-rank", "32", "--qk-nope-head-dim", "8",
        "--qk-rope-head-dim", "4", "--v-head-dim", "8",
    ]  # fmt: skip
    main(
        ["train", "--variant", "gla_2", *sizes, "--train-data", str(tmp_path / "train.bin"), "--block-size", "32"]
        + ["--max-steps", "3", "--output-dir", str(tmp_path / "out"), "--no-progress-bar"]
    )
    model = MLRAForCausalLM.from_pretrained(tmp_path / "out")
    assert model.config.variant == "gla_2" and model.config.max_position_embeddings == 32
    assert model.config.use_cache
    # loadable without the package too: the modeling files beside the weights, named by auto_map
    assert model.config.auto_map["AutoModelForCausalLM"] == "modeling_mlra.MLRAForCausalLM"
    assert (tmp_path / "out" / "modeling_mlra.py").is_file() and (tmp_path / "out" / "configuration_mlra.py").is_file()


def test_cli_train_continues_from_a_saved_model_with_init_from(tmp_path):
    write_bin_tokens(tmp_path / "train.bin", TOKENS)
    first = build_model("mlra_2", **TINY)
    first.save_pretrained(tmp_path / "start")
    main(
        ["train", "--init-from", str(tmp_path / "start"), "--train-data", str(tmp_path / "train.bin")]
        + ["--block-size", "32", "--max-steps", "2", "--output-dir", str(tmp_path / "out"), "--no-progress-bar"]
    )
    continued = MLRAForCausalLM.from_pretrained(tmp_path / "out")
    assert continued.config.variant == "mlra_2"
    assert not torch.equal(continued.lm_head.weight, first.lm_head.weight)
