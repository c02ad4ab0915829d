"""Nemotron Elastic: search space, importance, permutation, nested masks, parameter counts, router, extraction."""

from elastic_jax.elastic.extract import child_config, extract
from elastic_jax.elastic.importance import Importance, Rankings, estimate_importance, rankings
from elastic_jax.elastic.masks import choice_masks, masks_from_counts, masks_from_weights
from elastic_jax.elastic.param_count import choice_param_count, expected_param_count, param_count
from elastic_jax.elastic.permute import permute_params
from elastic_jax.elastic.space import Choice, ElasticSpace, SpaceError

__all__ = [
    "Choice", "ElasticSpace", "Importance", "Rankings", "SpaceError", "child_config", "choice_masks",
    "choice_param_count", "estimate_importance", "expected_param_count", "extract", "masks_from_counts",
    "masks_from_weights", "param_count", "permute_params", "rankings",
]
