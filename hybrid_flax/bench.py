r"""Throughput of a config: the train step, the eval step and the input pipeline, on their own.

  python -m hybrid_flax.bench --config configs/cifar_hybrid.py [--config.batch_size=256] \
      [--steps 20] [--warmup 3] [--pipeline_steps 50 --config.dataset=cifar10_folder ...] \
      [--torch [--rounds 5]]

The steps run the project's own jitted, sharded, donated `train_step` / `eval_step` on a fixed
random batch, so only compute is timed; compilation is timed separately. FLOPs per image come
from XLA's cost analysis of the compiled step, which gives the achieved GFLOP/s. The pipeline is
timed on the configured data set from a cold start (every example read and decoded from disk,
the first epoch's cost) up to the device; it is skipped when the data set is not prepared.
--torch also times the same network's training step in PyTorch (`torch_twin.py`, parameter
count asserted equal) on the same batch size and prints the JAX / PyTorch ratio. A 2-core host's
speed drifts by a tenth and more within minutes, so `--rounds N` times the two training steps
alternately N times and reports the median and range of the per-round ratios.
"""

import copy
import functools
import importlib.util
import json
import subprocess
import sys
import time

from hybrid_flax import host_memory  # standard library only: cheap before the imports below

if __name__ == '__main__':
  # Before the heavy imports, so that only the re-executed process pays for them (as launch.py).
  host_memory.reexec_with_fast_malloc()

# pylint: disable=g-import-not-at-top,wrong-import-position
import jax
import jax.numpy as jnp
import numpy as np
from absl import app
from absl import flags
from jax.sharding import NamedSharding, PartitionSpec as P
from ml_collections import config_flags

from hybrid_flax import compile_ahead
from hybrid_flax import fused_batch_norm
from hybrid_flax import host_cpu
from hybrid_flax import input_pipeline
from hybrid_flax import onednn_attention
from hybrid_flax import onednn_conv
from hybrid_flax import train
from hybrid_flax import xla_cpu_flags
# pylint: enable=g-import-not-at-top,wrong-import-position

_CIFAR10_TRAIN_SIZE = 50_000
_STEPS_PER_EPOCH = 1000  # the schedules' clock only; any length times the same


def _setup(config):
  mesh = train.data_mesh()
  train.validate_config(config, mesh.size)
  replicated, data = NamedSharding(mesh, P()), NamedSharding(mesh, P('data'))
  # The schedule's length changes neither the state's structure nor the step's cost.
  learning_rate_fn, init, _ = train.state_factory(config, _STEPS_PER_EPOCH,
                                                  input_pipeline.IMAGE_SHAPE, replicated)
  state = jax.jit(init, out_shardings=replicated)(jax.random.PRNGKey(config.seed))
  return learning_rate_fn, state, replicated, data


def _unsharded_state(config):
  """The state's shapes with an optimizer bound to no mesh, for `_flops`' unsharded count.

  Its model runs XLA's convolutions, attention core and batch norm whatever `model.conv_impl`,
  `model.attention_kernel` and `model.bn_kernel` say: XLA's cost analysis counts nothing inside
  custom calls.
  """
  config = copy.deepcopy(config)
  config.model.conv_impl = config.model.attention_kernel = config.model.bn_kernel = 'xla'
  return train.state_factory(config, _STEPS_PER_EPOCH, input_pipeline.IMAGE_SHAPE, None)[2]


def param_count(params) -> int:
  return sum(x.size for x in jax.tree.leaves(params))


def flax_param_count(config) -> int:
  """The model's parameter count, from shapes alone (nothing is initialised or compiled)."""
  return param_count(_unsharded_state(config).params)


# New buffers holding a state's values, with its shardings and pytree metadata; jitted once
# here so that each round reuses the compiled copy.
copy_state = jax.jit(functools.partial(jax.tree.map, jnp.copy))


def _random_batch(batch_size: int, sharding, seed: int = 0) -> dict[str, jax.Array]:
  rng = np.random.default_rng(seed)
  batch = {'image': rng.integers(0, 256, (batch_size,) + input_pipeline.IMAGE_SHAPE, np.uint8),
           'label': rng.integers(0, 10, (batch_size,), np.int32),
           'index': np.arange(batch_size, dtype=np.int32),  # for augment.alternate_flip
           'mask': np.ones((batch_size,), np.float32)}
  return jax.device_put(batch, sharding)


def _flops(step, *args) -> float:
  """FLOPs of one `step(*args)` over the whole batch, counted by XLA on the CPU as lowered.

  Not the compiled program's count: on GPUs its convolutions are cuDNN library calls that XLA's
  cost analysis leaves out (it reported ~1/9 of the true FLOPs on an H200), and a sharded
  program counts one device's share. Lowered for the CPU, unsharded, the count is the same on
  every machine; the GPU's own lowered programs have no cost analysis.
  """
  cpu = jax.sharding.SingleDeviceSharding(jax.devices('cpu')[0])
  cost = jax.jit(step).lower(*compile_ahead.abstract(args, cpu)).cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost  # a list in older JAX versions
  return float(cost.get('flops', float('nan')))


