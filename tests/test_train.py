"""The train step, sharding, optimizer, config checks and checkpoint round trips."""

import errno
import functools
import os
import shutil
import subprocess
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax.training import train_state
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from configs import cifar_tiny
from hybrid_flax import checkpointing
from hybrid_flax import models
from hybrid_flax import optimizer
from hybrid_flax import train
from tests import conftest


def _setup(config=None, steps_per_epoch=10):
  config = config or cifar_tiny.get_config()
  model = models.create_model(config.model)
  lr_fn = optimizer.create_learning_rate_fn(config, steps_per_epoch)
  tx = optimizer.create_optimizer(config, lr_fn)
  state = train.create_train_state(jax.random.PRNGKey(0), model, tx, (32, 32, 3))
  return jax.device_put(state), lr_fn  # every leaf an array, as the training loop has it


def _batch(n=16):
  labels = np.arange(n) % 10
  images = np.stack([_decode(conftest.class_image(int(l), i))
                     for i, l in enumerate(labels)])
  return {'image': images, 'label': labels.astype(np.int32)}


def _decode(data):
  import io  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  return np.asarray(Image.open(io.BytesIO(data)).convert('RGB'))


def _sharded_step_fn(lr_fn, devices):
  mesh = Mesh(np.asarray(devices), ('data',))
  data, rep = NamedSharding(mesh, P('data')), NamedSharding(mesh, P())
  fn = jax.jit(functools.partial(train.train_step, learning_rate_fn=lr_fn),
               in_shardings=(rep, data), out_shardings=(rep, rep), donate_argnums=0)
  return fn, data, rep


@pytest.mark.parametrize('name', optimizer.OPTIMIZERS)
def test_train_step_lowers_the_loss_on_a_fixed_batch(name):
  config = cifar_tiny.get_config()
  config.optimizer = name
  state, lr_fn = _setup(config)
  batch = _batch()
  step = jax.jit(functools.partial(train.train_step, learning_rate_fn=lr_fn))
  losses = []
  for _ in range(15):
    state, metrics = step(state, batch)
    losses.append(float(metrics['loss']))
  assert losses[-1] < 0.5 * losses[0], losses
  assert int(state.step) == 15


def test_sharded_step_on_4_devices_matches_one_device():
  # Each step starts both from the same state (one device's): trajectories compared over
  # several steps drift apart chaotically once rounding flips a max-pool near-tie (1.5e-5
  # after 2 steps, 2e-3 after 3 with the default attention core), which says nothing of
  # sharding.
  assert jax.device_count() == 4
  batch = _batch()
  state, lr_fn = _setup()
  steps = [_sharded_step_fn(lr_fn, devices) for devices in (jax.devices()[:1], jax.devices())]
  for _ in range(3):
    host = jax.device_get(state)
    results = []
    for (fn, data, rep), n in zip(steps, (1, 4)):
      new, metrics = fn(jax.device_put(host, rep), jax.device_put(batch, data))
      assert len(new.params['head']['kernel'].sharding.device_set) == n
      results.append((new, float(metrics['loss'])))
    (state, l1), (state4, l4) = results
    for one, four in ((state.params, state4.params), (state.batch_stats, state4.batch_stats)):
      jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6),
                   jax.device_get(one), jax.device_get(four))
  assert l1 == pytest.approx(l4, rel=1e-4)


