"""README.md of a converted folder, rendered from the `hub_card.md` template (huggingface_hub's ModelCard)."""

from dataclasses import dataclass, field
from pathlib import Path

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from modeling_mlra import MLRAConfig
from modeling_mlra.configuration_mlra import PUBLISHED_DIMENSIONS, split_variant_name
from modeling_mlra.eval.paper_results import load_paper_results

# The source of truth is the top-level hub_card.md; conversion/hub_card.md links to it and the wheel holds a copy.
HUB_CARD_TEMPLATE = Path(__file__).with_name("hub_card.md")
PAPER_URL = "https://arxiv.org/abs/2603.02188"
TP_DEGREES = (1, 2, 4, 8)
COMMON_LIMITATIONS = (
    "A base language model: no instruction tuning or safety alignment; it continues text and can produce wrong or "
    "offensive output.",
    "`trust_remote_code=True` runs the Python files in this folder; read them first, or install `modeling_mlra`.",
)


@dataclass
class CardInfo:
    """What the card says about where the weights came from."""

    repo_id: str  # where users load it from: the Hub repo, or the local folder
    provenance: str
    tokenizer_id: str
    base_model: str | None = None
    limitations: list[str] = field(default_factory=list)
    tags: list[str] = field(default_factory=list)


def member_label(config: MLRAConfig) -> str:
    """MLA, GLA-2, MLRA-4, ... from the structure (L, B); "gated" / "unscaled" from the variant name."""
    L, B = config.num_latent_blocks, config.num_softmax_branches
    label = "MLA" if L == 1 else f"GLA-{L}" if B == 1 else f"MLRA-{B}" if L == 4 else f"L={L}, B={B}"
    if config.latent_norm == "shared" and L > 1:
        label += " (shared latent norm)"
    if config.variant is not None:
        _, gated, scaled = split_variant_name(config.variant)
        label += " with output gate" if gated else "" if scaled else " without variance scaling"
    return label


def cache_rows(config: MLRAConfig) -> list[dict]:
    """Per-GPU cache at each TP degree: each GPU keeps max(L / TP, 1) latent blocks and the rope key."""
    rows = []
    for tp in TP_DEGREES:
        values = config.latent_block_dim * max(config.num_latent_blocks // tp, 1) + config.qk_rope_head_dim
        rows.append(dict(tp=tp, width=values, bytes=f"{values * config.num_hidden_layers * 2:,}"))
    return rows


def paper_rows(config: MLRAConfig) -> tuple[dict, dict, str]:
    """The paper's perplexities and zero-shot accuracies for this variant, when this is a published model."""
    published = all(getattr(config, key) == value for key, value in PUBLISHED_DIMENSIONS.items())
    results = load_paper_results()
    if not published or config.variant not in results["perplexity"]["rows"]:
        return {}, {}, ""
    perplexity = dict(results["perplexity"]["rows"][config.variant])
    zero_shot = dict(results["zero_shot"]["rows"][config.variant])
    return perplexity, zero_shot, results["source"].split(". perplexity =")[0]


def eval_results(config: MLRAConfig, perplexity: dict, zero_shot: dict) -> list[EvalResult]:
    if not perplexity:
        return []
    results = load_paper_results()
    source = dict(source_name="Reported by the authors (Liu et al., ICLR 2026)", source_url=PAPER_URL, verified=False)
    entries = [
        EvalResult(
            task_type="text-generation", dataset_type=name.lower(), dataset_name=name, metric_type="perplexity",
            metric_value=value, **source,
        )
        for name, value in perplexity.items() if name != "avg"
    ]
    entries += [
        EvalResult(
            task_type="text-generation", dataset_type=task, dataset_name=task, metric_type=results["zero_shot"]["metrics"][task],
            metric_value=value, **source,
        )
        for task, value in zero_shot.items() if task != "avg"
    ]
    return entries


def render_hub_card(config: MLRAConfig, info: CardInfo) -> str:
    perplexity, zero_shot, paper_source = paper_rows(config)
    model_name = Path(info.repo_id).name
    card_data = ModelCardData(
        language=["en"],
        license="apache-2.0",
        library_name="transformers",
        pipeline_tag="text-generation",
        tags=["mlra", "latent-attention", "custom_code", *([config.variant] if config.variant else []), *info.tags],
        base_model=info.base_model,
        model_name=model_name,
        eval_results=eval_results(config, perplexity, zero_shot) or None,
    )
    card = ModelCard.from_template(
        card_data,
        template_path=str(HUB_CARD_TEMPLATE),
        model_name=model_name,
        member_label=member_label(config),
        num_layers=config.num_hidden_layers,
        hidden_size=config.hidden_size,
        num_heads=config.num_attention_heads,
        kv_lora_rank=config.kv_lora_rank,
        num_latent_blocks=config.num_latent_blocks,
        num_softmax_branches=config.num_softmax_branches,
        rope_dim=config.qk_rope_head_dim,
        vocab_size=config.vocab_size,
        dtype=str(config.dtype).removeprefix("torch."),
        provenance=info.provenance,
        repo_id=info.repo_id,
        tokenizer_id=info.tokenizer_id,
        cache_rows=cache_rows(config),
        paper_perplexity=perplexity,
        paper_zero_shot=zero_shot,
        paper_source=paper_source,
        limitations=[*info.limitations, *COMMON_LIMITATIONS],
    )
    return str(card)
