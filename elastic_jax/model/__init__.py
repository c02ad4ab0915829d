"""Flax linen modules of the hybrid LM, its configuration and decode caches."""

from elastic_jax.model.config import BlockSpec, ConfigError, ModelConfig
