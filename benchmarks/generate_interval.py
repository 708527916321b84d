"""generate()'s time per token against its own compiled step, at batch 1, on one GPU (issue 16, item 1).

    python benchmarks/generate_interval.py --out benchmarks/results/generate_interval_h200   # the GPU (90 s)
    python benchmarks/generate_interval.py --quick                                            # tiny shapes, CPU

Ours (MLRA-4) and transformers' Llama (8 KV heads) of the same ~2.9B size, bfloat16, random weights, 24 layers,
`generate(cache_implementation="static")` with each model's automatic compile, batch 1, through two loops:
- "per-step sync": transformers' decoding loop as it is, which reads on the host after every step whether all
  sequences have finished, so the host cannot queue the next step while the GPU runs this one;
- "deferred": the same loop reading that flag one step late (transformers' `DeferredStopCheck`, which transformers
  takes on MPS only). Ours takes it by default on CUDA (`MLRAForCausalLM._sample`); for Llama this script forces
  it (`DeferredStopCheck.is_supported` patched), to show the same effect on a transformers model.
Per model and loop, after the first (compiling) call and one short call per prompt length (its prefill's first
run): ms/token from the total time of 256 new tokens (`min_new_tokens`: no early stop) for prompts of --prompts
tokens, one call each (calls of different lengths reuse one static cache and one compiled graph: recompiles are
counted); the median interval between streamed tokens (a streamer that notes when each token reaches the host); and
the GPU time of each compiled step inside generate() (CUDA events around every call of the compiled forward: in the
deferred loop, where the GPU never waits for the host, that is the step alone; in the per-step loop it includes the
host's launch).
The compiled step: the very compiled forward generate() calls, called back to back on the inputs of one decode step
(CUDA events over --step-calls calls; the host's time for those calls is reported beside it and must be below it for
the number to be the GPU's). Checks: the deferred loop gives the per-step loop's tokens (256 greedy tokens; an eos
stop mid-way; sampling with a seed). Last, a cProfile of one deferred generate() of ours: how long the host waits
for the GPU (the deferred check's Event.synchronize) out of its total, i.e. the host's slack per token.
"""

import argparse
import contextlib
import cProfile
import io
import pstats
import statistics
import sys
import time
from pathlib import Path
from unittest import mock

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    IntervalStreamer,
    Report,
    error_text,
    fmt,
    llama_gqa_config,
    published_model,
    release,
    run_setting,
    synchronize,
    transformers_model,
)
from transformers import CompileConfig  # noqa: E402
from transformers.generation.utils import DeferredStopCheck  # noqa: E402

from modeling_mlra import MLRAConfig, MLRAForCausalLM  # noqa: E402
from modeling_mlra import modeling_mlra as mlra  # noqa: E402

MODELS = ("mlra_4", "llama_gqa")
LOOPS = ("per_step_sync", "deferred")
QUICK_SHAPES = dict(
    hidden_size=64, num_attention_heads=4, kv_lora_rank=32, qk_nope_head_dim=16, v_head_dim=16, qk_rope_head_dim=8,
    intermediate_size=128, vocab_size=256, q_lora_rank=48,
)  # fmt: skip


class HostEvent:
    """--quick: the CPU has no events; its copies to the host are done when they return, so waiting is a no-op."""

    def __init__(self, *args, **kwargs):
        pass

    def record(self, *args, **kwargs):
        pass

    def synchronize(self):
        pass


def build_model(name: str, args, device, dtype):
    overrides = dict(max_position_embeddings=max(args.prompts) + args.new_tokens + 64)
    if args.quick:
        overrides.update(QUICK_SHAPES)
    if name == "mlra_4":
        return published_model(name, args.layers, device, dtype, **overrides)
    reference = MLRAConfig.from_variant("mlra_4", num_hidden_layers=args.layers, **overrides)
    return transformers_model(llama_gqa_config(reference, kv_heads=2 if args.quick else 8), device, dtype)


