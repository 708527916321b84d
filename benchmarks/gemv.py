"""The decode step's projections at batch 1 and 16: cuBLAS against the Triton GEMV, and the step with each (issue 16).

    python benchmarks/gemv.py --sweep --out benchmarks/results/gemv_h200     # the GPU run (about a minute)
    python benchmarks/gemv.py --offline                              # no GPU: compile every launch for sm_90 here

Weights of the 2.9B MLRA-4 layer (bfloat16, random): q_a_proj with kv_a_proj_with_mqa (one launch, outputs side by
side), q_b_proj, o_proj, gate_proj with up_proj (one launch, SwiGLU), down_proj, the lm_head, and the absorbed
decode's W_UK fold (24 heads x 4 branches of [128 x 128]) and W_UV (the branches summed), for M = 1 and 16 rows.
Per shape: cuBLAS as the model calls it (F.linear per weight; torch.matmul for W_UK and W_UV), the Triton GEMV
(`modeling_mlra/decode_gemv.py`) with the launch the model makes (`gemv_config`; the RMSNorm of the input, the
residual or W_UV's scale inside it, a programmatic dependent launch where the GPU and Triton have it), that launch
without PDL, the product alone (no norm or residual), and with --sweep other tiles.
Each time is GPU time per call from CUDA-graph replays of calls over enough copies of the weights to leave L2
(several hundred MB, so every call reads its weights from memory, as a decode step does), median; bandwidth =
weight bytes / time, against a device-to-device copy in the same run. The Triton results are checked against
float32 products on the same inputs (relative error).

Then the whole decode step of the 24-layer MLRA-4 (static cache of 16 tokens, batch 1 and 16): the eager step
captured in a CUDA graph with the projections through cuBLAS (decode_kernel="auto", eager) and through the GEMV
(decode_kernel="triton"), its logits against the cuBLAS step's, its kernels (torch.profiler), and the eager step's
wall time per call (the host's launch cost, which is why "auto" keeps cuBLAS outside torch.compile).
--offline compiles each launch for sm_90 (Triton's own specialization) and counts, in the SASS, the 16-byte global
loads (LDG.E.128), all global loads, spills and the matrix instructions.
"""

import argparse
import json
import math
import os
import re
import sys
import time
from pathlib import Path

if "--offline" in sys.argv:
    os.environ.pop("TRITON_INTERPRET", None)
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    Report,
    cache_tensors,
    copy_bandwidth,
    error_text,
    fmt,
    gpu_time_ms,
    published_model,
    random_cache,
    release,
    set_cache_length,
)

from modeling_mlra import decode_gemv  # noqa: E402
from modeling_mlra.decode_gemv import SIDE_BY_SIDE, SINGLE, SWIGLU, _gemv, gemv_config  # noqa: E402
from modeling_mlra.modeling_mlra import CACHE_FIELD  # noqa: E402

H200_SMS = 132
HEADS, BRANCHES, BLOCK, NOPE, VALUE = 24, 4, 128, 128, 128
# (name, kind, first weight rows, second weight rows or 0, reduction): the 2.9B MLRA-4 layer and its lm_head
LINEARS = [
    ("q_a + kv_a", SIDE_BY_SIDE, 1024, 576, 3072),
    ("q_b", SINGLE, 4608, 0, 1024),
    ("o", SINGLE, 3072, 0, 3072),
    ("gate + up", SWIGLU, 9880, 9880, 3072),
    ("down", SINGLE, 3072, 0, 9880),
    ("lm_head", SINGLE, 50304, 0, 3072),
]
UP_PROJECTIONS = ["W_UK fold", "W_UV"]


def _tiles(*tiles):
    return [dict(BLOCK_N=n, BLOCK_K=k, num_warps=w) for n, k, w in tiles]


