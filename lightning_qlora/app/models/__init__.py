"""LightningModules and pretrained-model loading for the default job."""

from lightning_qlora.app.models.causal_lm import CausalLMFineTune
from lightning_qlora.app.models.pretrained import DEFAULT_MODEL, PretrainedUnavailableError, resolve_pretrained

__all__ = ["DEFAULT_MODEL", "CausalLMFineTune", "PretrainedUnavailableError", "resolve_pretrained"]
