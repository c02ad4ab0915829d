"""Flax linen modules of the hybrid LM, its configuration and decode caches."""

from elastic_jax.model.config import BlockSpec, ConfigError, ModelConfig
from elastic_jax.model.hybrid import Cache, HybridLM, init_cache, init_params, param_logical_axes, param_shapes

__all__ = ["BlockSpec", "Cache", "ConfigError", "HybridLM", "ModelConfig", "init_cache", "init_params", "param_logical_axes", "param_shapes"]
