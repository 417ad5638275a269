"""The conv blocks' batch-norm kernel (`model.bn_kernel`): against nn.BatchNorm -> ReLU ->
`models.max_pool_2x2` (values, running averages, gradients, ties), on one device and split over
several, and its refusals and fallbacks.

The whole model with it: tests/test_models.py.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from configs import cifar_tiny
from hybrid_flax import fused_batch_norm
from hybrid_flax import models
from hybrid_flax import onednn_conv
from tests import conftest

needs_kernel = conftest.needs_kernels()


class _Reference(nn.Module):
  """What the kernel replaces: nn.BatchNorm (as `models.ConvBlock` names it), ReLU, pool."""
  pool: bool
  train: bool

  @nn.compact
  def __call__(self, x):
    x = models.batch_norm(self.train, name='BatchNorm_0')(x)
    x = nn.relu(x)
    return models.max_pool_2x2(x) if self.pool else x


class _Kernel(nn.Module):
  pool: bool
  train: bool
  mesh: object = None

  @nn.compact
  def __call__(self, x):
    return fused_batch_norm.BatchNormRelu(self.pool, use_running_average=not self.train,
                                          momentum=0.9, epsilon=1e-5, mesh=self.mesh,
                                          name='BatchNorm_0')(x)


def _inputs(shape, key=0):
  """Conv-output-like maps with exact ties: a quarter of the values repeat their left
  neighbour's, so the pool's windows hold equal positive maxima as well as the ReLU's zeros."""
  x = 3 * jax.random.normal(jax.random.PRNGKey(key), shape) + 0.5
  repeat = jax.random.bernoulli(jax.random.PRNGKey(key + 1), 0.25, shape)
  return jnp.where(repeat, jnp.roll(x, 1, axis=2), x)


def _run(module, variables, x, dy):
  """Output, updated batch stats and the gradients of <output, dy> for x and the params."""
  def loss(params, x):
    y, updates = module.apply({**variables, 'params': params}, x, mutable=['batch_stats'])
    return jnp.sum(y * dy), (y, updates['batch_stats'])

  grad = jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True))
  (dparams, dx), (y, stats) = grad(variables['params'], x)
  return y, stats, dparams, dx


@needs_kernel
@pytest.mark.parametrize('devices,shape,pool', [
    (4, (8, 6, 6, 16), True),  # each device's share
    (4, (8, 6, 6, 16), False),
    (1, (3, 4, 10, 5), True),  # one device; channels no vector width divides
    (2, (4, 7, 5, 24), False),  # odd maps, not pooled
    (4, (2, 4, 4, 8), True),  # a batch the devices cannot split runs whole
])
def test_training_matches_batch_norm_relu_pool(devices, shape, pool):
  mesh = Mesh(np.asarray(jax.devices()[:devices]), ('data',))
  x = _inputs(shape)
  ref = _Reference(pool, train=True)
  variables = ref.init(jax.random.PRNGKey(2), x)
  # A scale and shift away from 1 and 0, and running averages away from their start.
  variables = jax.tree.map(lambda a: a + 0.3 * jax.random.normal(jax.random.PRNGKey(3), a.shape),
                           variables)
  if shape[0] % devices == 0:
    x = jax.device_put(x, NamedSharding(mesh, P('data')))
  n, h, w, c = shape
  out_shape = (n, h // 2, w // 2, c) if pool else shape
  dy = jax.random.normal(jax.random.PRNGKey(4), out_shape)
  got = _run(_Kernel(pool, train=True, mesh=mesh), variables, x, dy)
  want = _run(ref, variables, x, dy)
  for g, w, name in zip(got, want, ('output', 'batch stats', 'param grads', 'dx'), strict=True):
    assert jax.tree.structure(g) == jax.tree.structure(w), name
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(w), strict=True):
      assert a.shape == b.shape and a.dtype == b.dtype, name
      np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-5 * float(jnp.abs(b).max()),
                                 err_msg=name)


