"""Helpers shared by the benchmarks: the models at the published shapes (ours and transformers' DeepseekV3 and Llama
of the same size), caches filled with random states in the layout each model's forward writes, the check of that
layout, a device-to-device copy as the bandwidth reference, a streamer that times generated tokens, the timing
functions, and the reporting: every result is written as OUT.json and OUT.md, both naming the command that wrote
them, and plotted as OUT.png."""

import gc
import json
import os
import platform
import shlex
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import transformers
from transformers import (
    DeepseekV3Config,
    DeepseekV3ForCausalLM,
    DynamicCache,
    LlamaConfig,
    LlamaForCausalLM,
    StaticCache,
)
from transformers.generation.streamers import BaseStreamer

REPOSITORY = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPOSITORY))
from modeling_mlra import MLRACache, MLRAConfig, MLRAForCausalLM  # noqa: E402
from modeling_mlra.modeling_mlra import CACHE_FIELD, MLRALatentCacheLayer  # noqa: E402


def random_model(config: MLRAConfig, device, dtype) -> MLRAForCausalLM:
    """Ours with random weights, built on `device` (seed 0, so every process builds the same); the output
    projections random too (not the zero init), so every layer's attention and MLP contribute."""
    torch.manual_seed(0)
    with torch.device(device):
        model = MLRAForCausalLM._from_config(config, dtype=dtype).eval()
    with torch.no_grad():
        for module in model.modules():
            if getattr(module, "is_residual_output", False):
                module.weight.normal_(0, config.initializer_range)
    return model


def published_model(variant: str, layers: int, device, dtype, **overrides) -> MLRAForCausalLM:
    """`random_model` of a family member at the published shapes with `layers` layers (`overrides`: any field)."""
    return random_model(MLRAConfig.from_variant(variant, num_hidden_layers=layers, **overrides), device, dtype)


def deepseek_v3_config(reference: MLRAConfig) -> DeepseekV3Config:
    """transformers' DeepseekV3 with every layer dense (no MoE is built) and the sizes of `reference` (an MLRA
    config): the same latent, head and MLP widths, vocabulary, tied embeddings and context length."""
    return DeepseekV3Config(
        vocab_size=reference.vocab_size, hidden_size=reference.hidden_size,
        intermediate_size=reference.intermediate_size, num_hidden_layers=reference.num_hidden_layers,
        num_attention_heads=reference.num_attention_heads, num_key_value_heads=reference.num_attention_heads,
        q_lora_rank=reference.q_lora_rank, kv_lora_rank=reference.kv_lora_rank,
        qk_nope_head_dim=reference.qk_nope_head_dim, qk_rope_head_dim=reference.qk_rope_head_dim,
        v_head_dim=reference.v_head_dim, first_k_dense_replace=reference.num_hidden_layers, n_routed_experts=8,
        num_experts_per_tok=2, n_group=1, topk_group=1, tie_word_embeddings=True,
        max_position_embeddings=reference.max_position_embeddings, rms_norm_eps=1e-6,
    )  # fmt: skip


def llama_gqa_config(reference: MLRAConfig, kv_heads: int = 8) -> LlamaConfig:
    """transformers' Llama of the size of `reference`: the same query heads, `kv_heads` key/value heads (GQA) of
    the value head width, MLP width, vocabulary, tied embeddings and context length."""
    return LlamaConfig(
        vocab_size=reference.vocab_size, hidden_size=reference.hidden_size,
        intermediate_size=reference.intermediate_size, num_hidden_layers=reference.num_hidden_layers,
        num_attention_heads=reference.num_attention_heads, num_key_value_heads=kv_heads,
        head_dim=reference.v_head_dim, tie_word_embeddings=True,
        max_position_embeddings=reference.max_position_embeddings, rms_norm_eps=1e-6,
    )  # fmt: skip


def transformers_model(config, device, dtype):
    """DeepseekV3ForCausalLM or LlamaForCausalLM (from the config's type) with random weights, built on `device`."""
    model_class = DeepseekV3ForCausalLM if isinstance(config, DeepseekV3Config) else LlamaForCausalLM
    torch.manual_seed(0)
    with torch.device(device):
        return model_class._from_config(config, dtype=dtype).eval()


