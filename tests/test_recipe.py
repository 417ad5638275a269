"""The strong recipe's switches: each one does what it says, and off means the paper's step."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import cifar_hybrid
from configs import cifar_hybrid_fast
from configs import cifar_tiny
from hybrid_flax import augment
from hybrid_flax import input_pipeline
from hybrid_flax import models
from hybrid_flax import optimizer
from hybrid_flax import train
from tests import test_launch
from tests import test_train


# The switches end to end through launch.py, as a user runs them.
_launch = test_launch._launch  # pylint: disable=protected-access
_final_params = test_launch._final_params  # pylint: disable=protected-access
_metrics = test_launch._metrics  # pylint: disable=protected-access


def _images(n=6, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (n, 32, 32, 3), np.uint8)


def test_crops_are_windows_of_the_reflect_padded_image():
  images = _images()
  out = np.asarray(augment.random_crop_flip(jnp.asarray(images), jax.random.PRNGKey(1), 4,
                                            flip=False))
  assert out.shape == images.shape and out.dtype == np.uint8
  padded = np.pad(images, ((0, 0), (4, 4), (4, 4), (0, 0)), mode='reflect')
  offsets = []
  for i in range(len(images)):
    found = [(dy, dx) for dy in range(9) for dx in range(9)
             if np.array_equal(padded[i, dy:dy + 32, dx:dx + 32], out[i])]
    assert found, f'image {i} is not a crop of its padded original'
    offsets.append(found[0])
  assert len(set(offsets)) > 1  # each image draws its own offset


def test_flips_mirror_about_half_the_images_and_keep_the_rest():
  images = _images(64)
  out = np.asarray(augment.random_crop_flip(jnp.asarray(images), jax.random.PRNGKey(2), 0,
                                            flip=True))
  mirrored = [np.array_equal(o, i[:, ::-1]) for o, i in zip(out, images)]
  kept = [np.array_equal(o, i) for o, i in zip(out, images)]
  assert all(m or k for m, k in zip(mirrored, kept))
  assert 16 < sum(mirrored) < 48


def test_augmentation_is_a_function_of_the_key():
  images = jnp.asarray(_images())
  a, b, c = (augment.random_crop_flip(images, jax.random.PRNGKey(k), 4, True) for k in (3, 3, 4))
  assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_crops_and_flips_draw_what_they_drew_before_the_mirror_and_size_arguments():
  # The runs in README.md drew offsets with a scalar bound and coins of shape [B, 1, 1, 1];
  # the same draws must come out now, or rerunning those commands would not reproduce them.
  images, rng = jnp.asarray(_images(64)), jax.random.PRNGKey(5)
  crop_rng, flip_rng = jax.random.split(rng)
  offsets = jax.random.randint(crop_rng, (64, 2), 0, 5)
  padded = jnp.pad(images, ((0, 0), (2, 2), (2, 2), (0, 0)), mode='reflect')
  crops = jnp.stack([jax.lax.dynamic_slice(p, (o[0], o[1], 0), (32, 32, 3))
                     for p, o in zip(padded, offsets)])
  coins = jax.random.bernoulli(flip_rng, 0.5, (64, 1, 1, 1))
  expected = jnp.where(coins, crops[:, :, ::-1, :], crops)
  np.testing.assert_array_equal(augment.random_crop_flip(images, rng, 2, True), expected)


def test_smaller_crops_are_windows_of_the_padded_image_at_its_scale():
  images = _images(8)
  out = np.asarray(augment.random_crop_flip(jnp.asarray(images), jax.random.PRNGKey(7), 2,
                                            flip=False, size=24))
  assert out.shape == (8, 24, 24, 3)
  padded = np.pad(images, ((0, 0), (2, 2), (2, 2), (0, 0)), mode='reflect')
  offsets = set()
  for i in range(8):
    found = [(dy, dx) for dy in range(13) for dx in range(13)
             if np.array_equal(padded[i, dy:dy + 24, dx:dx + 24], out[i])]
    assert found, f'image {i} is not a 24x24 window of its padded original'
    offsets.add(found[0])
  assert len(offsets) > 1


def test_alternating_flip_mirrors_each_image_every_other_epoch():
  rng, index = jax.random.PRNGKey(6), jnp.arange(1000)
  epochs = [np.asarray(augment.alternating_flip(rng, index, jnp.int32(e))) for e in range(4)]
  assert 400 < epochs[0].sum() < 600  # a random half in the first epoch
  np.testing.assert_array_equal(epochs[1], ~epochs[0])  # then the other half
  np.testing.assert_array_equal(epochs[2], epochs[0])
  np.testing.assert_array_equal(epochs[3], epochs[1])
  # An image's coin is its own: the same wherever it sits in the batch and whoever shares it.
  some = jnp.asarray([999, 3, 500])
  np.testing.assert_array_equal(augment.alternating_flip(rng, some, jnp.int32(0)),
                                epochs[0][np.asarray(some)])


def test_given_mirror_flips_exactly_those_images():
  images = jnp.asarray(_images(4))
  mirror = jnp.asarray([True, False, False, True])
  out = np.asarray(augment.random_crop_flip(images, jax.random.PRNGKey(0), 0, True, mirror))
  for o, i, m in zip(out, np.asarray(images), mirror):
    np.testing.assert_array_equal(o, i[:, ::-1] if m else i)


def _alternating_step_images(state, batch, steps, steps_per_epoch):
  """The images the jitted train step trains on at each of `steps`, as they reach the model."""
  seen = []
  apply_fn = state.apply_fn

  def spy(variables, x, **kwargs):
    jax.debug.callback(lambda images: seen.append(np.asarray(images)), x)
    return apply_fn(variables, x, **kwargs)

  step_fn = jax.jit(functools.partial(train.train_step, learning_rate_fn=lambda s: 0.1, flip=True,
                                      alternate_flip_epoch_steps=steps_per_epoch))
  images = []
  for step in steps:  # one program for all: the step is an argument, not a constant
    step_fn(state.replace(apply_fn=spy, step=jnp.full_like(state.step, step)), batch)
    jax.effects_barrier()
    images.append(seen.pop())
    assert not seen
  return images


def test_train_step_alternates_flips_by_the_epoch_of_its_step():
  state, _ = test_train._setup()
  batch = {**test_train._batch(), 'index': np.arange(16, dtype=np.int32)}
  plain = np.asarray(train.preprocess(batch['image']))
  # Steps 0 and 10 are the first steps of epochs 0 and 1.
  first, second = _alternating_step_images(state, batch, steps=(0, 10), steps_per_epoch=10)
  mirrored = lambda seen: [np.allclose(s, p[:, ::-1]) and not np.allclose(s, p)
                           for s, p in zip(seen, plain)]
  kept = lambda seen: [np.allclose(s, p) for s, p in zip(seen, plain)]
  assert all(m or k for m, k in zip(mirrored(first), kept(first)))
  assert 0 < sum(mirrored(first)) < 16
  assert mirrored(second) == kept(first) and kept(second) == mirrored(first)
  with pytest.raises(ValueError, match='needs each example'):
    train.train_step(state, test_train._batch(), lambda s: 0.1, flip=True,
                     alternate_flip_epoch_steps=10)


def _state_with_averaged_weights(config):
  """A tiny model's state that keeps `state.ema` (the EMA or Lookahead's slow weights)."""
  model = models.create_model(config.model)
  lr_fn = optimizer.create_learning_rate_fn(config, 10)
  tx = optimizer.create_optimizer(config, lr_fn)
  state = jax.device_put(train.create_train_state(jax.random.PRNGKey(0), model, tx, (32, 32, 3),
                                                  ema=True))
  return state, lr_fn


def test_lookahead_restarts_the_weights_from_the_slow_ones_every_k_steps():
  config = cifar_tiny.get_config()
  config.lookahead_every = 2
  state, lr_fn = _state_with_averaged_weights(config)
  step = jax.jit(functools.partial(train.train_step, learning_rate_fn=lr_fn, lookahead_every=2,
                                   lookahead_decay_fn=lambda s: 0.25))
  plain = jax.jit(functools.partial(train.train_step, learning_rate_fn=lr_fn))
  batch = test_train._batch()
  slow = jax.device_get(state.ema)
  one, _ = step(state, batch)  # step 1: no sync; the weights move, the slow ones do not
  expected_one, _ = plain(state, batch)
  kernel = lambda tree: np.asarray(tree['params']['head']['kernel'])
  np.testing.assert_array_equal(kernel(jax.device_get(one.ema)), kernel(slow))
  np.testing.assert_allclose(one.params['head']['kernel'], expected_one.params['head']['kernel'],
                             rtol=1e-6, atol=1e-7)
  fast, _ = plain(one, batch)  # what step 2 computes before it syncs
  two, _ = step(one, batch)
  expected = jax.tree.map(lambda s, f: 0.25 * s + 0.75 * f, slow,
                          {'params': jax.device_get(fast.params),
                           'batch_stats': jax.device_get(fast.batch_stats)})
  for got in ({'params': two.params, 'batch_stats': two.batch_stats}, two.ema):
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                 jax.device_get(got), expected)


def test_lookahead_decay_ramps_up_as_the_cube_of_progress():
  config = cifar_tiny.get_config()
  config.num_epochs, config.lookahead_every, config.lookahead_decay = 2, 5, 0.95
  decay = train.create_lookahead_decay_fn(config, steps_per_epoch=50)
  assert float(decay(0)) == 0.0
  assert float(decay(50)) == pytest.approx(0.95 ** 5 / 8)
  assert float(decay(100)) == pytest.approx(0.95 ** 5)


def test_label_smoothing_loss_matches_optax_on_the_same_logits():
  config = cifar_tiny.get_config()
  state, lr_fn = test_train._setup(config)
  batch = test_train._batch()
  _, metrics = train.train_step(state, batch, lr_fn, label_smoothing=0.2)
  logits, _ = state.apply_fn({'params': state.params, 'batch_stats': state.batch_stats},
                             train.preprocess(batch['image']), train=True,
                             mutable=['batch_stats'])
  expected = optax.softmax_cross_entropy(
      logits, optax.smooth_labels(jax.nn.one_hot(batch['label'], 10), 0.2)).mean()
  hard = optax.softmax_cross_entropy_with_integer_labels(logits, batch['label']).mean()
  assert float(metrics['loss']) == pytest.approx(float(expected), rel=1e-5)
  assert abs(float(expected) - float(hard)) > 1e-3  # the switch changed the loss


def test_augmentation_changes_the_step_and_off_is_the_plain_step():
  state, lr_fn = test_train._setup()
  batch = test_train._batch()
  plain, _ = train.train_step(state, batch, lr_fn)
  switched_off, _ = train.make_train_step(cifar_tiny.get_config(), lr_fn, 10)(state, batch)
  augmented, _ = train.train_step(state, batch, lr_fn, crop_padding=4, flip=True)
  kernel = lambda s: np.asarray(s.params['head']['kernel'])
  np.testing.assert_array_equal(kernel(plain), kernel(switched_off))
  assert not np.allclose(kernel(plain), kernel(augmented))


def test_ema_tracks_the_weights_and_is_what_evaluation_uses():
  config = cifar_tiny.get_config()
  config.ema_decay = 0.9
  state, lr_fn = _state_with_averaged_weights(config)
  before = jax.device_get(state.params)
  batch = test_train._batch()
  new, _ = train.make_train_step(config, lr_fn, 10)(state, batch)
  expected = jax.tree.map(lambda old, cur: 0.9 * old + 0.1 * cur, before,
                          jax.device_get(new.params))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
               jax.device_get(new.ema['params']), expected)
  batch['mask'] = np.ones(len(batch['label']), np.float32)
  with_ema = train.eval_step(new, batch)
  by_hand = train.eval_step(new.replace(params=new.ema['params'],
                                        batch_stats=new.ema['batch_stats'], ema=None), batch)
  assert float(with_ema['loss_sum']) == pytest.approx(float(by_hand['loss_sum']), rel=1e-6)


def test_flip_tta_averages_the_logits_of_the_image_and_its_mirror():
  state, _ = test_train._setup()
  images = jnp.asarray(_images(4))
  variables = train.eval_variables(state)
  both = train.eval_logits(state.apply_fn, variables, images, flip=True)
  one = train.eval_logits(state.apply_fn, variables, images)
  mirror = train.eval_logits(state.apply_fn, variables, images[:, :, ::-1])
  np.testing.assert_allclose(both, (one + mirror) / 2, rtol=1e-5, atol=1e-6)


def test_weight_decay_can_spare_norm_and_bias_parameters():
  config = cifar_tiny.get_config()
  config.weight_decay, config.momentum = 0.1, 0.0
  params = {'kernel': jnp.ones((2, 2)), 'bias': jnp.ones(2), 'scale': jnp.ones(2)}
  zeros = jax.tree.map(jnp.zeros_like, params)
  for decay_all in (True, False):
    config.weight_decay_norm_and_bias = decay_all
    tx = optimizer.create_optimizer(config, optimizer.create_learning_rate_fn(config, 10))
    updates, _ = tx.update(zeros, tx.init(params), params)
    assert float(jnp.abs(updates['kernel']).sum()) > 0
    assert (float(jnp.abs(updates['bias']).sum()) > 0) == decay_all
    assert (float(jnp.abs(updates['scale']).sum()) > 0) == decay_all


def test_linear_schedule_warms_up_then_decays_to_zero():
  config = cifar_tiny.get_config()
  config.num_epochs, config.learning_rate = 4, 0.4
  config.schedule, config.warmup_epochs = 'linear', 1
  fn = optimizer.create_learning_rate_fn(config, 10)
  assert [float(fn(s)) for s in (0, 5, 10, 25, 40)] == pytest.approx([0, 0.2, 0.4, 0.2, 0],
                                                                        abs=1e-7)


def test_bfloat16_compute_keeps_float32_parameters_and_logits():
  config = cifar_tiny.get_config().model
  config.dtype = 'bfloat16'
  model = models.create_model(config)
  variables = model.init(jax.random.PRNGKey(0), jnp.zeros((2, 32, 32, 3)), train=False)
  assert {x.dtype for x in jax.tree.leaves(variables['params'])} == {jnp.dtype('float32')}
  logits = model.apply(variables, jnp.ones((2, 32, 32, 3)), train=False)
  assert logits.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(logits)))
  config.dtype = 'float16'
  with pytest.raises(ValueError, match='model.dtype must be one of'):
    models.create_model(config)


def test_fast_recipe_is_the_paper_model_with_every_switch_on():
  paper, fast = cifar_hybrid.get_config(), cifar_hybrid_fast.get_config()
  # Same architecture and width (the parameter count is pinned in test_models.py); the fast
  # recipe's model fields are only switches of initialisation and logit scale.
  switches = {'logit_scale', 'dirac', 'whiten', 'dtype'}
  assert ({k: v for k, v in fast.model.items() if k not in switches} ==
          {k: v for k, v in paper.model.items() if k not in switches})
  train.validate_config(fast, 4)
  assert fast.augment.crop_padding and fast.augment.flip and fast.label_smoothing
  assert fast.ema_decay and fast.eval_flip and fast.nesterov and fast.schedule == 'linear'
  assert fast.model.dirac and fast.model.logit_scale < 1 and fast.bn_bias_lr_scale > 1
  # The paper's config keeps every switch off.
  assert not (paper.augment.crop_padding or paper.augment.flip or paper.label_smoothing or
              paper.ema_decay or paper.eval_flip or paper.model.dirac or paper.model.whiten)
  assert paper.model.logit_scale == 1 and paper.bn_bias_lr_scale == 1


def test_whitening_kernel_whitens_the_patches_it_was_estimated_from():
  rng = np.random.default_rng(0)
  noise = rng.normal(size=(32, 12, 12, 3))
  images = noise + np.roll(noise, 1, axis=1) + 0.5 * noise[..., ::-1]  # correlated patches
  kernel = models.whitening_kernel(images, 8, eps=0.0)
  assert kernel.shape == (3, 3, 3, 8) and kernel.dtype == np.float32
  out = np.asarray(jax.lax.conv_general_dilated(
      images.astype(np.float32), kernel, (1, 1), 'VALID',
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'))).reshape(-1, 8)
  # Four unit-variance, uncorrelated projections (the top eigenvectors), then their negatives.
  np.testing.assert_allclose(np.cov(out[:, :4].T, bias=True), np.eye(4), atol=1e-3)
  np.testing.assert_array_equal(out[:, 4:], -out[:, :4])
  raw = np.cov(images.reshape(-1, 3).T, bias=True)
  assert not np.allclose(raw, np.eye(3), atol=0.3)  # the pixels themselves were far from white
  with pytest.raises(ValueError, match='even width of at most 54'):
    models.whitening_kernel(images, 7)
  # Summed over chunks of images (7 here: 5 chunks, the last of 4), the same covariance.
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(models, '_WHITENING_CHUNK', 7)
    np.testing.assert_allclose(models.whitening_kernel(images, 8, eps=0.0), kernel, rtol=1e-5,
                               atol=1e-6)
  config = cifar_tiny.get_config().model
  config.whiten, config.widths = True, (9, 16, 16, 32)
  with pytest.raises(ValueError, match='model.whiten needs an even first width'):
    models.create_model(config)


def test_dirac_init_starts_every_conv_but_the_first_as_an_identity():
  config = cifar_tiny.get_config().model
  plain = models.create_model(config).init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))
  config.dirac = True
  dirac = models.create_model(config).init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))
  count = lambda v: sum(x.size for x in jax.tree.leaves(v['params']))
  assert count(dirac) == count(plain)  # an initialisation, not a new parameter
  k = lambda v, *path: np.asarray(functools.reduce(dict.__getitem__, path, v['params']))
  np.testing.assert_array_equal(k(dirac, 'conv1', 'Conv_0', 'kernel'),
                                k(plain, 'conv1', 'Conv_0', 'kernel'))
  for path, n in ((('conv2', 'Conv_0', 'kernel'), 8),  # 8 -> 16 channels: the first 8
                  (('residual1', 'ConvBlock_0', 'Conv_0', 'kernel'), 16)):
    kernel = k(dirac, *path)
    expected = np.zeros((3, 3, n, n), np.float32)
    expected[1, 1] = np.eye(n)
    np.testing.assert_array_equal(kernel[:, :, :n, :n], expected)
    # Beyond the identity block the default initialisation is untouched.
    np.testing.assert_array_equal(kernel[:, :, :, n:], k(plain, *path)[:, :, :, n:])


def test_whitened_layer_is_frozen_and_batch_norm_offsets_move_faster():
  config = cifar_tiny.get_config()
  config.momentum, config.weight_decay, config.grad_clip_norm = 0.0, 1e-2, 0.0
  params = models.create_model(config.model).init(
      jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))['params']
  grads = jax.tree.map(jnp.ones_like, params)

  def updates(**switches):
    for name, value in switches.items():
      target = config.model if name in ('whiten', 'dirac') else config
      target[name] = value
    tx = optimizer.create_optimizer(config, optimizer.create_learning_rate_fn(config, 10))
    config.model.whiten, config.bn_bias_lr_scale = False, 1.0
    out, _ = tx.update(grads, tx.init(params), params)
    return out

  plain, switched = updates(), updates(whiten=True, bn_bias_lr_scale=64.0)
  flat_plain = dict(jax.tree_util.tree_flatten_with_path(plain)[0])
  for path, u in jax.tree_util.tree_flatten_with_path(switched)[0]:
    names = tuple(k.key for k in path)
    expected = flat_plain[path]
    if names == models.WHITENED_KERNEL:
      expected = 0 * expected  # neither moved nor decayed
    elif names[-1] == 'bias' and names[-2].startswith('BatchNorm'):
      expected = 64 * expected
    np.testing.assert_allclose(u, expected, rtol=1e-6, err_msg=str(names))
  assert float(jnp.abs(flat_plain[next(p for p in flat_plain if tuple(
      k.key for k in p) == models.WHITENED_KERNEL)]).sum()) > 0  # trained when not whitened


@pytest.mark.parametrize('kernels', ['xla', 'auto'])
def test_a_whitened_conv1_wider_than_its_filters_is_two_convs_of_which_one_learns(kernels):
  config = cifar_tiny.get_config()
  config.model.widths, config.grad_clip_norm = (64, 16, 16, 32), 0.0
  # 'auto': oneDNN's convs and the fused batch-norm kernel where this CPU has them.
  config.model.conv_impl = config.model.bn_kernel = kernels
  x = jnp.asarray(_images(2), jnp.float32)
  single = models.create_model(config.model)
  variables = single.init(jax.random.PRNGKey(0), x)
  config.model.whiten = True
  split = models.create_model(config.model)
  assert models.whitened_width(config.model) == split.conv1_split == 54
  halves = split.init(jax.random.PRNGKey(0), x)
  conv1 = halves['params']['conv1']
  assert conv1['Conv_0']['kernel'].shape == (3, 3, 3, 54)
  assert conv1['Conv_1']['kernel'].shape == (3, 3, 3, 10)
  count = lambda v: sum(p.size for p in jax.tree.leaves(v['params']))
  assert count(halves) == count(variables)  # the paper's parameters, split in two
  # Side by side, the two convs are the single conv with their kernels and biases joined.
  joined = {name: jnp.concatenate([conv1['Conv_0'][name], conv1['Conv_1'][name]], axis=-1)
            for name in ('kernel', 'bias')}
  params = {**halves['params'], 'conv1': {**conv1, 'Conv_0': joined}}
  del params['conv1']['Conv_1']
  for train_mode in (False, True):
    got = split.apply(halves, x, train=train_mode, mutable=['batch_stats'])[0]
    want = single.apply({**halves, 'params': params}, x, train=train_mode,
                        mutable=['batch_stats'])[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  # The filters stay where whitening put them; the other channels learn, under either optimizer.
  grads = jax.tree.map(jnp.ones_like, halves['params'])
  for name in optimizer.OPTIMIZERS:
    config.optimizer = name
    tx = optimizer.create_optimizer(config, optimizer.create_learning_rate_fn(config, 10))
    updates, _ = tx.update(grads, tx.init(halves['params']), halves['params'])
    assert not np.any(updates['conv1']['Conv_0']['kernel']), name
    assert np.any(updates['conv1']['Conv_1']['kernel']), name


def _muon_updates(**fields):
  """One update of the tiny model's parameters from random gradients, and its inputs."""
  config = cifar_tiny.get_config()
  config.grad_clip_norm, config.model.whiten = 0.0, True
  for name, value in fields.items():
    config[name] = value
  params = models.create_model(config.model).init(
      jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))['params']
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
  # Each output channel's gradient on its own scale, so the raw steps are far from orthogonal.
  grads = treedef.unflatten([jax.random.normal(k, p.shape) * jnp.geomspace(0.1, 10, p.shape[-1])
                             for k, p in zip(keys, leaves)])
  lr_fn = optimizer.create_learning_rate_fn(config, 10)
  tx = optimizer.create_optimizer(config, lr_fn)
  updates, _ = tx.update(grads, tx.init(params), params)
  flat = lambda tree: {tuple(k.key for k in path): x
                       for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]}
  return flat(params), flat(grads), flat(updates), float(lr_fn(1))


