"""The ranks of the tensor-parallel tests: processes forked from the test process (so they need not import torch
and transformers again, the expensive part on 2 CPUs), each with torchrun's environment variables, running every
case of one world size in one launch. Every rank loads each case's checkpoint twice, whole and with
`tp_plan="auto"` (gloo on the CPU), and compares what they compute (with a `compile_flag`, also greedy decoding
through the compiled step); rank 0 returns one record per case.
"""

import json
import os
import socket
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch._dynamo.utils import counters
from transformers import set_seed

from modeling_mlra import MLRACache, MLRAForCausalLM
from modeling_mlra.modeling_mlra import CACHE_FIELD
from modeling_mlra.tensor_parallel import shard_model

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


@torch.no_grad()
def greedy_steps(model, step, prompt: torch.Tensor, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy decoding on a static cache after an eager prefill of `prompt`, each token through `step(ids, cache)`:
    the tokens [bsz, steps] and the logits of every step [bsz, steps, vocab]."""
    cache = MLRACache(model.config, max_cache_len=prompt.shape[1] + steps)
    logits = model(prompt, **{CACHE_FIELD: cache}).logits[:, -1:]
    tokens, step_logits = [], []
    for _ in range(steps):
        tokens.append(logits.argmax(-1))
        logits = step(tokens[-1], cache)
        step_logits.append(logits)
    return torch.cat(tokens, 1), torch.cat(step_logits, 1)


def eager_step(model):
    return lambda ids, cache: model(ids, logits_to_keep=1, **{CACHE_FIELD: cache}).logits


def compiled_in_turn(model, flag: Path):
    """The decode step `torch.compile(fullgraph=True)` (inductor), compiled by rank 0 first: the other ranks wait
    for its compilation to end and find the same graph in inductor's on-disk caches (every rank's share has the
    same shapes), instead of compiling it at once on a shared CPU. Dynamo's caches are reset first, so that every
    rank compiles (and rank 0 signals) even where an earlier case's graph would serve: a rank that waited for a
    signal that never came would leave rank 0 in its first all-reduce."""
    torch._dynamo.reset()
    compiled = torch.compile(eager_step(model), fullgraph=True)
    first_call = True

    def step(ids, cache):
        nonlocal first_call
        if not first_call:
            return compiled(ids, cache)
        first_call = False
        if dist.get_rank() != 0:
            while not flag.exists():
                time.sleep(0.1)
            return compiled(ids, cache)
        signal = torch._dynamo.callback_handler.register_end_callback(lambda _: flag.touch())
        try:
            return compiled(ids, cache)
        finally:
            torch._dynamo.callback_handler.remove_end_callback(signal)

    return step


@torch.no_grad()
def traced_operations(model) -> list[str]:
    """The operations of the decode step (a static cache after a 4-token prefill) as torch.compile(fullgraph=True)
    traces them, in order (dynamo's caches reset first: a step compiled before must not answer for it)."""
    torch._dynamo.reset()
    cache = MLRACache(model.config, max_cache_len=8)
    ids = torch.zeros(1, 4, dtype=torch.long)
    model(ids, **{CACHE_FIELD: cache})
    operations = []

    def recording_backend(graph_module, example_inputs):
        operations.extend(str(node.target) for node in graph_module.graph.nodes if node.op == "call_function")
        return graph_module.forward

    torch.compile(eager_step(model), backend=recording_backend, fullgraph=True)(ids[:, :1], cache)
    return operations


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
    if "compile_flag" in case:  # the compiled decode step against the eager split step and the whole model
        prompt, steps = tokens[:, :8], 4
        compiled_step = compiled_in_turn(split, Path(case["compile_flag"]))
        graphs = counters["stats"]["unique_graphs"]
        compiled_tokens, compiled_logits = greedy_steps(split, compiled_step, prompt, steps)
        record["compiled_graphs"] = counters["stats"]["unique_graphs"] - graphs  # 1: no recompilation across steps
        _, eager_logits = greedy_steps(split, eager_step(split), prompt, steps)
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, compiled_tokens.tolist())
        record["compiled_ranks_agree"] = all(rank_tokens == gathered[0] for rank_tokens in gathered)
        if dist.get_rank() == 0:
            whole_tokens, whole_logits = greedy_steps(whole, eager_step(whole), prompt, steps)
            record["compiled_vs_eager_split"] = (compiled_logits - eager_logits).abs().max().item()
            record["compiled_vs_whole"] = (compiled_logits - whole_logits).abs().max().item()
            record["compiled_tokens_equal"] = torch.equal(compiled_tokens, whole_tokens)
    if case.get("trace_graphs"):  # the graph at this degree, and at one rank (a group of its own) the unsplit one
        alone = [dist.new_group([rank]) for rank in range(dist.get_world_size())][dist.get_rank()]
        one_rank = shard_model(MLRAForCausalLM.from_pretrained(path).eval(), alone)
        record["one_rank_graph_is_unsplit_graph"] = traced_operations(one_rank) == traced_operations(whole)
        record["collectives"] = [op for op in traced_operations(split) if "collective" in op or "c10d" in op]
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