@contextlib.contextmanager
def decoding_loop(model, loop: str, device, built: list):
    """generate() through `loop`; every deferred stop check built is appended to `built` (which loop ran)."""
    ours = isinstance(model, MLRAForCausalLM)
    init = DeferredStopCheck.__init__

    def counting_init(self, *args, **kwargs):
        built.append(loop)
        init(self, *args, **kwargs)

    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch.object(DeferredStopCheck, "__init__", counting_init))
        if loop == "per_step_sync" and ours:
            stack.enter_context(mock.patch.object(mlra, "DEFERRED_STOP_CHECK_DEVICES", ()))
        if loop == "deferred" and not ours:
            always = staticmethod(lambda *args, **kwargs: True)
            stack.enter_context(mock.patch.object(DeferredStopCheck, "is_supported", always))
        if loop == "deferred" and device.type == "cpu":
            stack.enter_context(mock.patch.object(mlra, "DEFERRED_STOP_CHECK_DEVICES", ("cuda", "cpu")))
            stack.enter_context(mock.patch.object(torch, "Event", HostEvent))
        yield


class TimedCalls:
    """Wraps generate()'s compiled forward (`model._compiled_call`, which `get_compiled_call` hands back while the
    compile config is unchanged): CUDA events around every call while `timing`, and the last call's arguments."""

    def __init__(self, model, device):
        self.model, self.device, self.call = model, device, model._compiled_call
        self.events, self.timing, self.last_kwargs = [], False, None
        model._compiled_call = self

    def __call__(self, **kwargs):
        self.last_kwargs = kwargs
        if not self.timing or self.device.type != "cuda":
            return self.call(**kwargs)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = self.call(**kwargs)
        end.record()
        self.events.append((start, end))
        return out

    def median_ms(self) -> float | None:
        synchronize(self.device)
        times = [start.elapsed_time(end) for start, end in self.events[2:]]
        self.events = []
        return statistics.median(times) if times else None