def test_muon_orthogonalises_conv_kernel_steps_and_leaves_the_rest_to_sgd():
  params, grads, sgd, _ = _muon_updates()
  _, _, muon, lr = _muon_updates(optimizer='muon', muon_ns_steps=5, muon_normalize=False,
                                 muon_learning_rate=0.1)
  ratio = 0.1 / cifar_tiny.get_config().learning_rate
  convs = [n for n, p in params.items() if p.ndim == 4 and n != models.WHITENED_KERNEL]
  assert len(convs) == 7
  for name in convs:
    out = params[name].shape[-1]
    step = np.linalg.svd(np.asarray(-muon[name] / (ratio * lr)).reshape(-1, out),
                         compute_uv=False)
    raw = np.linalg.svd(np.asarray(grads[name]).reshape(-1, out), compute_uv=False)
    # The gradient's singular values spread over orders of magnitude; the step's are pulled
    # towards 1 (the quintic Newton-Schulz lands in roughly [0.7, 1.2], not exactly on 1).
    assert raw.max() / raw.min() > 10, name
    assert 0.5 < step.min() and step.max() < 1.5, (name, step.min(), step.max())
  # The frozen conv1 and everything that is not a conv kernel: the SGD path's very update.
  for name in params:
    if name not in convs:
      np.testing.assert_allclose(muon[name], sgd[name], rtol=1e-6, err_msg=str(name))
  assert not np.any(muon[models.WHITENED_KERNEL])


