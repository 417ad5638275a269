"""Shapes, pinned parameter counts, gradient checks and attention equivariance of the blocks."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from configs import cifar_cnn
from configs import cifar_hybrid
from configs import cifar_hybrid_cpu
from configs import cifar_hybrid_fast
from configs import cifar_hybrid_noembed
from configs import cifar_tiny
from hybrid_flax import models
from hybrid_flax import onednn_conv
from hybrid_flax import train


def _param_count(model, shape=(1, 32, 32, 3)):
  variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros(shape),
                                                train=False))
  return sum(x.size for x in jax.tree.leaves(variables['params']))


def _model(**overrides):
  config = cifar_hybrid.get_config().model
  for k, v in overrides.items():
    config[k] = v
  return models.create_model(config)


# ResNet-9 (conv 64-128-256-512 + two residual blocks + Dense 512->10) has 6,575,370 parameters;
# each attention block adds 6*C^2 + 6*C (two Dense embeddings, Q/K/V, output projection).
@pytest.mark.parametrize('overrides, expected', [
    ({}, 6_575_370 + (6 * 128**2 + 6 * 128) + (6 * 512**2 + 6 * 512)),
    ({'embed': False}, 6_575_370 + (4 * 128**2 + 4 * 128) + (4 * 512**2 + 4 * 512)),
    ({'attention': False}, 6_575_370),
    # A norm after each attention block: a scale and an offset per channel.
    ({'attention_norm': 'batch'}, 8_250_378 + 2 * 128 + 2 * 512),
    ({'attention_norm': 'layer'}, 8_250_378 + 2 * 128 + 2 * 512),
])
def test_pinned_parameter_counts(overrides, expected):
  assert _param_count(_model(**overrides)) == expected


@pytest.mark.parametrize('config_module, expected', [
    (cifar_hybrid, 8_250_378), (cifar_hybrid_noembed, 7_692_042), (cifar_cnn, 6_575_370),
    (cifar_hybrid_fast, 8_250_378), (cifar_hybrid_cpu, 1_178_122)])
def test_paper_configs_have_pinned_parameter_counts(config_module, expected):
  assert _param_count(models.create_model(config_module.get_config().model)) == expected


@pytest.mark.parametrize('overrides', [
    {},
    {'embed': False},
    {'attention': False},
    {'pool': (True, False, True, False)},
    {'widths': (8, 16, 24, 32), 'num_heads': 4},
])
def test_full_model_output_shape(overrides):
  model = _model(**overrides)
  out = jax.eval_shape(lambda: model.init_with_output(
      jax.random.PRNGKey(0), jnp.zeros((3, 32, 32, 3)), train=False)[0])
  assert out.shape == (3, 10) and out.dtype == jnp.float32


def test_tiny_model_runs_train_and_eval_mode():
  model = models.create_model(cifar_tiny.get_config().model)
  x = jax.random.uniform(jax.random.PRNGKey(1), (4, 32, 32, 3))
  variables = model.init(jax.random.PRNGKey(0), x, train=False)
  logits, updates = model.apply(variables, x, train=True, mutable=['batch_stats'],
                                rngs={'dropout': jax.random.PRNGKey(2)})
  assert logits.shape == (4, 10) and np.all(np.isfinite(logits))
  # Training mode updates the running statistics; evaluation mode uses them.
  changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), variables['batch_stats'],
                         updates['batch_stats'])
  assert all(jax.tree.leaves(changed))
  assert model.apply(variables, x, train=False).shape == (4, 10)


@pytest.mark.parametrize('block, x_shape, out_shape', [
    (models.ConvBlock(6), (2, 8, 8, 3), (2, 8, 8, 6)),
    (models.ConvBlock(6, pool=True), (2, 8, 8, 3), (2, 4, 4, 6)),
    (models.ResidualBlock(), (2, 8, 8, 5), (2, 8, 8, 5)),
])
def test_conv_block_shapes(block, x_shape, out_shape):
  x = jnp.ones(x_shape)
  out, _ = block.init_with_output(jax.random.PRNGKey(0), x, train=False)
  assert out.shape == out_shape


@pytest.mark.parametrize('embed', [True, False])
def test_attention_block_shape_and_params(embed):
  block = models.AttentionBlock(num_heads=2, embed=embed)
  out, variables = block.init_with_output(jax.random.PRNGKey(0), jnp.ones((2, 4, 3, 8)))
  assert out.shape == (2, 4, 3, 8)
  assert ('embed_in' in variables['params']) == embed


def test_attention_is_permutation_equivariant_over_positions():
  block = models.AttentionBlock(num_heads=2)
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 4, 4, 8))
  variables = block.init(jax.random.PRNGKey(1), x)
  perm = np.random.default_rng(0).permutation(16)
  out = block.apply(variables, x).reshape(2, 16, 8)
  out_of_permuted = block.apply(variables, x.reshape(2, 16, 8)[:, perm].reshape(2, 4, 4, 8))
  np.testing.assert_allclose(out_of_permuted.reshape(2, 16, 8), out[:, perm], atol=1e-5)
  # And it really mixes positions: changing one position changes the others' outputs.
  moved = block.apply(variables, x.at[:, 0, 0].add(1.0)).reshape(2, 16, 8)
  assert float(jnp.abs(moved[:, 1:] - out[:, 1:]).max()) > 1e-4


def _largest_abs(a):
  return float(jnp.abs(a.astype(jnp.float32)).max())


def _assert_grads_agree(grads, ref_grads, tol):
  # Relative to the largest gradient: the key bias's is zero (softmax ignores a shift that is
  # the same for every key), so it differs by round-off only.
  largest = max(_largest_abs(g) for g in jax.tree.leaves(ref_grads))
  for g, ref_g in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads), strict=True):
    assert g.dtype == ref_g.dtype and g.shape == ref_g.shape
    assert _largest_abs(g - ref_g) <= tol * largest


@pytest.mark.parametrize('num_heads, shape, dtype, tol', [
    (1, (2, 16, 16, 32), jnp.float32, 1e-5), (8, (2, 4, 4, 64), jnp.float32, 1e-5),
    (2, (3, 4, 3, 8), jnp.bfloat16, 5e-2)])
def test_attention_impls_share_parameters_and_agree(num_heads, shape, dtype, tol):
  # models.SelfAttention stands in for nn.MultiHeadDotProductAttention: the same variables
  # (names, shapes, initial values), outputs, gradients and recorded attention weights.
  x = jax.random.normal(jax.random.PRNGKey(0), shape)
  ours, flax_own = (models.AttentionBlock(num_heads, impl=impl, dtype=dtype)
                    for impl in ('deferred', 'flax'))
  variables = ours.init(jax.random.PRNGKey(1), x)
  jax.tree.map(np.testing.assert_array_equal, variables,
               flax_own.init(jax.random.PRNGKey(1), x))

  def run(block, variables):
    return block.apply(variables, x, mutable=['intermediates'])

  def loss(block, variables):
    return jnp.sum(jnp.sin(block.apply(variables, x).astype(jnp.float32)))

  (out, inter), (ref, ref_inter) = run(ours, variables), run(flax_own, variables)
  assert _largest_abs(out - ref) <= tol * _largest_abs(ref)
  weights = inter['intermediates']['mhsa']['attention_weights'][0]
  ref_weights = ref_inter['intermediates']['mhsa']['attention_weights'][0]
  assert weights.shape == ref_weights.shape == (shape[0], num_heads) + (shape[1] * shape[2],) * 2
  assert _largest_abs(weights - ref_weights) <= tol
  grads, ref_grads = (jax.grad(loss, argnums=1)(block, variables) for block in (ours, flax_own))
  _assert_grads_agree(grads, ref_grads, tol)


@pytest.mark.parametrize('pairs, length, kib, expected', [
    (512, 256, 1024, 4),  # paper width: 64 examples x 8 heads a device, 256 KiB of scores each
    (512, 16, 1024, 512),  # the 4x4 block: everything in one chunk
    (6, 16, 4, 3),  # 4 pairs would fit; 3 is the most that divides 6
    (5, 64, 1, 1),  # not even one pair fits: one at a time
])
def test_pairs_per_chunk_fits_the_budget_and_divides_the_pairs(pairs, length, kib, expected):
  assert models._pairs_per_chunk(pairs, length, kib) == expected


@pytest.mark.parametrize('num_heads, shape, kib, dtype, tol', [
    (2, (8, 4, 4, 8), 2, jnp.float32, 1e-5),  # 2 pairs a chunk, 2 chunks on each of 4 devices
    (1, (4, 6, 6, 8), 1, jnp.float32, 1e-5),  # a pair at a time, 36 positions
    (4, (8, 2, 2, 16), 1024, jnp.float32, 1e-5),  # the whole shard in one chunk
    (2, (4, 4, 4, 8), 2, jnp.bfloat16, 2e-2),
])
def test_chunked_attention_backward_matches_autodiff(num_heads, shape, kib, dtype, tol):
  # With a mesh the block's backward loops over chunks of each device's (example, head) pairs
  # (the batch split over 4 fake devices); its gradients must be autodiff's, for the
  # parameters and the input, and the forward pass must not change at all.
  mesh = train.data_mesh()  # conftest's 4 fake devices
  batch = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('data'))
  x = jax.device_put(jax.random.normal(jax.random.PRNGKey(0), shape), batch)
  plain = models.AttentionBlock(num_heads, dtype=dtype)
  chunked = models.AttentionBlock(num_heads, dtype=dtype, grad_chunk_kib=kib, mesh=mesh)
  variables = plain.init(jax.random.PRNGKey(1), x)

  def loss(variables, x, block):
    return jnp.sum(jnp.sin(block.apply(variables, x).astype(jnp.float32)))

  grad = jax.jit(jax.grad(loss, argnums=(0, 1)), static_argnums=2)
  assert 'shard_map' in str(jax.make_jaxpr(grad, static_argnums=2)(variables, x, chunked))
  assert 'shard_map' not in str(jax.make_jaxpr(grad, static_argnums=2)(variables, x, plain))
  np.testing.assert_array_equal(jax.jit(chunked.apply)(variables, x),
                                jax.jit(plain.apply)(variables, x))
  _assert_grads_agree(grad(variables, x, chunked), grad(variables, x, plain), tol)


def test_training_state_uses_the_chunked_attention_backward_on_its_mesh():
  # state_factory hands the model its sharding's mesh, as it does the optimizer: the chunked
  # backward is what training runs on CPUs, and 0 turns it off.
  mesh = train.data_mesh()  # conftest's 4 fake devices
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  for kib, expected in ((1024, True), (0, False)):
    config = cifar_tiny.get_config()
    config.model.attention_grad_chunk_kib = kib
    # oneDNN's convs and the attention and batch-norm kernels split the batch with shard_maps
    # of their own.
    config.model.conv_impl = config.model.attention_kernel = config.model.bn_kernel = 'xla'
    _, init, _ = train.state_factory(config, 10, (32, 32, 3), replicated)
    state = jax.eval_shape(init, jax.random.PRNGKey(0))
    assert state.apply_fn.__self__.mesh is mesh

    def loss(params, batch_stats):
      logits, _ = state.apply_fn({'params': params, 'batch_stats': batch_stats},
                                 jnp.zeros((4, 32, 32, 3)), train=True, mutable=['batch_stats'])
      return logits.sum()

    jaxpr = jax.make_jaxpr(jax.grad(loss))(state.params, state.batch_stats)
    assert ('shard_map' in str(jaxpr)) == expected


@pytest.mark.parametrize('token', [0.5, float('nan')])
def test_opaque_identity_returns_its_input(token):
  # A NaN token skips the loop, a finite one runs it once: the values are the input's both ways.
  xs = (jax.random.normal(jax.random.PRNGKey(0), (3, 4)), jnp.arange(6.0, dtype=jnp.bfloat16))
  out = jax.jit(models._opaque_identity)(xs, jnp.float32(token))
  for o, x in zip(out, xs, strict=True):
    assert o.dtype == x.dtype
    np.testing.assert_array_equal(o, x)


def test_conv_grad_barrier_keeps_the_convolutions_values_and_gradients():
  conv, barrier = (functools.partial(f, window_strides=(1, 1), padding=((1, 1), (1, 1)),
                                     dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
                   for f in (jax.lax.conv_general_dilated, models.conv_with_grad_barrier))
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 6, 6, 3))
  w = jax.random.normal(jax.random.PRNGKey(1), (3, 3, 3, 5))
  dy = jax.random.normal(jax.random.PRNGKey(2), (2, 6, 6, 5))
  np.testing.assert_allclose(jax.jit(barrier)(x, w), jax.jit(conv)(x, w), rtol=1e-6, atol=1e-6)
  vjp = jax.jit(lambda f, x, w, dy: jax.vjp(f, x, w)[1](dy), static_argnums=0)
  for g, ref in zip(vjp(barrier, x, w, dy), vjp(conv, x, w, dy), strict=True):
    np.testing.assert_allclose(g, ref, rtol=1e-5, atol=1e-5)
  # The barrier is a loop in the backward pass only.
  assert 'while' not in str(jax.make_jaxpr(barrier)(x, w))
  assert 'while' in str(jax.make_jaxpr(lambda x, w: jax.vjp(barrier, x, w)[1](dy))(x, w))


def _switched_models(field: str, off_value, **overrides):
  """The tiny config's model (with `overrides` of its model fields) as configured and with
  `model.<field>` = `off_value`, the parameters, and a jitted gradient of a fixed loss taking
  (params, model)."""
  x = jax.random.normal(jax.random.PRNGKey(0), (4, 32, 32, 3))
  config = cifar_tiny.get_config().model
  config.update(overrides)
  on = models.create_model(config)
  config[field] = off_value
  off = models.create_model(config)
  variables = off.init(jax.random.PRNGKey(1), x, train=False)

  def loss(params, model):
    logits, _ = model.apply({**variables, 'params': params}, x, train=True,
                            mutable=['batch_stats'])
    return jnp.sum(jnp.sin(logits))

  return on, off, variables['params'], jax.jit(jax.grad(loss), static_argnums=1)


def test_conv_grad_barrier_is_a_switch_that_leaves_the_model_s_gradients():
  assert cifar_tiny.get_config().model.conv_grad_barrier  # the paper configs' default
  # With XLA's convs everywhere: oneDNN's (model.conv_impl) take the barrier's place.
  on, off, params, grad = _switched_models('conv_grad_barrier', False)
  on, off = on.clone(onednn=False), off.clone(onednn=False)
  assert 'while' in str(jax.make_jaxpr(grad, static_argnums=1)(params, on))
  assert 'while' not in str(jax.make_jaxpr(grad, static_argnums=1)(params, off))
  _assert_grads_agree(grad(params, on), grad(params, off), 1e-5)


needs_onednn = pytest.mark.skipif(onednn_conv.unavailable_reason() is not None,
                                  reason=f'oneDNN unavailable: {onednn_conv.unavailable_reason()}')


def _custom_calls_with_xla_s_gradients(field: str, flag: str, counts: dict, **overrides):
  """`model.<field>`'s 'auto' (every config's default) against 'xla': the model flag it sets,
  each custom call's count in the gradient's HLO (none with 'xla'), and XLA's gradients.
  Returns the two models and the parameters."""
  assert cifar_tiny.get_config().model[field] == 'auto'
  on, off, params, grad = _switched_models(field, 'xla', **overrides)
  assert getattr(on, flag) and not getattr(off, flag)
  hlo, off_hlo = (grad.lower(params, model).as_text() for model in (on, off))
  for text, count in counts.items():
    assert hlo.count(text) == count, text
    assert text not in off_hlo, text
  _assert_grads_agree(grad(params, on), grad(params, off), 1e-5)
  return on, off, params


@needs_onednn
def test_conv_impl_auto_runs_the_convs_through_onednn_to_xla_s_gradients():
  # With Winograd (`model.conv_winograd`, the default) the convs with 32 channels in and out
  # (`onednn_conv.WINOGRAD_MIN_CHANNELS`: residual2's two, on 4x4 maps) run it all three ways,
  # the other six oneDNN's direct convs as below (conv1's input needs no gradient), none of
  # them on 4x4 maps, so none blocked.
  on, _, _ = _custom_calls_with_xla_s_gradients('conv_impl', 'onednn', {
      'custom_call @HfConvForward(': 6,
      'custom_call @HfConvInputGrad(': 6 - 1,
      'custom_call @HfConvWeightGrad(': 6,
      'custom_call @HfWinogradConv(': 2 * 2,
      'custom_call @HfWinogradWeightGrad(': 2,
      'blocked = 1': 0})
  assert cifar_tiny.get_config().model.conv_winograd and on.winograd


@needs_onednn
def test_conv_impl_auto_without_winograd_runs_onednn_s_direct_convs_to_xla_s_gradients():
  # All three ways as above; residual2's two (4x4) forward and input grad in the blocked
  # layout, their weight grad XLA's.
  on, _, _ = _custom_calls_with_xla_s_gradients('conv_impl', 'onednn', {
      'custom_call @HfConvForward(': 8,
      'custom_call @HfConvInputGrad(': 8 - 1,  # conv1's input needs no gradient
      'custom_call @HfWinogradConv(': 0,
      'custom_call @HfWinogradWeightGrad(': 0,
      'custom_call @HfConvWeightGrad(': 6,
      'blocked = 1': 4}, conv_winograd=False)
  assert not on.winograd


@needs_onednn
def test_attention_kernel_auto_runs_both_blocks_through_the_kernels_to_xla_s_gradients():
  on, off, params = _custom_calls_with_xla_s_gradients('attention_kernel', 'attention_onednn', {
      'custom_call @HfAttentionForward(': 2,
      'custom_call @HfAttentionBackward(': 2,
      # Each block's six dense layers (embed in and out, q, k, v, out): forward, input gradient
      # and kernel gradient.
      'custom_call @HfMatmul(': 2 * 6 * 3})
  # The attention-map tool's weights are the same either way.
  x = jax.random.normal(jax.random.PRNGKey(2), (2, 32, 32, 3))
  weights = [m.apply({**off.init(jax.random.PRNGKey(1), x), 'params': params}, x,
                     mutable=['intermediates'])[1]['intermediates'] for m in (on, off)]
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), *weights)


@needs_onednn
def test_bn_kernel_auto_runs_every_conv_block_through_the_kernel_to_xla_s_gradients():
  # conv1..conv4 and the residual blocks' two each: statistics, forward, and the backward's two.
  _custom_calls_with_xla_s_gradients('bn_kernel', 'bn_kernel', {
      f'custom_call @{name}(': 8 for name in ('HfBnStats', 'HfBnReluForward',
                                              'HfBnReluBackwardSums', 'HfBnReluBackward')})


def test_attention_weights_are_recorded_only_when_asked():
  block = models.AttentionBlock(1)
  x = jax.random.normal(jax.random.PRNGKey(0), (1, 2, 2, 4))
  variables = block.init(jax.random.PRNGKey(1), x)
  assert 'intermediates' not in variables
  _, state = block.apply(variables, x, mutable=['intermediates'])
  np.testing.assert_allclose(state['intermediates']['mhsa']['attention_weights'][0].sum(-1),
                             1.0, rtol=1e-6)


@pytest.mark.parametrize('norm', ['batch', 'layer'])
def test_attention_norm_normalises_the_block_output(norm):
  block = models.AttentionBlock(num_heads=2, norm=norm)
  x = 50.0 * jax.random.normal(jax.random.PRNGKey(0), (4, 4, 4, 8))
  variables = block.init(jax.random.PRNGKey(1), x)
  out, _ = block.apply(variables, x, train=True, mutable=['batch_stats'])
  axes = (0, 1, 2) if norm == 'batch' else (3,)  # per channel over the batch, or per position
  np.testing.assert_allclose(out.mean(axis=axes), 0.0, atol=1e-4)
  np.testing.assert_allclose(out.std(axis=axes), 1.0, atol=1e-3)


def test_logit_scale_multiplies_the_logits():
  x = jax.random.uniform(jax.random.PRNGKey(1), (2, 32, 32, 3))
  variables = _model(widths=(8, 16, 16, 32), num_heads=2).init(jax.random.PRNGKey(0), x)
  plain = _model(widths=(8, 16, 16, 32), num_heads=2).apply(variables, x)
  scaled = _model(widths=(8, 16, 16, 32), num_heads=2, logit_scale=0.125).apply(variables, x)
  np.testing.assert_allclose(scaled, 0.125 * plain, rtol=1e-6)
  assert float(jnp.abs(plain).max()) > 0


def test_attention_block_rejects_heads_that_do_not_divide_channels():
  with pytest.raises(ValueError, match='attention heads'):
    models.AttentionBlock(num_heads=3).init(jax.random.PRNGKey(0), jnp.ones((1, 2, 2, 8)))


@pytest.mark.parametrize('overrides, match', [
    ({'widths': (8, 16, 16)}, '4 entries'),
    ({'widths': (8, 18, 16, 32), 'num_heads': 4}, 'not divisible'),
    ({'num_heads': 0}, 'positive'),
    ({'dropout': 1.0}, 'dropout'),
    ({'attention_norm': 'group'}, 'attention_norm'),
    ({'attention_impl': 'flash'}, 'attention_impl'),
    ({'logit_scale': 0.0}, 'logit_scale'),
    ({'bn_group_size': -1}, 'bn_group_size'),
    ({'attention_grad_chunk_kib': -1}, 'attention_grad_chunk_kib'),
])
def test_invalid_model_configs_fail_with_a_reason(overrides, match):
  with pytest.raises(ValueError, match=match):
    _model(**overrides)


@pytest.mark.parametrize('shape', [(2, 8, 8, 3), (3, 7, 5, 2)])
def test_max_pool_matches_flax_max_pool_values_and_gradients(shape):
  # Rounded and ReLU'd, so most windows hold ties: the gradient must still pick one element.
  x = jnp.maximum(jnp.round(2 * jax.random.normal(jax.random.PRNGKey(0), shape)), 0)
  reference = lambda x: nn.max_pool(x, (2, 2), strides=(2, 2))
  np.testing.assert_array_equal(models.max_pool_2x2(x), reference(x))
  cotangent = jax.random.normal(jax.random.PRNGKey(1), reference(x).shape)
  grad = lambda f: jax.vjp(f, x)[1](cotangent)[0]
  np.testing.assert_array_equal(grad(models.max_pool_2x2), grad(reference))
  tangent = jax.random.normal(jax.random.PRNGKey(2), shape)
  np.testing.assert_array_equal(jax.jvp(models.max_pool_2x2, (x,), (tangent,))[1],
                                jax.jvp(reference, (x,), (tangent,))[1])


@pytest.mark.parametrize('group_size', [8, 2])
def test_ghost_batch_norm_is_batch_norm_applied_to_each_group(group_size):
  x = 3 * jax.random.normal(jax.random.PRNGKey(0), (8, 5, 5, 6)) + 1
  reference = nn.BatchNorm(use_running_average=False, momentum=0.9, epsilon=1e-5)
  ghost = models.GhostBatchNorm(group_size, use_running_average=False)
  variables = reference.init(jax.random.PRNGKey(1), x)
  assert (jax.tree.structure(ghost.init(jax.random.PRNGKey(1), x))
          == jax.tree.structure(variables))
  # Away from the initial values, so scale, offset and running statistics all count.
  variables = jax.tree.map(
      lambda v: v + 0.1 * jax.random.normal(jax.random.PRNGKey(2), v.shape), variables)
  out, updates = ghost.apply(variables, x, mutable=['batch_stats'])
  groups = [reference.apply(variables, x[i:i + group_size], mutable=['batch_stats'])
            for i in range(0, 8, group_size)]
  np.testing.assert_allclose(out, np.concatenate([g[0] for g in groups]), atol=1e-6)
  for stat in ('mean', 'var'):
    np.testing.assert_allclose(updates['batch_stats'][stat],
                               np.mean([g[1]['batch_stats'][stat] for g in groups], 0),
                               atol=1e-6)
  # Evaluation uses the running statistics, exactly as nn.BatchNorm does.
  np.testing.assert_array_equal(
      models.GhostBatchNorm(group_size, use_running_average=True).apply(variables, x),
      nn.BatchNorm(use_running_average=True).apply(variables, x))


def test_residual_block_applies_its_convs_in_the_order_checkpoints_name_them():
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 4, 4, 3))
  block = models.ResidualBlock()
  variables = block.init(jax.random.PRNGKey(1), x, train=False)
  # Distinct statistics per conv, so swapping the two would change the output.
  variables = jax.tree.map(
      lambda v: v + 0.5 * jax.random.uniform(jax.random.PRNGKey(2), v.shape), variables)
  conv = lambda name, y: models.ConvBlock(3).apply(
      {k: v[name] for k, v in variables.items()}, y, train=False)
  np.testing.assert_allclose(block.apply(variables, x, train=False),
                             x + conv('ConvBlock_1', conv('ConvBlock_0', x)), atol=1e-6)


def test_ghost_batch_norm_rejects_a_batch_that_does_not_split_into_groups():
  ghost = models.GhostBatchNorm(3, use_running_average=False)
  x = jnp.ones((4, 2, 2, 1))
  with pytest.raises(ValueError, match='groups of 3'):
    ghost.init_with_output(jax.random.PRNGKey(0), x)


def _block_fn(block, x, train_mode):
  """(params, x) -> output for gradient checks, batch statistics as in training."""
  variables = block.init(jax.random.PRNGKey(0), x, **train_mode)

  def f(params, inputs):
    if 'batch_stats' in variables:
      out, _ = block.apply({'params': params, 'batch_stats': variables['batch_stats']}, inputs,
                           mutable=['batch_stats'], **train_mode)
      return out
    return block.apply({'params': params}, inputs, **train_mode)
  return f, variables['params']


@pytest.mark.parametrize('name', ['conv', 'conv_pool', 'residual', 'attention',
                                  'attention_noembed', 'attention_flax', 'attention_batchnorm',
                                  'attention_layernorm', 'residual_ghost_norm'])
def test_block_gradients_match_finite_differences(name):
  block, train_mode = {
      'conv': (models.ConvBlock(4, dtype=jnp.float64), {'train': True}),
      'conv_pool': (models.ConvBlock(4, pool=True, dtype=jnp.float64), {'train': True}),
      'residual': (models.ResidualBlock(dtype=jnp.float64), {'train': True}),
      'attention': (models.AttentionBlock(2, dtype=jnp.float64), {}),
      'attention_noembed': (models.AttentionBlock(2, embed=False, dtype=jnp.float64), {}),
      'attention_flax': (models.AttentionBlock(2, impl='flax', dtype=jnp.float64), {}),
      'attention_batchnorm': (models.AttentionBlock(2, norm='batch', dtype=jnp.float64),
                              {'train': True}),
      'attention_layernorm': (models.AttentionBlock(2, norm='layer', dtype=jnp.float64), {}),
      'residual_ghost_norm': (models.ResidualBlock(bn_group_size=1, dtype=jnp.float64),
                              {'train': True}),
  }[name]
  with jax.enable_x64(True):
    x = jax.random.normal(jax.random.PRNGKey(3), (2, 4, 4, 4), dtype=jnp.float64)
    f, params = _block_fn(block, x, train_mode)
    params = jax.tree.map(lambda p: p.astype(jnp.float64), params)
    # Gradients with respect to both the parameters and the input, forward and reverse mode.
    check_grads(f, (params, x), order=1, modes=('fwd', 'rev'), eps=1e-6, atol=1e-5, rtol=1e-5)