def test_ghost_batch_norm_within_each_device_share_drops_the_statistics_all_reduces():
  batch = _batch(32)
  config = cifar_tiny.get_config()
  config.batch_size = 32
  config.model.bn_group_size = 8  # 32 examples on 4 devices: one group each
  # XLA's whole-batch batch norm to compare with (ghost batch norm is always XLA's): this
  # model has no mesh, so the kernel's (`model.bn_kernel`) would gather the batch instead.
  config.model.bn_kernel = 'xla'
  results, all_reduces = [], {}
  for devices in (jax.devices()[:1], jax.devices()):
    state, lr_fn = _setup(config)
    fn, data, rep = _sharded_step_fn(lr_fn, devices)
    state = jax.device_put(state, rep)
    for _ in range(2):
      state, metrics = fn(state, jax.device_put(batch, data))
    results.append((jax.device_get(state.params), float(metrics['loss'])))
  # The same groups whatever the device count, so the same training up to summation order,
  # which statistics over only 8 examples amplify more than whole-batch ones (hence the
  # looser tolerance than test_sharded_step_on_4_devices_matches_one_device's).
  (p1, l1), (p4, l4) = results
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4), p1, p4)
  assert l1 == pytest.approx(l4, rel=1e-4)
  for group in (0, 8):
    config.model.bn_group_size = group
    state, lr_fn = _setup(config)
    fn, data, rep = _sharded_step_fn(lr_fn, jax.devices())
    hlo = fn.lower(jax.device_put(state, rep), jax.device_put(batch, data)).compile().as_text()
    all_reduces[group] = hlo.count(' all-reduce(') + hlo.count(' all-reduce-start(')
  # Whole-batch statistics need cross-device sums in every batch norm, forward and backward.
  assert 0 < all_reduces[8] < all_reduces[0], all_reduces


def test_on_device_gather_step_on_4_devices_matches_the_fed_batch():
  # config.data_on_device: the split replicated, the indices sharded, the gather in the step.
  split = _batch(32)
  index = np.array([3, 5, 6, 11, 17, 20, 21, 22, 24, 25, 26, 27, 28, 29, 30, 31], np.int32)
  mesh = Mesh(np.asarray(jax.devices()), ('data',))
  data, rep = NamedSharding(mesh, P('data')), NamedSharding(mesh, P())
  results = []
  for on_device in (False, True):
    state, lr_fn = _setup()
    state = jax.device_put(state, rep)
    step_fn = functools.partial(train.train_step, learning_rate_fn=lr_fn)
    if on_device:
      fn = jax.jit(functools.partial(train.train_step_on_device_data, step_fn=step_fn),
                   in_shardings=(rep, data, rep), out_shardings=(rep, rep), donate_argnums=0)
      args = (jax.device_put({'index': index}, data), jax.device_put(split, rep))
    else:
      fn = jax.jit(step_fn, in_shardings=(rep, data), out_shardings=(rep, rep),
                   donate_argnums=0)
      args = (jax.device_put({k: v[index] for k, v in split.items()}, data),)
    for _ in range(2):
      state, metrics = fn(state, *args)
    results.append((jax.device_get(state.params), float(metrics['loss'])))
  (p_host, l_host), (p_dev, l_dev) = results
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), p_host, p_dev)
  assert l_host == pytest.approx(l_dev, rel=1e-6)


def test_sgd_weight_decay_is_pytorch_style_and_coupled():
  config = cifar_tiny.get_config()
  config.learning_rate, config.weight_decay, config.momentum = 0.1, 0.01, 0.9
  tx = optimizer.create_optimizer(config, optimizer.create_learning_rate_fn(config, 10))
  params = {'w': jnp.array([1.0, -2.0])}
  grads = {'w': jnp.array([0.5, 0.5])}
  opt_state = tx.init(params)
  updates, opt_state = tx.update(grads, opt_state, params)
  # torch.optim.SGD: d = g + wd * p; buf = d (first step); p -= lr * buf
  np.testing.assert_allclose(updates['w'], -0.1 * (np.array([0.5, 0.5]) +
                                                   0.01 * np.array([1.0, -2.0])), rtol=1e-6)
  updates, _ = tx.update(grads, opt_state, params)
  d = np.array([0.5, 0.5]) + 0.01 * np.array([1.0, -2.0])
  np.testing.assert_allclose(updates['w'], -0.1 * (0.9 * d + d), rtol=1e-6)


def test_gradient_clipping_bounds_the_step():
  config = cifar_tiny.get_config()
  config.learning_rate, config.weight_decay, config.momentum, config.grad_clip_norm = 1.0, 0, 0, 1.0
  tx = optimizer.create_optimizer(config, optimizer.create_learning_rate_fn(config, 10))
  params = {'w': jnp.zeros(2)}
  updates, _ = tx.update({'w': jnp.array([30.0, 40.0])}, tx.init(params), params)
  np.testing.assert_allclose(updates['w'], [-0.6, -0.8], rtol=1e-6)