def test_muon_keeps_conv_kernels_at_norm_sqrt_out():
  params, _, updates, _ = _muon_updates(optimizer='muon')
  for name, p in params.items():
    if p.ndim == 4 and name != models.WHITENED_KERNEL:
      assert float(jnp.linalg.norm(p + updates[name])) == pytest.approx(
          np.sqrt(p.shape[-1]), rel=1e-5), name


def test_muon_shared_out_over_devices_gives_the_same_updates_and_state():
  config = cifar_tiny.get_config()
  config.optimizer, config.model.whiten = 'muon', True
  params = models.create_model(config.model).init(
      jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))['params']
  lr_fn = optimizer.create_learning_rate_fn(config, 10)
  mesh = train.data_mesh()
  assert mesh.size == 4  # conftest's fake devices: the kernels are shared out
  results = []
  for tx in (optimizer.create_optimizer(config, lr_fn),
             optimizer.create_optimizer(config, lr_fn, mesh)):
    state, updates = tx.init(params), []
    for seed in (1, 2):  # a second step, so the momentum carried in the state counts too
      # A key per leaf: kernels of one shape get different gradients, so a mix-up between
      # the devices' results would show.
      leaves, treedef = jax.tree.flatten(params)
      keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
      grads = treedef.unflatten([jax.random.normal(k, p.shape) for k, p in zip(keys, leaves)])
      update, state = jax.jit(tx.update)(grads, state, params)
      updates.append(update)
    results.append((updates, state))
  (whole, whole_state), (shared, shared_state) = results
  assert jax.tree.structure(whole_state) == jax.tree.structure(shared_state)  # same checkpoints
  for a, b in zip(jax.tree.leaves((whole, whole_state)), jax.tree.leaves((shared, shared_state))):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_newton_schulz_work_is_shared_out_costliest_first():
  costs = [1, 9, 4, 4, 3, 2]
  owners = optimizer._share_out(costs, 3)  # pylint: disable=protected-access
  loads = [sum(c for c, o in zip(costs, owners) if o == d) for d in range(3)]
  assert sorted(loads) == [7, 7, 9]  # the 9 alone; 4+3 and 4+2+1 beside it
  assert optimizer._share_out(costs, 1) == [0] * len(costs)  # pylint: disable=protected-access


