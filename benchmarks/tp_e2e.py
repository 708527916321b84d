"""Tensor-parallel decoding through the compiled step, under torchrun on any number of GPUs: MLRA-4, GLA-2 and MLA
at the published 2.9B shape (random weights, bf16) split over 1, 2, 4, ... ranks by latent block, beside the same
model unsplit on one GPU and transformers' Llama of the same size with 8 KV heads split by its own
`tp_plan="auto"`.

One launch measures every degree that divides the world size (each on its own process group of the first P ranks;
the others wait; TP 1, which compiles exactly the unsplit model's graph, only when the world is one GPU). Per setup
(model x degree), batch and prompt:
- graph ms: the eager decode step on a static cache holding `prompt` random tokens, captured in a CUDA graph with
  its all-reduces and replayed, the cache rewound before every replay (median over --replays); compiled ms: the
  step `torch.compile(fullgraph=True)` (inductor) captured the same way, at --compiled-shapes (a compile per shape);
  on the CPU (--quick) the steps called as they are;
- checks: the replayed logits against the eager step's (vs eager), and against the unsplit model's step of the same
  kind on the same cache contents (logits vs 1 GPU; every rank's cache holds its columns of one random full cache);
- generate ms: generate()'s median interval between streamed tokens on that cache with its automatic compile
  (--generate, at --compiled-shapes);
- cache GB per GPU, and collective ms per step: the step's own collectives alone (ours: 2 all-reduces per layer of
  [bsz, 1, d] in the model dtype; Llama's plan: the same plus its lm_head's all-gather of the logits) captured in a
  CUDA graph on the same group and replayed, so the column is their cost without the waiting for other ranks that
  a profiler's NCCL kernel time includes; share = collective ms / step ms.

    # issue 19, 4 x H200 (unsplit, TP 2, TP 4 in each launch; NVLink multicast stays off, set below): a launch per
    # model and batch, each a few compiles (about a minute each at 24 layers) and under 10 minutes
    for batch in 1 16; do
      for variant in mlra_4 gla_2 mla; do
        torchrun --nproc-per-node 4 benchmarks/tp_e2e.py --variants $variant --skip-llama --batches $batch \
            --generate --out benchmarks/results/tp_e2e_h200x4_${variant}_b$batch
      done
      torchrun --nproc-per-node 4 benchmarks/tp_e2e.py --variants --batches $batch --generate \
          --out benchmarks/results/tp_e2e_h200x4_llama_b$batch
    done
    # one GPU: TP 1 through the split code against the unsplit model (benchmarks/results/tp_e2e_h200x1.md)
    torchrun --nproc-per-node 1 benchmarks/tp_e2e.py --variants mlra_4 --skip-llama --layers 8 --batches 1 \
        --prompts 32768 --replays 50 --out benchmarks/results/tp_e2e_h200x1
    torchrun --nproc-per-node 2 benchmarks/tp_e2e.py --quick --backend aot_eager --out /tmp/tp_e2e  # CPU, gloo

Writes OUT.json, OUT.md and OUT.png.
"""

import os

# NVLink multicast stays off (shared machines): set before torch.distributed starts NCCL.
for _name, _value in (("NCCL_NVLS_ENABLE", "0"), ("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1"), ("NVSHMEM_DISABLE_NVLS", "1")):
    os.environ.setdefault(_name, _value)

import argparse  # noqa: E402
import datetime  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.distributed._functional_collectives as funcol  # noqa: E402
from transformers import LlamaForCausalLM, StaticCache  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    IntervalStreamer,
    Panel,
    Report,
    error_text,
    fmt,
    llama_gqa_config,
    plot_panels,
    random_model,
    release,
    set_cache_length,
    software_versions,
    transformers_model,
)

from modeling_mlra import MLRACache, MLRAConfig  # noqa: E402  (common puts the repository first)
from modeling_mlra.modeling_mlra import CACHE_FIELD  # noqa: E402
from modeling_mlra.tensor_parallel import LatentShard, check_degree, shard_model  # noqa: E402

