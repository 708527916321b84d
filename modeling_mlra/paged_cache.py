"""Continuous batching on the compressed cache: transformers' `PagedAttentionCache` holding MLRA's latent.

transformers' continuous batching (`generate_batch`, `init_continuous_batching`, `transformers serve
--continuous-batching`) builds its paged cache from the config: per token and layer a key and a value of
`num_key_value_heads` x `head_dim` values. `MLRAConfig` declares one head of (d_c + d_r) / 2 values, so the pages hold
exactly the latent row `MLRACache` keeps (d_c + d_r values): its first half in the key page, its second half in the
value page. `MLRAPagedLatent` writes and reads the rows through the paged cache's own `update` (the release's index
arithmetic, prefix sharing and forking stay transformers'), tells the attention where each sequence of the packed
batch has its new tokens and its rows (each attends to its own only: no scores between sequences), and lays the
packed queries out as one row per sequence for the fused decode kernel.

The paged cache's call convention changed during 5.x; both are handled here (tested on transformers 5.17 and 5.24).
"""

import functools
import inspect

import torch

try:
    from transformers.generation.continuous_batching import PagedAttentionCache
except ImportError:  # a transformers release without continuous batching: no paged cache can reach the model
    PagedAttentionCache = None

# the keyword names of the batch's longest query changed during 5.x (`max_seqlen_q` up to 5.2x, then `max_length_q`)
MAX_QUERY_LENGTH_KEYS = ("max_length_q", "max_seqlen_q")


def is_paged_cache(cache) -> bool:
    return PagedAttentionCache is not None and isinstance(cache, PagedAttentionCache)


def _update_takes_kwargs(cache) -> bool:
    """transformers >= 5.2x: `update(key, value, layer_idx, kwargs)`; earlier: `update(..., read_index, write_index)`."""
    return "kwargs" in inspect.signature(type(cache).update).parameters