def measure_model(name: str, args, device, dtype, report: Report, stop) -> None:
    model = build_model(name, args, device, dtype)
    if args.quick:  # generate() compiles only on accelerators unless told; the eager backend keeps the check fast
        config = CompileConfig(fullgraph=True, dynamic=False, backend="eager", mode=None)
        config._compile_all_devices = True
        model.generation_config.compile_config = config
    vocab = model.config.vocab_size
    stats = torch._dynamo.utils.counters["stats"]

    def prompt(length, seed):
        return torch.randint(1, vocab, (1, length), generator=torch.Generator().manual_seed(seed)).to(device)

    def generate(ids, new_tokens, min_new_tokens=None, **extra):
        extra = dict(dict(do_sample=False), **extra)
        return model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, pad_token_id=0,
            min_new_tokens=new_tokens if min_new_tokens is None else min_new_tokens, cache_implementation="static",
            **extra,
        )  # fmt: skip

    first_prompt = args.prompts[0]
    short = min(64, args.new_tokens)  # the checks' and timed calls' new tokens (within the first call's cache)
    with torch.no_grad():
        start = time.perf_counter()
        generate(prompt(max(args.prompts), 0), args.new_tokens)  # the largest: every later call fits its cache
        synchronize(device)
        first_call_s = time.perf_counter() - start
        # every prompt length once, untimed: a prefill of at most absorbed_max_query_len tokens runs the fused
        # decode kernel, which Triton compiles for each new query length (1-2 s, seen in the first H200 run)
        for seed, length in enumerate(args.prompts):
            generate(prompt(length, 20 + seed), 2)
        graphs = stats["unique_graphs"]
        timed = TimedCalls(model, device)
        outputs = {}
        for loop in LOOPS:
            if stop():
                report.record(dict(model=name, loop=loop, error="skipped: past --stop-after-s"))
                continue
            built = []
            row = dict(model=name, loop=loop, batch=1, new_tokens=args.new_tokens, first_call_s=first_call_s)
            try:
                with decoding_loop(model, loop, device, built):
                    per_prompt = {}
                    for seed, length in enumerate(args.prompts):
                        synchronize(device)
                        start = time.perf_counter()
                        out = generate(prompt(length, seed), args.new_tokens)
                        synchronize(device)
                        per_prompt[length] = (time.perf_counter() - start) / args.new_tokens * 1e3
                        outputs.setdefault(loop, out)
                    row["ms_per_token_by_prompt"] = per_prompt
                    row["ms_per_token"] = statistics.median(per_prompt.values())
                    streamer = IntervalStreamer()
                    generate(prompt(first_prompt, 7), args.new_tokens, streamer=streamer)
                    row["streamed_ms"] = streamer.median_ms(skip=2)
                    timed.timing = True
                    generate(prompt(first_prompt, 8), short)
                    timed.timing = False
                    row["step_in_generate_ms"] = timed.median_ms()
                row["deferred_checks_built"] = len(built)
            except Exception as error:  # noqa: BLE001 - one loop's failure must not lose the other
                row["error"] = error_text(error)
            report.record(row)

        checks = dict(model=name, loop="checks")
        try:
            if set(outputs) == set(LOOPS):
                checks["greedy_equal"] = bool(torch.equal(outputs[LOOPS[0]], outputs[LOOPS[1]]))
                # eos: a token first generated after 16 steps, so that generation stops mid-way
                reference = outputs[LOOPS[0]][0, first_prompt:].tolist()
                eos = next((t for i, t in enumerate(reference) if i >= 16 and t not in reference[:i]), reference[-1])
                checks["eos_stop_after"] = reference.index(eos) + 1
                sampled, stopped = {}, {}
                for loop in LOOPS:
                    with decoding_loop(model, loop, device, []):
                        stopped[loop] = generate(prompt(first_prompt, 0), short, min_new_tokens=0, eos_token_id=eos)
                        torch.manual_seed(3)
                        sampled[loop] = generate(prompt(first_prompt, 9), short, do_sample=True, top_k=50)
                checks["eos_stop_equal"] = bool(torch.equal(*stopped.values()))
                checks["eos_stop_length"] = stopped[LOOPS[0]].shape[1] - first_prompt
                checks["sampling_equal"] = bool(torch.equal(*sampled.values()))
            # the compiled step: the compiled forward called back to back on the inputs of a decode step, on a
            # cache with room for the calls (the kept static cache holds max(prompts) + new tokens)
            generate(prompt(min(args.prompts), 10), 4)
            kwargs = timed.last_kwargs
            calls = min(args.step_calls, args.new_tokens)
            timed.call(**kwargs)
            synchronize(device)
            host_start = time.perf_counter()
            if device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
            for _ in range(calls):
                timed.call(**kwargs)
            host_ms = (time.perf_counter() - host_start) / calls * 1e3
            if device.type == "cuda":
                end.record()
                end.synchronize()
                checks["compiled_step_ms"] = start.elapsed_time(end) / calls
            else:
                checks["compiled_step_ms"] = (time.perf_counter() - host_start) / calls * 1e3
            checks["compiled_step_host_ms"] = host_ms
            checks["recompiles_after_first_call"] = stats["unique_graphs"] - graphs
            if name == "mlra_4" and args.out is not None and not stop():
                checks.update(profile_deferred(generate, prompt(first_prompt, 11), model, device, args))
        except Exception as error:  # noqa: BLE001
            checks["error"] = error_text(error)
        report.record(checks)
        model._compiled_call = timed.call


def profile_deferred(generate, ids, model, device, args) -> dict:
    """cProfile of one deferred generate() of 64 new tokens: its total, and the time waiting for the device."""
    tokens = 64
    profiler = cProfile.Profile()
    with decoding_loop(model, "deferred", device, []):
        synchronize(device)
        profiler.enable()
        generate(ids, tokens)
        synchronize(device)
        profiler.disable()
    stats = pstats.Stats(profiler)
    total = stats.total_tt
    waiting = sum(
        entry[2] for (_, _, function), entry in stats.stats.items() if "synchronize" in function
    )  # tottime of every synchronize (the deferred check's Event.synchronize, ours above)
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(30)
    path = Path(str(args.out) + "_profile.txt")
    path.write_text(f"cProfile of one deferred generate() of mlra_4, {ids.shape[1]}-token prompt, {tokens} new tokens\n"
                    + text.getvalue())  # fmt: skip
    return dict(profile=path.name, profiled_ms_per_token=total / tokens * 1e3,
                profiled_wait_ms_per_token=waiting / tokens * 1e3)  # fmt: skip