# --sweep at one row: per shape, tiles (BLOCK_N, BLOCK_K, warps) around the model's (sm_90 registers and 16-byte
# loads in flight per thread from --offline); at 16 rows the tl.dot tiles
SWEEP_ONE_ROW_TILES = {
    "q_a + kv_a": _tiles((4, 1024, 4), (2, 1024, 4), (4, 512, 4), (4, 1024, 8)),
    "q_b": _tiles((4, 1024, 4), (2, 1024, 4), (4, 512, 4), (16, 512, 8)),
    "o": _tiles((4, 1024, 4), (2, 1024, 4), (4, 1024, 8), (8, 512, 4)),
    "gate + up": _tiles((4, 512, 4), (4, 1024, 4), (2, 1024, 4), (8, 256, 4), (2, 2048, 8)),
    "down": _tiles((2, 1024, 4), (8, 512, 4), (4, 1024, 4), (2, 2048, 8), (4, 2048, 8)),
    "lm_head": _tiles((8, 512, 4), (8, 1024, 4), (4, 1024, 4)),
    "W_UK fold": [dict(BLOCK_N=32), dict(BLOCK_N=64)],
    "W_UV": [dict(BLOCK_N=8), dict(BLOCK_N=2)],
}
# ... the model's tile asking its first 8 KB into L2 before it waits (PDL) in place of loading its first tile (asking
# 32 KB or all of its rows into L2 was slower at every shape: benchmarks/results/gemv_h200_prefetch.md); and with the
# next weight tile loaded ahead in the loop (`lookahead`), the model's tile and, where the loop is long, others
SWEEP_LOOKAHEAD_TILES = {
    "gate + up": _tiles((4, 512, 4), (4, 1024, 4)),
    "down": _tiles((2, 1024, 4), (4, 512, 4), (2, 512, 4)),
    "lm_head": _tiles((8, 512, 4), (4, 1024, 4)),
}
SWEEP_ONE_ROW = {
    name: [
        *tiles, dict(preload=False), dict(lookahead=True),
        *(dict(tile, lookahead=True) for tile in SWEEP_LOOKAHEAD_TILES.get(name, [])),
    ]
    for name, tiles in SWEEP_ONE_ROW_TILES.items()
}
SWEEP_ROWS = [dict(BLOCK_N=n, BLOCK_K=k, num_stages=s) for n, k, s in
              ((16, 128, 3), (16, 64, 4), (32, 64, 4), (32, 128, 3), (64, 64, 3))]  # fmt: skip
SWEPT_ROWS = ("q_a + kv_a", "q_b", "o", "gate + up", "down")  # the 16-row shapes swept (97% of a layer's weight bytes)


def sweep(name, rows):
    """The launch choices --sweep times for the shape `name` at `rows` rows."""
    return SWEEP_ONE_ROW.get(name, []) if rows == 1 else SWEEP_ROWS if name in SWEPT_ROWS else []


NORMED = ("q_a + kv_a", "q_b", "gate + up")  # the model's launches with the RMSNorm of their input inside
WITH_RESIDUAL = ("o", "down")  # ... and with the residual added inside
# the model's launch (norm, scale and residual inside, PDL where the GPU and Triton have it) and its variants
VARIANTS = {"triton": {}, "triton, no PDL": dict(pdl=False), "triton, product alone": dict(unfused=True)}


