r"""Screens precise batch-norm statistics on finished runs: recomputed, then evaluated.

  python docs/screens/bn_recalibration.py WORKDIR [WORKDIR ...] [--samples 10000 ...]

A run's running batch-norm statistics are momentum averages (0.9: about the last ten steps)
taken while the weights still moved. For each run's latest checkpoint this recomputes them
with the final (evaluated) weights, as Wu and Johnson's "precise BN": the per-batch means and
variances of `--samples` training images, in batches of `--batch`, averaged. The images are
taken as they are (`none`), mirrored at random (`flip`), or augmented as the run trained at
full size (`train`: its crop padding and flips). Each variant is then evaluated on the test set
with the run's own test-time views, so the `running statistics` row reproduces the run's final
accuracy. A screen, not a tool: docs/results.md records what it found.
"""

import argparse
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

AUGMENTS = ('none', 'flip', 'train')


def precise_batch_stats(run, images: np.ndarray, batch: int, augment_mode: str, seed: int):
  """Batch-norm statistics of `images` under `run`'s evaluated weights, averaged per batch."""
  from hybrid_flax import augment, train  # after the device count is set
  from jax.sharding import NamedSharding, PartitionSpec as P
  mesh = train.data_mesh()
  momentum = run.config.model.bn_momentum
  variables = run.variables
  zeros = jax.tree.map(jnp.zeros_like, variables['batch_stats'])

  replicated, sharded = NamedSharding(mesh, P()), NamedSharding(mesh, P('data'))

  @functools.partial(jax.jit, in_shardings=(replicated, sharded, replicated))
  def batch_stats(params, x, rng):
    if augment_mode != 'none':
      padding = run.config.augment.crop_padding if augment_mode == 'train' else 0
      x = augment.random_crop_flip(x, rng, padding, flip=True)
    # Running statistics start at zero, so one update leaves (1 - momentum) x this batch's.
    _, updates = run.model.apply({'params': params, 'batch_stats': zeros},
                                 train.preprocess(x), train=True, mutable=['batch_stats'])
    return jax.tree.map(lambda s: s / (1 - momentum), updates['batch_stats'])

  total, count = None, 0
  key = jax.random.key(seed)
  for start in range(0, len(images) - batch + 1, batch):
    stats = batch_stats(variables['params'], images[start:start + batch],
                        jax.random.fold_in(key, start))
    total = stats if total is None else jax.tree.map(jnp.add, total, stats)
    count += 1
  return jax.tree.map(lambda s: s / count, total)


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('workdirs', nargs='+')
  parser.add_argument('--samples', type=int, default=10000, help='training images to use')
  parser.add_argument('--batch', type=int, default=500, help='images per batch statistic')
  parser.add_argument('--augment', nargs='+', choices=AUGMENTS, default=list(AUGMENTS))
  parser.add_argument('--devices', type=int, default=4, help='CPU devices to shard over')
  parser.add_argument('--seed', type=int, default=0, help='which training images, which crops')
  args = parser.parse_args()
  jax.config.update('jax_num_cpu_devices', args.devices)
  from hybrid_flax import inference, input_pipeline
  input_pipeline.hide_gpus_from_tensorflow()
  # Runs of one data set share its splits: read each once.
  load_split = functools.lru_cache(input_pipeline.load_split)
  for workdir in args.workdirs:
    run = inference.load_run(workdir)
    test_x, test_y = load_split(run.config.dataset, run.config.eval_split, run.config.data_dir)
    train_x, _ = load_split(run.config.dataset, run.config.train_split, run.config.data_dir)
    pick = np.random.default_rng(args.seed).permutation(len(train_x))[:args.samples]
    train_x = train_x[np.sort(pick)]

    def accuracy(r):
      return 100 * float((inference.predict_logits(r, test_x).argmax(-1) == test_y).mean())

    print(f'{workdir} (step {run.step})')
    print(f'  {"running statistics":<34}{accuracy(run):8.2f}')
    for mode in args.augment:
      stats = precise_batch_stats(run, train_x, args.batch, mode, args.seed)
      # `train.eval_variables` evaluates `state.ema` whenever it is set, with or without EMA.
      recalibrated = dataclasses.replace(run, state=run.state.replace(
          ema=dict(run.variables, batch_stats=stats)))
      print(f'  {f"precise, {args.samples} images, {mode}":<34}{accuracy(recalibrated):8.2f}',
            flush=True)


if __name__ == '__main__':
  main()