def _time_compiled(step, state, *args, carry_state: bool, steps: int, warmup: int):
  """Seconds for `steps` calls after `warmup` untimed ones, waiting on the last result."""
  out = None
  for i in range(warmup + steps):
    if i == warmup:
      jax.block_until_ready(out)
      start = time.perf_counter()
    out = step(state, *args)
    if carry_state:
      state = out[0]  # the old state was donated
  jax.block_until_ready(out)
  return time.perf_counter() - start


def median_ms(fn, repeats: int = 5) -> float:
  """Milliseconds: the median of `repeats` timed calls of `fn` after one untimed warm-up call
  (`fn` waits on its own results). The one-kernel scripts in docs/cpu_runs time with it."""
  fn()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return float(np.median(times)) * 1e3


def measure_steps(config, steps: int = 20, warmup: int = 3, rounds: int = 1,
                  between_rounds=None) -> dict[str, dict[str, float]]:
  """{'train': {...}, 'eval': {...}} (and 'early' for a config with early crops): images/s,
  compile seconds, FLOPs/image, GFLOP/s.

  The train step is timed `rounds` times, `between_rounds()` called after each (the PyTorch
  timing, so that the two alternate and a drift in the host's speed falls on both); its row
  holds the median round and `'train_rounds'` each round's images/s.
  """
  if rounds < 1:
    raise ValueError(f'--rounds must be at least 1, got {rounds}')
  learning_rate_fn, state, replicated, data = _setup(config)
  unsharded = _unsharded_state(config)
  results = {}
  runs = [('eval', config.eval_batch_size), ('train', config.batch_size)]
  if config.augment.early_crop_size and config.augment.early_crop_epochs:
    runs.append(('early', config.batch_size))  # the step on the smaller early crops
  # The train steps donate their state, so each round steps a copy (copy_state) of this one.
  for name, batch_size in runs:
    args, arg_shardings = (_random_batch(batch_size, data),), (data,)
    if name != 'eval':
      step = train.make_train_step(config, learning_rate_fn, _STEPS_PER_EPOCH,
                                   early=name == 'early')
      if config.data_on_device:
        # A random split of CIFAR-10's size on every device; the step gathers its batch there.
        split = _random_batch(_CIFAR10_TRAIN_SIZE, replicated, seed=1)
        indices = np.random.default_rng(2).choice(_CIFAR10_TRAIN_SIZE, batch_size,
                                                  replace=False)
        args = (jax.device_put({'index': np.sort(indices).astype(np.int32)}, data),
                {'image': split['image'], 'label': split['label']})
        arg_shardings = (data, replicated)
        step = functools.partial(train.train_step_on_device_data, step_fn=step)
      fn = jax.jit(step, in_shardings=(replicated, *arg_shardings),
                   out_shardings=(replicated, replicated), donate_argnums=0)
    else:
      step = functools.partial(train.eval_step, **train.test_time_augmentation(config))
      fn = jax.jit(step, in_shardings=(replicated, data), out_shardings=replicated)
    flops = _flops(step, unsharded, *args)
    start = time.perf_counter()
    compiled = fn.lower(state, *args).compile()
    compile_seconds = time.perf_counter() - start
    times = []
    for _ in range(rounds if name == 'train' else 1):
      # A train step donates its input, so each round steps a copy and `state` stays intact.
      start_state = state if name == 'eval' else copy_state(state)
      times.append(_time_compiled(compiled, start_state, *args, carry_state=name != 'eval',
                                  steps=steps, warmup=warmup))
      if name == 'train' and between_rounds is not None:
        between_rounds()
    seconds = float(np.median(times))
    results[name] = {'batch_size': batch_size, 'images_per_sec': batch_size * steps / seconds,
                     'steps_per_sec': steps / seconds, 'compile_seconds': compile_seconds,
                     'flops_per_image': flops / batch_size,
                     'gflops_per_sec': flops * steps / seconds / 1e9}
    if name == 'train':
      results['train_rounds'] = [batch_size * steps / t for t in times]
  results['train']['param_count'] = param_count(state.params)
  return results


