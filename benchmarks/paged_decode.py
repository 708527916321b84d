"""Continuous batching's decode attention of one layer on a CUDA GPU: the fused kernel reading the latent pages in place
(`LatentPages`) against the gather it replaced (the paged cache's index_select of the key and the value pages, the
halves joined by torch.cat, then the kernel on the joined rows) and against the kernel on rows already contiguous (the
floor: no pages).

    python benchmarks/paged_decode.py --out benchmarks/results/paged_decode_h200
    TRITON_INTERPRET=1 python benchmarks/paged_decode.py --tiny --out /tmp/pd   # the harness itself, on the CPU

One layer of the 2.9B MLRA-4 (24 heads, 4 x 128 + 64, bfloat16): R requests of C cached tokens each, one new token,
in pages of 256 tokens handed out in random order (the holes of a long-running server). Times are GPU time
(triton.testing.do_bench, median); GB/s = the cache bytes the kernel reads (R x C x 1152) over the time, against a
device-to-device copy of the same bytes timed in the same run. The outputs of the three paths are compared.
"""

import argparse
import json
import sys
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from modeling_mlra.mlra_decode_kernel import LatentPages, mlra_decode_attention  # noqa: E402

K = 1024
PAGE = 256
POINTS = [(16, 32 * K), (64, 8 * K), (118, 32 * K)]
TINY_POINTS = [(3, 300)]


def paged_layer(requests, context, heads, blocks, branches, block_dim, rope_dim, device, dtype, seed=0):
    """Random queries and rows, the rows scattered over shuffled pages; also the same rows contiguous."""
    generator = torch.Generator(device=device).manual_seed(seed)
    width = blocks * block_dim + rope_dim
    q_absorbed = torch.randn(requests, 1, branches, heads, block_dim, device=device, generator=generator).to(dtype)
    q_rope = torch.randn(requests, 1, heads, rope_dim, device=device, generator=generator).to(dtype)
    pages_per_request = -(-context // PAGE)
    num_pages = requests * pages_per_request + requests  # spare pages: holes between the requests' pages
    order = torch.randperm(num_pages, device=device, generator=generator)[: requests * pages_per_request]
    slots = (order.view(requests, pages_per_request, 1) * PAGE + torch.arange(PAGE, device=device)).flatten(1)
    slots = slots[:, :context].flatten()
    key_pages = torch.randn(num_pages * PAGE, width // 2, device=device, generator=generator).to(dtype)
    value_pages = torch.randn(num_pages * PAGE, width // 2, device=device, generator=generator).to(dtype)
    seq_lens = torch.full((requests,), context, device=device)
    row_starts = torch.arange(requests, device=device) * context
    pages = LatentPages(key_pages, value_pages, slots)
    return q_absorbed, q_rope, pages, seq_lens, row_starts, blocks // branches


def run_point(requests, context, device, dtype, tiny):
    shape = (4, 2, 2, 16, 8) if tiny else (24, 4, 4, 128, 64)  # heads, blocks, branches, block width, rope width
    q_absorbed, q_rope, pages, seq_lens, row_starts, groups = paged_layer(requests, context, *shape, device, dtype)
    scaling = 192**-0.5
    rows = pages.gather()  # contiguous rows, prepared outside the timing: the floor

    def in_place():
        return mlra_decode_attention(q_absorbed, q_rope, pages, seq_lens, None, groups, scaling, row_starts=row_starts)

    def gathered():  # what continuous batching did before: the paged cache's gather, the join, the kernel
        keys, values = pages.key_pages.index_select(0, pages.slots), pages.value_pages.index_select(0, pages.slots)
        joined = torch.cat([keys, values], dim=-1)[None]
        return mlra_decode_attention(q_absorbed, q_rope, joined, seq_lens, None, groups, scaling, row_starts=row_starts)

    def contiguous():
        return mlra_decode_attention(q_absorbed, q_rope, rows, seq_lens, None, groups, scaling, row_starts=row_starts)

    outputs = {name: fn().float() for name, fn in (("in place", in_place), ("gathered", gathered),
                                                   ("contiguous", contiguous))}
    row = dict(
        requests=requests, context=context, cache_gb=rows.numel() * rows.element_size() / 1e9,
        max_diff_in_place_vs_contiguous=(outputs["in place"] - outputs["contiguous"]).abs().max().item(),
        max_diff_gathered_vs_contiguous=(outputs["gathered"] - outputs["contiguous"]).abs().max().item(),
    )
    if device == "cuda":
        copy_target = torch.empty_like(rows)
        for name, fn in (("in place", in_place), ("gathered", gathered), ("contiguous", contiguous),
                         ("copy", lambda: copy_target.copy_(rows))):
            row[f"{name} us"] = triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median") * 1e3
            row[f"{name} GB/s"] = row["cache_gb"] / row[f"{name} us"] * 1e6
        del copy_target
    del rows, pages
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/paged_decode_h200")
    parser.add_argument("--tiny", action="store_true", help="small shapes on the CPU (TRITON_INTERPRET=1): the harness")
    options = parser.parse_args()
    device = "cpu" if options.tiny else "cuda"
    dtype = torch.float32 if options.tiny else torch.bfloat16
    meta = dict(torch=torch.__version__, triton=triton.__version__,
                device=torch.cuda.get_device_name() if device == "cuda" else "cpu (interpreter)")
    print(meta, flush=True)
    rows = []
    for requests, context in TINY_POINTS if options.tiny else POINTS:
        rows.append(run_point(requests, context, device, dtype, options.tiny))
        print(rows[-1], flush=True)
        if device == "cuda":
            torch.cuda.empty_cache()
    Path(options.out).parent.mkdir(parents=True, exist_ok=True)
    Path(options.out + ".json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))


if __name__ == "__main__":
    main()