def test_learning_rate_schedules():
  config = cifar_tiny.get_config()
  config.num_epochs, config.learning_rate = 4, 0.2
  assert float(optimizer.create_learning_rate_fn(config, 10)(37)) == pytest.approx(0.2)
  config.schedule, config.warmup_epochs = 'cosine', 1
  fn = optimizer.create_learning_rate_fn(config, 10)
  assert float(fn(0)) == 0.0 and float(fn(5)) == pytest.approx(0.1)
  assert float(fn(10)) == pytest.approx(0.2) and float(fn(40)) == pytest.approx(0.0, abs=1e-7)


def _set(config, field, value):
  """config.<field> = value, for a dotted field such as 'augment.flip'."""
  section, _, name = field.rpartition('.')
  (config[section] if section else config)[name] = value


@pytest.mark.parametrize('field, value, match', [
    ('learning_rate', -0.1, 'learning_rate must be positive'),
    ('batch_size', 18, 'batch_size=18 must be a positive multiple of the 4 devices'),
    ('eval_batch_size', 0, 'eval_batch_size=0'),
    ('schedule', 'step', 'schedule must be one of'),
    ('label_smoothing', 1.0, 'label_smoothing must be in'),
    ('ema_decay', -0.1, 'ema_decay must be in'),
    ('num_epochs', 0, 'num_epochs must be positive'),
    ('momentum', 1.5, 'momentum'),
    ('grad_clip_norm', -1.0, 'grad_clip_norm'),
    ('eval_every_epochs', 0, 'eval_every_epochs must be positive'),
    ('bn_bias_lr_scale', 0.0, 'bn_bias_lr_scale must be positive'),
    ('eval_translate', 32, 'eval_translate must be in'),
    ('lookahead_every', -1, 'lookahead_every must be >= 0'),
    ('lookahead_decay', 1.0, 'lookahead_decay must be in'),
    ('augment.early_crop_size', 20, 'early_crop_size must be 0 or a multiple of 8'),
    ('augment.early_crop_epochs', 3, 'early_crop_epochs must be in'),
    ('optimizer', 'adam', 'optimizer must be one of'),
])
def test_bad_configs_fail_before_compiling(field, value, match):
  config = cifar_tiny.get_config()
  _set(config, field, value)
  with pytest.raises(ValueError, match=match):
    train.validate_config(config, num_devices=4)


def test_batch_must_split_into_ghost_batch_norm_groups():
  config = cifar_tiny.get_config()
  config.model.bn_group_size = 3
  with pytest.raises(ValueError, match='multiple of model.bn_group_size=3'):
    train.validate_config(config, num_devices=4)


@pytest.mark.parametrize('fields, match', [
    ({'ema_decay': 0.99, 'lookahead_every': 5}, 'set one of them to 0'),
    ({'augment.flip': False, 'augment.alternate_flip': True}, 'needs augment.flip=True'),
    ({'optimizer': 'muon', 'muon_learning_rate': 0.0}, 'muon_learning_rate must be positive'),
    ({'optimizer': 'muon', 'muon_momentum': 1.0}, 'muon_momentum must be in'),
    ({'optimizer': 'muon', 'muon_ns_steps': 0}, 'muon_ns_steps must be positive'),
])
def test_switches_that_contradict_each_other_are_refused(fields, match):
  config = cifar_tiny.get_config()
  for field, value in fields.items():
    _set(config, field, value)
  with pytest.raises(ValueError, match=match):
    train.validate_config(config, num_devices=4)


def test_config_typos_fail_loudly():
  config = cifar_tiny.get_config()
  config.lock()
  with pytest.raises(AttributeError):
    config.learnig_rate = 0.1  # pylint: disable=attribute-defined-outside-init


def _trained_state(steps=2, config=None):
  state, lr_fn = _setup(config)
  step = jax.jit(functools.partial(train.train_step, learning_rate_fn=lr_fn))
  for _ in range(steps):
    state, _ = step(state, _batch())
  return state


def _abstract(state):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                      state)