def test_translate_tta_averages_shifted_views_with_the_centred_one():
  state, _ = test_train._setup()
  images = _images(4)
  variables = train.eval_variables(state)
  logits = lambda x: np.asarray(train.eval_logits(state.apply_fn, variables, jnp.asarray(x),
                                                  flip=True))
  padded = np.pad(images, ((0, 0), (2, 2), (2, 2), (0, 0)), mode='reflect')
  expected = logits(images) / 2 + (logits(padded[:, :32, :32]) + logits(padded[:, 4:, 4:])) / 4
  got = train.eval_logits(state.apply_fn, variables, jnp.asarray(images), flip=True, translate=2)
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
  assert not np.allclose(got, logits(images), atol=1e-4)


@pytest.mark.parametrize('wide', [False, True], ids=['conv1_all_whitened', 'conv1_wider'])
def test_airbench_switches_train_end_to_end_with_conv1_frozen_at_the_whitening_filters(
    tiny_data_dir, tmp_path, wide):
  # A conv1 wider than its 54 filters (the paper's 64), under Muon: the 10 others learn.
  extra = ('--config.model.widths=(64,16,16,32)', '--config.optimizer=muon') if wide else ()
  proc = _launch(tmp_path, tiny_data_dir, '--config.model.whiten=True', '--config.model.dirac=True',
                 '--config.bn_bias_lr_scale=8', '--config.eval_translate=1',
                 '--config.ema_decay=0.9', *extra)
  assert proc.returncode == 0, proc.stderr[-4000:]
  assert ('conv1 whitens 3x3 patches, estimated from 80 training images'
          + (' (its first 54 channels; the other 10 learn).' if wide else '.')) in proc.stderr
  step, state = _final_params(tmp_path)
  assert step == test_launch.TOTAL_STEPS
  images, _ = input_pipeline.load_split('cifar10_folder', 'train', str(tiny_data_dir))
  expected = models.whitening_kernel(np.asarray(train.preprocess(images)),
                                     54 if wide else cifar_tiny.get_config().model.widths[0])
  for variables in (state['params'], state['ema']['params']):
    np.testing.assert_allclose(variables['conv1']['Conv_0']['kernel'], expected, rtol=1e-6,
                               atol=1e-7)
  epochs = [m for m in _metrics(tmp_path) if m['kind'] == 'epoch']
  assert len(epochs) == test_launch.EPOCHS and all(np.isfinite(m['test_loss']) for m in epochs)