def measure_pipeline(config, steps: int = 50) -> dict[str, float]:
  """Images/s from the TFDS split, cold, to sharded device arrays.

  With config.data_on_device the split is loaded onto the devices once (`load_seconds`, cold
  reads included) and the rate is that of the per-step index batches, what training then feeds.
  Raises DatasetUnavailableError when the data set is not prepared.
  """
  mesh = train.data_mesh()
  data = NamedSharding(mesh, P('data'))
  start = time.perf_counter()
  # Not from the split cache: the figures are those of a first launch, which decodes.
  reader = input_pipeline.open_split(config.dataset, config.train_split, config.data_dir,
                                     cache=False)
  open_seconds = time.perf_counter() - start
  steps = min(steps, len(reader) // config.batch_size)
  rows = input_pipeline.process_rows(data, config.batch_size)
  load_seconds = 0.0
  if config.data_on_device:
    start = time.perf_counter()
    jax.block_until_ready(jax.device_put(reader.read(np.arange(len(reader))),
                                         NamedSharding(mesh, P())))
    load_seconds = time.perf_counter() - start
    batches = input_pipeline.train_index_batches(
        len(reader), batch_size=config.batch_size, seed=config.seed, start_step=0,
        num_steps=steps, rows=rows)
  else:
    batches = input_pipeline.train_batches(reader, batch_size=config.batch_size,
                                           seed=config.seed, start_step=0, num_steps=steps,
                                           rows=rows)
  start = time.perf_counter()
  for batch in input_pipeline.to_device(batches, data):
    jax.block_until_ready(batch)
  seconds = time.perf_counter() - start
  return {'images_per_sec': steps * config.batch_size / seconds,
          'steps_per_sec': steps / seconds, 'open_seconds': open_seconds, 'steps': steps,
          'load_seconds': load_seconds}


def check_torch_twin_matches(config) -> None:
  """Raises ValueError for a config whose training `torch_twin` does not reproduce."""
  if config.model.bn_group_size:
    raise ValueError('the PyTorch twin normalises over the whole batch; --torch needs '
                     '--config.model.bn_group_size=0')
  if config.optimizer != 'sgd':
    raise ValueError('the PyTorch twin trains with SGD; --torch needs --config.optimizer=sgd')


def measure_torch(config, jax_param_count: int, steps: int, warmup: int) -> dict[str, float]:
  """The same model's training steps in PyTorch (the `bench` extra); the same size, checked.

  In a process of its own: no JAX or TensorFlow thread pools competing with PyTorch's, and no
  clash between their native libraries (importing PyTorch's compiler stack after TensorFlow
  crashes).
  """
  if importlib.util.find_spec('torch') is None:
    raise SystemExit('error: --torch needs PyTorch: pip install -e ".[bench]"')
  proc = subprocess.run([sys.executable, '-m', 'hybrid_flax.torch_twin', config.to_json(),
                         str(steps), str(warmup)], capture_output=True, text=True, check=False)
  if proc.returncode:
    raise SystemExit(f'error: the PyTorch timing failed: {proc.stderr.strip()[-2000:]}')
  result = json.loads(proc.stdout.splitlines()[-1])
  if result['param_count'] != jax_param_count:
    raise AssertionError(f'the PyTorch twin has {result["param_count"]} parameters and the Flax '
                         f'model {jax_param_count}: they are not the same network')
  return result


def report(config, steps: dict, pipeline: dict | str, torch_rounds: list[dict] | None = None,
           peak_gflops: float = 0.0) -> str:
  """The table; with the PyTorch rounds, their median and, for several, each round's pair."""
  conv_status = onednn_conv.status(config.model.conv_impl, config.model.dtype,
                                   config.model.conv_winograd)
  lines = [f'JAX {jax.__version__} on {jax.device_count()} x {jax.devices()[0].device_kind}; '
           f'model widths {tuple(config.model.widths)}, attention={config.model.attention}, '
           f'embed={config.model.embed}; {host_cpu.describe()}; {host_memory.status()}; '
           f'{xla_cpu_flags.status(config.xla_cpu_convolutions)}; '
           f'{conv_status}; '
           f'{onednn_attention.status(config.model.attention_kernel, config.model.dtype)}; '
           f'{fused_batch_norm.status(config.model.bn_kernel, config.model.dtype)}',
           f'{"":10}{"batch":>7}{"img/s":>10}{"steps/s":>9}{"compile s":>11}'
           f'{"GFLOP/img":>11}{"GFLOP/s":>9}']
  for name in ('train', 'eval', 'early'):
    if name not in steps:
      continue
    r = steps[name]
    label = f'early {config.augment.early_crop_size}px' if name == 'early' else name
    lines.append(f'{label:10}{r["batch_size"]:>7}{r["images_per_sec"]:>10.1f}'
                 f'{r["steps_per_sec"]:>9.3f}{r["compile_seconds"]:>11.1f}'
                 f'{r["flops_per_image"] / 1e9:>11.3f}{r["gflops_per_sec"]:>9.1f}')
  if peak_gflops:
    lines.append('% of the given peak (' + f'{peak_gflops:,.0f} GFLOP/s): ' + ', '.join(
        f'{name} {100 * steps[name]["gflops_per_sec"] / peak_gflops:.1f}%'
        for name in ('train', 'eval')))
    if 'Winograd' in conv_status:
      # XLA counts the direct convolutions' multiply-adds; Winograd's F(2x2, 3x3) does 4/9 of
      # them for the forward and input gradient, so these are effective rates.
      lines[-1] += (" (XLA's count of the direct convolutions' FLOPs: effective, Winograd "
                    "does fewer)")
  if isinstance(pipeline, str):
    lines.append(f'pipeline  skipped: {pipeline}')
  else:
    ratio = pipeline['steps_per_sec'] / steps['train']['steps_per_sec']
    what = (f'indices into the split on the device, loaded in {pipeline["load_seconds"]:.1f} s'
            if config.data_on_device else 'cold reads')
    lines.append(f'{"pipeline":10}{config.batch_size:>7}{pipeline["images_per_sec"]:>10.1f}'
                 f'{pipeline["steps_per_sec"]:>9.3f}   ({what}; {ratio:.1f}x the train '
                 'step rate)')
  if torch_rounds:
    t, j = torch_rounds[0], steps['train']
    torch_rates = [r['images_per_sec'] for r in torch_rounds]
    rate = float(np.median(torch_rates))
    lines.append(f'{"pytorch":10}{t["batch_size"]:>7}{rate:>10.1f}'
                 f'{rate / t["batch_size"]:>9.3f}   (torch {t["version"]} on '
                 f'{t["device"]}, {t["dtype"]}, {t["threads"]} threads, '
                 f'{t["param_count"]:,} parameters as in JAX)')
    if len(torch_rounds) == 1:
      lines.append(f'JAX / PyTorch training throughput: {j["images_per_sec"] / rate:.2f}x')
    else:
      ratios = [a / b for a, b in zip(steps['train_rounds'], torch_rates)]
      for i, (a, b, r) in enumerate(zip(steps['train_rounds'], torch_rates, ratios)):
        lines.append(f'round {i + 1}: JAX {a:.1f} img/s, PyTorch {b:.1f} img/s, {r:.2f}x')
      lines.append(f'JAX / PyTorch training throughput: {np.median(ratios):.2f}x, the median of '
                   f'{len(ratios)} interleaved rounds ({min(ratios):.2f}x to {max(ratios):.2f}x)')
  return '\n'.join(lines)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  config = _CONFIG.value
  try:
    xla_cpu_flags.apply(config.xla_cpu_convolutions)  # before anything starts a JAX backend
    torch_rounds, between_rounds = [], None
    if _TORCH.value:
      check_torch_twin_matches(config)  # first: the JAX timing before it takes minutes
      jax_param_count = flax_param_count(config)
      between_rounds = lambda: torch_rounds.append(
          measure_torch(config, jax_param_count, _STEPS.value, _WARMUP.value))
    steps = measure_steps(config, _STEPS.value, _WARMUP.value, _ROUNDS.value, between_rounds)
  except ValueError as e:
    raise SystemExit(f'error: {e}') from None
  try:
    pipeline = measure_pipeline(config, _PIPELINE_STEPS.value) if _PIPELINE_STEPS.value else (
        '--pipeline_steps=0')
  except input_pipeline.DatasetUnavailableError as e:
    pipeline = str(e).splitlines()[0]
  print(report(config, steps, pipeline, torch_rounds, _PEAK_GFLOPS.value))


if __name__ == '__main__':
  # Flags live here, not at import: tests import this module beside others that define flags.
  _CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file to measure.',
                                            lock_config=True)
  flags.mark_flags_as_required(['config'])
  _STEPS = flags.DEFINE_integer('steps', 20, 'Timed steps.')
  _WARMUP = flags.DEFINE_integer('warmup', 3, 'Untimed steps before timing.')
  _PIPELINE_STEPS = flags.DEFINE_integer('pipeline_steps', 50,
                                         'Batches to time the input pipeline over (0: skip).')
  _TORCH = flags.DEFINE_bool('torch', False, 'Also time the same model in PyTorch (the bench '
                             'extra) and print the JAX / PyTorch ratio.')
  _ROUNDS = flags.DEFINE_integer('rounds', 1, 'Times the train step is timed, alternating '
                                 'with PyTorch\'s under --torch; the median round is reported.')
  _PEAK_GFLOPS = flags.DEFINE_float('peak_gflops', 0.0, 'The hardware\'s peak GFLOP/s for the '
                                    'step\'s dtype: also print the achieved share of it (MFU).')
  input_pipeline.hide_gpus_from_tensorflow()
  jax.config.config_with_absl()  # --jax_num_cpu_devices=N: one host CPU seen as N devices
  app.run(main)
