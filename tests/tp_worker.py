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
    "assisted": dict(),  # with the whole model as the assistant
}


@torch.no_grad()
def computations(model, tokens: torch.Tensor, modes: list[str], assistant) -> dict:
    """Logits of a 24-token forward, of a decode step after an 8-token prefill, and generated tokens per mode."""
    prompt = tokens[:, :8]
    results = {"logits": model(tokens).logits}
    cache = MLRACache(model.config)
    model(prompt, past_key_values=cache)
    results["decode_logits"] = model(tokens[:, 8:9], past_key_values=cache).logits  # absorbed, on the cache
    results["cache_bytes_per_token_per_layer"] = cache.layers[0].bytes_per_token
    for mode in modes:
        options = dict(GENERATE_MODES[mode], max_new_tokens=12, pad_token_id=0)
        inputs = prompt
        if mode == "assisted":  # transformers' assisted decoding takes one sequence
            options["assistant_model"], inputs = assistant, prompt[:1]
        set_seed(1)
        results[mode] = model.generate(inputs, **options)
    return results


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
    tokens = torch.randint(whole.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    modes = case.get("modes", ["greedy"])
    # the split model runs on every rank (collectives); the whole model, the reference, on rank 0 only
    outputs = {"split": computations(split, tokens, modes, whole)}
    if dist.get_rank() == 0:
        outputs["whole"] = computations(whole, tokens, modes, whole)
    record = {}
    for mode in modes:
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, outputs["split"][mode].tolist())
        record[f"{mode}_ranks_agree"] = all(rank_tokens == gathered[0] for rank_tokens in gathered)
        if dist.get_rank() == 0:
            record[f"{mode}_equal"] = torch.equal(outputs["split"][mode], outputs["whole"][mode])
    if dist.get_rank() == 0:
        for name in ("logits", "decode_logits"):
            record[f"{name}_error"] = (outputs["split"][name] - outputs["whole"][name]).abs().max().item()
        record["cache_bytes_per_token_per_layer"] = outputs["split"]["cache_bytes_per_token_per_layer"]
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
