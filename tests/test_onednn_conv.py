"""oneDNN's 3x3 convolutions (`model.conv_impl`): XLA's values and gradients, and clear refusals.

The whole model's gradients with them: tests/test_models.py.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from configs import cifar_tiny
from hybrid_flax import models
from hybrid_flax import onednn_conv
from hybrid_flax import train
from tests import conftest

needs_onednn = conftest.needs_kernels()

_XLA_CONV = functools.partial(jax.lax.conv_general_dilated, window_strides=(1, 1),
                              padding=((1, 1), (1, 1)),
                              dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


def _onednn_conv(mesh, winograd=False):
  conv = onednn_conv.conv_3x3(mesh, winograd)
  return lambda x, w: conv(x, w, (1, 1), ((1, 1), (1, 1)))


def _values_and_grads(conv, x, w, dy):
  return jax.jit(lambda x, w, dy: (conv(x, w), *jax.vjp(conv, x, w)[1](dy)))(x, w, dy)


@needs_onednn
@pytest.mark.parametrize('devices,batch', [(4, 8), (1, 3), (4, 1)])
@pytest.mark.parametrize('height,width', [(9, 8), (6, 5)])
def test_conv_3x3_matches_xla_values_and_gradients(devices, batch, height, width):
  """Each device's share (4 devices), one device, and a batch the devices cannot split; on maps
  of MIN_SIZE and more (XLA's NHWC) and narrower ones (oneDNN's blocked layout, XLA's weight
  gradient)."""
  assert onednn_conv.BLOCKED_MIN_SIZE <= 5 < onednn_conv.MIN_SIZE <= 8
  mesh = Mesh(np.asarray(jax.devices()[:devices]), ('data',))
  keys = jax.random.split(jax.random.PRNGKey(0), 3)
  # 17 output channels: more than one of the blocked layout's 16-channel blocks.
  x = jax.random.normal(keys[0], (batch, height, width, 3))
  w = jax.random.normal(keys[1], (3, 3, 3, 17))
  dy = jax.random.normal(keys[2], (batch, height, width, 17))
  if batch % devices == 0:
    x, dy = (jax.device_put(a, NamedSharding(mesh, P('data'))) for a in (x, dy))
  got = _values_and_grads(_onednn_conv(mesh), x, w, dy)
  want = _values_and_grads(_XLA_CONV, x, w, dy)
  for g, ref, name in zip(got, want, ('output', 'input grad', 'kernel grad'), strict=True):
    assert g.shape == ref.shape, name
    np.testing.assert_allclose(g, ref, rtol=1e-5, atol=1e-5 * float(jnp.abs(ref).max()),
                               err_msg=name)


@needs_onednn
@pytest.mark.parametrize('devices,batch', [(4, 8), (1, 3), (4, 1)])
@pytest.mark.parametrize('shape,out,calls', [
    ((8, 6, 32), 33, (2, 1)),  # all three; 33: no vector width divides it
    ((4, 4, 33), 32, (2, 1)),  # the smallest maps, one tile per 2x2 block of them
    ((6, 6, 31), 40, (0, 0)),  # too few input channels: all direct
    ((6, 6, 40), 31, (0, 0)),  # too few output channels: all direct
    ((5, 6, 32), 32, (0, 0)),  # odd maps: all direct
])
def test_winograd_matches_xla_values_and_gradients(devices, batch, shape, out, calls):
  """F(2x2, 3x3) for the forward and, from the same transformed kernel turned round, the input
  gradient, and the weight gradient through the transformed kernel's, where `winograd_covers`
  the layer; oneDNN's direct convolutions for all three elsewhere."""
  assert onednn_conv.WINOGRAD_MIN_CHANNELS == 32  # the cases straddle it
  mesh = Mesh(np.asarray(jax.devices()[:devices]), ('data',))
  keys = jax.random.split(jax.random.PRNGKey(0), 3)
  x = jax.random.normal(keys[0], (batch,) + shape)
  w = jax.random.normal(keys[1], (3, 3, shape[-1], out))
  dy = jax.random.normal(keys[2], (batch,) + shape[:2] + (out,))
  if batch % devices == 0:
    x, dy = (jax.device_put(a, NamedSharding(mesh, P('data'))) for a in (x, dy))
  conv = _onednn_conv(mesh, winograd=True)
  hlo = jax.jit(lambda x, w, dy: (conv(x, w), *jax.vjp(conv, x, w)[1](dy))).lower(
      x, w, dy).as_text()
  assert hlo.count('custom_call @HfWinogradConv(') == calls[0]
  assert hlo.count('custom_call @HfWinogradWeightGrad(') == calls[1]
  got = _values_and_grads(conv, x, w, dy)
  want = _values_and_grads(_XLA_CONV, x, w, dy)
  for g, ref, name in zip(got, want, ('output', 'input grad', 'kernel grad'), strict=True):
    assert g.shape == ref.shape, name
    np.testing.assert_allclose(g, ref, rtol=1e-5, atol=2e-6 * float(jnp.abs(ref).max()),
                               err_msg=name)


def test_winograd_kernel_is_g_w_g_transposed():
  g = np.array([[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]])
  w = np.random.default_rng(0).normal(size=(3, 3, 5, 7))
  want = np.einsum('ia,abck,jb->ijck', g, w, g).reshape(16, 5, 7)
  np.testing.assert_allclose(onednn_conv.winograd_kernel(jnp.asarray(w, jnp.float32)), want,
                             rtol=1e-6, atol=1e-6)


