"""The attention blocks' C++ kernels (`model.attention_kernel`): the core and the dense layers'
sgemm products, against XLA's values and gradients, and their refusals.

The whole model with it: tests/test_models.py.
"""


import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from configs import cifar_tiny
from hybrid_flax import models
from hybrid_flax import onednn_attention
from hybrid_flax import onednn_conv
from hybrid_flax import onednn_dense
from tests import conftest

needs_onednn = conftest.needs_kernels()


def _xla_core(q, k, v):
  """`models._attention_core` on the kernel's [batch, length, heads, depth] layout."""
  heads_first = lambda a: a.transpose(0, 2, 1, 3)
  q = q / np.sqrt(q.shape[-1]).astype(np.float32)
  return heads_first(models._attention_core(*map(heads_first, (q, k, v))))  # pylint: disable=protected-access


def _values_and_grads(core, q, k, v, dy):
  return jax.jit(lambda q, k, v, dy: (core(q, k, v), *jax.vjp(core, q, k, v)[1](dy)))(q, k, v, dy)


@needs_onednn
@pytest.mark.parametrize('devices,batch,length,heads,depth', [
    (4, 8, 16, 2, 8),  # each device's share
    (1, 3, 37, 3, 5),  # one device; a length and depth no vector width divides
    (4, 2, 9, 1, 16),  # a batch the devices cannot split runs whole
])
def test_core_matches_xla_values_and_gradients(devices, batch, length, heads, depth):
  mesh = Mesh(np.asarray(jax.devices()[:devices]), ('data',))
  keys = jax.random.split(jax.random.PRNGKey(0), 4)
  # Scores spread over a few units, so the softmax is neither flat nor one-hot.
  q, k, v, dy = (2 * jax.random.normal(key, (batch, length, heads, depth)) for key in keys)
  if batch % devices == 0:
    q, k, v, dy = (jax.device_put(a, NamedSharding(mesh, P('data'))) for a in (q, k, v, dy))
  got = _values_and_grads(onednn_attention.attention_core(mesh), q, k, v, dy)
  want = _values_and_grads(_xla_core, q, k, v, dy)
  for g, ref, name in zip(got, want, ('output', 'dq', 'dk', 'dv'), strict=True):
    assert g.shape == ref.shape, name
    np.testing.assert_allclose(g, ref, rtol=1e-5, atol=1e-5 * float(jnp.abs(ref).max()),
                               err_msg=name)


@needs_onednn
def test_core_clamps_far_scores_and_keeps_nans():
  """Scores more than 87 below their row's max (exp clamped at -87) and NaNs of either sign in
  q: the clamp is a bit select in csrc/attention.cc, which must neither move a NaN nor miss a
  score."""
  keys = jax.random.split(jax.random.PRNGKey(1), 3)
  q, k, v = (jax.random.normal(key, (2, 24, 2, 8)) for key in keys)
  q = 30 * q  # scores spread over hundreds: a fifth of them more than 87 below the row max
  q = q.at[0, 3, 0, 0].set(np.nan).at[1, 5, 1, 2].set(-np.nan)
  assert np.signbit(np.asarray(q)[1, 5, 1, 2])
  got = np.asarray(jax.jit(onednn_attention.attention_core(None))(q, k, v))
  want = np.asarray(jax.jit(_xla_core)(q, k, v))
  nan = np.isnan(got).any(-1)
  assert nan[0, 3, 0] and nan[1, 5, 1] and nan.sum() == 2, np.argwhere(nan)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(np.nanmax(np.abs(want))))


@needs_onednn
@pytest.mark.parametrize('devices,x_shape,w_shape,contracted', [
    (4, (8, 5, 6), (6, 7), 1),  # nn.Dense on each device's share
    (4, (8, 5, 6), (6, 2, 3), 1),  # DenseGeneral to (heads, depth): q, k, v
    (1, (3, 5, 2, 3), (2, 3, 6), 2),  # DenseGeneral from (heads, depth), one device: out
    (4, (2, 6), (6, 4), 1),  # a batch the devices cannot split runs whole
])
def test_dense_products_match_xla_values_and_gradients(devices, x_shape, w_shape, contracted):
  mesh = Mesh(np.asarray(jax.devices()[:devices]), ('data',))
  numbers = ((tuple(range(len(x_shape) - contracted, len(x_shape))), tuple(range(contracted))),
             ((), ()))
  keys = jax.random.split(jax.random.PRNGKey(0), 3)
  x, w = jax.random.normal(keys[0], x_shape), jax.random.normal(keys[1], w_shape)
  if x_shape[0] % devices == 0:
    x = jax.device_put(x, NamedSharding(mesh, P('data')))
  ours = lambda x, w: onednn_dense.dot_general(mesh)(x, w, numbers)
  xla = lambda x, w: jax.lax.dot_general(x, w, numbers)
  dy = jax.random.normal(keys[2], jax.eval_shape(xla, x, w).shape)
  grads = lambda f: jax.jit(lambda x, w, dy: (f(x, w), *jax.vjp(f, x, w)[1](dy)))(x, w, dy)
  for g, ref, name in zip(grads(ours), grads(xla), ('output', 'input grad', 'kernel grad'),
                          strict=True):
    assert g.shape == ref.shape, name
    np.testing.assert_allclose(g, ref, rtol=1e-5, atol=1e-5 * float(jnp.abs(ref).max()),
                               err_msg=name)


@needs_onednn
def test_dense_products_refuse_what_they_do_not_run():
  ours = onednn_dense.dot_general(None)
  x, w = jnp.zeros((2, 3)), jnp.zeros((3, 4))
  with pytest.raises(ValueError, match='float32'):
    ours(x.astype(jnp.bfloat16), w.astype(jnp.bfloat16), (((1,), (0,)), ((), ())))
  with pytest.raises(ValueError, match='no batch axes'):
    ours(x, w.T, (((1,), (1,)), ((), ())))


@needs_onednn
def test_core_refuses_what_it_does_not_run():
  core = onednn_attention.attention_core(None)
  x = jnp.zeros((2, 4, 2, 8))
  with pytest.raises(ValueError, match='float32'):
    core(x.astype(jnp.bfloat16), x, x)
  with pytest.raises(ValueError, match='one shape'):
    core(x, x[:, :3], x)


def test_attention_kernel_is_checked_and_refused_with_its_reason():
  config = cifar_tiny.get_config().model
  config.attention_kernel = 'fused'
  with pytest.raises(ValueError, match='attention_kernel must be one of'):
    models.create_model(config)
  config.attention_kernel, config.attention_impl = 'onednn', 'flax'
  with pytest.raises(ValueError, match="runs the 'deferred' core"):
    models.create_model(config)
  assert not onednn_conv.use_onednn('auto', jnp.bfloat16, 'attention_kernel')
  with pytest.raises(ValueError, match="attention_kernel='onednn' cannot run here: .*bfloat16"):
    onednn_conv.use_onednn('onednn', 'bfloat16', 'attention_kernel')
  assert onednn_attention.status('xla', 'float32') == (
      "attention blocks: XLA's (model.attention_kernel='xla')")