@needs_kernel
@pytest.mark.parametrize('pool', [True, False])
def test_evaluation_matches_batch_norm_relu_pool(pool):
  mesh = Mesh(np.asarray(jax.devices()), ('data',))
  x = jax.device_put(_inputs((8, 4, 6, 12)), NamedSharding(mesh, P('data')))
  ref = _Reference(pool, train=False)
  variables = ref.init(jax.random.PRNGKey(2), x)
  variables = jax.tree.map(lambda a: a + 0.3 * jax.random.normal(jax.random.PRNGKey(3), a.shape),
                           variables)
  variables['batch_stats']['BatchNorm_0']['var'] = jnp.abs(
      variables['batch_stats']['BatchNorm_0']['var'])
  got = jax.jit(_Kernel(pool, train=False, mesh=mesh).apply)(variables, x)
  want = jax.jit(ref.apply)(variables, x)
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


@needs_kernel
def test_statistics_cotangents_reach_the_input():
  # The batch mean and variance are outputs too (for the running averages). Training ignores
  # them, but a loss that reads them gets their gradient, as autodiff of nn.BatchNorm's gives.
  # The folded shift (a conv's bias) moves the mean, so it gets the mean's cotangent.
  x = _inputs((4, 4, 4, 6))
  shift = jnp.linspace(1.0, -2.0, 6)
  scale = jnp.linspace(0.5, 1.5, 6)
  bias = jnp.linspace(-0.2, 0.3, 6)

  def reference(x, shift, scale, bias):
    x = x + shift
    mean = x.mean((0, 1, 2))
    var = jnp.maximum(0.0, jnp.square(x).mean((0, 1, 2)) - jnp.square(mean))
    y = (x - mean) * (jax.lax.rsqrt(var + 1e-5) * scale) + bias
    return models.max_pool_2x2(nn.relu(y)), mean, var

  kernel = fused_batch_norm.train_function(None, True, 1e-5)
  cotangents = (jax.random.normal(jax.random.PRNGKey(5), (4, 2, 2, 6)),
                jnp.linspace(-1.0, 1.0, 6), jnp.linspace(2.0, -0.5, 6))
  inputs = (x, shift, scale, bias)
  for g, w in zip(jax.jit(kernel)(*inputs), reference(*inputs), strict=True):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5 * float(jnp.abs(w).max()))
  got = jax.jit(lambda *a: jax.vjp(kernel, *a)[1](cotangents))(*inputs)
  want = jax.jit(lambda *a: jax.vjp(reference, *a)[1](cotangents))(*inputs)
  np.testing.assert_allclose(got[1], cotangents[1], rtol=1e-6)  # d shift = d mean
  for g, w in zip(got, want, strict=True):
    np.testing.assert_allclose(g, w, rtol=2e-5, atol=2e-5 * float(jnp.abs(w).max()))


