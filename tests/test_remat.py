"""Memory levers of the model: per-block-kind rematerialisation and the bf16 teacher.

Remat only changes what the backward pass recomputes, so its reference is the same model without remat: same
parameter tree, same gradients. The bf16 teacher's reference is the fp32 teacher, within bf16 rounding.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import random_params, small_config

from elastic_jax.elastic.router import RouterSchedule
from elastic_jax.elastic.space import ElasticSpace
from elastic_jax.model import HybridLM
from elastic_jax.model.hybrid import remat_policies
from elastic_jax.train.loop import place_teacher
from elastic_jax.train.losses import cross_entropy
from elastic_jax.train.sharding import make_mesh, replicated
from elastic_jax.train.elastic_step import ElasticSetup
from elastic_jax.train.memory import MemoryConfig

CONFIG = small_config("M*-", hidden_size=32, intermediate_size=48)
TOKENS = jax.random.randint(jax.random.key(3), (2, 9), 0, CONFIG.vocab_size)


def _grads(remat, params, masks):
  """Gradients of the LM loss, and whether the backward program holds rematerialised blocks."""
  def loss(p):
    logits = HybridLM(CONFIG, remat=remat_policies(remat)).apply({"params": p}, TOKENS[:, :-1], masks=masks)
    return jnp.mean(cross_entropy(logits, TOKENS[:, 1:]))
  rematerialised = "remat" in str(jax.make_jaxpr(jax.grad(loss))(params))
  return jax.jit(jax.grad(loss))(params), rematerialised


def test_every_remat_policy_gives_the_gradients_of_no_remat():
  params = random_params(CONFIG, seed=4)
  # A per-sample mask (row 0 pruned, row 1 full) sends gradients through the masked paths too.
  masks = {"hidden": jnp.asarray([[1.0] * 24 + [0.0] * 8, [1.0] * 32]),
           "layers_2": {"mlp": jnp.asarray([[1.0] * 36 + [0.0] * 12, [1.0] * 48])}}
  reference, rematerialised = _grads({}, params, masks)
  assert not rematerialised
  # Two settings cover both policies on every block kind.
  for remat in ({"mamba": "full", "attention": "dots", "mlp": "full"},
                {"mamba": "dots", "attention": "full", "mlp": "dots"}):
    grads, rematerialised = _grads(remat, params, masks)
    assert rematerialised
    assert jax.tree.structure(grads) == jax.tree.structure(reference)
    for (path, g), r in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(reference)):
      np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-6 * float(jnp.max(jnp.abs(r))),
                                 err_msg=f"{remat} {jax.tree_util.keystr(path)}")


def test_remat_leaves_the_parameter_tree_unchanged():
  def shapes(remat):
    boxed = jax.eval_shape(HybridLM(CONFIG, remat=remat_policies(remat)).init, jax.random.key(0), TOKENS)
    return jax.tree_util.tree_map_with_path(lambda path, x: (jax.tree_util.keystr(path), x.shape, x.dtype),
                                            boxed["params"])

  plain = shapes({})
  for policy in ("full", "dots"):
    assert shapes({"mamba": policy, "attention": policy, "mlp": policy}) == plain


def test_remat_policies_are_validated_and_hashable():
  assert remat_policies({"mlp": "dots", "mamba": "full", "attention": "none"}) == (("mamba", "full"),
                                                                                  ("mlp", "dots"))
  hash(HybridLM(CONFIG, remat=remat_policies({"mamba": "full"})))
  with pytest.raises(ValueError, match=r"remat has block kind 'ssm'; the kinds are \('mamba', 'attention', 'mlp', "
                     r"'moe'\)"):
    remat_policies({"ssm": "full"})
  with pytest.raises(ValueError, match=r"remat\['mlp'\]='everything' is not a policy; use one of \('none', 'full', "
                     r"'dots'\)"):
    remat_policies({"mlp": "everything"})


def test_bf16_teacher_is_stored_in_bf16_and_close_to_the_fp32_teacher():
  params = random_params(CONFIG, seed=5)
  space = ElasticSpace.from_fractions(CONFIG, (0.5, 1.0))
  setups = {dtype: ElasticSetup(CONFIG, space, (1.0, 0.5), (0, 1, 2), RouterSchedule(total_steps=4),
                                memory=MemoryConfig(teacher_dtype=dtype)) for dtype in ("float32", "bfloat16")}
  mesh = make_mesh()
  shardings = jax.tree.map(lambda _: replicated(mesh), params)
  held = place_teacher(setups["bfloat16"], params, shardings)
  assert {x.dtype for x in jax.tree.leaves(held)} == {jnp.dtype(jnp.bfloat16)}
  np.testing.assert_array_equal(np.asarray(held["embed"]["embedding"], np.float32),
                                np.asarray(params["embed"]["embedding"].astype(jnp.bfloat16), np.float32))
  assert {x.dtype for x in jax.tree.leaves(place_teacher(setups["float32"], params, shardings))} == {
      jnp.dtype(jnp.float32)}

  inputs = TOKENS[:, :-1]
  fp32 = jax.jit(lambda p: setups["float32"].teacher.apply({"params": p}, inputs))(params)
  bf16 = jax.jit(lambda p: setups["bfloat16"].teacher.apply({"params": p}, inputs))(held)
  assert bf16.dtype == jnp.float32  # the KL reads fp32 logits
  scale = float(jnp.max(jnp.abs(fp32)))
  error = float(jnp.max(jnp.abs(bf16 - fp32)))
  # bf16 keeps 8 mantissa bits (relative rounding 2^-9 per operation); through a few blocks the logits stay within
  # a few percent of their scale, and clearly differ from fp32 (so the teacher did compute in bf16).
  assert 0 < error < 0.03 * scale, (error, scale)  # measured: about 1% of the scale
  # Next-token distributions agree: the KD target barely moves.
  p32, p16 = jax.nn.softmax(fp32), jax.nn.softmax(bf16)
  assert float(jnp.max(jnp.abs(p32 - p16))) < 0.02