def make_case(name, rows, device, dtype, copies_bytes):
    """[(plain(), gemv(choices), reference(choices)) per copy of the weights] and weight bytes per call. gemv makes
    the model's launch: the RMSNorm of the input inside q_a + kv_a's, q_b's and gate + up's, the residual added
    inside o's and down's, W_UV's scale inside its; choices `unfused=True` leave these out (the product alone),
    `pdl=False` launches without PDL. reference: float32 products of the same inputs (norm, scale, residual as gemv)."""
    generator = torch.Generator(device=device).manual_seed(0)

    def draw(*shape, scale=1.0):
        return (torch.randn(shape, device=device, generator=generator) * scale).to(dtype)

    def split(choices):
        """(the kernel's choices, whether the model's norm / scale / residual go in)"""
        choices = dict(choices)
        return choices, not choices.pop("unfused", False)

    if name in UP_PROJECTIONS:
        weight_bytes = BRANCHES * HEADS * (NOPE + VALUE) * BLOCK * dtype.itemsize // 2
    else:
        _, kind, n1, n2, k = next(case for case in LINEARS if case[0] == name)
        weight_bytes = (n1 + n2) * k * dtype.itemsize
    copies = max(2, min(200, math.ceil(copies_bytes / weight_bytes)))
    calls = []
    for _ in range(copies):
        if name in UP_PROJECTIONS:  # views of one kv_b_proj weight [L, h * (d_n + d_v), d_l], as the model takes them
            weight = draw(BRANCHES, HEADS * (NOPE + VALUE), BLOCK, scale=0.05)
            w_uk, w_uv = weight.view(BRANCHES, HEADS, NOPE + VALUE, BLOCK).split([NOPE, VALUE], dim=2)
            if name == "W_UK fold":
                x = draw(HEADS, rows, NOPE)

                def plain(x=x, w=w_uk):
                    return torch.matmul(x, w)

                def gemv(c, x=x, w=w_uk):
                    return _gemv(x[:, None], w.transpose(-1, -2).flatten(0, 1)[:, None], None, SINGLE, **split(c)[0])

                def reference(c, x=x, w=w_uk):
                    return torch.matmul(x.float(), w.float()).flatten(0, 1)
            else:
                x = draw(BRANCHES, HEADS, rows, BLOCK)

                def plain(x=x, w=w_uv):
                    return torch.matmul(x, w.transpose(-1, -2)).sum(dim=0)

                def gemv(c, x=x, w=w_uv):
                    c, fused = split(c)
                    return _gemv(x.transpose(0, 1), w.transpose(0, 1), None, SINGLE, scale=0.5 if fused else 1.0, **c)

                def reference(c, x=x, w=w_uv):
                    return torch.matmul(x.float(), w.float().transpose(-1, -2)).sum(0) * (0.5 if split(c)[1] else 1.0)
        else:
            x = draw(rows, k)
            w1, w2 = draw(n1, k, scale=0.02), draw(n2, k, scale=0.02) if n2 else None
            norm_weight = draw(k, scale=0.1) + 1 if name in NORMED else None
            residual = draw(rows, n1) if name in WITH_RESIDUAL else None

            def plain(x=x, a=w1, b=w2):  # the GEMVs alone
                return F.linear(x, a) if b is None else (F.linear(x, a), F.linear(x, b))

            def gemv(c, x=x, a=w1, b=w2, kind=kind, norm_weight=norm_weight, residual=residual):
                c, fused = split(c)
                residual = residual if residual is None else residual[None]
                extra = dict(norm_weight=norm_weight, eps=1e-6, residual=residual)
                second = b[None, None] if b is not None else None
                return _gemv(x[None, None], a[None, None], second, kind, **(extra if fused else {}), **c)[0]

            def reference(c, x=x, a=w1, b=w2, kind=kind, norm_weight=norm_weight, residual=residual):
                x, fused = x.float(), split(c)[1]
                if fused and norm_weight is not None:
                    x = F.rms_norm(x, (x.shape[-1],), norm_weight.float(), 1e-6)
                if kind == SWIGLU:
                    return F.silu(x @ a.float().T) * (x @ b.float().T)
                if kind == SIDE_BY_SIDE:
                    return torch.cat([x @ a.float().T, x @ b.float().T], -1)
                return x @ a.float().T + (residual.float() if fused and residual is not None else 0)
        calls.append((plain, gemv, reference))
    return calls, weight_bytes


def relative_error(out, reference) -> float:
    out = out.float().reshape(reference.shape)
    return ((out - reference).norm() / reference.norm()).item()


