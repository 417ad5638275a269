r"""Each conv layer alone: forward, input gradient and weight gradient, JAX against PyTorch.

  python docs/cpu_runs/conv_layers.py [--config configs/cifar_hybrid.py] [--rounds 3] [--torch] \
      [--jax_num_cpu_devices=2]

The training step spends most of its time in the convolutions; this times each layer's three
convolutions apart, at the config's batch size, so the two frameworks can be compared kernel by
kernel. JAX runs them as the training step does (`models.conv_function`): the batch split over
every device; through oneDNN where `model.conv_impl` puts them there (by Winograd's F(2x2, 3x3)
where `model.conv_winograd` and `onednn_conv.winograd_covers` say so); else on CPUs with
`model.conv_grad_barrier` through `models.conv_with_grad_barrier` (alone, with nothing for it to
keep out of the copies, the barrier only costs its loop). PyTorch runs `F.conv2d`, NCHW,
on its default threads, as `hybrid_flax/torch_twin.py` does. Neither adds the conv's bias. Both
run in this one process, under the huge-page malloc that `bench` gives both frameworks too
(PyTorch's convolutions ran up to a quarter slower without it). A round times every layer in JAX,
then in PyTorch; the medians over the rounds are printed.
"""

import importlib.util
import statistics

from hybrid_flax import host_memory

if __name__ == '__main__':
  host_memory.reexec_with_fast_malloc()  # as bench and launch.py

# pylint: disable=g-import-not-at-top,wrong-import-position
import jax
import numpy as np
from absl import app
from absl import flags
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from ml_collections import config_flags

from hybrid_flax import bench
from hybrid_flax import models
from hybrid_flax import onednn_conv
from hybrid_flax import train
from hybrid_flax import xla_cpu_flags

_PARTS = ('forward', 'input grad', 'weight grad', 'all three')


def conv_layers(model_config, size: int = 32) -> list[tuple[str, int, int, int]]:
  """(name, spatial size, in channels, out channels) of each 3x3 conv, in the model's order."""
  widths, pool = tuple(model_config.widths), tuple(model_config.pool)
  layers, cin = [], 3
  for stage in range(2):
    for i in (2 * stage, 2 * stage + 1):
      layers.append((f'conv{i + 1}', size, cin, widths[i]))
      cin, size = widths[i], size // 2 if pool[i] else size
    layers += [(f'residual{stage + 1}.{j}', size, cin, cin) for j in range(2)]
  return layers


def _jax_timers(config, size, cin, cout):
  mesh = train.data_mesh()
  data, replicated = NamedSharding(mesh, P('data')), NamedSharding(mesh, P())
  batch, key = config.batch_size, jax.random.PRNGKey(0)
  onednn = onednn_conv.use_onednn(config.model.conv_impl, config.model.dtype)
  op = models.conv_function(size, config.model.conv_grad_barrier, onednn, mesh,
                            config.model.conv_winograd)
  conv = lambda x, w: op(x, w, (1, 1), ((1, 1), (1, 1)),
                         dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  x = jax.device_put(jax.random.normal(key, (batch, size, size, cin)), data)
  w = jax.device_put(jax.random.normal(key, (3, 3, cin, cout)) * 0.05, replicated)
  dy = jax.device_put(jax.random.normal(key, (batch, size, size, cout)), data)

  def all_three(x, w, dy):  # the forward's output and both gradients, from one linearisation
    y, vjp = jax.vjp(conv, x, w)
    return y, vjp(dy)

  parts = (conv,
           lambda x, w, dy: jax.vjp(lambda x: conv(x, w), x)[1](dy),
           lambda x, w, dy: jax.vjp(lambda w: conv(x, w), w)[1](dy),
           all_three)
  timers = []
  for i, part in enumerate(parts):
    args = (x, w) if i == 0 else (x, w, dy)
    compiled = jax.jit(part).lower(*args).compile()
    timers.append(lambda c=compiled, a=args: jax.block_until_ready(c(*a)))
  return timers


def _torch_timers(config, size, cin, cout):
  import torch  # pylint: disable=import-outside-toplevel
  import torch.nn.functional as F  # pylint: disable=import-outside-toplevel
  batch = config.batch_size
  x = torch.randn(batch, cin, size, size, requires_grad=True)
  w = torch.randn(cout, cin, 3, 3, requires_grad=True)
  dy = torch.randn(batch, cout, size, size)
  y = F.conv2d(x, w, padding=1)  # the graph the gradients reuse, as in a training step

  def forward():
    with torch.no_grad():
      F.conv2d(x, w, padding=1)

  def all_three():
    x.grad = w.grad = None
    F.conv2d(x, w, padding=1).backward(dy)

  return (forward,
          lambda: torch.autograd.grad(y, x, dy, retain_graph=True),
          lambda: torch.autograd.grad(y, w, dy, retain_graph=True),
          all_three)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if _TORCH.value and importlib.util.find_spec('torch') is None:
    raise app.UsageError('--torch needs PyTorch: pip install -e ".[bench]"')
  config = _CONFIG.value
  xla_cpu_flags.apply(config.xla_cpu_convolutions)
  layers = conv_layers(config.model)
  frameworks = {'jax': _jax_timers}
  if _TORCH.value:
    frameworks['torch'] = _torch_timers
  timers = {(fw, layer[0]): make(config, *layer[1:])
            for fw, make in frameworks.items() for layer in layers}
  ms = {key: [[] for _ in _PARTS] for key in timers}
  for r in range(_ROUNDS.value):
    for key, fns in timers.items():
      for times, fn in zip(ms[key], fns):
        times.append(bench.median_ms(fn))
    print(f'round {r + 1} of {_ROUNDS.value} done', flush=True)
  print(f'batch {config.batch_size}, {jax.device_count()} JAX devices; ms, medians of '
        f'{_ROUNDS.value} rounds (each round: the median of 5 calls)')
  print(f'{"layer":14s} {"shape":18s} ' + ' '.join(
      f'{fw + " " + p:>17s}' for fw in frameworks for p in _PARTS))
  totals = {fw: np.zeros(len(_PARTS)) for fw in frameworks}
  for name, size, cin, cout in layers:
    row = []
    for fw in frameworks:
      medians = [statistics.median(t) for t in ms[(fw, name)]]
      totals[fw] += medians
      row += [f'{m:17.1f}' for m in medians]
    print(f'{name:14s} {f"{size}x{size} {cin}->{cout}":18s} ' + ' '.join(row))
  print(f'{"sum":33s} ' + ' '.join(f'{t:17.1f}' for fw in frameworks for t in totals[fw]))
  if 'torch' in frameworks:
    print('JAX / PyTorch speed, summed over the layers: ' + ', '.join(
        f'{p} {t / j:.2f}x' for p, j, t in zip(_PARTS, totals['jax'], totals['torch'])))


if __name__ == '__main__':
  _CONFIG = config_flags.DEFINE_config_file('config', 'configs/cifar_hybrid.py',
                                            'Config whose conv layers to time.', lock_config=True)
  _ROUNDS = flags.DEFINE_integer('rounds', 3, 'Rounds over all layers.')
  _TORCH = flags.DEFINE_bool('torch', False, 'Also time PyTorch (pip install -e ".[bench]").')
  jax.config.config_with_absl()  # --jax_num_cpu_devices=N
  app.run(main)
