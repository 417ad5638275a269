r"""Screens test-time views on finished runs: caches each view's logits once, then combines them.

  python docs/screens/tta_views.py --out /tmp/views WORKDIR [WORKDIR ...]

For each run's latest checkpoint it saves the test set's logits for 18 views (the image and its
mirror at each position of the 3x3 grid of 2-pixel shifts, reflect-padded as in training) to
OUT/<run>.npz, then prints the test accuracy of several weightings of them per run. The
weightings average logits as `train.eval_logits` does; "config's 6 views" is its
`eval_translate=2`, so that row reproduces each run's own final accuracy. A screen, not a tool:
docs/results.md records what it found.
"""

import argparse
import os

import jax
import numpy as np

SHIFT = 2
DIAGONALS = [(-SHIFT, -SHIFT), (SHIFT, SHIFT), (-SHIFT, SHIFT), (SHIFT, -SHIFT)]
AXES = [(-SHIFT, 0), (SHIFT, 0), (0, -SHIFT), (0, SHIFT)]


def pair(views, dy, dx):
  """The flip-averaged logits at one shift."""
  return (views[f'{dy}_{dx}_0'] + views[f'{dy}_{dx}_1']) / 2


WEIGHTINGS = {
    'flips only': lambda v: pair(v, 0, 0),
    "config's 6 views (centre 1/2, 2 diagonals 1/4)":
        lambda v: pair(v, 0, 0) / 2 + sum(pair(v, *p) for p in DIAGONALS[:2]) / 4,
    'centre and 2 diagonals, 1/3 each':
        lambda v: (pair(v, 0, 0) + sum(pair(v, *p) for p in DIAGONALS[:2])) / 3,
    'centre 1/2, the other 2 diagonals 1/4':
        lambda v: pair(v, 0, 0) / 2 + sum(pair(v, *p) for p in DIAGONALS[2:]) / 4,
    'centre 1/2, 4 diagonals 1/8':
        lambda v: pair(v, 0, 0) / 2 + sum(pair(v, *p) for p in DIAGONALS) / 8,
    'centre 1/2, 4 axis shifts 1/8':
        lambda v: pair(v, 0, 0) / 2 + sum(pair(v, *p) for p in AXES) / 8,
    'centre 1/2, 8 shifts 1/16':
        lambda v: pair(v, 0, 0) / 2 + sum(pair(v, *p) for p in DIAGONALS + AXES) / 16,
    'all 9 positions, 1/9 each':
        lambda v: (pair(v, 0, 0) + sum(pair(v, *p) for p in DIAGONALS + AXES)) / 9,
}


def cache_views(workdir: str, out: str) -> str:
  from hybrid_flax import inference, input_pipeline  # after the device count is set
  path = os.path.join(out, os.path.basename(os.path.normpath(workdir)) + '.npz')
  if os.path.exists(path):
    return path
  run = inference.load_run(workdir)
  run.config.eval_flip, run.config.eval_translate = False, 0  # one view per call
  images, labels = input_pipeline.load_split(run.config.dataset, run.config.eval_split,
                                             run.config.data_dir)
  h, w = images.shape[1:3]
  padded = np.pad(images, ((0, 0), (SHIFT, SHIFT), (SHIFT, SHIFT), (0, 0)), mode='reflect')
  views = {}
  for dy in (-SHIFT, 0, SHIFT):
    for dx in (-SHIFT, 0, SHIFT):
      shifted = padded[:, SHIFT + dy:SHIFT + dy + h, SHIFT + dx:SHIFT + dx + w]
      for flip in (0, 1):
        x = np.ascontiguousarray(shifted[:, :, ::-1] if flip else shifted)
        views[f'{dy}_{dx}_{flip}'] = inference.predict_logits(run, x)
  np.savez(path, labels=labels, **views)
  return path


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('workdirs', nargs='+')
  parser.add_argument('--out', required=True, help='folder for the cached logits')
  parser.add_argument('--devices', type=int, default=8, help='CPU devices to shard over')
  args = parser.parse_args()
  jax.config.update('jax_num_cpu_devices', args.devices)
  from hybrid_flax import input_pipeline
  input_pipeline.hide_gpus_from_tensorflow()
  os.makedirs(args.out, exist_ok=True)
  runs = {os.path.basename(os.path.normpath(w)): dict(np.load(cache_views(w, args.out)))
          for w in args.workdirs}
  print(f'{"test-time views":<48}' + ''.join(f'{name:>8}' for name in runs) + '    mean')
  for label, combine in WEIGHTINGS.items():
    accs = [100 * float((combine(v).argmax(-1) == v['labels']).mean()) for v in runs.values()]
    print(f'{label:<48}' + ''.join(f'{a:8.2f}' for a in accs) + f'{np.mean(accs):8.3f}')


if __name__ == '__main__':
  main()