VARIANTS = ("mlra_4", "gla_2", "mla")
QUICK_SHAPES = dict(
    hidden_size=64, num_hidden_layers=2, num_attention_heads=4, kv_lora_rank=32, qk_nope_head_dim=16,
    v_head_dim=16, qk_rope_head_dim=8, intermediate_size=128, vocab_size=256,
)  # fmt: skip


def mlra_config(variant: str, args) -> MLRAConfig:
    overrides = dict(max_position_embeddings=max(args.prompts) + args.new_tokens + 8)
    if args.layers:
        overrides["num_hidden_layers"] = args.layers
    if args.quick:
        overrides.update(QUICK_SHAPES, q_lora_rank=48 if variant != "mla" else 64)
    return MLRAConfig.from_variant(variant, **overrides)


# ----------------------------------------------------------------------------------------------- caches


def filled_mlra_cache(model, batch: int, prompt: int, capacity: int) -> MLRACache:
    """A static MLRACache holding `prompt` tokens of one random full-width cache (seeded per layer, the same on every
    rank), of which this rank keeps its columns: its latent blocks and the rope key (all of them unsplit), written
    through the cache's own update."""
    config, parameter = model.config, next(model.parameters())
    full_width = config.kv_lora_rank + config.qk_rope_head_dim
    state = getattr(model, "tensor_parallel", None)
    columns = list(range(full_width))
    if state is not None:
        columns = [*state.shard.latent_columns, *range(config.kv_lora_rank, full_width)]
    columns = torch.tensor(columns, device=parameter.device)
    cache = MLRACache(config, max_cache_len=capacity)
    generator = torch.Generator(parameter.device)
    for layer_idx in range(config.num_hidden_layers):
        generator.manual_seed(layer_idx)
        states = torch.empty(batch, prompt, len(columns), dtype=parameter.dtype, device=parameter.device)
        for row in range(batch):  # a row at a time: the full-width states of a 16 x 512K batch would not fit
            full = torch.randn(prompt, full_width, generator=generator, device=parameter.device, dtype=parameter.dtype)
            states[row] = full.index_select(-1, columns)
        cache.update(states, layer_idx)
        del states
    return cache