def test_airbench_schedule_switches_train_end_to_end_the_same_on_both_pipelines(
    tiny_data_dir, tmp_path):
  # Alternating flips need each example's index from either pipeline, Lookahead keeps its slow
  # weights in the state, and the early crops switch programs after the first epoch.
  switches = ('--config.augment.flip=True', '--config.augment.alternate_flip=True',
              '--config.augment.crop_padding=2', '--config.lookahead_every=2',
              '--config.augment.early_crop_size=16', '--config.augment.early_crop_epochs=1')
  states = []
  for on_device in (False, True):
    workdir = tmp_path / f'on_device_{on_device}'
    proc = _launch(workdir, tiny_data_dir, *switches, f'--config.data_on_device={on_device}')
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert f'Step {test_launch.STEPS_PER_EPOCH + 1}: the early crops end' in proc.stderr
    # The time left after the (only, so last) early epoch warns that its pace understates the
    # full-size rest; after a full-size epoch there is nothing to warn of.
    assert re.search(r'Epoch 1 of 3 done; .*; the full-size steps after the early crops cost '
                     r'more\)\.', proc.stderr)
    assert re.search(r'Epoch 2 of 3 done; .* \(evaluations not counted\)\.', proc.stderr)
    assert sorted(test_launch.compiled_ahead(proc)) == [
        'eval step', 'train step', 'train step on the early crops']
    step, state = _final_params(workdir)
    assert step == test_launch.TOTAL_STEPS and 'ema' in state
    epochs = [m for m in _metrics(workdir) if m['kind'] == 'epoch']
    assert len(epochs) == test_launch.EPOCHS and all(np.isfinite(m['test_loss']) for m in epochs)
    states.append(state)
  # The same examples by index on both pipelines, so the same flips and the same training.
  jax.tree.map(np.testing.assert_array_equal, *states)

  # One more epoch, resumed after the early crops: their program is not compiled again.
  proc = _launch(tmp_path / 'on_device_True', tiny_data_dir, *switches,
                 '--config.data_on_device=True', f'--config.num_epochs={test_launch.EPOCHS + 1}')
  assert proc.returncode == 0, proc.stderr[-4000:]
  assert sorted(test_launch.compiled_ahead(proc)) == ['eval step', 'train step']
  assert _final_params(tmp_path / 'on_device_True')[0] == (
      test_launch.TOTAL_STEPS + test_launch.STEPS_PER_EPOCH)
