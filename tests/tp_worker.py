"""One rank of the tensor-parallel tests (tests/test_tensor_parallel.py launches it with torchrun, gloo on the CPU).

    torchrun --nproc-per-node 2 tests/tp_worker.py CASES.json RESULTS.json

Every rank loads each case's checkpoint twice, whole and with `tp_plan="auto"`, and compares what they compute;
rank 0 writes one record per case. All cases of a world size run in one launch: starting processes and importing
torch is the expensive part.
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import set_seed

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from modeling_mlra import MLRACache, MLRAForCausalLM  # noqa: E402

torch.set_num_threads(1)

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
    return record


def main():
    cases = json.loads(Path(sys.argv[1]).read_text())
    results = {case["name"]: run_case(case) for case in cases}
    if dist.get_rank() == 0:
        Path(sys.argv[2]).write_text(json.dumps(results, indent=1))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
