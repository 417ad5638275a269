r"""Each attention block alone: the C++ kernel against XLA, for the core and for the whole block.

  python docs/cpu_runs/attention_core.py [--config configs/cifar_hybrid.py] [--rounds 3] \
      [--image_size 32] [--jax_num_cpu_devices=2]

`model.attention_kernel` moves two things off XLA at once: the core softmax(q k^T / sqrt(d)) v
(`onednn_attention`) and the block's dense layers (`onednn_dense`). A whole-step A/B cannot say
which of them gains or loses, and on a 2-core host it drifts by a tenth or more within minutes. This
times, for each attention block of the config at its batch size (split over every device, as the
training step does): the core's forward, the core's forward and backward (on the q, k, v
layout the kernel takes; XLA's is `models.xla_attention_core`, as the model runs it),
and the whole `SelfAttention` (projections, core, output) forward and backward, each way. A
round times every part both ways, kernel then XLA; the medians over the rounds are printed.
`--image_size 24` gives the shapes of the early epochs' 24x24 crops.
"""

import statistics

from hybrid_flax import host_memory

if __name__ == '__main__':
  host_memory.reexec_with_fast_malloc()  # as bench and launch.py

# pylint: disable=g-import-not-at-top,wrong-import-position
import jax
import jax.numpy as jnp
from absl import app
from absl import flags
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from ml_collections import config_flags

from hybrid_flax import bench
from hybrid_flax import models
from hybrid_flax import onednn_attention
from hybrid_flax import onednn_conv
from hybrid_flax import train

_PARTS = ('core forward', 'core fwd+bwd', 'block fwd+bwd')
_IMPLS = ('kernel', 'xla')


def attention_blocks(model_config, size: int = 32) -> list[tuple[str, int, int, int]]:
  """(name, tokens, channels, heads) of each attention block, in the model's order."""
  if not model_config.attention:
    return []
  widths, pool = tuple(model_config.widths), tuple(model_config.pool)
  blocks = []
  for stage in range(2):
    for i in (2 * stage, 2 * stage + 1):
      size = size // 2 if pool[i] else size
    blocks.append((f'attention{stage + 1}', size * size, widths[2 * stage + 1],
                   model_config.num_heads))
  return blocks


def timers(config, tokens: int, channels: int, heads: int) -> dict:
  """{impl: the three parts' timers} for one block at the config's batch size."""
  mesh = train.data_mesh()
  data = NamedSharding(mesh, P('data'))
  batch, depth = config.batch_size, channels // heads
  keys = jax.random.split(jax.random.PRNGKey(0), 5)
  q, k, v, dy = (jax.device_put(jax.random.normal(key, (batch, tokens, heads, depth)), data)
                 for key in keys[:4])
  x = jax.device_put(jax.random.normal(keys[4], (batch, tokens, channels)), data)
  cores = {'kernel': onednn_attention.attention_core(mesh),
           'xla': models.xla_attention_core(config.model.attention_grad_chunk_kib, mesh)}
  result = {}
  for impl in _IMPLS:
    core = cores[impl]
    block = models.SelfAttention(heads, grad_chunk_kib=config.model.attention_grad_chunk_kib,
                                 mesh=mesh, onednn=impl == 'kernel')
    params = block.init(jax.random.PRNGKey(0), x)
    block_grads = jax.grad(lambda p, x, block=block: jnp.sum(block.apply(p, x) ** 2), (0, 1))
    parts = ((core, (q, k, v)),
             (lambda q, k, v, dy, core=core: jax.vjp(core, q, k, v)[1](dy), (q, k, v, dy)),
             (block_grads, (params, x)))
    result[impl] = []
    for fn, args in parts:
      compiled = jax.jit(fn).lower(*args).compile()
      result[impl].append(lambda c=compiled, a=args: jax.block_until_ready(c(*a)))
  return result


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  reason = onednn_conv.unavailable_reason()
  if reason is not None:
    raise app.UsageError(f'the attention kernel is not available here: {reason}')
  config = _CONFIG.value
  blocks = attention_blocks(config.model, _IMAGE_SIZE.value)
  if not blocks:
    raise app.UsageError('the config has no attention blocks (model.attention=False)')
  fns = {block[0]: timers(config, *block[1:]) for block in blocks}
  ms = {(name, impl): [[] for _ in _PARTS] for name in fns for impl in _IMPLS}
  for r in range(_ROUNDS.value):
    for name, by_impl in fns.items():
      for impl in _IMPLS:
        for times, fn in zip(ms[name, impl], by_impl[impl]):
          times.append(bench.median_ms(fn))
    print(f'round {r + 1} of {_ROUNDS.value} done', flush=True)
  print(f'batch {config.batch_size}, {_IMAGE_SIZE.value}x{_IMAGE_SIZE.value} images, '
        f'{jax.device_count()} JAX devices; ms, medians of {_ROUNDS.value} rounds (each round: '
        'the median of 5 calls)')
  print(f'{"block":11s} {"tokens x heads x depth":23s} {"impl":6s} ' +
        ' '.join(f'{part:>14s}' for part in _PARTS))
  for name, tokens, channels, heads in blocks:
    for impl in _IMPLS:
      shape = f'{tokens} x {heads} x {channels // heads}'
      print(f'{name:11s} {shape:23s} {impl:6s} ' + ' '.join(
          f'{statistics.median(t):14.1f}' for t in ms[name, impl]))


if __name__ == '__main__':
  _CONFIG = config_flags.DEFINE_config_file('config', 'configs/cifar_hybrid.py',
                                            'Training configuration.', lock_config=True)
  _ROUNDS = flags.DEFINE_integer('rounds', 3, 'Rounds of timing every part both ways.')
  _IMAGE_SIZE = flags.DEFINE_integer('image_size', 32, 'Input images are this many pixels wide.')
  jax.config.config_with_absl()  # --jax_num_cpu_devices=N
  app.run(main)
