"""Multi-Head Low-Rank Attention (MLRA) for transformers: MLA, GLA and MLRA as one model family.

Importing the package registers the classes with the Auto classes and for `save_pretrained` to write
`auto_map` and the modeling files, so saved folders load with `trust_remote_code=True` alone.
"""

from pathlib import Path

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .configuration_mlra import VARIANTS, MLRAConfig
from .modeling_mlra import MLRACache, MLRAForCausalLM, MLRAModel, MLRAPreTrainedModel

# Installs place the top-level eval/ and conversion/ folders inside this package (pyproject package-dir); in a source
# checkout they sit beside it, and this makes them import as modeling_mlra.eval / modeling_mlra.conversion there too.
_CHECKOUT = Path(__file__).resolve().parent.parent
if (_CHECKOUT / "pyproject.toml").is_file() and (_CHECKOUT / "eval" / "__init__.py").is_file():
    __path__.append(str(_CHECKOUT))

AutoConfig.register("mlra", MLRAConfig)
AutoModel.register(MLRAConfig, MLRAModel)
AutoModelForCausalLM.register(MLRAConfig, MLRAForCausalLM)
MLRAConfig.register_for_auto_class()
MLRAModel.register_for_auto_class("AutoModel")
MLRAForCausalLM.register_for_auto_class("AutoModelForCausalLM")

__all__ = ["MLRACache", "MLRAConfig", "MLRAForCausalLM", "MLRAModel", "MLRAPreTrainedModel", "VARIANTS"]
