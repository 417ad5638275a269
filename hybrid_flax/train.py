"""Training and evaluation: the train state, the pure step functions, and the loop around them."""

import contextlib
import errno
import fcntl
import functools
import os
import signal
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from flax import traverse_util
from flax.training import train_state
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from hybrid_flax import augment
from hybrid_flax import checkpointing
from hybrid_flax import compile_ahead
from hybrid_flax import input_pipeline
from hybrid_flax import metric_writer
from hybrid_flax import models
from hybrid_flax import optimizer
from hybrid_flax import profiling
from hybrid_flax import xla_cpu_flags


class TrainState(train_state.TrainState):
  batch_stats: Any
  rng: jax.Array  # base key; each step's dropout and augment keys come from fold_in(rng, step)
  # {'params', 'batch_stats'}: the weights evaluation uses, averaged over steps when
  # config.ema_decay > 0 or Lookahead's slow weights when config.lookahead_every > 0; else None.
  ema: Any = None


class NonFiniteLossError(FloatingPointError):
  """Training diverged; the checkpoints on disk predate it."""


class WorkdirBusyError(RuntimeError):
  """Another live run holds the workdir."""


class DiskFullError(RuntimeError):
  """A write to the workdir (metrics, events, config) found its disk full."""


@contextlib.contextmanager
def exclusive_workdir(workdir: str):
  """Holds an flock on `workdir/.lock` so two runs never interleave checkpoints and metrics.

  The kernel drops the lock when the holder dies, so a killed run leaves no stale lock behind.
  Process 0 holds it for the whole run; the others learn its outcome, so that all stop together
  rather than wait for a process that is gone.
  """
  with contextlib.ExitStack() as stack:
    busy = None
    if jax.process_index() == 0:
      try:
        stack.enter_context(_flock(workdir))
      except WorkdirBusyError as e:
        busy = e
    if multihost_utils.broadcast_one_to_all(np.int32(busy is not None)):
      raise busy or WorkdirBusyError(f'another run is using {workdir} (process 0 found it '
                                     'locked); stop it first or pick another --workdir')
    yield


@contextlib.contextmanager
def _flock(workdir: str):
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, '.lock'), 'a+') as f:
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      f.seek(0)
      raise WorkdirBusyError(f'another run (pid {f.read().strip() or "?"}) is using {workdir}; '
                             'stop it first or pick another --workdir') from None
    f.truncate(0)
    f.write(str(os.getpid()))
    f.flush()
    yield


def data_mesh() -> Mesh:
  """One 'data' axis over every device of every process: the batch is split, the state copied."""
  return Mesh(np.asarray(jax.devices()), ('data',))


def _eval_checks(config: ml_collections.ConfigDict) -> list[tuple[bool, str]]:
  return [(0 <= config.eval_translate < 32,
           f'eval_translate must be in [0, 32), got {config.eval_translate}')]