def cache_states_shapes(config, batch: int, tokens: int) -> list[tuple[int, ...]]:
    """Shapes of the tensors a layer's forward passes to `cache.update` for `tokens` new tokens: ours, the latent and
    rope key [bsz, T, d_c + d_r]; DeepseekV3, the normalized latent [bsz, 1, T, d_c] and the rotated rope key
    [bsz, 1, T, d_r] (it re-expands them every step); Llama, K and V [bsz, kv_heads, T, head_dim]."""
    if isinstance(config, MLRAConfig):
        return [(batch, tokens, config.kv_lora_rank + config.qk_rope_head_dim)]
    if isinstance(config, DeepseekV3Config):
        return [(batch, 1, tokens, config.kv_lora_rank), (batch, 1, tokens, config.qk_rope_head_dim)]
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return [(batch, config.num_key_value_heads, tokens, head_dim)] * 2


def empty_cache(model, capacity: int, static: bool = False):
    """An empty cache of the model's kind: ours `MLRACache` (static: allocated at `capacity`; growing: that capacity
    up front, so no doubling copy falls inside a timing); DeepseekV3 and Llama: transformers' `StaticCache` at
    `capacity` or a `DynamicCache`."""
    if isinstance(model, MLRAForCausalLM):
        cache = MLRACache(model.config, max_cache_len=capacity if static else None)
        for layer in cache.layers:
            layer.min_capacity = capacity
        return cache
    return StaticCache(config=model.config, max_cache_len=capacity) if static else DynamicCache(config=model.config)


def random_cache(model, batch: int, tokens: int, reserve: int, static: bool = False):
    """`empty_cache(model, tokens + reserve, static)` holding `tokens` random tokens per row, written through the
    cache's own `update` with tensors of the shapes the model's forward passes to it (`cache_states_shapes`)."""
    cache = empty_cache(model, tokens + reserve, static)
    parameter = next(model.parameters())
    shapes = cache_states_shapes(model.config, batch, tokens)
    for layer_idx in range(model.config.num_hidden_layers):
        states = [torch.randn(shape, dtype=parameter.dtype, device=parameter.device) for shape in shapes]
        cache.update(*states, layer_idx)
    return cache


def cache_tensors(cache) -> list[list[torch.Tensor]]:
    """Per layer, the tensors the cache holds for it: the filled part of a growing cache, all of a static one."""
    tensors = []
    for layer in cache.layers:
        if isinstance(layer, MLRALatentCacheLayer):
            filled = layer.buffer if layer.is_compileable else layer.buffer[:, : layer.get_seq_length()]
            tensors.append([filled])
        else:
            tensors.append([layer.keys, layer.values])
    return tensors


def set_cache_length(cache, length: int) -> None:
    """Rewind (or advance) a static cache to `length` tokens in place, on the device: the next step writes slot
    `length` (ours and transformers' static layers both count their tokens in a `cumulative_length` tensor)."""
    for layer in cache.layers:
        layer.cumulative_length.fill_(length)


def check_cache_layout(model, static: bool = False, tokens: int = 8, reserve: int = 8) -> None:
    """`random_cache` must hold the shapes and dtypes that the model's own forward writes: compared with a real
    forward of `tokens` tokens into `empty_cache` of the same kind and capacity."""
    filled = random_cache(model, 1, tokens, reserve, static)
    written = empty_cache(model, tokens + reserve, static)
    ids = torch.randint(0, model.config.vocab_size, (1, tokens), device=next(model.parameters()).device)
    with torch.no_grad():
        model(ids, logits_to_keep=1, **{CACHE_FIELD: written})
    describe = lambda c: [[(tuple(t.shape), t.dtype) for t in layer] for layer in cache_tensors(c)]  # noqa: E731
    if describe(written) != describe(filled) or int(written.get_seq_length()) != int(filled.get_seq_length()):
        raise RuntimeError(f"{type(model).__name__}: random cache {describe(filled)} != forward's {describe(written)}")