def measure_projections(args, device, dtype, copy_gbs, report):
    names = [case[0] for case in LINEARS] + UP_PROJECTIONS
    for rows in args.rows:
        for name in names:
            try:
                calls, weight_bytes = make_case(name, rows, device, dtype, args.copies_mb * 2**20)
            except Exception as error:  # noqa: BLE001
                report.record(dict(part="projection", shape=name, rows=rows, error=error_text(error)))
                continue

            def record(variant, fn, check=None, choices=None):
                row = dict(part="projection", shape=name, rows=rows, variant=variant, copies=len(calls),
                           weight_mb=weight_bytes / 1e6, choices=choices)  # fmt: skip
                try:
                    if check is not None:
                        row["relative_error"] = check()
                    row["us"] = gpu_time_ms(fn, rep=args.rep_ms) * 1e3 / len(calls)
                    row["gb_s"] = weight_bytes / (row["us"] * 1e-6) / 1e9
                    row["of_copy_rate"] = row["gb_s"] / copy_gbs
                except Exception as error:  # noqa: BLE001 - one launch choice failing must not lose the others
                    row["error"] = error_text(error)
                report.record(row)
                return row

            record("cuBLAS", lambda: [plain() for plain, _, _ in calls])
            candidates = sweep(name, rows) if args.sweep else []
            for variant, choices in [*VARIANTS.items(), *((f"triton {c}", c) for c in candidates)]:
                record(variant, lambda c=choices: [gemv(c) for _, gemv, _ in calls],
                       lambda c=choices: relative_error(calls[0][1](c), calls[0][2](c)), choices)  # fmt: skip
            del calls
            release(device)


def config_key(name, rows) -> tuple:
    """The shape arguments of `gemv_config` for the model's launch of `name` (rows, outputs, reduction, batches,
    mode, segments)."""
    if name == "W_UK fold":
        return rows, BLOCK, NOPE, BRANCHES * HEADS, SINGLE, 1
    if name == "W_UV":
        return rows, VALUE, BLOCK, HEADS, SINGLE, BRANCHES
    _, kind, n1, n2, k = next(case for case in LINEARS if case[0] == name)
    return rows, n1 + (n2 if kind == SIDE_BY_SIDE else 0), k, 1, kind, 1


def pick_launches(rows_measured) -> list:
    """Per shape and row count, the fastest of the model's launch and the sweep's (what `--gemv-choices` of
    benchmarks/decode_step.py takes): [{shape, rows, key, choices, us, model_us}]."""
    picks = []
    measured = [r for r in rows_measured if r["part"] == "projection" and "us" in r]
    for shape, count in dict.fromkeys((r["shape"], r["rows"]) for r in measured):
        group = [r for r in measured if (r["shape"], r["rows"]) == (shape, count)]
        tritons = [r for r in group if r["variant"] == "triton" or r["variant"].startswith("triton {")]
        if not tritons:
            continue
        best = min(tritons, key=lambda r: r["us"])
        model = next((r["us"] for r in tritons if r["variant"] == "triton"), None)
        picks.append(dict(shape=shape, rows=count, key=list(config_key(shape, count)), choices=best["choices"],
                          us=best["us"], model_us=model))  # fmt: skip
    return picks


def profile_kernels(fn, top=6) -> dict:
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    kernels = [e for e in kernels if not e.name.startswith(("Memcpy", "Memset"))]
    by_name = {}
    for e in kernels:
        by_name[e.name] = by_name.get(e.name, 0.0) + e.device_time
    tops = sorted(by_name.items(), key=lambda item: -item[1])[:top]
    return dict(kernels=len(kernels), kernel_us=sum(by_name.values()),
                top=[dict(name=n[:70], us=us, count=sum(e.name == n for e in kernels)) for n, us in tops])  # fmt: skip