def validate_eval_config(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError for test-time settings (e.g. overridden by `evaluate`) that cannot run."""
  for ok, message in _eval_checks(config):
    if not ok:
      raise ValueError(message)


def validate_config(config: ml_collections.ConfigDict, num_devices: int) -> None:
  """Raises ValueError with a one-line reason for a config that cannot train."""
  checks = [
      (config.num_epochs > 0, f'num_epochs must be positive, got {config.num_epochs}'),
      (config.learning_rate > 0, f'learning_rate must be positive, got {config.learning_rate}'),
      (config.weight_decay >= 0, f'weight_decay must be >= 0, got {config.weight_decay}'),
      (config.grad_clip_norm >= 0, f'grad_clip_norm must be >= 0, got {config.grad_clip_norm}'),
      (0 <= config.momentum < 1, f'momentum must be in [0, 1), got {config.momentum}'),
      (config.optimizer in optimizer.OPTIMIZERS,
       f'optimizer must be one of {optimizer.OPTIMIZERS}, got {config.optimizer!r}'),
      (config.optimizer != 'muon' or config.muon_learning_rate > 0,
       f'muon_learning_rate must be positive, got {config.muon_learning_rate}'),
      (config.optimizer != 'muon' or 0 <= config.muon_momentum < 1,
       f'muon_momentum must be in [0, 1), got {config.muon_momentum}'),
      (config.optimizer != 'muon' or config.muon_ns_steps > 0,
       f'muon_ns_steps must be positive, got {config.muon_ns_steps}'),
      (config.schedule in optimizer.SCHEDULES,
       f'schedule must be one of {optimizer.SCHEDULES}, got {config.schedule!r}'),
      (0 <= config.warmup_epochs < config.num_epochs,
       f'warmup_epochs must be in [0, num_epochs), got {config.warmup_epochs}'),
      (0 <= config.label_smoothing < 1,
       f'label_smoothing must be in [0, 1), got {config.label_smoothing}'),
      (0 <= config.ema_decay < 1, f'ema_decay must be in [0, 1), got {config.ema_decay}'),
      (config.profile_steps >= 0, f'profile_steps must be >= 0, got {config.profile_steps}'),
      (config.lookahead_every >= 0,
       f'lookahead_every must be >= 0, got {config.lookahead_every}'),
      (0 < config.lookahead_decay < 1,
       f'lookahead_decay must be in (0, 1), got {config.lookahead_decay}'),
      (not (config.ema_decay and config.lookahead_every),
       'ema_decay and lookahead_every both choose the weights evaluation uses: set one of them '
       f'to 0 (got ema_decay={config.ema_decay}, lookahead_every={config.lookahead_every})'),
      (0 <= config.augment.early_crop_epochs <= config.num_epochs,
       f'augment.early_crop_epochs must be in [0, num_epochs], got '
       f'{config.augment.early_crop_epochs}'),
      (config.augment.early_crop_size == 0 or (
          0 < config.augment.early_crop_size <= input_pipeline.IMAGE_SHAPE[0] and
          config.augment.early_crop_size % 2 ** sum(config.model.pool) == 0),
       f'augment.early_crop_size must be 0 or a multiple of {2 ** sum(config.model.pool)} (the '
       f'model\'s {sum(config.model.pool)} 2x2 max-pools) up to the image size, got '
       f'{config.augment.early_crop_size}'),
      (config.augment.flip or not config.augment.alternate_flip,
       'augment.alternate_flip decides how images are flipped: it needs augment.flip=True'),
      (config.bn_bias_lr_scale > 0,
       f'bn_bias_lr_scale must be positive, got {config.bn_bias_lr_scale}'),
      *_eval_checks(config),
      (0 <= config.augment.crop_padding < 32,
       f'augment.crop_padding must be in [0, 32), got {config.augment.crop_padding}'),
      (config.checkpoint_every_steps > 0 and config.log_every_steps > 0,
       'checkpoint_every_steps and log_every_steps must be positive'),
      (config.eval_every_epochs > 0, 'eval_every_epochs must be positive (the last epoch is '
                                     f'always evaluated), got {config.eval_every_epochs}'),
      (config.keep_checkpoints > 0, 'keep_checkpoints must be positive'),
  ]
  over = f' of {jax.process_count()} processes' if jax.process_count() > 1 else ''
  for name in ('batch_size', 'eval_batch_size'):
    size = config[name]
    # Global sizes: every device takes an equal share, whatever process it belongs to.
    checks.append((size > 0 and size % num_devices == 0,
                   f'{name}={size} must be a positive multiple of the {num_devices} devices{over}'))
  group = config.model.bn_group_size
  checks.append((group <= 0 or config.batch_size % group == 0,
                 f'batch_size={config.batch_size} must be a multiple of model.bn_group_size='
                 f'{group} (ghost batch norm)'))
  for ok, message in checks:
    if not ok:
      raise ValueError(message)
  xla_cpu_flags.check(config.xla_cpu_convolutions)
  models.validate_model_config(config.model)


# Training images the whitening filters are estimated from (airbench uses 5,000).
WHITENING_IMAGES = 5000


def create_train_state(rng, model, tx, image_shape, ema: bool = False) -> TrainState:
  params_rng, dropout_rng = jax.random.split(rng)
  variables = model.init(params_rng, jnp.zeros((1,) + tuple(image_shape), jnp.uint8), train=False)
  return TrainState.create(apply_fn=model.apply, params=variables['params'], tx=tx,
                           batch_stats=variables['batch_stats'], rng=dropout_rng,
                           ema=dict(variables) if ema else None)


def whiten_first_layer(state: TrainState, images: np.ndarray, sharding) -> TrainState:
  """`state` with conv1's kernel (and its average's) set to whiten `images`' 3x3 patches."""
  width = traverse_util.flatten_dict(state.params)[models.WHITENED_KERNEL].shape[-1]
  kernel = models.whitening_kernel(np.asarray(preprocess(images)), width)

  def with_kernel(params):
    flat = traverse_util.flatten_dict(params)
    # A buffer of its own each time: the step donates the state, and one buffer cannot be
    # donated twice (the weights and their average).
    flat[models.WHITENED_KERNEL] = jax.make_array_from_process_local_data(sharding, kernel)
    return traverse_util.unflatten_dict(flat)

  ema = None if state.ema is None else {**state.ema, 'params': with_kernel(state.ema['params'])}
  return state.replace(params=with_kernel(state.params), ema=ema)


