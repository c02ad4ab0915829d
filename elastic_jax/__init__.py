"""elastic_jax: Nemotron Elastic in JAX/Flax.

One hybrid Mamba-2/Attention/MLP language model that holds a nested family of smaller models, trained together by
distillation with a learned router and extracted zero-shot. See README.md for the pipeline.
"""

__version__ = "0.1.0"