@needs_onednn
def test_conv_3x3_with_no_mesh_runs_one_unsplit_call():
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 8, 4))
  w = jax.random.normal(jax.random.PRNGKey(1), (3, 3, 4, 4))
  np.testing.assert_allclose(jax.jit(_onednn_conv(None))(x, w), jax.jit(_XLA_CONV)(x, w),
                             rtol=1e-5, atol=1e-5)


@needs_onednn
def test_conv_3x3_refuses_what_it_does_not_run():
  conv = onednn_conv.conv_3x3(None)
  x, w = jnp.zeros((1, 8, 8, 4)), jnp.zeros((3, 3, 4, 4))
  with pytest.raises(ValueError, match='stride 1'):
    conv(x, w, (2, 2), ((1, 1), (1, 1)))
  with pytest.raises(ValueError, match='float32'):
    conv(x.astype(jnp.bfloat16), w.astype(jnp.bfloat16), (1, 1), ((1, 1), (1, 1)))
  with pytest.raises(ValueError, match='3x3'):
    conv(x, jnp.zeros((5, 5, 4, 4)), (1, 1), ((2, 2), (2, 2)))


@needs_onednn
def test_the_sharded_train_step_runs_onednn_on_each_device():
  """The training step as train.py jits it, batch split over 4 devices: oneDNN's direct
  convolutions or Winograd's in the program, and the same losses as with XLA's convolutions."""
  losses = {}
  for impl, winograd in (('onednn', False), ('onednn', True), ('xla', False)):
    config = cifar_tiny.get_config()
    config.model.conv_impl = impl
    config.model.conv_winograd = winograd
    mesh = train.data_mesh()
    assert mesh.size == 4
    replicated, data = NamedSharding(mesh, P()), NamedSharding(mesh, P('data'))
    lr, init, _ = train.state_factory(config, 10, (32, 32, 3), replicated)
    state = jax.jit(init, out_shardings=replicated)(jax.random.PRNGKey(0))
    rng = np.random.default_rng(0)
    batch = jax.device_put({
        'image': rng.integers(0, 256, (8, 32, 32, 3), np.uint8),
        'label': rng.integers(0, 10, (8,), np.int32),
        'index': np.arange(8, dtype=np.int32), 'mask': np.ones((8,), np.float32)}, data)
    step = jax.jit(train.make_train_step(config, lr, 10), in_shardings=(replicated, data),
                   out_shardings=(replicated, replicated))
    hlo = step.lower(state, batch).as_text()
    assert ('HfConvForward' in hlo) == (impl == 'onednn')  # conv1's 3 channels stay direct
    assert ('HfWinogradConv' in hlo) == winograd
    state, first = step(state, batch)
    state, second = step(state, batch)  # a second step: the first one's update applied
    losses[impl, winograd] = float(first['loss']), float(second['loss'])
  want = losses['xla', False]
  for (impl, winograd), (first, second) in losses.items():
    assert first == pytest.approx(want[0], rel=1e-5), (impl, winograd)
    # Measured: 3.2e-7 direct, 5.8e-7 Winograd (only residual2's 32 channels run it here).
    assert second == pytest.approx(want[1], rel=1e-4), (impl, winograd)


def test_conv_impl_is_checked_and_refused_with_its_reason():
  with pytest.raises(ValueError, match="conv_impl must be one of"):
    onednn_conv.check('mkldnn')
  config = cifar_tiny.get_config().model
  config.conv_impl = 'cudnn'
  with pytest.raises(ValueError, match="conv_impl must be one of"):
    models.create_model(config)
  assert not onednn_conv.use_onednn('xla', jnp.float32)
  # bfloat16 compute is for GPUs: 'auto' falls back to XLA, 'onednn' says why it cannot.
  assert not onednn_conv.use_onednn('auto', jnp.bfloat16)
  with pytest.raises(ValueError, match='bfloat16, not float32'):
    onednn_conv.use_onednn('onednn', 'bfloat16')
  assert 'bfloat16, not float32' in onednn_conv.status('auto', 'bfloat16')
  assert onednn_conv.status('xla', 'float32') == (
      "3x3 convolutions: XLA's (model.conv_impl='xla')")
  assert onednn_conv.status('xla', 'float32', winograd=True) == (
      "3x3 convolutions: XLA's (model.conv_impl='xla')")
  if onednn_conv.unavailable_reason() is None:
    assert 'Winograd' in onednn_conv.status('auto', 'float32', winograd=True)
    assert 'Winograd' not in onednn_conv.status('auto', 'float32')


def test_a_missing_compiler_or_wheel_is_named(monkeypatch, tmp_path):
  monkeypatch.setenv('HYBRID_FLAX_CACHE', str(tmp_path))
  monkeypatch.setattr(onednn_conv, '_find', lambda dist, suffix: tmp_path / 'a' / 'b' / 'c')
  monkeypatch.setenv('CXX', 'no-such-compiler-hybrid-flax')
  with pytest.raises(onednn_conv.Unavailable, match='no C.. compiler'):
    onednn_conv._build()  # pylint: disable=protected-access
  monkeypatch.undo()
  with pytest.raises(onednn_conv.Unavailable, match=r'pip install -e "\.\[onednn\]"'):
    onednn_conv._find('hybrid-flax-no-such-distribution', '/x.so')  # pylint: disable=protected-access