@needs_kernel
@pytest.mark.parametrize('pool', [True, False])
def test_conv_block_folds_the_conv_bias_to_xla_s_values(pool):
  # With the kernel the conv's bias is never added to the maps: it moves the batch mean (and so
  # the running average), and evaluation subtracts it from the running mean. Against the block
  # on XLA's path, with a bias, scale and running averages away from their start.
  mesh = Mesh(np.asarray(jax.devices()), ('data',))
  x = jax.device_put(jax.random.normal(jax.random.PRNGKey(0), (8, 6, 6, 5)),
                     NamedSharding(mesh, P('data')))
  on, off = (models.ConvBlock(12, pool=pool, bn_kernel=k, mesh=mesh) for k in (True, False))
  variables = off.init(jax.random.PRNGKey(1), x, train=False)
  assert jax.tree.structure(on.init(jax.random.PRNGKey(1), x, train=False)) == (
      jax.tree.structure(variables))
  variables = jax.tree.map(lambda a: a + 0.5 * jax.random.normal(jax.random.PRNGKey(2), a.shape),
                           variables)
  variables['batch_stats']['BatchNorm_0']['var'] = jnp.abs(
      variables['batch_stats']['BatchNorm_0']['var'])
  assert float(jnp.abs(variables['params']['Conv_0']['bias']).min()) > 0.01
  dy = jax.random.normal(jax.random.PRNGKey(3), (8, 3, 3, 12) if pool else (8, 6, 6, 12))

  def run(block):
    def loss(params):
      y, updates = block.apply({**variables, 'params': params}, x, train=True,
                               mutable=['batch_stats'])
      return jnp.sum(y * dy), (y, updates['batch_stats'])
    grads, (y, stats) = jax.jit(jax.grad(loss, has_aux=True))(variables['params'])
    return y, stats, grads, jax.jit(block.apply, static_argnames='train')(variables, x,
                                                                          train=False)

  got, want = run(on), run(off)
  largest = max(float(jnp.abs(w).max()) for w in jax.tree.leaves(want[2]))
  for g, w, name in zip(got, want, ('output', 'running averages', 'grads', 'eval'), strict=True):
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(w), strict=True):
      atol = 2e-5 * (largest if name == 'grads' else float(jnp.abs(b).max()))
      np.testing.assert_allclose(a, b, rtol=2e-5, atol=atol, err_msg=name)
  # The bias's gradient: exactly the mean's cotangent, zero; XLA's is round-off.
  np.testing.assert_array_equal(got[2]['Conv_0']['bias'], 0.0)


@needs_kernel
def test_conv_blocks_fall_back_where_the_kernel_does_not_cover():
  # Ghost batch norm's group statistics, and a pool over odd maps, stay XLA's.
  cases = ((dict(pool=True), (4, 6, 6, 3), True), (dict(pool=True), (4, 5, 6, 3), False),
           (dict(pool=False, bn_group_size=2), (4, 6, 6, 3), False),
           (dict(pool=False), (4, 5, 6, 3), True))
  for kwargs, shape, expected in cases:
    block = models.ConvBlock(8, bn_kernel=True, **kwargs)
    x = jnp.zeros(shape)
    variables = block.init(jax.random.PRNGKey(0), x, train=False)
    hlo = jax.jit(lambda v, x, block=block: block.apply(v, x, train=True,
                                                         mutable=['batch_stats'])).lower(
                                                             variables, x).as_text()
    assert ('HfBnReluForward' in hlo) == expected, (kwargs, shape)
    assert fused_batch_norm.covers(shape, kwargs['pool'], kwargs.get('bn_group_size', 0)) == (
        expected)
    # Either way, nn.BatchNorm's variables.
    assert set(variables['params']['BatchNorm_0']) == {'scale', 'bias'}
    assert set(variables['batch_stats']['BatchNorm_0']) == {'mean', 'var'}


def test_bn_kernel_is_checked_and_refused_with_its_reason():
  config = cifar_tiny.get_config().model
  assert config.bn_kernel == 'auto'
  config.bn_kernel = 'fused'
  with pytest.raises(ValueError, match='bn_kernel must be one of'):
    models.create_model(config)
  assert not onednn_conv.use_onednn('auto', jnp.bfloat16, 'bn_kernel')
  with pytest.raises(ValueError, match="bn_kernel='onednn' cannot run here: .*bfloat16"):
    onednn_conv.use_onednn('onednn', 'bfloat16', 'bn_kernel')
  assert fused_batch_norm.status('xla', 'float32') == (
      "conv blocks' batch norm + ReLU + pool: XLA's (model.bn_kernel='xla')")
  config.bn_kernel = 'xla'
  assert not models.create_model(config).bn_kernel


@needs_kernel
def test_kernel_refuses_what_it_does_not_take():
  block = fused_batch_norm.BatchNormRelu(False, use_running_average=False, momentum=0.9,
                                         epsilon=1e-5)
  for x in (jnp.zeros((2, 4, 4, 3), jnp.bfloat16), jnp.zeros((2, 4, 3))):
    with pytest.raises(ValueError, match='float32 \\[n, h, w, c\\]'):
      block.init(jax.random.PRNGKey(0), x)