def copy_bandwidth(device, gigabytes: float = 2.0) -> float:
    """Device-to-device copy, GB/s counting bytes read and written."""
    src = torch.empty(int(gigabytes * 2**30), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        dst.copy_(src)
    end.record()
    torch.cuda.synchronize()
    return 2 * src.numel() * 10 / (start.elapsed_time(end) / 1e3) / 1e9


class IntervalStreamer(BaseStreamer):
    """Records when each put reaches the streamer: the prompt first, then every new token. generate() puts tokens
    already copied to the host (so their step is done), as a streamer that prints them sees them; waiting here for
    the whole device would also wait for the step generate() has queued behind them."""

    def __init__(self):
        self.times = []

    def put(self, value):
        self.times.append(time.perf_counter())

    def end(self):
        pass

    def intervals_ms(self) -> list[float]:
        """Milliseconds between consecutive puts; the first is the prompt's forward up to the first new token."""
        return [(b - a) * 1e3 for a, b in zip(self.times, self.times[1:])]

    def median_ms(self, skip: int = 1) -> float:
        """Median interval after the first `skip` (1: leave out the prompt's forward)."""
        return statistics.median(self.intervals_ms()[skip:])


# ----------------------------------------------------------------------------------------------- timing


def synchronize(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def timed_ms(fn, device):
    """(fn(), milliseconds): CUDA events on the GPU (the device's time from launch to finish), a wall clock on the
    CPU."""
    if torch.device(device).type != "cuda":
        start = time.perf_counter()
        result = fn()
        return result, (time.perf_counter() - start) * 1e3
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    result = fn()
    end.record()
    end.synchronize()
    return result, start.elapsed_time(end)


def gpu_time_ms(fn, rep: int = 50) -> float:
    """Median milliseconds of GPU time of fn(), replayed from a CUDA graph: host launch overhead is left out, as it
    is in a captured decode step. fn runs once eagerly first (kernel compilation, autotuning).

    `triton.testing.do_bench_cudagraph` runs fn on a new side stream that does not wait for the current one, so the
    device is synchronised first: inputs made just before on the current stream (a cache of gigabytes still being
    filled with random values, the per-row lengths) must be complete before fn reads them. Without this the decode
    kernel read its per-row lengths from memory not yet written (an old allocation's bytes) and streamed far past
    the cache: the illegal-address fault of the earlier H200 runs, absent under CUDA_LAUNCH_BLOCKING=1."""
    import triton.testing

    fn()
    torch.cuda.synchronize()
    return triton.testing.do_bench_cudagraph(fn, rep=rep, return_mode="median")


def median_ms(fn, device, warmup: int = 1, iterations: int = 5) -> float:
    """Median milliseconds of fn(): `gpu_time_ms` on a GPU; on the CPU the wall time of `iterations` calls after
    `warmup`."""
    if torch.device(device).type == "cuda":
        return gpu_time_ms(fn)
    for _ in range(warmup):
        fn()
    return statistics.median(timed_ms(fn, device)[1] for _ in range(iterations))


def release(device) -> None:
    """Free what the previous configuration left (between models or sizes in one process)."""
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------- reporting


def command_line(argv: list[str] | None = None) -> str:
    """The command that is running, as typed from the repository root (under torchrun, with its process count)."""
    script = Path(sys.argv[0]).resolve()
    if script.is_relative_to(REPOSITORY):
        script = script.relative_to(REPOSITORY)
    launcher = "python"
    if "LOCAL_WORLD_SIZE" in os.environ:
        launcher = f"torchrun --nproc-per-node {os.environ['LOCAL_WORLD_SIZE']}"
    return " ".join([launcher, str(script), *map(shlex.quote, sys.argv[1:] if argv is None else argv)])


def software_versions() -> dict:
    """Python, torch, transformers, triton (None where not installed) and CUDA versions."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return dict(
        python=platform.python_version(), torch=torch.__version__, transformers=transformers.__version__,
        triton=triton_version, cuda=torch.version.cuda,
    )  # fmt: skip


def run_setting(parser, args, argv: list[str] | None, layers: int) -> tuple[torch.device, torch.dtype, dict]:
    """A one-GPU measurement's device, dtype and report header: bfloat16 on the GPU, which the measurement needs
    (parser.error without one); with `args.quick`, float32 on one CPU thread, to check the script."""
    dtype = torch.float32 if args.quick else torch.bfloat16
    device = torch.device("cuda" if torch.cuda.is_available() and not args.quick else "cpu")
    if device.type != "cuda" and not args.quick:
        parser.error("no CUDA device: the measurement needs a GPU (--quick checks the script on the CPU)")
    if args.quick:
        torch.set_num_threads(1)
    meta = dict(
        command=command_line(argv), device=torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU",
        dtype=str(dtype).removeprefix("torch."), layers=layers, machine=platform.node(), **software_versions(),
    )  # fmt: skip
    return device, dtype, meta


def write_results(out: Path, data: dict, markdown: str, command: str | None = None) -> None:
    """OUT.json (`data` and the command) and OUT.md (`markdown` with the command under its title line)."""
    out = Path(out)
    command = command or command_line()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"command": command, **data}, indent=1, default=str))
    title, _, body = markdown.partition("\n")
    out.with_suffix(".md").write_text(f"{title}\n\nCommand: `{command}`\n{body}")


def error_text(error: BaseException) -> str:
    """One line for a configuration that failed: "out of memory", or the exception's type and first line."""
    if isinstance(error, torch.OutOfMemoryError):
        return "out of memory"
    message = str(error).strip()
    return f"{type(error).__name__}: {message.splitlines()[0][:200] if message else ''}"


def fmt(value, spec: str) -> str:
    """A table cell: `value` formatted, "-" for None (not measured)."""
    return "-" if value is None else format(value, spec)


class Report:
    """Rows as they complete: every `record` rewrites OUT.json and OUT.md (`markdown(meta, rows)`), so a run cut short
    keeps what it measured, and a table that fails to render does not stop the run (the .json holds every row).
    `finish` writes them once more and draws OUT.png (`plot(meta, rows, path)`)."""

    def __init__(self, out: Path, meta: dict, markdown, plot=None):
        self.out, self.meta, self.rows = Path(out), meta, []
        self.markdown, self.plot = markdown, plot

    def record(self, row: dict) -> None:
        self.rows.append(row)
        print(json.dumps(row), flush=True)
        self.write()

    def write(self) -> None:
        try:
            text = self.markdown(self.meta, self.rows)
        except Exception as error:  # noqa: BLE001 - the .json holds every row
            text = f"# {self.out.name}: the table could not be written ({error_text(error)}); see the .json\n"
        write_results(self.out, dict(meta=self.meta, rows=self.rows), text, command=self.meta.get("command"))

    def finish(self) -> None:
        self.write()
        if self.plot is None:
            return
        try:
            self.plot(self.meta, self.rows, self.out.with_suffix(".png"))
        except ImportError:
            print("matplotlib is not installed: no PNG", flush=True)
        except Exception as error:  # noqa: BLE001 - the table and the .json are written
            print(f"could not draw the .png: {error_text(error)}", flush=True)


@dataclass
class Panel:
    """One plot: lines (label -> (x, y) points) and horizontal reference lines (label -> y)."""

    title: str
    xlabel: str
    ylabel: str
    lines: dict[str, list[tuple[float, float]]]
    references: dict[str, float] = field(default_factory=dict)
    xscale: str = "log"
    yscale: str = "linear"


def plot_panels(path: Path, panels: list[Panel], title: str | None = None) -> None:
    """The panels side by side in one PNG; without matplotlib, a note and no file."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no PNG")
        return
    figure, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False)
    for axis, panel in zip(axes[0], panels):
        for label, points in panel.lines.items():
            if points:
                axis.plot(*zip(*sorted(points)), marker="o", label=label)
        for label, value in panel.references.items():
            axis.axhline(value, color="black", linestyle="--", label=label)
        axis.set(xscale=panel.xscale, yscale=panel.yscale, xlabel=panel.xlabel, ylabel=panel.ylabel, title=panel.title)
        axis.grid(True, which="both", alpha=0.3)
        axis.legend(fontsize=7)
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(Path(path), dpi=120)
    plt.close(figure)
