"""Continuous batching on the compressed cache: transformers' `PagedAttentionCache` holding MLRA's latent.

transformers' continuous batching (`generate_batch`, `init_continuous_batching`, `transformers serve
--continuous-batching`) builds its paged cache from the config: per token and layer a key and a value of
`num_key_value_heads` x `head_dim` values. `MLRAConfig` declares one head of (d_c + d_r) / 2 values, so the pages hold
exactly the latent row `MLRACache` keeps (d_c + d_r values): its first half in the key page, its second half in the
value page. `MLRAPagedLatent` writes and reads the rows through the paged cache's own `update` (the release's index
arithmetic, prefix sharing and forking stay transformers'), tells the attention where each sequence of the packed
batch has its new tokens and its rows (each attends to its own only: no scores between sequences), and lays the
packed queries out as one row per sequence for the fused decode kernel. The kernel reads the pages in place, through
the paged cache's read index (`LatentPages`); the PyTorch paths read the rows `update` gathers.

The paged cache's call convention and tensor layout changed during 5.x; both are handled here (tested on
transformers 5.17 and 5.24).
"""

import functools
import inspect

import torch
from transformers.utils import logging

from .mlra_decode_kernel import LatentPages

logger = logging.get_logger(__name__)

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
        mask, each row's first key in what `update` returns: its rows, or its slots in the pages). No host
        synchronisation."""
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

    def update(self, states: torch.Tensor, layer_idx: int) -> torch.Tensor | LatentPages:
        """Write the new latent rows states [1, T, d_c + d_r] into the pages; return what the batch's sequences attend
        to, sequence after sequence as cu_seq_lens_k delimits them: where the fused kernel runs (`use_kernel_rows`),
        the pages themselves and the tokens' slots in them (`LatentPages`, nothing copied; the rows of a batch with
        nothing cached are the new ones, returned as they are), else the rows gathered, [1, S, d_c + d_r]."""
        width = states.shape[-1]
        half = self.cache_half_width(layer_idx)
        if width != 2 * half:
            raise ValueError(
                f"the paged cache holds {2 * half} values per token and layer but the model caches {width}: build "
                "continuous batching from this model's config (num_key_value_heads=1, head_dim=(d_c + d_r) / 2)"
            )
        key, value = (part.unsqueeze(1) for part in states.split(half, dim=-1))  # [1, 1, T, half]: one "head"
        pages = self.latent_pages(layer_idx, half) if self.kernel_inputs is not None else None
        if pages is not None:  # write only (the paged cache skips its read for an empty read index), read in place
            self.write_and_read(key, value, layer_idx, [index[:0] for index in self.batch_kwargs["read_index"]])
            return pages if pages.slots.numel() else states
        key, value = self.write_and_read(key, value, layer_idx, self.batch_kwargs["read_index"])
        return torch.cat([key.reshape(1, -1, half), value.reshape(1, -1, half)], dim=-1)

    def write_and_read(self, key, value, layer_idx: int, read_index: list[torch.Tensor]):
        """The paged cache's own update: key and value [1, 1, T, half] written at the batch's write index, the rows of
        read_index read back (none for an empty one: then key and value come back as they are)."""
        if self.update_takes_kwargs:
            # the cache replaces per-layer entries of the dict it is given: a fresh one for every layer
            return self.cache.update(key, value, layer_idx, kwargs=dict(self.batch_kwargs, read_index=read_index))
        return self.cache.update(
            key, value, layer_idx, read_index=read_index, write_index=self.batch_kwargs["write_index"]
        )

    def latent_pages(self, layer_idx: int, half: int) -> LatentPages | None:
        """The layer's key and value pages as [slots, half] views and the batch's read index into them (the kernel rows'
        slots, sequence after sequence), or None where this release's layout cannot be read in place (then `update`
        gathers, and says why once).

        transformers >= 5.2x: one allocator per attention type, a layer's key and value pages interleaved with the
        other layers' in one tensor; the allocator's views for the block-table path index pages by the read index.
        Earlier 5.x: one key tensor and one value tensor per layer of a group, indexed by the group's read index."""
        allocators = getattr(self.cache, "layer_to_allocator", None)
        if allocators is not None:
            allocator = allocators[layer_idx]
            full_attention = getattr(allocator, "layer_type", None) == "full_attention"
            pages_of = getattr(allocator, "get_cache_for_block_table", None)
            if not full_attention or pages_of is None:
                return self.gathered(f"layer {layer_idx}'s allocator {type(allocator).__name__} has no full-attention "
                                     "pages to read")
            key_pages, value_pages = pages_of(layer_idx)
            slots = self.batch_kwargs["read_index"][allocator.index]
        else:
            if not hasattr(self.cache, "layer_index_to_group_indices"):
                return self.gathered(f"{type(self.cache).__name__} has neither allocators nor per-group layer tensors")
            if getattr(self.cache, "sliding_windows", {}).get(layer_idx, 1) != 1:
                return self.gathered(f"layer {layer_idx} has a sliding window (its read index holds sentinels)")
            group, index = self.cache.layer_index_to_group_indices[layer_idx]
            key_pages, value_pages = self.cache.key_cache[index], self.cache.value_cache[index]
            slots = self.batch_kwargs["read_index"][group]
        if not (key_pages.is_contiguous() and value_pages.is_contiguous()) or key_pages.shape[-2:].numel() != half:
            return self.gathered(f"pages {tuple(key_pages.shape)} are not contiguous rows of one head of {half} values")
        return LatentPages(key_pages.view(-1, half), value_pages.view(-1, half), slots)

    @staticmethod
    def gathered(reason: str) -> None:
        logger.warning_once(f"the decode kernel reads the rows gathered from the pages, not the pages: {reason}")
        return None

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