@pytest.mark.parametrize('name', optimizer.OPTIMIZERS)
def test_checkpoint_round_trip(tmp_path, name):
  config = cifar_tiny.get_config()
  config.optimizer = name  # Muon's state is a partition of two optimizers' states
  state = _trained_state(config=config)
  manager = checkpointing.make_manager(str(tmp_path / 'ckpt'), keep=2)
  assert checkpointing.save(manager, state, {'step': 2, 'note': 'x'})
  assert not checkpointing.save(manager, state, {'step': 2})  # same step: no second write
  manager.wait_until_finished()
  restored, meta = checkpointing.restore_latest(
      checkpointing.make_manager(str(tmp_path / 'ckpt'), keep=2), _abstract(state))
  assert meta == {'step': 2, 'note': 'x'}
  same = jax.tree.map(lambda a, b: bool(np.array_equal(a, b)), jax.device_get(state),
                      jax.device_get(restored))
  assert all(jax.tree.leaves(same))  # params, batch_stats, opt_state, step, rng


def test_checkpoints_save_and_restore_under_a_relative_workdir(tmp_path, monkeypatch):
  # `--workdir runs/x`, as README's commands give it: Orbax's array writer wants absolute
  # paths, and a relative one once failed the first save (a run died at its first checkpoint).
  monkeypatch.chdir(tmp_path)
  state = _trained_state()
  manager = checkpointing.make_manager(os.path.join('runs', 'x', 'checkpoints'), keep=2)
  assert checkpointing.save(manager, state, {'step': 2})
  manager.wait_until_finished()
  assert os.listdir(tmp_path / 'runs' / 'x' / 'checkpoints') == ['2']
  for reopened in (checkpointing.make_manager(os.path.join('runs', 'x', 'checkpoints'), keep=2),
                   checkpointing.open_read_only(os.path.join('runs', 'x', 'checkpoints'))):
    restored, meta = checkpointing.restore_latest(reopened, _abstract(state))
    assert meta == {'step': 2}
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(state), jax.device_get(restored))
  # The kill-anywhere check's reading of a run's final state (its --reference may be relative).
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  proc = subprocess.run(
      [sys.executable, '-c', 'from hybrid_flax import kill_anywhere; '
       'step, state = kill_anywhere.final_state("runs/x"); print(step, sorted(state))'],
      capture_output=True, text=True, timeout=120, check=False,
      env={**os.environ, 'PYTHONPATH': repo, 'JAX_PLATFORMS': 'cpu'})
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert proc.stdout.split('\n')[0].startswith("2 ['batch_stats',")


def _written_whole(manager, step):
  """(arrays saved, whether each was written as one chunk) from a checkpoint's metadata."""
  written = [m for m in jax.tree.leaves(manager.item_metadata(step)['state'])
             if getattr(m, 'storage', None) is not None and m.shape]
  return len(written), [m.storage.write_shape == m.shape for m in written]


def test_a_replicated_state_is_saved_whole_and_sliced_checkpoints_still_restore(tmp_path):
  # A data-parallel state lives on every device; Orbax's CPU default splits each array's saving
  # over the 4 replicas (a device slice each), which cost the tiny config's save ~3x.
  state = jax.device_put(_trained_state(),
                         NamedSharding(Mesh(np.asarray(jax.devices()), ('data',)), P()))
  manager = checkpointing.make_manager(str(tmp_path / 'whole'), keep=2)
  assert checkpointing.save(manager, state, {'step': 2})
  manager.wait_until_finished()
  count, whole = _written_whole(manager, 2)
  assert count > 10 and all(whole)
  # Runs checkpointed by the code before, in slices, must resume too.
  handler = ocp.type_handlers.get_type_handler(jax.Array)
  handler._use_replica_parallel = True  # pylint: disable=protected-access
  try:
    sliced = ocp.CheckpointManager(str(tmp_path / 'sliced'),
                                   options=ocp.CheckpointManagerOptions(create=True))
    assert checkpointing.save(sliced, state, {'step': 2})
    sliced.wait_until_finished()
  finally:
    handler._use_replica_parallel = False  # pylint: disable=protected-access
  assert not all(_written_whole(sliced, 2)[1])
  for directory in ('whole', 'sliced'):
    restored, _ = checkpointing.restore_latest(
        checkpointing.make_manager(str(tmp_path / directory), keep=2), _abstract(state))
    same = jax.tree.map(lambda a, b: bool(np.array_equal(a, b)), jax.device_get(state),
                        jax.device_get(restored))
    assert all(jax.tree.leaves(same)), directory