def measure_steps(args, device, dtype, copy_gbs, report):
    """The eager decode step of the 24-layer MLRA-4 in a CUDA graph, projections through cuBLAS or the GEMV."""
    model = published_model("mlra_4", args.layers, device, dtype, max_position_embeddings=4096)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    for batch, context in args.steps:
        cache = random_cache(model, batch, context, reserve=64, static=True)
        ids = torch.randint(0, model.config.vocab_size, (batch, 1), device=device)
        cache_bytes = sum(t.element_size() * t.numel() // t.shape[1] * context for layer in cache_tensors(cache)
                          for t in layer)  # fmt: skip
        logits = {}
        for variant, setting in (("cuBLAS", "auto"), ("triton GEMV", "triton")):
            row = dict(part="step", batch=batch, context=context, variant=variant,
                       floor_ms=(weights + cache_bytes) / (copy_gbs * 1e9) * 1e3)  # fmt: skip
            try:
                model.config.decode_kernel = setting

                def step():
                    set_cache_length(cache, context)
                    return model(ids, logits_to_keep=1, **{CACHE_FIELD: cache}).logits

                with torch.no_grad():
                    logits[variant] = step().float()
                    if variant != "cuBLAS":
                        reference = logits["cuBLAS"]
                        row["logits_vs_cublas"] = ((logits[variant] - reference).abs().max() / reference.abs().max()).item()
                    row["graph_ms"] = gpu_time_ms(step, rep=args.rep_ms * 4)
                    row["graph_of_floor"] = row["graph_ms"] / row["floor_ms"]
                    torch.cuda.synchronize()
                    start = time.perf_counter()
                    for _ in range(10):
                        step()
                    torch.cuda.synchronize()
                    row["eager_ms"] = (time.perf_counter() - start) / 10 * 1e3
                    row.update(profile_kernels(step))
            except Exception as error:  # noqa: BLE001
                row["error"] = error_text(error)
            report.record(row)
        model.config.decode_kernel = "auto"
        del cache
        release(device)


