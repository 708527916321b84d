"""The ranks of the tensor-parallel tests: processes forked from the test process (so they need not import torch
and transformers again, the expensive part on 2 CPUs), each with torchrun's environment variables, running every
case of one world size in one launch. Every rank loads each case's checkpoint twice, whole and with
`tp_plan="auto"` (gloo on the CPU), and compares what they compute; rank 0 returns one record per case.
"""

import json
import os
import socket
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from transformers import set_seed

from modeling_mlra import MLRACache, MLRAForCausalLM

GENERATE_MODES = {
    "greedy": dict(),
    "sample": dict(do_sample=True, top_k=0, temperature=1.0),
    "beams": dict(num_beams=2),
    "static": dict(cache_implementation="static"),
    "assisted": dict(),  # with the whole model as the assistant, added below
}


def run_case(case: dict) -> dict:
    path = case["path"]
    if "error" in case:
        try:
            MLRAForCausalLM.from_pretrained(path, tp_plan="auto")
        except ValueError as error:
            return {"error": str(error)}
        return {"error": None}

    whole = MLRAForCausalLM.from_pretrained(path).eval()
    split = MLRAForCausalLM.from_pretrained(path, tp_plan="auto").eval()
    vocab = whole.config.vocab_size
    tokens = torch.randint(vocab, (2, 24), generator=torch.Generator().manual_seed(0))
    prompt = tokens[:, :8]
    record = {}
    with torch.no_grad():
        record["logit_error"] = (split(tokens).logits - whole(tokens).logits).abs().max().item()
        # a prefill, then decode steps on the rank's cache (absorbed path)
        cache, reference_cache = MLRACache(split.config), MLRACache(whole.config)
        split(prompt, use_cache=True, past_key_values=cache)
        whole(prompt, use_cache=True, past_key_values=reference_cache)
        step = tokens[:, 8:9]
        decode_error = (split(step, past_key_values=cache).logits - whole(step, past_key_values=reference_cache).logits)
        record["decode_logit_error"] = decode_error.abs().max().item()
        record["cache_bytes_per_token_per_layer"] = cache.layers[0].bytes_per_token
        record["expected_cache_bytes"] = split.tensor_parallel.shard.cache_width * 4
        record["whole_cache_bytes"] = reference_cache.layers[0].bytes_per_token

        for mode in case.get("modes", ["greedy"]):
            options = dict(GENERATE_MODES[mode], max_new_tokens=12, pad_token_id=0)
            outputs = []
            inputs = prompt
            if mode == "assisted":  # transformers' assisted decoding takes one sequence
                options["assistant_model"], inputs = whole, prompt[:1]
            for model in (whole, split):
                set_seed(1)
                outputs.append(model.generate(inputs, **options))
            gathered = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, outputs[1].tolist())
            record[f"{mode}_equal"] = torch.equal(outputs[0], outputs[1])
            record[f"{mode}_ranks_agree"] = all(tokens == gathered[0] for tokens in gathered)
    if "save_to" in case:
        try:
            split.save_pretrained(case["save_to"])
        except ValueError as error:
            record["save_error"] = str(error)
        record["save_folder_exists"] = os.path.exists(case["save_to"])
    return record


def _rank_main(rank: int, world_size: int, port: int, cases: list[dict], results_file: str):
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size)
    )
    torch.set_num_threads(1)
    results = {case["name"]: run_case(case) for case in cases}
    if rank == 0:
        Path(results_file).write_text(json.dumps(results, indent=1))
    dist.destroy_process_group()


def run_world(world_size: int, cases: list[dict], results_file: Path) -> dict:
    """Run `cases` on `world_size` forked ranks; the records rank 0 wrote."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    mp.start_processes(
        _rank_main, args=(world_size, port, cases, str(results_file)), nprocs=world_size, start_method="fork"
    )
    return json.loads(results_file.read_text())