def filled_llama_cache(model, batch: int, prompt: int, capacity: int, degree: int) -> StaticCache:
    """transformers' StaticCache holding `prompt` random tokens of this rank's KV heads (its plan splits them)."""
    config, parameter = model.config, next(model.parameters())
    cache = StaticCache(config=config, max_cache_len=capacity)
    shape = (batch, config.num_key_value_heads // degree, prompt, config.head_dim)
    for layer_idx in range(config.num_hidden_layers):
        states = [torch.randn(shape, dtype=parameter.dtype, device=parameter.device) for _ in range(2)]
        cache.update(*states, layer_idx)
    return cache


def cache_bytes(cache) -> int:
    """Bytes the cache's filled part takes on this GPU."""
    tokens = int(cache.get_seq_length())
    if isinstance(cache, MLRACache):
        return cache.bytes_per_token * cache.layers[0].batch_size * tokens
    return sum(2 * layer.keys[:, :, :tokens].nbytes for layer in cache.layers)


# ----------------------------------------------------------------------------------------------- measurements


def synchronize(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_replays(replay, rewind, count: int, device) -> list[float]:
    """Milliseconds of `count` replays, `rewind()` before each (outside the timing). Every rank of a group runs the
    same count, so their collectives pair up."""
    times = []
    for _ in range(count):
        rewind()
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            replay()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            start = time.perf_counter()
            replay()
            times.append((time.perf_counter() - start) * 1e3)
    return times


def captured(fn, device, warmups: int = 3):
    """(replay, output): `fn` run `warmups` times on a side stream, then captured in a CUDA graph; on the CPU, `fn`
    itself with its output copied into the first result."""
    if device.type != "cuda":
        output = fn()

        def replay():
            output.copy_(fn())

        return replay, output
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(warmups):
            fn()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        output = fn()
    return graph.replay, output


def step_measurements(model, steps: dict, cache, batch: int, prompt: int, args, device, references: dict) -> dict:
    """Each of `steps` (kind -> step(ids, cache) -> logits: "graph", the eager step; "compiled") captured and
    replayed: median ms, and its logits against the eager step's and against `references[kind]` (the unsplit
    model's logits of that kind on the same cache contents and token, if there). Fills `references` where empty."""
    ids = torch.randint(model.config.vocab_size, (batch, 1), generator=torch.Generator().manual_seed(prompt))
    ids = ids.to(device)

    def rewind():
        set_cache_length(cache, prompt)

    row = {}
    with torch.no_grad():
        rewind()
        eager = model(ids, logits_to_keep=1, **{CACHE_FIELD: cache}).logits.float()
        for kind, step in steps.items():
            rewind()  # the warm-up steps advance the cache by a token each; the graph reads the length from the device
            replay, logits = captured(lambda: step(ids, cache), device)
            row[f"{kind}_ms"] = statistics.median(timed_replays(replay, rewind, args.replays, device))
            rewind()
            replay()
            replayed = logits.float().clone()
            row[f"{kind}_vs_eager"] = relative_error(replayed, eager)
            if kind in references:
                row[f"{kind}_vs_1_gpu"] = relative_error(replayed, references[kind])
            else:
                references[kind] = replayed
            del replay, logits
    return row


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def generate_interval(model, cache, batch: int, prompt: int, args, device) -> float:
    """generate() on the filled static cache (its automatic compile): median ms between streamed tokens after the
    first two."""
    ids = torch.randint(model.config.vocab_size, (batch, prompt + 1), device=device)
    streamer = IntervalStreamer()
    set_cache_length(cache, prompt)
    with torch.no_grad():
        model.generate(
            ids, attention_mask=torch.ones_like(ids), streamer=streamer, max_new_tokens=args.new_tokens,
            min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0, **{CACHE_FIELD: cache},
        )  # fmt: skip
    return statistics.median(streamer.intervals_ms()[2:])


def collective_ms(group, degree: int, batch: int, config, dtype, device, replays: int, gathered_logits: bool) -> float:
    """The step's collectives alone, captured and replayed on `group`: 2 all-reduces per layer of [bsz, 1, d] in
    the model dtype (and, for Llama's plan, the lm_head's all-gather of [bsz, 1, vocab / P] logits)."""
    hidden = torch.randn(batch, 1, config.hidden_size, dtype=dtype, device=device)
    logits = torch.randn(batch * config.vocab_size // degree, dtype=dtype, device=device)

    def collectives():
        out = hidden
        for _ in range(2 * config.num_hidden_layers):
            out = funcol.all_reduce(out, "sum", group)
        if gathered_logits:
            out = out.sum() + funcol.all_gather_tensor(logits, 0, group).sum()
        return out.wait() if isinstance(out, funcol.AsyncCollectiveTensor) else out

    replay, _ = captured(collectives, device)
    return statistics.median(timed_replays(replay, lambda: None, replays, device))


# ----------------------------------------------------------------------------------------------- the run


class Runner:
    """Rows of every setup; rank 0 prints each and rewrites the .md and .json as it goes (common's Report)."""

    def __init__(self, args, device, dtype):
        self.args, self.device, self.dtype = args, device, dtype
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        meta = {
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "gpus": self.world, "dtype": str(dtype).removeprefix("torch."), **software_versions(),
            "new_tokens": args.new_tokens, "replays": args.replays, "backend": args.backend,
        }  # fmt: skip
        self.report = Report(args.out, meta, markdown, plot)

    def record(self, row: dict) -> None:
        if self.rank == 0:
            self.report.record(row)
        else:
            self.report.rows.append(row)

    def recorded(self, row: dict) -> bool:
        return bool(self.report.rows) and self.report.rows[-1] is row

    def fits(self, group, needed_bytes: int) -> bool:
        """Whether every rank of `group` has `needed_bytes` free (decided together, so no rank runs alone)."""
        if self.device.type != "cuda":
            return True
        flag = torch.tensor([int(torch.cuda.mem_get_info(self.device)[0] > needed_bytes * 1.1)], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=group)
        return bool(flag.item())

    def run_setup(self, label: str, model, degree: int, group, make_cache, references: dict, peer: bool = False):
        """Every batch x prompt of one model on `group`: the eager step captured in a CUDA graph, and at
        --compiled-shapes the compiled step too (a compile per shape). `references` maps (batch, prompt) to the
        unsplit model's logits: the unsplit setup (degree None) fills it, the split ones compare with it. `peer`:
        transformers' model (compiled without fullgraph: its plan's hooks may break the graph)."""
        args = self.args
        eager_step = lambda ids, cache: model(ids, logits_to_keep=1, **{CACHE_FIELD: cache}).logits  # noqa: E731
        compiled_step = torch.compile(eager_step, fullgraph=not peer, dynamic=False, backend=args.backend)
        for batch in args.batches:
            for prompt in args.prompts:
                row = {"setup": label, "degree": degree, "batch": batch, "prompt": prompt}
                compiled = (batch, prompt) in args.compiled_shapes
                cache = None
                try:
                    capacity = prompt + args.new_tokens + 8
                    # the cache, a layer's states while it is filled, and 2 GB for the step
                    needed = self.cache_bytes_estimate(model, batch, capacity, degree)
                    if not self.fits(group, needed + needed // model.config.num_hidden_layers + (2 << 30)):
                        row["error"] = "does not fit"
                        self.record(row)
                        continue
                    cache = make_cache(batch, prompt, capacity)
                    row["cache_gb_per_gpu"] = cache_bytes(cache) / 1e9
                    steps = {"graph": eager_step, **({"compiled": compiled_step} if compiled else {})}
                    shape_references = references.setdefault((batch, prompt), {}) if degree is None else (
                        dict(references.get((batch, prompt), {}))
                    )  # fmt: skip
                    row.update(step_measurements(model, steps, cache, batch, prompt, args, self.device, shape_references))
                    if degree is not None:
                        row["collective_ms"] = collective_ms(
                            group, degree, batch, model.config, self.dtype, self.device, args.replays, peer
                        )
                    if args.generate and compiled:  # the step's row is written first: a run cut short keeps it
                        self.record(row)
                        row["generate_ms"] = generate_interval(model, cache, batch, prompt, args, self.device)
                except Exception as error:  # recorded, so that the other setups still run (alike on every rank)
                    row["error"] = error_text(error)
                del cache
                release(self.device)
                if not self.recorded(row):
                    self.record(row)
                elif self.rank == 0:  # recorded before generate(), which filled in its column
                    self.report.write()

    def cache_bytes_estimate(self, model, batch: int, capacity: int, degree: int | None) -> int:
        config, degree = model.config, degree or 1
        element = torch.finfo(self.dtype).bits // 8
        if isinstance(config, MLRAConfig):
            width = LatentShard.for_rank(config, 0, degree).cache_width
        else:
            width = 2 * config.num_key_value_heads // degree * config.head_dim
        return width * element * batch * capacity * config.num_hidden_layers


def degrees_of(world: int, requested: list[int] | None) -> list[int]:
    """The degrees to run: `requested`, else every power of two up to the world size that divides it (1 only on
    one GPU: elsewhere the unsplit model's rows stand for it, as TP 1 compiles the same graph)."""
    degrees = requested or [p for p in (2, 4, 8, 16) if p <= world and world % p == 0] or [1]
    for degree in degrees:
        if degree > world:
            raise SystemExit(f"--degrees {degree}: only {world} processes (torchrun --nproc-per-node)")
    return degrees


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="output prefix: OUT.json, OUT.md, OUT.png")
    parser.add_argument("--prompts", type=int, nargs="+", default=[4096, 32768, 131072, 524288])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument(
        "--degrees", type=int, nargs="+", help="default: 2, 4, ... up to the world size (1 on one GPU)"
    )
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=VARIANTS, help="none: Llama only")
    parser.add_argument("--layers", type=int, help="layers of every model (default: the published 24)")
    parser.add_argument(
        "--compiled-shapes", nargs="+", default=["1x32768", "16x131072"], metavar="BATCHxPROMPT",
        help="where the compiled step (a compile per setup and shape) and generate() are measured as well",
    )
    parser.add_argument("--replays", type=int, default=20)
    parser.add_argument("--new-tokens", type=int, default=16, help="generate()'s new tokens (--generate)")
    parser.add_argument("--generate", action="store_true", help="also time generate() (compiles once more per shape)")
    parser.add_argument("--skip-llama", action="store_true")
    parser.add_argument("--backend", default="inductor", help="torch.compile backend (aot_eager: a quick check)")
    parser.add_argument("--quick", action="store_true", help="tiny shapes on the CPU (gloo), to check the script")
    args = parser.parse_args()
    if args.quick:
        args.prompts, args.batches, args.replays, args.compiled_shapes = [64, 256], [1, 2], 3, ["1x64", "2x256"]
    args.compiled_shapes = {tuple(int(part) for part in shape.split("x")) for shape in args.compiled_shapes}
    use_cuda = torch.cuda.is_available() and not args.quick
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    # rank 0 alone measures the unsplit model while the others wait: a long wait is not a hung collective
    dist.init_process_group("nccl" if use_cuda else "gloo", timeout=datetime.timedelta(hours=2))
    torch._dynamo.config.recompile_limit = 64  # a compile per shape; the replays themselves never recompile
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", torch.cuda.current_device()) if use_cuda else torch.device("cpu")
    dtype = torch.bfloat16 if use_cuda else torch.float32
    degrees = degrees_of(world, args.degrees)
    unsplit_group = dist.new_group([0])
    groups = {degree: dist.new_group(list(range(degree))) for degree in degrees}
    runner = Runner(args, device, dtype)

    for variant in args.variants:
        config = mlra_config(variant, args)
        references = {}
        if rank == 0:  # the unsplit model on one GPU, the reference of every degree
            model = random_model(config, device, dtype)
            runner.run_setup(f"{variant} 1 GPU", model, None, unsplit_group, make_mlra_cache(model), references)
            del model
            release(device)
        for degree in degrees:
            try:
                check_degree(config, degree)
            except ValueError as error:
                if rank == 0:
                    runner.record({"setup": f"{variant} TP{degree}", "degree": degree, "error": str(error)})
                continue
            if rank < degree:  # the same random weights as the unsplit model, then this rank's share
                model = shard_model(random_model(config, device, dtype), groups[degree], device=device)
                runner.run_setup(
                    f"{variant} TP{degree}", model, degree, groups[degree], make_mlra_cache(model), references
                )
                del model
            release(device)
            dist.barrier()

    if not args.skip_llama:
        run_llama(runner, args, degrees, unsplit_group, groups, device, dtype, rank)

    if rank == 0:
        runner.report.finish()
        print(markdown(runner.report.meta, runner.report.rows))
    dist.destroy_process_group()


def make_mlra_cache(model):
    return lambda batch, prompt, capacity: filled_mlra_cache(model, batch, prompt, capacity)


def run_llama(runner: Runner, args, degrees, unsplit_group, groups, device, dtype, rank) -> None:
    """transformers' Llama (8 KV heads, the size of MLRA-4): unsplit on one GPU, and at each degree > 1 dividing
    its KV heads split by its own `tp_plan="auto"` over that degree's ranks."""
    config = llama_gqa_config(mlra_config("mlra_4", args), kv_heads=8 if not args.quick else 4)
    references = {}
    folder = Path(tempfile.gettempdir()) / "tp_e2e_llama"
    if rank == 0:
        model = transformers_model(config, device, dtype)
        model.save_pretrained(folder)
        runner.run_setup(
            "llama 1 GPU", model, None, unsplit_group,
            lambda b, p, c: filled_llama_cache(model, b, p, c, 1), references, peer=True,
        )  # fmt: skip
        del model
        release(device)
    dist.barrier()
    for degree in degrees:
        if degree == 1 or config.num_key_value_heads % degree:
            continue
        if rank < degree:
            mesh = dist.device_mesh.DeviceMesh.from_group(groups[degree], device.type)
            model = LlamaForCausalLM.from_pretrained(folder, tp_plan="auto", device_mesh=mesh, dtype=dtype).eval()
            runner.run_setup(
                f"llama TP{degree} (tp_plan=auto)", model, degree, groups[degree],
                lambda b, p, c, model=model, degree=degree: filled_llama_cache(model, b, p, c, degree), {},
                peer=True,
            )  # fmt: skip
            del model
        release(device)
        dist.barrier()


# ----------------------------------------------------------------------------------------------- report


def step_kind(row: dict) -> str | None:
    """The step a row's ratios use: the compiled one where measured, else the graph of the eager step."""
    return "compiled" if "compiled_ms" in row else "graph" if "graph_ms" in row else None


def markdown(meta: dict, rows: list[dict]) -> str:
    one_gpu = {(r["setup"].split()[0], r["batch"], r["prompt"]): r for r in rows if r["setup"].endswith("1 GPU")}
    lines = [
        f"# Tensor-parallel decode, {meta['gpus']} x {meta['device']}, {meta['dtype']}, 2.9B shape, random weights",
        "",
        f"torch {meta['torch']}, transformers {meta['transformers']}, compile backend {meta['backend']}. graph: the "
        "eager decode step captured in a CUDA graph; compiled: the step `torch.compile(fullgraph=True)` then captured "
        f"(at --compiled-shapes); both the median of {meta['replays']} replays. vs 1 GPU: the step (compiled where "
        "measured) / the unsplit model's; collectives: the step's own collectives alone, captured and replayed on "
        "the same ranks, and their share of the step; generate: generate()'s median interval between streamed "
        "tokens (its automatic compile). vs eager: max |replayed - eager logits| / max |eager logits| (graph / "
        "compiled); logits vs 1 GPU: the same against the unsplit model's step of the same kind on the same cache.",
        "",
        "| setup | batch | prompt | graph ms | compiled ms | vs 1 GPU | generate ms | cache GB per GPU | collective ms | "
        "collective share | vs eager | logits vs 1 GPU |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        prompt = f"{row['prompt']:,}" if "prompt" in row else ""
        kind = step_kind(row)
        if kind is None:
            lines.append(f"| {row['setup']} | {row.get('batch', '')} | {prompt} | {row['error']} | | | | | | | | |")
            continue
        base = one_gpu.get((row["setup"].split()[0], row["batch"], row["prompt"]), {})
        ratio = None
        if not row["setup"].endswith("1 GPU") and f"{kind}_ms" in base:
            ratio = row[f"{kind}_ms"] / base[f"{kind}_ms"]
        share = row["collective_ms"] / row[f"{kind}_ms"] if "collective_ms" in row else None
        vs_eager = " / ".join(f"{row[f'{k}_vs_eager']:.1e}" for k in ("graph", "compiled") if f"{k}_vs_eager" in row)
        lines.append(
            f"| {row['setup']} | {row['batch']} | {prompt} | {row['graph_ms']:.3f} | "
            f"{fmt(row.get('compiled_ms'), '.3f')} | {fmt(ratio, '.3f')} | {fmt(row.get('generate_ms'), '.2f')} | "
            f"{row['cache_gb_per_gpu']:.2f} | {fmt(row.get('collective_ms'), '.3f')} | {fmt(share, '.0%')} | "
            f"{vs_eager} | {fmt(row.get(f'{kind}_vs_1_gpu'), '.1e')} |"
        )
    errors = [f"- {row['setup']}, batch {row['batch']}, prompt {row['prompt']:,}: {row['error']}" for row in rows
              if step_kind(row) and "error" in row]  # fmt: skip
    if errors:
        lines += ["", "Errors after the step was measured:", *errors]
    return "\n".join(lines) + "\n"


def plot(meta: dict, rows: list[dict], path: Path) -> None:
    panels = [
        Panel(
            f"batch {batch}", "prompt tokens (cached)", "decode step ms (graph of the eager step)",
            {
                setup: [(r["prompt"], r["graph_ms"]) for r in rows
                        if r["setup"] == setup and r.get("batch") == batch and "graph_ms" in r]
                for setup in dict.fromkeys(row["setup"] for row in rows)
            },
        )  # fmt: skip
        for batch in sorted({row["batch"] for row in rows if "batch" in row})
    ]
    plot_panels(path, panels)


if __name__ == "__main__":
    main()