def markdown(meta, rows) -> str:
    lines = [
        f"# Decode-step projections, cuBLAS against the Triton GEMV: {meta['device']}, {meta['dtype']}",
        "",
        f"Versions: torch {meta['torch']}, triton {meta['triton']}, CUDA {meta['cuda']}  ",
        f"Copy rate in this run: {fmt(meta.get('copy_gb_s'), '.0f')} GB/s (read + written). How each number is made: "
        "the docstring of benchmarks/gemv.py.",
        "",
        "## Projections: us per call (fraction of the copy rate)",
        "",
        "The model's launch has the RMSNorm of its input inside (q_a + kv_a, q_b, gate + up), the residual added "
        "inside (o, down) or the scale (W_UV), and launches with PDL where the GPU and Triton have it; \"no PDL\" is "
        "that launch without it, \"product alone\" the product without the norm or residual (PDL on). cuBLAS: the "
        "product alone.",
        "",
        "| shape | rows | weight MB | cuBLAS | Triton (model's launch) | no PDL | product alone | best Triton (sweep) "
        "| best choice | Triton rel. error |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    projections = [r for r in rows if r["part"] == "projection" and "us" in r]
    keys = list(dict.fromkeys((r["shape"], r["rows"]) for r in projections))
    for shape, count in keys:
        group = [r for r in projections if (r["shape"], r["rows"]) == (shape, count)]
        by_variant = {r["variant"]: r for r in group}
        tritons = [r for r in group if r["variant"] == "triton" or r["variant"].startswith("triton {")]
        best = min(tritons, key=lambda r: r["us"]) if tritons else None

        def cell(r):
            return "-" if r is None else f"{r['us']:.1f} ({r['of_copy_rate']:.2f})"

        error = by_variant.get("triton", {}).get("relative_error")
        lines.append(
            f"| {shape} | {count} | {group[0]['weight_mb']:.1f} | {cell(by_variant.get('cuBLAS'))} "
            f"| {cell(by_variant.get('triton'))} | {cell(by_variant.get('triton, no PDL'))} "
            f"| {cell(by_variant.get('triton, product alone'))} | {cell(best)} | {best['variant'] if best else '-'} "
            f"| {fmt(error, '.1e')} |"
        )
    failed = [r for r in rows if r["part"] == "projection" and "error" in r]
    if failed:
        lines += ["", "Failed: " + "; ".join(f"{r['shape']} x{r['rows']} {r.get('variant', '')}: {r['error']}"
                                            for r in failed[:12])]  # fmt: skip
    steps = [r for r in rows if r["part"] == "step"]
    if steps:
        lines += [
            "",
            "## The 24-layer decode step (eager, in a CUDA graph), projections through cuBLAS or the GEMV",
            "",
            "| batch x context | projections | graph ms | floor ms | graph / floor | eager ms per step (host) "
            "| logits vs cuBLAS | kernels | kernel ms | top kernels |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
        ]
        for r in steps:
            if "error" in r:
                lines.append(f"| {r['batch']} x {r['context']} | {r['variant']} | {r['error']} |" + " |" * 7)
                continue
            top = "; ".join(f"{t['name']} x{t['count']} {t['us']:.0f} us" for t in r.get("top", []))
            lines.append(
                f"| {r['batch']} x {r['context']} | {r['variant']} | {r['graph_ms']:.2f} | {r['floor_ms']:.2f} "
                f"| {r['graph_of_floor']:.2f} | {r['eager_ms']:.2f} | {fmt(r.get('logits_vs_cublas'), '.1e')} "
                f"| {r.get('kernels', '-')} | {fmt(r.get('kernel_us') and r['kernel_us'] / 1e3, '.2f')} | {top} |"
            )
    return "\n".join(lines) + "\n"


def plot(meta, rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    projections = [r for r in rows if r["part"] == "projection" and "us" in r]
    counts = sorted({r["rows"] for r in projections})
    figure, axes = plt.subplots(1, len(counts), figsize=(7 * len(counts), 4.5), squeeze=False)
    for axis, count in zip(axes[0], counts):
        shapes = list(dict.fromkeys(r["shape"] for r in projections if r["rows"] == count))
        for offset, (label, pick) in enumerate((
            ("cuBLAS", lambda g: [r for r in g if r["variant"] == "cuBLAS"]),
            ("Triton (model's launch)", lambda g: [r for r in g if r["variant"] == "triton"]),
            ("Triton, no PDL", lambda g: [r for r in g if r["variant"] == "triton, no PDL"]),
        )):
            values = []
            for shape in shapes:
                chosen = pick([r for r in projections if r["rows"] == count and r["shape"] == shape])
                values.append(chosen[0]["of_copy_rate"] if chosen else 0)
            axis.bar([i + 0.27 * offset for i in range(len(shapes))], values, width=0.27, label=label)
        axis.set_xticks([i + 0.27 for i in range(len(shapes))], shapes, rotation=30, fontsize=8)
        axis.set(ylabel="weight bytes / time, fraction of the copy rate", title=f"{count} row(s)")
        axis.axhline(1.0, color="black", linestyle="--", linewidth=0.8)
        axis.legend(fontsize=7)
    figure.suptitle(f"{meta['device']}, {meta['dtype']}: decode-step projections")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def offline(args):
    """Compile every launch the benchmark makes for sm_90 here and count loads and spills in the SASS."""
    from compile_decode_kernel import compile_for_hopper, resources_and_sass

    launches = []
    original_kernel, original_sms = decode_gemv._gemv_kernel, decode_gemv._num_sms

    class Recorder:
        def __getitem__(self, grid):
            return lambda *a, **kw: launches.append((grid, a, kw))

    decode_gemv._gemv_kernel, decode_gemv._num_sms = Recorder(), lambda index: H200_SMS
    try:
        meta = dict(device="meta", dtype=torch.bfloat16)
        for rows in args.rows:
            for name, kind, n1, n2, k in LINEARS:
                for choices in [{}] + (sweep(name, rows) if args.sweep else []):
                    second = torch.empty(n2, k, **meta)[None, None] if n2 else None
                    _gemv(torch.empty(1, 1, rows, k, **meta), torch.empty(n1, k, **meta)[None, None], second, kind,
                          **choices)  # fmt: skip
                    launches[-1] = (name, rows, choices) + launches[-1]
            weight = torch.empty(BRANCHES, HEADS, NOPE + VALUE, BLOCK, **meta)
            w_uk, w_uv = weight.split([NOPE, VALUE], dim=2)
            _gemv(torch.empty(HEADS, 1, rows, NOPE, **meta), w_uk.transpose(-1, -2).flatten(0, 1)[:, None], None, SINGLE)
            launches[-1] = ("W_UK fold", rows, {}) + launches[-1]
            x = torch.empty(BRANCHES, HEADS, rows, BLOCK, **meta).transpose(0, 1)
            _gemv(x, w_uv.transpose(0, 1), None, SINGLE)
            launches[-1] = ("W_UV", rows, {}) + launches[-1]
    finally:
        decode_gemv._gemv_kernel, decode_gemv._num_sms = original_kernel, original_sms
    print("| shape | rows | choices | grid | tile (M x N x K) | warps | stages | registers | stack bytes | shared bytes "
          "| LDG.E.128 | LDG | LDGSTS | LDL/STL | HMMA |")
    print("|---|---:|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    import tempfile

    for name, rows, choices, grid, a, kw in launches:
        try:
            compiled = compile_for_hopper(original_kernel, a, kw)
        except Exception as error:  # noqa: BLE001
            print(f"| {name} | {rows} | {choices} | failed: {str(error)[:150]} |")
            continue
        with tempfile.NamedTemporaryFile(suffix=".sass") as sass_file:
            counts = resources_and_sass(compiled, Path(sass_file.name))
            sass = Path(sass_file.name).read_text()
        wide = len(re.findall(r"\bLDG\.E\.(?:EL\.)?(?:LTC\d+B\.)?128", sass))
        tile = f"{kw['BLOCK_M']}x{kw['BLOCK_N']}x{kw['BLOCK_K']}"
        print(f"| {name} | {rows} | {choices or 'model'} | {grid} | {tile} | {kw['num_warps']} | {kw['num_stages']} "
              f"| {counts['registers']} | {counts['stack bytes']} | {counts['shared bytes']} | {wide} | {counts['LDG']} "
              f"| {counts['LDGSTS']} | {counts['LDL/STL']} | {counts['HMMA']} |", flush=True)  # fmt: skip


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/gemv_h200"))
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--sweep", action="store_true", help="also time other launch choices (SWEEP)")
    parser.add_argument("--copies-mb", type=float, default=300, help="weight copies per timed graph, in MB")
    parser.add_argument("--rep-ms", type=float, default=20)
    parser.add_argument("--steps", nargs="*", default=["1x16"], help="whole-step shapes, batch x context")
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--offline", action="store_true", help="compile for sm_90 here (no GPU) and report the SASS")
    args = parser.parse_args(argv)
    args.steps = [tuple(int(v) for v in s.split("x")) for s in args.steps]
    if args.offline:
        offline(args)
        return
    from common import command_line, software_versions

    device, dtype = torch.device("cuda"), torch.bfloat16
    meta = dict(command=command_line(argv), device=torch.cuda.get_device_name(device), dtype="bfloat16",
                **software_versions())  # fmt: skip
    report = Report(args.out, meta, markdown, plot)
    meta["copy_gb_s"] = copy_gbs = copy_bandwidth(device)
    release(device)
    print(f"copy rate {copy_gbs:.0f} GB/s; model launch choices: " + ", ".join(
        f"{n} x{r}: {gemv_config(r, n1 + (n2 if k_ == SIDE_BY_SIDE else 0), k, 1, k_, H200_SMS)}"
        for r in args.rows for n, k_, n1, n2, k in LINEARS), flush=True)  # fmt: skip
    measure_projections(args, device, dtype, copy_gbs, report)
    if args.sweep:
        picks = pick_launches(report.rows)
        args.out.with_name(args.out.name + "_picks.json").write_text(json.dumps(picks, indent=1))
        for pick in picks:
            print(f"picked {pick['shape']} x{pick['rows']}: {pick['choices']} {pick['us']:.1f} us (model's launch "
                  f"{fmt(pick['model_us'], '.1f')}) -> gemv_config {gemv_config(*pick['key'][:5], H200_SMS, segments=pick['key'][5], **pick['choices'])}", flush=True)  # fmt: skip
    if args.steps:
        measure_steps(args, device, dtype, copy_gbs, report)
    report.finish()
    print("\n" + args.out.with_suffix(".md").read_text(), flush=True)


if __name__ == "__main__":
    main()