def state_factory(config, steps_per_epoch: int, image_shape, sharding):
  """Returns (learning_rate_fn, init(rng) -> TrainState, the abstract state to restore into)."""
  mesh = sharding.mesh if isinstance(sharding, NamedSharding) else None
  model = models.create_model(config.model, mesh)
  learning_rate_fn = optimizer.create_learning_rate_fn(config, steps_per_epoch)
  tx = optimizer.create_optimizer(config, learning_rate_fn, mesh)
  init = functools.partial(create_train_state, model=model, tx=tx, image_shape=image_shape,
                           ema=config.ema_decay > 0 or config.lookahead_every > 0)
  abstract_state = compile_ahead.abstract(
      jax.eval_shape(init, jax.random.PRNGKey(config.seed)), sharding)
  return learning_rate_fn, init, abstract_state


def preprocess(images: jax.Array) -> jax.Array:
  mean = jnp.asarray(input_pipeline.CIFAR10_MEAN) * 255.0
  std = jnp.asarray(input_pipeline.CIFAR10_STD) * 255.0
  return (images.astype(jnp.float32) - mean) / std


def train_step(state: TrainState, batch, learning_rate_fn, *, crop_padding: int = 0,
               crop_size: int = 0, flip: bool = False, alternate_flip_epoch_steps: int = 0,
               label_smoothing: float = 0.0, ema_decay: float = 0.0, lookahead_every: int = 0,
               lookahead_decay_fn: optax.Schedule | None = None):
  """One SGD step on a global batch; returns the new state and the batch's metrics.

  The keyword options are the recipe's switches (see `make_train_step`); their defaults are
  the paper's plain step: no augmentation, hard labels, no weight averaging. `crop_size` > 0
  trains on crops of that size (`augment.early_crop_size`).
  `alternate_flip_epoch_steps` > 0 (the steps per epoch) flips by `augment.alternating_flip`,
  which needs the batch's dataset indices (`batch['index']`). `lookahead_every` > 0 moves the
  slow weights (`state.ema`) towards the weights every that many steps and restarts the weights
  from them (Lookahead, as airbench uses it), by `lookahead_decay_fn(step)`.
  """
  dropout_rng = jax.random.fold_in(state.rng, state.step)
  images = batch['image']
  if crop_padding or crop_size or flip:
    mirror = None
    if flip and alternate_flip_epoch_steps:
      if 'index' not in batch:
        raise ValueError('augment.alternate_flip needs each example\'s index in the split '
                         '(batch["index"]), which this batch lacks')
      # A key fixed for the run: each image's first-epoch coin must not change between epochs.
      mirror = augment.alternating_flip(jax.random.split(state.rng)[1], batch['index'],
                                        state.step // alternate_flip_epoch_steps)
    # A key of its own, so switching augmentation on leaves the dropout masks as they were.
    images = augment.random_crop_flip(images, jax.random.fold_in(dropout_rng, 1), crop_padding,
                                      flip, mirror, crop_size)

  def loss_fn(params):
    logits, updates = state.apply_fn(
        {'params': params, 'batch_stats': state.batch_stats}, preprocess(images),
        train=True, mutable=['batch_stats'], rngs={'dropout': dropout_rng})
    if label_smoothing:
      targets = optax.smooth_labels(jax.nn.one_hot(batch['label'], logits.shape[-1]),
                                    label_smoothing)
      loss = optax.softmax_cross_entropy(logits, targets).mean()
    else:
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch['label']).mean()
    return loss, (logits, updates['batch_stats'])

  (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  metrics = {
      'loss': loss,
      'accuracy': jnp.mean(jnp.argmax(logits, -1) == batch['label']),
      'learning_rate': learning_rate_fn(state.step),
  }
  new_state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
  current = {'params': new_state.params, 'batch_stats': new_state.batch_stats}
  if ema_decay:
    new_state = new_state.replace(
        ema=optax.incremental_update(current, state.ema, step_size=1.0 - ema_decay))
  elif lookahead_every:
    sync = new_state.step % lookahead_every == 0
    slow = optax.incremental_update(current, state.ema,
                                    step_size=1.0 - lookahead_decay_fn(new_state.step))
    slow = jax.tree.map(lambda s, old: jnp.where(sync, s, old), slow, state.ema)
    fast = jax.tree.map(lambda s, cur: jnp.where(sync, s, cur), slow, current)
    new_state = new_state.replace(params=fast['params'], batch_stats=fast['batch_stats'],
                                  ema=slow)
  return new_state, metrics


def create_lookahead_decay_fn(config, steps_per_epoch: int) -> optax.Schedule:
  """airbench's Lookahead schedule: the slow weights keep `lookahead_decay ** lookahead_every`
  of themselves at each sync, ramped up from 0 as (step / total steps) ** 3, so Lookahead is
  all but off early, when the weights should move fast, and strongest as training ends."""
  total = config.num_epochs * steps_per_epoch
  final = config.lookahead_decay ** config.lookahead_every
  return lambda step: final * (jnp.minimum(step, total) / total) ** 3


def make_train_step(config, learning_rate_fn, steps_per_epoch: int, early: bool = False):
  """`train_step` with the config's recipe switches bound; jit it where it is called.

  `early`: the step of the first `augment.early_crop_epochs` epochs, on the smaller crops.
  """
  return functools.partial(
      train_step, learning_rate_fn=learning_rate_fn, crop_padding=config.augment.crop_padding,
      crop_size=config.augment.early_crop_size if early else 0, flip=config.augment.flip,
      alternate_flip_epoch_steps=steps_per_epoch if config.augment.alternate_flip else 0,
      label_smoothing=config.label_smoothing, ema_decay=config.ema_decay,
      lookahead_every=config.lookahead_every,
      lookahead_decay_fn=(create_lookahead_decay_fn(config, steps_per_epoch)
                          if config.lookahead_every else None))


def gather_batch(data, batch):
  """The examples `batch['index']` of a split held on the device (config.data_on_device)."""
  return {'image': data['image'][batch['index']], 'label': data['label'][batch['index']],
          'index': batch['index']}


def train_step_on_device_data(state: TrainState, batch, data, step_fn):
  """`step_fn` (a bound `train_step`) on the batch gathered from `data` by its indices."""
  return step_fn(state, gather_batch(data, batch))


def eval_variables(state: TrainState) -> dict[str, Any]:
  """The weights to evaluate: the running average when the recipe keeps one."""
  if state.ema is not None:
    return state.ema
  return {'params': state.params, 'batch_stats': state.batch_stats}


def test_time_augmentation(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """`eval_logits`' / `eval_step`'s test-time augmentation arguments, from a run's config."""
  return {'flip': bool(config.eval_flip), 'translate': int(config.eval_translate)}


def eval_logits(apply_fn, variables, images: jax.Array, flip: bool = False,
                translate: int = 0) -> jax.Array:
  """Logits of uint8 images, with optional test-time augmentation.

  `flip` averages them with the mirrored images'; `translate` > 0 then averages that (weight
  1/2) with the same for the images shifted by `translate` pixels down-right and up-left
  (1/4 each, reflect-padded as in training): airbench's multi-crop evaluation.
  """
  def views(x):
    logits = apply_fn(variables, preprocess(x), train=False)
    if flip:
      logits = (logits + apply_fn(variables, preprocess(x[:, :, ::-1, :]), train=False)) / 2
    return logits

  logits = views(images)
  if translate:
    t, (h, w) = translate, images.shape[1:3]
    padded = jnp.pad(images, ((0, 0), (t, t), (t, t), (0, 0)), mode='reflect')
    shifted = views(padded[:, :h, :w]) + views(padded[:, 2 * t:, 2 * t:])
    logits = logits / 2 + shifted / 4
  return logits


def eval_step(state: TrainState, batch, flip: bool = False, translate: int = 0):
  """Sums of loss, correct predictions and examples over the real (mask 1) examples."""
  logits = eval_logits(state.apply_fn, eval_variables(state), batch['image'], flip, translate)
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch['label'])
  mask = batch['mask']
  return {
      'loss_sum': jnp.sum(loss * mask),
      'correct': jnp.sum((jnp.argmax(logits, -1) == batch['label']) * mask),
      'count': jnp.sum(mask),
  }


def evaluate(eval_fn, state, reader, batch_size, sharding,
             progress: bool = False) -> dict[str, float]:
  totals = None
  batches = input_pipeline.to_device(
      input_pipeline.eval_batches(reader, batch_size,
                                  input_pipeline.process_rows(sharding, batch_size)), sharding)
  if progress:
    import tqdm  # pylint: disable=g-import-not-at-top
    # Counted in images so the bar's rate reads img/s; leave=False keeps the train bar on top.
    bar = tqdm.tqdm(total=len(reader), unit='img', desc='eval', leave=False, mininterval=2.0,
                    dynamic_ncols=True)
  for batch in batches:
    out = eval_fn(state, batch)
    totals = out if totals is None else jax.tree.map(jnp.add, totals, out)
    if progress:
      jax.block_until_ready(out)
      bar.update(min(batch_size, len(reader) - bar.n))
  if progress:
    bar.close()
  totals = jax.device_get(totals)
  return {'test_loss': float(totals['loss_sum'] / totals['count']),
          'test_accuracy': float(totals['correct'] / totals['count']),
          'test_examples': int(totals['count'])}


class _StopRequest:
  """Turns SIGTERM/SIGINT into a flag checked between steps, so a checkpoint can be saved.

  With several processes all must stop, and checkpoint, at the same step, or the ones still
  training wait for the others forever: there SIGTERM to any process goes to JAX's preemption
  service (its own handler, so none is installed here), which names a step all processes reach.
  """

  def __init__(self):
    self.signum = None
    self._previous = {}
    self._synced = jax.process_count() > 1

  def __enter__(self):
    for sig in () if self._synced else (signal.SIGTERM, signal.SIGINT):
      try:
        self._previous[sig] = signal.signal(sig, self._handle)
      except ValueError:  # not the main thread: leave signals alone
        pass
    return self

  def requested(self, step: int) -> bool:
    if self._synced and multihost_utils.reached_preemption_sync_point(step):
      self.signum = signal.SIGTERM
    return self.signum is not None

  def _handle(self, signum, frame):
    del frame
    if self.signum is not None:  # second signal: stop now
      raise KeyboardInterrupt
    self.signum = signum
    logging.warning('Received signal %d: saving a checkpoint and stopping.', signum)

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


class _MetricsBuffer:
  """Device-side per-step metrics, fetched to the host only at log points."""

  def __init__(self):
    self.pending, self.epoch_sums, self.epoch_steps = [], {}, 0

  def flush(self, step: int) -> dict[str, float]:
    """Averages the pending steps; raises NonFiniteLossError naming the first bad step."""
    if not self.pending:
      return {}
    host = jax.device_get(self.pending)
    first = step - len(host) + 1
    for i, m in enumerate(host):
      if not np.isfinite(m['loss']):
        raise NonFiniteLossError(
            f'loss is {m["loss"]} at step {first + i}: training diverged (try a lower '
            'learning_rate). The last checkpoint on disk was saved before this step.')
    self.pending = []
    means = {k: float(np.mean([m[k] for m in host])) for k in host[0]}
    for k in ('loss', 'accuracy'):
      self.epoch_sums[k] = self.epoch_sums.get(k, 0.0) + means[k] * len(host)
    self.epoch_steps += len(host)
    return means

  def pop_epoch(self) -> dict[str, float]:
    out = {f'train_{k}': v / self.epoch_steps for k, v in self.epoch_sums.items()}
    self.epoch_sums, self.epoch_steps = {}, 0
    return out


def _compile_ahead(config, learning_rate_fn, steps_per_epoch: int, abstract_state, train_reader,
                   test_reader, data_sharding, needs_early: bool, needs_full: bool):
  """(the early crops' train step, the full-size one, the eval step), compiling in background
  threads in that order; a train step not needed is None. With `config.data_on_device` the
  train steps take the split held on the devices as a third argument."""
  replicated = NamedSharding(data_sharding.mesh, P())
  background = compile_ahead.pool(needs_early + needs_full + 1)
  kind = 'index' if config.data_on_device else 'train'
  args = (abstract_state, compile_ahead.abstract(
      input_pipeline.batch_shapes(train_reader, config.batch_size, kind), data_sharding))
  in_shardings = (replicated, data_sharding)
  if config.data_on_device:
    args += (compile_ahead.abstract(input_pipeline.batch_shapes(train_reader, 0, 'split'),
                                    replicated),)
    in_shardings += (replicated,)

  def train_program(name, early):
    step_fn = make_train_step(config, learning_rate_fn, steps_per_epoch, early=early)
    if config.data_on_device:
      step_fn = functools.partial(train_step_on_device_data, step_fn=step_fn)
    return compile_ahead.Program(
        name, jax.jit(step_fn, in_shardings=in_shardings, out_shardings=(replicated, replicated),
                      donate_argnums=0), args, background)

  early_fn = train_program('train step on the early crops', True) if needs_early else None
  train_fn = train_program('train step', False) if needs_full else None
  eval_fn = compile_ahead.Program(
      'eval step', jax.jit(functools.partial(eval_step, **test_time_augmentation(config)),
                           in_shardings=(replicated, data_sharding), out_shardings=replicated),
      (abstract_state, compile_ahead.abstract(
          input_pipeline.batch_shapes(test_reader, config.eval_batch_size, 'eval'),
          data_sharding)), background)
  background.shutdown(wait=False)  # its threads end with their compilations
  return early_fn, train_fn, eval_fn


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> TrainState:
  """Trains `config` in `workdir`, resuming from its latest checkpoint if there is one."""
  with exclusive_workdir(workdir):
    try:
      return _train_and_evaluate(config, workdir)
    except OSError as e:
      if e.errno not in (errno.ENOSPC, errno.EDQUOT):
        raise
      # The checkpoints' own writes fail as CheckpointWriteError; this is every other write.
      hint = checkpointing.resume_hint(checkpointing.checkpoint_dir(workdir))
      raise DiskFullError(f'{e}; {hint}, once space is freed') from e


def _train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> TrainState:
  mesh = data_mesh()
  validate_config(config, mesh.size)
  data_sharding = NamedSharding(mesh, P('data'))
  replicated = NamedSharding(mesh, P())
  is_main = jax.process_index() == 0
  train_rows = input_pipeline.process_rows(data_sharding, config.batch_size)
  logging.info('Mesh %s over %d devices in %d processes; process %d feeds rows %d..%d of each '
               'global batch of %d from its devices %s.', dict(mesh.shape), mesh.size,
               jax.process_count(), jax.process_index(), train_rows[0], train_rows[-1],
               config.batch_size, [d.id for d in mesh.local_devices])

  train_reader = input_pipeline.open_split(config.dataset, config.train_split, config.data_dir)
  test_reader = input_pipeline.open_split(config.dataset, config.eval_split, config.data_dir)
  shared = input_pipeline.shared_examples(train_reader, test_reader)
  if shared:
    # Deliberate when measuring fit to the training data, a mistake when holding out a set.
    logging.warning('%d of the %d evaluation examples (%s) are also training examples (%s): '
                    'their accuracy is not a held-out estimate.', shared, len(test_reader),
                    config.eval_split, config.train_split)
  steps_per_epoch = len(train_reader) // config.batch_size
  if steps_per_epoch == 0:
    raise ValueError(f'batch_size={config.batch_size} exceeds the {len(train_reader)} training '
                     'examples')
  total_steps = config.num_epochs * steps_per_epoch

  learning_rate_fn, init, abstract_state = state_factory(config, steps_per_epoch,
                                                         train_reader.image_shape, replicated)
  rng = jax.random.PRNGKey(config.seed)

  os.makedirs(workdir, exist_ok=True)
  manager = checkpointing.make_manager(checkpointing.checkpoint_dir(workdir),
                                       config.keep_checkpoints)
  run_meta = {'dataset': config.dataset, 'train_split': config.train_split,
              'batch_size': config.batch_size, 'seed': config.seed,
              'num_train_examples': len(train_reader), 'steps_per_epoch': steps_per_epoch}
  state, meta = checkpointing.restore_latest(manager, abstract_state)
  if state is not None:
    # Results do not depend on the process count, but a changed one most likely means a
    # mistyped launch (a process missing, two jobs mixed up); say so rather than guess.
    written_by = meta.get('process_count', 1)  # checkpoints that predate the field: 1 process
    if written_by != jax.process_count():
      raise ValueError(f'the checkpoint in {workdir} was written by {written_by} process(es) and '
                       f'this run has {jax.process_count()}; resume with --num_processes='
                       f'{written_by} or use a new --workdir')
    written = {'train_split': 'train', **meta}  # checkpoints that predate the field: 'train'
    stale = {k: (written.get(k), v) for k, v in run_meta.items() if written.get(k) != v}
    if stale:
      raise ValueError(f'the checkpoint in {workdir} was written with a different input stream '
                       f'(field: (checkpoint, now)) {stale}; resume with the same config or use '
                       'a new --workdir')

  start_step = 0 if state is None else int(jax.device_get(state.step))

  # Steps 1..early_steps train on the smaller early crops: a program of its own (new shapes).
  early_steps = (config.augment.early_crop_epochs * steps_per_epoch
                 if config.augment.early_crop_size else 0)
  # The steps compile from here on, beside the state's initialisation and the data's reading.
  early_fn, train_fn, eval_fn = _compile_ahead(
      config, learning_rate_fn, steps_per_epoch, abstract_state, train_reader, test_reader,
      data_sharding, needs_early=start_step < early_steps,
      needs_full=total_steps > max(start_step, early_steps))

  if state is None:
    state = jax.jit(init, out_shardings=replicated)(rng)
    logging.info('No checkpoint in %s: starting from scratch.', workdir)
    if config.model.whiten:
      # Every process reads the same images, so all compute the same filters.
      first = train_reader.read(np.arange(min(WHITENING_IMAGES, len(train_reader))))['image']
      state = whiten_first_layer(state, first, replicated)
      whitened, width = models.whitened_width(config.model), config.model.widths[0]
      logging.info('conv1 whitens 3x3 patches, estimated from %d training images%s.',
                   len(first), '' if whitened == width else
                   f' (its first {whitened} channels; the other {width - whitened} learn)')
  else:
    logging.info('Resumed from step %d (epoch %d, batch %d of %d).', int(state.step),
                 int(state.step) // steps_per_epoch, int(state.step) % steps_per_epoch,
                 steps_per_epoch)
  if is_main:
    with open(os.path.join(workdir, 'config.json'), 'w') as f:
      f.write(config.to_json_best_effort(indent=2))

  param_count = sum(x.size for x in jax.tree.leaves(state.params))
  logging.info('Model: %d parameters; %d steps/epoch, %d steps total, %d devices.', param_count,
               steps_per_epoch, total_steps, mesh.size)

  if config.data_on_device:
    # The whole split, replicated on every device (150 MB as uint8); each step receives only
    # its examples' indices and gathers them inside the jitted step: no per-step host work.
    step_args = (jax.tree.map(lambda x: jax.make_array_from_process_local_data(replicated, x),
                              train_reader.read(np.arange(len(train_reader)))),)
    batches = input_pipeline.train_index_batches(
        len(train_reader), batch_size=config.batch_size, seed=config.seed,
        start_step=start_step, num_steps=total_steps, rows=train_rows)
  else:
    step_args = ()
    batches = input_pipeline.train_batches(
        train_reader, batch_size=config.batch_size, seed=config.seed, start_step=start_step,
        num_steps=total_steps, rows=train_rows)
  batches = input_pipeline.to_device(batches, data_sharding)
  writer = metric_writer.MetricWriter(workdir, start_step)
  buffer = _MetricsBuffer()

  def checkpoint(step):
    buffer.flush(step)  # never checkpoint a diverged state
    checkpointing.save(manager, state, {**run_meta, 'process_count': jax.process_count(),
                                        'step': step, 'epoch': step // steps_per_epoch,
                                        'batch_in_epoch': step % steps_per_epoch})

  progress = _progress(config, is_main, total_steps, start_step, steps_per_epoch)
  last_log_time, last_log_step = time.time(), start_step
  epoch_start_time, epoch_start_step = time.time(), start_step
  # After the launch's first step, which waits for its compilation.
  profile = profiling.StepWindow(os.path.join(workdir, 'profile'), config.profile_steps,
                                 start_step + 1, total_steps, enabled=is_main)
  with _StopRequest() as stop, profile:
    for step, batch in zip(range(start_step + 1, total_steps + 1), batches):
      if step == early_steps + 1 and early_steps:
        logging.info('Step %d: the early crops end; full-size images from here (their own '
                     'program).', step)
      profile.before(step)
      with jax.profiler.StepTraceAnnotation('train', step_num=step):
        state, metrics = (early_fn if step <= early_steps else train_fn)(state, batch, *step_args)
      profile.after(step, state)
      buffer.pending.append(metrics)
      if len(buffer.pending) > 2:
        # Bound the run-ahead of async dispatch: progress, timings and a stop signal then
        # refer to steps that actually ran, not merely queued ones.
        jax.block_until_ready(buffer.pending[-3]['loss'])
      if progress is not None:
        progress.update(1)
      if step == start_step + 1:
        jax.block_until_ready(state)
        logging.info('First step (and any wait for its compilation) took %.1fs.',
                     time.time() - last_log_time)
        last_log_time, last_log_step = time.time(), step
        epoch_start_time, epoch_start_step = time.time(), step
      epoch, batch_in_epoch = divmod(step, steps_per_epoch)
      end_of_epoch = batch_in_epoch == 0
      if step % config.log_every_steps == 0 and step > last_log_step:
        means = buffer.flush(step)
        rate = (step - last_log_step) / (time.time() - last_log_time)
        writer.write({'kind': 'train', 'step': step, 'epoch': step / steps_per_epoch,
                      **{f'train_{k}': v for k, v in means.items() if k != 'learning_rate'},
                      'learning_rate': means['learning_rate'], 'steps_per_sec': rate,
                      'images_per_sec': rate * config.batch_size})
        if progress is not None:
          progress.set_postfix(loss=f'{means["loss"]:.3f}', img_s=f'{rate * config.batch_size:.0f}')
        last_log_time, last_log_step = time.time(), step
      stopping = stop.requested(step)  # once per step, as JAX's preemption sync asks
      if end_of_epoch or step % config.checkpoint_every_steps == 0 or stopping:
        checkpoint(step)
      if end_of_epoch:
        buffer.flush(step)
        seconds = time.time() - epoch_start_time
        record = {'kind': 'epoch', 'step': step, 'epoch': epoch, **buffer.pop_epoch(),
                  'learning_rate': float(learning_rate_fn(step - 1)),
                  'epoch_seconds': seconds,
                  'images_per_sec': (step - epoch_start_step) * config.batch_size / seconds}
        if epoch % config.eval_every_epochs == 0 or step == total_steps:
          eval_start = time.time()
          record.update(evaluate(eval_fn, state, test_reader, config.eval_batch_size,
                                 data_sharding,
                                 progress=progress is not None))
          record['eval_seconds'] = time.time() - eval_start
        writer.write(record)
        if is_main and epoch_start_step < step < total_steps:
          # A run in the background has no progress bar: its log says when it will end. (No
          # pace where the epoch's only step was a resumed launch's first, timed apart.)
          # An epoch on the early crops (the last of them included) understates the rest.
          logging.info('%s', _time_left(epoch, config.num_epochs, total_steps - step,
                                        seconds / (step - epoch_start_step),
                                        step <= early_steps < total_steps))
        # The epoch record consumed the pending steps; evaluation time is not training time.
        epoch_start_time, epoch_start_step = time.time(), step
        last_log_time, last_log_step = time.time(), step
      if stopping:
        logging.warning('Stopped at step %d on signal %d; rerun the same command to resume.',
                        step, stop.signum)
        break
  if progress is not None:
    progress.close()
  checkpointing.finish(manager)
  if start_step == total_steps:
    logging.info('Training already finished at step %d.', total_steps)
    writer.write({'kind': 'final', 'step': total_steps, **evaluate(
        eval_fn, state, test_reader, config.eval_batch_size, data_sharding,
        progress=config.progress_bar and is_main)})
  writer.close()
  logging.info('Process %d decoded %d of %d training and %d of %d test examples (the rest, if '
               'any, it did not need or read from the split cache).', jax.process_index(),
               train_reader.num_read, len(train_reader), test_reader.num_read, len(test_reader))
  return state


def _time_left(epoch: int, num_epochs: int, steps_left: int, seconds_per_step: float,
               early: bool) -> str:
  left = int(round(steps_left * seconds_per_step))
  hours, minutes, seconds = left // 3600, left // 60 % 60, left % 60
  took = (f'{hours}h {minutes:02d}m' if hours else f'{minutes}m {seconds:02d}s' if minutes else
          f'{seconds}s')
  more = '; the full-size steps after the early crops cost more' if early else ''
  return (f'Epoch {epoch} of {num_epochs} done; at its pace the remaining {steps_left} steps take '
          f'~{took} (evaluations not counted{more}).')


def _progress(config, is_main, total_steps, start_step, steps_per_epoch):
  if not (config.progress_bar and is_main) or start_step >= total_steps:
    return None
  import tqdm  # pylint: disable=g-import-not-at-top
  return tqdm.tqdm(total=total_steps, initial=start_step, unit='step', dynamic_ncols=True,
                   mininterval=5.0, smoothing=0.1,
                   desc=f'train ({steps_per_epoch} steps/epoch)')
