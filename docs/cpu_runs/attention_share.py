r"""What the attention blocks cost each framework: JAX and PyTorch, with and without them, interleaved.

  python docs/cpu_runs/attention_share.py --rounds 5 [--config configs/cifar_hybrid.py] \
      [--steps 8 --warmup 2] [--jax_num_cpu_devices=4]

Each round times four training steps one after another, JAX then PyTorch, for the config and for
the same config with `model.attention=False`, through `hybrid_flax.bench`'s own timing functions
(so the same batch, warm-up and parameter-count check as `bench --torch`). A 2-core host drifts
by a tenth within minutes, so the four are compared round by round and the medians of the ratios
printed: whether JAX loses to PyTorch in the attention blocks or in the convolutional trunk, and
how fast JAX would be against PyTorch's whole model if its attention cost nothing.
"""

import statistics

from hybrid_flax import host_memory

if __name__ == '__main__':
  host_memory.reexec_with_fast_malloc()  # as bench and launch.py

# pylint: disable=g-import-not-at-top,wrong-import-position
import jax
from absl import app
from absl import flags
from ml_collections import config_flags

from hybrid_flax import bench
from hybrid_flax import xla_cpu_flags

_RUNS = ('jax full', 'jax no attention', 'torch full', 'torch no attention')
_RATIOS = (('jax full', 'torch full'), ('jax no attention', 'torch no attention'),
           ('jax no attention', 'torch full'))


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  full = _CONFIG.value
  bench.check_torch_twin_matches(full)
  trunk = full.copy_and_resolve_references()
  trunk.model.attention = False
  xla_cpu_flags.apply(full.xla_cpu_convolutions)
  steps, warmup = _STEPS.value, _WARMUP.value
  rates = {name: [] for name in _RUNS}
  for r in range(_ROUNDS.value):
    for suffix, config in (('full', full), ('no attention', trunk)):
      jax_train = bench.measure_steps(config, steps, warmup)['train']
      rates[f'jax {suffix}'].append(jax_train['images_per_sec'])
      rates[f'torch {suffix}'].append(bench.measure_torch(
          config, jax_train['param_count'], steps, warmup)['images_per_sec'])
    print(f'round {r + 1}: ' + ', '.join(f'{k} {v[-1]:.1f}' for k, v in rates.items()),
          flush=True)
  for name, v in rates.items():
    print(f'{name}: median {statistics.median(v):.1f} img/s ({min(v):.1f}-{max(v):.1f})')
  for a, b in _RATIOS:
    q = [x / y for x, y in zip(rates[a], rates[b])]
    print(f'{a} / {b}: median {statistics.median(q):.2f}x ({min(q):.2f}-{max(q):.2f}x)')


if __name__ == '__main__':
  _CONFIG = config_flags.DEFINE_config_file('config', 'configs/cifar_hybrid.py',
                                            'Config to time.', lock_config=True)
  _ROUNDS = flags.DEFINE_integer('rounds', 5, 'Rounds of the four timings.')
  _STEPS = flags.DEFINE_integer('steps', 8, 'Timed steps per timing.')
  _WARMUP = flags.DEFINE_integer('warmup', 2, 'Untimed steps before each timing.')
  jax.config.config_with_absl()  # --jax_num_cpu_devices=N
  app.run(main)