def test_a_failed_checkpoint_write_names_the_checkpoints_left_to_resume_from(tmp_path,
                                                                            monkeypatch):
  state = _trained_state()
  step = int(state.step)
  manager = checkpointing.make_manager(str(tmp_path / 'ckpt'), keep=3)
  assert checkpointing.save(manager, state, {'step': step})
  manager.wait_until_finished()
  # TensorStore's message on a full disk: the file first, a long path, the cause last.
  cause = ('RESOURCE_EXHAUSTED: Error writing local file "/runs/' + 'x' * 400 +
           '/_sharding": No space left on device [os_error_code=\'28\']')

  def fail(*args, **kwargs):
    raise ValueError(cause)

  monkeypatch.setattr(manager, 'save', fail)
  with pytest.raises(checkpointing.CheckpointWriteError) as error:
    checkpointing.save(manager, state.replace(step=state.step + 1), {'step': step + 1})
  message = str(error.value)
  assert message.startswith(f'could not write a checkpoint in {tmp_path / "ckpt"} (ValueError: '
                            'RESOURCE_EXHAUSTED: Error writing local file')
  assert 'No space left on device' in message and len(message) < 600  # both ends, not all
  assert (f'(steps [{step}]) are intact: rerun the same command to resume from step {step}'
          in message)
  # A write that failed in the background surfaces when the run waits for it.
  monkeypatch.setattr(manager, 'wait_until_finished', fail)
  with pytest.raises(checkpointing.CheckpointWriteError, match=f'resume from step {step},'):
    checkpointing.finish(manager)
  empty = checkpointing.make_manager(str(tmp_path / 'empty'), keep=3)
  monkeypatch.setattr(empty, 'save', fail)
  with pytest.raises(checkpointing.CheckpointWriteError,
                     match='no checkpoint was written before it: rerun the same command to start'):
    checkpointing.save(empty, state, {'step': step})


def test_steps_on_disk_are_the_complete_checkpoints_only(tmp_path):
  directory = checkpointing.checkpoint_dir(str(tmp_path))
  assert checkpointing.steps_on_disk(directory) == []  # no folder yet
  state = _trained_state()
  manager = checkpointing.make_manager(directory, keep=3)
  for step in (int(state.step), int(state.step) + 10):
    assert checkpointing.save(manager, state.replace(step=step), {'step': step})
    manager.wait_until_finished()
  # What a write killed mid-way leaves, and a stray file: neither is a step to resume from.
  os.makedirs(os.path.join(directory, f'{int(state.step) + 20}.orbax-checkpoint-tmp-7'))
  open(os.path.join(directory, 'notes.txt'), 'w').close()
  assert checkpointing.steps_on_disk(directory) == [int(state.step), int(state.step) + 10]


def test_a_full_disk_elsewhere_in_the_workdir_is_one_clear_error(tmp_path, monkeypatch):
  def full(config, workdir):
    raise OSError(errno.ENOSPC, 'No space left on device', os.path.join(workdir, 'metrics.jsonl'))

  monkeypatch.setattr(train, '_train_and_evaluate', full)
  with pytest.raises(train.DiskFullError, match=r"No space left on device: '.*metrics\.jsonl'; no "
                                                'checkpoint was written before it'):
    train.train_and_evaluate(cifar_tiny.get_config(), str(tmp_path))

  def denied(config, workdir):
    raise PermissionError(errno.EACCES, 'Permission denied')

  monkeypatch.setattr(train, '_train_and_evaluate', denied)
  with pytest.raises(PermissionError):  # other OS errors keep their type and traceback
    train.train_and_evaluate(cifar_tiny.get_config(), str(tmp_path))


def test_time_left_reads_in_hours_minutes_or_seconds():
  time_left = train._time_left  # pylint: disable=protected-access
  assert time_left(3, 12, 1770, 5.6, True) == (
      'Epoch 3 of 12 done; at its pace the remaining 1770 steps take ~2h 45m (evaluations not '
      'counted; the full-size steps after the early crops cost more).')
  assert '~2m 56s (evaluations not counted).' in time_left(11, 12, 195, 0.9, False)
  assert '~4s (' in time_left(1, 3, 10, 0.4, False)