class MLRAPagedLatent:
    """One forward pass of continuous batching on a `PagedAttentionCache`: the packed batch of sequences (all in one
    row, `cu_seq_lens_q` / `cu_seq_lens_k` delimit them) and the paged cache that holds their latent rows.

    Each sequence attends to its own rows only, found from the cumulative lengths: the block-diagonal mask continuous
    batching builds for sdpa and eager ([1, 1, T, pages + T]) is never read. Sequences with few new tokens can run
    as rows of the fused decode kernel (`use_kernel_rows`), the others one at a time (`sequences`).

    Args:
        cache: the `PagedAttentionCache` continuous batching passed to the model.
        batch_kwargs: the other keyword arguments it passed (read/write indices, cumulative lengths, ...).
    """

    def __init__(self, cache, batch_kwargs: dict):
        if batch_kwargs.get("block_table") is not None:
            raise ValueError(
                "MLRA models read their latent pages through the read/write indices of continuous batching, not "
                "through a flash-attention block table: pass ContinuousBatchingConfig(max_blocks_per_request=0)"
            )
        self.cache = cache
        self.batch_kwargs = batch_kwargs
        self.update_takes_kwargs = _update_takes_kwargs(cache)
        self.kernel_inputs = None

    def use_kernel_rows(self, num_tokens: int, row_width: int) -> None:
        """Lay the packed queries out as the fused kernel's grid [sequences, row_width], for the sequences with at
        most `row_width` new tokens: each one's tokens at the end of its row (the kernel counts a row's new tokens
        from its end; the leading slots of a shorter sequence hold zero queries whose outputs are dropped). Tokens of
        longer sequences (attended one at a time, `sequences`) and padding tokens past the last sequence (CUDA graphs)
        go to a spare row, and a longer sequence's row reads no keys. Sets `kernel_inputs`: (keys per row, no key
        mask, each row's first key in the rows `update` returns). No host synchronisation."""
        cu_seq_lens_q = self.batch_kwargs["cu_seq_lens_q"]
        starts, ends = cu_seq_lens_q[:-1].long(), cu_seq_lens_q[1:].long()
        self.num_rows, self.row_width = ends.shape[0], row_width
        in_kernel = ends - starts <= row_width
        tokens = torch.arange(num_tokens, device=ends.device)
        sequence = torch.bucketize(tokens, ends, right=True)  # num_rows for padding tokens
        known = sequence.clamp(max=self.num_rows - 1)
        spare = (sequence == self.num_rows) | ~in_kernel[known]
        in_row = row_width - (ends[known] - tokens)
        self.token_slots = torch.where(
            spare, self.num_rows * row_width + tokens % row_width, sequence * row_width + in_row
        )
        key_offsets = self.key_offsets()
        self.kernel_inputs = (torch.where(in_kernel, key_offsets.diff(), 0), None, key_offsets[:-1])

    def to_rows(self, packed: torch.Tensor) -> torch.Tensor:
        """[1, T, ...] packed queries -> [sequences, row_width, ...] kernel rows (see `use_kernel_rows`)."""
        grid = packed.new_zeros((self.num_rows + 1) * self.row_width, *packed.shape[2:])
        grid[self.token_slots] = packed[0]
        return grid[: self.num_rows * self.row_width].unflatten(0, (self.num_rows, self.row_width))

    def from_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """[sequences, row_width, ...] -> [1, T, ...], the packed tokens' outputs (tokens outside the rows: zeros)."""
        flat = torch.cat([rows.flatten(0, 1), rows.new_zeros(self.row_width, *rows.shape[2:])])
        return flat[self.token_slots].unsqueeze(0)

    @functools.cached_property
    def sequences(self) -> list[tuple[slice, slice]]:
        """Per sequence with new tokens: (its tokens in the packed batch, its rows in what `update` returns; the new
        tokens are its last rows). Read on the host: one synchronisation per forward pass."""
        queries = self.batch_kwargs["cu_seq_lens_q"].tolist()
        keys = self.key_offsets().tolist()
        return [
            (slice(queries[n], queries[n + 1]), slice(keys[n], keys[n + 1]))
            for n in range(len(queries) - 1)
            if queries[n + 1] > queries[n]
        ]

    @functools.cached_property
    def max_new_tokens(self) -> int:
        """The most new tokens any sequence of the batch has (decode steps: 1); read once per forward pass (every
        layer asks, and without an int in the batch's kwargs it is read from the device)."""
        for key in MAX_QUERY_LENGTH_KEYS:
            if isinstance(self.batch_kwargs.get(key), int):
                return self.batch_kwargs[key]
        return int(self.batch_kwargs["cu_seq_lens_q"].diff().max())

    def key_offsets(self) -> torch.Tensor:
        """cu_seq_lens_k [sequences + 1]: where each sequence's tokens start in the rows `update` returns."""
        offsets = self.batch_kwargs["cu_seq_lens_k"]
        return offsets["full_attention"] if isinstance(offsets, dict) else offsets

    def update(self, states: torch.Tensor, layer_idx: int) -> torch.Tensor:
        """Write the new latent rows states [1, T, d_c + d_r] into the pages; return every row the batch's sequences
        attend to, [1, S, d_c + d_r] (sequence after sequence, as cu_seq_lens_k delimits them)."""
        width = states.shape[-1]
        half = self.cache_half_width(layer_idx)
        if width != 2 * half:
            raise ValueError(
                f"the paged cache holds {2 * half} values per token and layer but the model caches {width}: build "
                "continuous batching from this model's config (num_key_value_heads=1, head_dim=(d_c + d_r) / 2)"
            )
        key, value = (part.unsqueeze(1) for part in states.split(half, dim=-1))  # [1, 1, T, half]: one "head"
        if self.update_takes_kwargs:
            # the cache replaces per-layer entries of the dict it is given: a fresh one for every layer
            key, value = self.cache.update(key, value, layer_idx, kwargs=dict(self.batch_kwargs))
        else:
            key, value = self.cache.update(
                key, value, layer_idx, read_index=self.batch_kwargs["read_index"],
                write_index=self.batch_kwargs["write_index"],
            )
        return torch.cat([key.reshape(1, -1, half), value.reshape(1, -1, half)], dim=-1)

    def cache_half_width(self, layer_idx: int) -> int:
        """The values per token of a key (or value) page, as the paged cache was sized."""
        allocators = getattr(self.cache, "layer_to_allocator", None)  # >= 5.2x: one allocator per attention type
        if allocators is not None:
            allocator = allocators[layer_idx]
            return allocator.num_key_value_heads * allocator.head_dim
        return self.cache.num_key_value_heads * self.cache.head_dim


def paged_cache_bytes_per_token(cache) -> int:
    """Bytes one token takes in a `PagedAttentionCache`, all layers, keys and values together (for an MLRA model:
    `MLRACache.bytes_per_token`, d_c + d_r values per layer)."""
    allocators = getattr(cache, "cache_allocators", None)
    if allocators is not None:  # >= 5.2x
        return sum(
            len(allocator.layer_indices) * allocator.bytes_per_page // allocator.tokens_per_page
            for allocator in allocators.values()
        )
    element_size = torch.empty((), dtype=cache.dtype).element_size()
    return cache.config.num_hidden_layers * 2 * cache.num_key_value_heads * cache.head_dim * element_size


__all__ = ["MLRAPagedLatent", "is_paged_cache", "paged_cache_bytes_per_token"]