def markdown(meta: dict, rows: list[dict]) -> str:
    checks = {r["model"]: r for r in rows if r.get("loop") == "checks"}
    lines = [
        f"# generate() against its compiled step: {meta['device']}, {meta['dtype']}, {meta['layers']} layers, batch 1",
        "",
        f"Versions: torch {meta['torch']}, transformers {meta['transformers']}, triton {meta['triton']}, "
        f"CUDA {meta['cuda']}; elapsed {fmt(meta.get('elapsed_s'), '.0f')} s. How each number is made: the docstring "
        "of benchmarks/generate_interval.py.",
        "",
        "| model | loop | ms/token by prompt length | median ms/token | streamed interval ms | step in generate ms "
        "| compiled step ms | total / step | streamed / step | deferred checks |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if r.get("loop") == "checks":
            continue
        if "error" in r:
            lines.append(f"| {r['model']} | {r['loop']} | {r['error']} | | | | | | | |")
            continue
        step = checks.get(r["model"], {}).get("compiled_step_ms")
        by_prompt = ", ".join(f"{v:.2f} ({k})" for k, v in r["ms_per_token_by_prompt"].items())
        ratio = lambda value: fmt(value / step if value is not None and step else None, ".2f")  # noqa: E731
        lines.append(
            f"| {r['model']} | {r['loop']} | {by_prompt} | {r['ms_per_token']:.2f} | {fmt(r['streamed_ms'], '.2f')} "
            f"| {fmt(r['step_in_generate_ms'], '.2f')} | {fmt(step, '.2f')} | {ratio(r['ms_per_token'])} "
            f"| {ratio(r['streamed_ms'])} | {r['deferred_checks_built']} |"
        )
    lines += ["", "## Checks and the compiled step", ""]
    for name, r in checks.items():
        lines.append(f"- {name}: " + ", ".join(f"{k}={fmt(v, '.3f') if isinstance(v, float) else v}"
                                               for k, v in r.items() if k not in ("model", "loop")))  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--quick", action="store_true", help="tiny shapes, float32, on the CPU: checks the script")
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--prompts", nargs="+", type=int, default=[16, 24, 8], help="prompt lengths, one call each")
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--step-calls", type=int, default=64)
    parser.add_argument("--stop-after-s", type=float, default=150.0, help="no model or loop starts after this")
    args = parser.parse_args(argv)
    if args.quick:
        args.layers, args.new_tokens = 2, 48
    default = "/tmp/generate_interval_quick" if args.quick else "benchmarks/results/generate_interval_h200"
    out = args.out = args.out or Path(default)
    started = time.perf_counter()
    device, dtype, meta = run_setting(parser, args, argv, args.layers)
    report = Report(out, meta, markdown)
    stop = lambda: time.perf_counter() - started > args.stop_after_s  # noqa: E731
    for name in args.models:
        if stop():
            report.record(dict(model=name, loop="all", error=f"skipped: past --stop-after-s {args.stop_after_s:.0f}"))
            continue
        try:
            measure_model(name, args, device, dtype, report, stop)
        except Exception as error:  # noqa: BLE001 - a model that fails must not lose the other
            report.record(dict(model=name, loop="all", error=error_text(error)))
        torch._dynamo.reset()
        release(device)
    meta["elapsed_s"] = time.perf_counter() - started
    report.finish()
    print("\n" + out.with_suffix(".md").read_text(), flush=True)


if __name__ == "__main__":
    main()