def test_empty_checkpoint_dir_restores_nothing(tmp_path):
  manager = checkpointing.make_manager(str(tmp_path / 'ckpt'), keep=2)
  assert checkpointing.restore_latest(manager, _abstract(_trained_state(0))) == (None, None)


def test_corrupt_latest_checkpoint_falls_back_to_the_previous(tmp_path, caplog):
  first, second = _trained_state(1), _trained_state(2)
  directory = str(tmp_path / 'ckpt')
  manager = checkpointing.make_manager(directory, keep=3)
  checkpointing.save(manager, first, {'step': 1})
  checkpointing.save(manager, second, {'step': 2})
  manager.wait_until_finished()
  state_dir = os.path.join(directory, '2', 'state')
  shutil.rmtree(state_dir)
  os.makedirs(state_dir)
  restored, meta = checkpointing.restore_latest(checkpointing.make_manager(directory, keep=3),
                                                _abstract(first))
  assert meta == {'step': 1} and int(restored.step) == 1
  assert 'step 2 is unreadable' in caplog.text


class _StateBeforeEma(train_state.TrainState):
  """TrainState as checkpoints before the EMA field were written."""
  batch_stats: Any
  rng: jax.Array


def test_checkpoints_from_before_the_ema_field_still_restore(tmp_path):
  state = _trained_state()
  old = _StateBeforeEma(step=state.step, apply_fn=state.apply_fn, params=state.params,
                        tx=state.tx, opt_state=state.opt_state, batch_stats=state.batch_stats,
                        rng=state.rng)
  manager = checkpointing.make_manager(str(tmp_path / 'ckpt'), keep=2)
  manager.save(2, args=ocp.args.Composite(state=ocp.args.StandardSave(old),
                                          meta=ocp.args.JsonSave({'step': 2})))
  manager.wait_until_finished()
  restored, _ = checkpointing.restore_latest(manager, _abstract(state))
  assert isinstance(restored, train.TrainState) and restored.ema is None
  same = jax.tree.map(lambda a, b: bool(np.array_equal(a, b)), jax.device_get(state),
                      jax.device_get(restored))
  assert all(jax.tree.leaves(same))


def test_ema_state_round_trips_and_a_state_without_it_is_refused(tmp_path):
  config = cifar_tiny.get_config()
  config.ema_decay = 0.5
  lr_fn = optimizer.create_learning_rate_fn(config, 10)
  with_ema = jax.device_put(train.create_train_state(
      jax.random.PRNGKey(0), models.create_model(config.model),
      optimizer.create_optimizer(config, lr_fn), (32, 32, 3), ema=True))
  with_ema, _ = jax.jit(train.make_train_step(config, lr_fn, 10))(with_ema, _batch())
  manager = checkpointing.make_manager(str(tmp_path / 'ema'), keep=2)
  checkpointing.save(manager, with_ema, {'step': 1})
  manager.wait_until_finished()
  restored, _ = checkpointing.restore_latest(manager, _abstract(with_ema))
  np.testing.assert_array_equal(restored.ema['params']['head']['kernel'],
                                with_ema.ema['params']['head']['kernel'])
  plain = checkpointing.make_manager(str(tmp_path / 'plain'), keep=2)
  checkpointing.save(plain, _trained_state(1), {'step': 1})
  plain.wait_until_finished()
  with pytest.raises(checkpointing.UnreadableCheckpointsError, match='none of the 1 checkpoints'):
    checkpointing.restore_latest(plain, _abstract(with_ema))


def test_a_second_run_on_a_busy_workdir_is_refused(tmp_path):
  with train.exclusive_workdir(str(tmp_path)):
    with pytest.raises(train.WorkdirBusyError, match=f'pid {os.getpid()}'):
      train.train_and_evaluate(cifar_tiny.get_config(), str(tmp_path))
  with train.exclusive_workdir(str(tmp_path)):  # released on exit: usable again
    pass
