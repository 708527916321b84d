"""Tensor-parallel inference over latent blocks (DESIGN.md section 6; docs/tensor_parallel.md).

Rank r of a group of P ranks holds, in every attention layer, a set of softmax branches x head groups (and so the
latent blocks `MLRAConfig.latent_block(b, g)` of those pairs) and the heads of its groups. Its attention is an MLRA
attention over that local structure with the global scales: its cache keeps only its latent blocks and the rope
key, and the absorbed and expanded paths run unchanged on the share. The rank's heads end in its columns of
`o_proj`, and one all-reduce of the [bsz, T, d] output adds the ranks' partial sums. The MLP is split the usual
way (gate/up by output rows, down by input columns, one all-reduce); the embedding and lm_head are replicated.

    torchrun --nproc-per-node 4 script.py    # in script.py:
    model = MLRAForCausalLM.from_pretrained(path, tp_plan="auto")    # or tp_size=4, or distributed_config=...

Inference only: the all-reduces carry no gradient rule. `modeling_mlra.py` imports this module (for
`from_pretrained`), never the reverse: the sharding builds each rank's attention from the class of the layer it
replaces.
"""

import copy
import math
import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.nn.functional as F
from torch import nn

from .configuration_mlra import MLRAConfig

@dataclass(frozen=True)
class LatentShard:
    """What rank `rank` of a tensor-parallel group of `size` ranks holds of each attention layer.

    The degree factors as P = P_g * P_b * P_h: P_g = gcd(P, G) ranks split the head groups (no query is computed
    twice), P_b = gcd(P / P_g, B) split the softmax branches, and the remaining P_h split the heads within a group,
    which replicates the latent blocks (MLA's only option: L = 1). Rank r = (b * P_g + g) * P_h + j holds branches
    `branches`, head groups `groups` and, in each group, the heads at offsets `head_offsets`.
    """

    config: MLRAConfig = field(compare=False, repr=False)
    rank: int
    size: int
    branches: range
    groups: range
    head_offsets: range

    @classmethod
    def for_rank(cls, config: MLRAConfig, rank: int, size: int) -> "LatentShard":
        if size < 1 or not 0 <= rank < size:
            raise ValueError(f"rank {rank} is not in a tensor-parallel group of {size}")
        B, G, hpg = config.num_softmax_branches, config.num_head_groups, config.heads_per_group
        group_split = math.gcd(size, G)
        branch_split = math.gcd(size // group_split, B)
        head_split = size // (group_split * branch_split)
        if hpg % head_split != 0:
            raise ValueError(
                f"tensor-parallel degree {size} does not divide the attention of {config.variant or 'this model'}: "
                f"L={config.num_latent_blocks} latent blocks, B={B} softmax branches, G={G} head groups of {hpg} "
                f"heads; after splitting {group_split} ways by group and {branch_split} by branch, {head_split} ranks "
                f"would share {hpg} heads per group (degrees that work: divisors of {B * G * hpg} of the form "
                "groups x branches x heads)"
            )
        branch_part, rest = divmod(rank, group_split * head_split)
        group_part, head_part = divmod(rest, head_split)
        local_b, local_g, local_hpg = B // branch_split, G // group_split, hpg // head_split
        return cls(
            config,
            rank,
            size,
            branches=range(branch_part * local_b, (branch_part + 1) * local_b),
            groups=range(group_part * local_g, (group_part + 1) * local_g),
            head_offsets=range(head_part * local_hpg, (head_part + 1) * local_hpg),
        )

    @property
    def blocks(self) -> list[int]:
        """The global latent blocks held, in the local block order (local block b' * G' + g')."""
        return [self.config.latent_block(b, g) for b in self.branches for g in self.groups]

    @property
    def heads(self) -> list[int]:
        """The global heads served, in the local head order (group by group)."""
        hpg = self.config.heads_per_group
        return [g * hpg + j for g in self.groups for j in self.head_offsets]

    @property
    def latent_columns(self) -> list[int]:
        """The latent columns (of d_c) this rank caches: its blocks, in local order."""
        d_l = self.config.latent_block_dim
        return [block * d_l + i for block in self.blocks for i in range(d_l)]

    @property
    def cache_width(self) -> int:
        """Values cached per token and layer on this rank: its latent blocks and the rope key."""
        return len(self.blocks) * self.config.latent_block_dim + self.config.qk_rope_head_dim

    def local_config(self) -> MLRAConfig:
        """The config of this rank's attention: its branches, groups and heads, with the global scales (s_q, s_kv
        from the global d_l, s_o = 1 / sqrt(B global); the softmax scale depends on d_n + d_r only)."""
        local = copy.deepcopy(self.config)
        local.num_attention_heads = len(self.heads)
        local.num_softmax_branches = len(self.branches)
        local.num_latent_blocks = len(self.blocks)
        local.kv_lora_rank = len(self.blocks) * self.config.latent_block_dim
        local.variant = None
        local._validate_structure()
        return local


class RowParallelLinear(nn.Linear):
    """`nn.Linear` over this rank's share of the input features: its output is a partial sum, and one all-reduce
    over the tensor-parallel group adds the ranks' shares. The all-reduce is a functional collective, so
    `torch.compile(fullgraph=True)` traces it and a CUDA graph captures it (NCCL)."""

    def __init__(self, weight: torch.Tensor, group):
        super().__init__(weight.shape[1], weight.shape[0], bias=False, device="meta", dtype=weight.dtype)
        self.weight = nn.Parameter(weight)
        self.group = group

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return funcol.all_reduce(F.linear(hidden_states, self.weight), "sum", self.group)


def row_parallel_linear(weight: torch.Tensor, group) -> nn.Linear:
    """A `RowParallelLinear` over `group`; for a group of one rank (the sum over one share is the share) a plain
    `nn.Linear`, so that TP 1 runs exactly the unsplit model's step, its decode GEMV included (which reads plain
    `nn.Linear` modules only), not a cuBLAS GEMV and a no-op collective."""
    return _linear(weight) if dist.get_world_size(group) == 1 else RowParallelLinear(weight, group)


class HeldBlocksSharedNorm(nn.Module):
    """`latent_norm="shared"` on one rank: RMSNorm over the whole latent [..., d_c] (the rank projects all of it),
    then only the rank's latent columns are kept. Projecting the whole latent costs d x d_c weights per rank and
    no collective, where a sliced projection would need an all-reduce of the sum of squares in every layer."""

    def __init__(self, norm: nn.Module, columns: list[int]):
        super().__init__()
        self.norm = norm
        self.register_buffer("columns", torch.tensor(columns), persistent=False)

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        return self.norm(latent).index_select(-1, self.columns)


def _rows(weight: torch.Tensor, rows: list[int] | range) -> torch.Tensor:
    """A copy of the given rows (so the full tensor can be freed)."""
    return weight.index_select(0, torch.tensor(list(rows), device=weight.device))


def _linear(weight: torch.Tensor) -> nn.Linear:
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta", dtype=weight.dtype)
    linear.weight = nn.Parameter(weight)
    return linear


def _head_rows(weight: torch.Tensor, heads: list[int], num_heads: int) -> torch.Tensor:
    """Rows [num_heads * per_head, ...] -> the rows of the given heads, in their order."""
    return weight.unflatten(0, (num_heads, -1))[heads].flatten(0, 1)


def shard_attention(attention: nn.Module, shard: LatentShard, group, local_config: MLRAConfig) -> nn.Module:
    """This rank's attention: an attention of the same class (MLRAAttention) over the shard's local structure
    (`local_config`, `shard.local_config()`, one object for every layer as in the unsplit model), holding slices of
    `attention`."""
    config, h = shard.config, shard.config.num_attention_heads
    heads, d_r = shard.heads, config.qk_rope_head_dim
    with torch.device("meta"):
        local = type(attention)(local_config, attention.layer_idx)
    if config.q_lora_rank is None:
        local.q_proj = _linear(_head_rows(attention.q_proj.weight, heads, h))
    else:
        local.q_a_proj = attention.q_a_proj
        local.q_a_layernorm = attention.q_a_layernorm
        local.q_b_proj = _linear(_head_rows(attention.q_b_proj.weight, heads, h))

    rope_rows = range(config.kv_lora_rank, config.kv_lora_rank + d_r)
    if config.latent_norm == "shared":
        local.kv_a_proj_with_mqa = attention.kv_a_proj_with_mqa
        local.kv_a_layernorm = HeldBlocksSharedNorm(attention.kv_a_layernorm, shard.latent_columns)
    else:
        rows = [*shard.latent_columns, *rope_rows]
        local.kv_a_proj_with_mqa = _linear(_rows(attention.kv_a_proj_with_mqa.weight, rows))
        local.kv_a_layernorm.weight = nn.Parameter(_rows(attention.kv_a_layernorm.weight, shard.latent_columns))
    # kv_b_proj [L, hpg * (d_n + d_v), d_l] -> the held blocks, and in each the heads at the shard's offsets
    up = attention.kv_b_proj.weight.unflatten(1, (config.heads_per_group, -1))
    up = up[shard.blocks][:, list(shard.head_offsets)].flatten(1, 2)
    local.kv_b_proj.weight = nn.Parameter(up.contiguous())

    if config.attention_output_gate:
        local.o_gate_proj = _linear(_head_rows(attention.o_gate_proj.weight, heads, h))
    o_columns = _head_rows(attention.o_proj.weight.t(), heads, h).t().contiguous()
    local.o_proj = row_parallel_linear(o_columns, group)
    unset = [name for name, tensor in [*local.named_parameters(), *local.named_buffers()] if tensor.is_meta]
    if unset:
        raise RuntimeError(f"tensor-parallel sharding left attention tensors {unset} unset")
    return local


def shard_mlp(mlp: nn.Module, rank: int, size: int, group) -> nn.Module:
    """gate/up keep this rank's rows of the intermediate width, down its columns and one all-reduce."""
    width = mlp.gate_proj.out_features // size
    rows = range(rank * width, (rank + 1) * width)
    mlp.gate_proj = _linear(_rows(mlp.gate_proj.weight, rows))
    mlp.up_proj = _linear(_rows(mlp.up_proj.weight, rows))
    mlp.down_proj = row_parallel_linear(_rows(mlp.down_proj.weight.t(), rows).t().contiguous(), group)
    return mlp


@dataclass
class TensorParallelState:
    """Attached to a sharded model as `model.tensor_parallel`."""

    shard: LatentShard
    group: object
    device: torch.device

    @property
    def rank(self) -> int:
        return self.shard.rank

    @property
    def size(self) -> int:
        return self.shard.size


def check_degree(config: MLRAConfig, size: int) -> None:
    """ValueError naming the field when `size` ranks cannot split the model."""
    LatentShard.for_rank(config, 0, size)
    if config.intermediate_size % size != 0:
        raise ValueError(
            f"tensor-parallel degree {size} does not divide MLRAConfig.intermediate_size={config.intermediate_size}"
        )


@torch.no_grad()
def shard_model(model, group=None, device: torch.device | str | None = None):
    """Split a loaded MLRAForCausalLM (or MLRAModel) across the ranks of `group` (default: the world) in place and
    move it to `device` (default: this rank's GPU under NCCL, else the CPU). Every rank must hold the same weights."""
    if getattr(model, "tensor_parallel", None) is not None:
        raise ValueError("the model is already split for tensor parallelism")
    group = group if group is not None else dist.group.WORLD
    rank, size = dist.get_rank(group), dist.get_world_size(group)
    config = model.config
    check_degree(config, size)
    shard = LatentShard.for_rank(config, rank, size)
    if device is None:
        device = _default_device(group)
    decoder = model.model if hasattr(model, "model") else model
    local_config = shard.local_config()
    for layer in decoder.layers:
        layer.self_attn = shard_attention(layer.self_attn, shard, group, local_config)
        layer.mlp = shard_mlp(layer.mlp, rank, size, group)
    model.to(device)
    model.tensor_parallel = TensorParallelState(shard, group, torch.device(device))
    return model


def _default_device(group) -> torch.device:
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


@dataclass
class TensorParallelRequest:
    """The tensor-parallel arguments of a `from_pretrained` call."""

    tp_size: int | None
    device_mesh: object | None

    def process_group(self):
        """The group to shard over: the mesh's ("tp" dimension) if given, else the world of torchrun's processes,
        initialised here when needed (NCCL with one GPU per process when CUDA is there, else gloo)."""
        if self.device_mesh is not None:
            mesh = self.device_mesh
            if mesh.ndim > 1:
                if "tp" not in (mesh.mesh_dim_names or ()):
                    raise ValueError("device_mesh has several dimensions and none is named 'tp'")
                mesh = mesh["tp"]
            group = mesh.get_group()
        else:
            if not dist.is_initialized():
                if "WORLD_SIZE" not in os.environ:
                    raise RuntimeError(
                        "tensor-parallel loading (tp_plan / tp_size / distributed_config) needs one process per "
                        "rank: launch with torchrun --nproc-per-node N"
                    )
                if torch.cuda.is_available():
                    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
                dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
            group = dist.group.WORLD
        size = dist.get_world_size(group)
        if self.tp_size is not None and self.tp_size != size:
            raise ValueError(
                f"tp_size={self.tp_size} but the tensor-parallel group has {size} processes: launch "
                f"torchrun --nproc-per-node {self.tp_size}, or pass a device_mesh with a 'tp' dimension of that size"
            )
        return group


def pop_tensor_parallel_arguments(kwargs: dict) -> TensorParallelRequest | None:
    """Take transformers' tensor-parallel arguments out of `from_pretrained`'s kwargs (`tp_plan="auto"`, `tp_size`,
    `distributed_config=DistributedConfig(tp_size=...)`, `device_mesh`); None when there are none."""
    tp_plan, tp_size = kwargs.pop("tp_plan", None), kwargs.pop("tp_size", None)
    distributed_config, device_mesh = kwargs.pop("distributed_config", None), kwargs.pop("device_mesh", None)
    if distributed_config is not None:
        for name in ("fsdp_size", "ep_size", "pp_size", "dp_replicate_size"):
            if (getattr(distributed_config, name, None) or 1) > 1:
                raise ValueError(f"MLRA models support tensor parallelism only; distributed_config.{name} must be 1")
        tp_plan = tp_plan if tp_plan is not None else getattr(distributed_config, "tp_plan", None)
        tp_size = tp_size if tp_size is not None else getattr(distributed_config, "tp_size", None)
        if tp_size is None and tp_plan is None:
            tp_plan = "auto"
    if tp_plan is None and tp_size is None and device_mesh is None:
        return None
    if tp_plan not in (None, "auto"):
        raise ValueError(
            f"tp_plan={tp_plan!r}: MLRA models split attention by latent block (see docs/tensor_parallel.md); "
            "pass tp_plan='auto'"
        )
    if kwargs.get("device_map") is not None:
        raise ValueError("device_map and tensor parallelism (tp_plan / tp_size) are mutually exclusive")
    return TensorParallelRequest(tp_size, device_mesh)


__all__ = ["LatentShard", "RowParallelLinear", "check_degree", "shard_model"]
