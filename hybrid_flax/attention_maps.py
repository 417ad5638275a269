r"""What the attention blocks look at: their weights over the image, for a few test images.

  python -m hybrid_flax.attention_maps --workdir runs/hybrid [--num_images 10] [--out PNG]

One row per image (the first test image of each class, in class order): the image with its
true and predicted class, then each attention block's map overlaid on it. A block's map is the
attention each spatial position receives, averaged over heads and query positions (1 = uniform),
so it shows where the block gathers information from. Colours are scaled per panel; the
printed range gives the absolute spread.
"""

import os

import numpy as np

from hybrid_flax import figures
from hybrid_flax import inference
from hybrid_flax import input_pipeline

def received_attention(weights: np.ndarray) -> np.ndarray:
  """[N, heads, queries, keys] -> [N, h, w]: attention per key position, mean over heads and
  queries, scaled so a uniform block reads 1."""
  n, _, _, keys = weights.shape
  side = int(round(np.sqrt(keys)))
  if side * side != keys:
    raise ValueError(f'{keys} attention positions are not a square feature map')
  return weights.mean(axis=(1, 2)).reshape(n, side, side) * keys


def pick_examples(labels: np.ndarray, count: int) -> np.ndarray:
  """Indices of the first example of each class in turn: class 0, 1, ..., then again."""
  firsts = [np.flatnonzero(labels == c) for c in np.unique(labels)]
  order = [ids[r] for r in range(max(map(len, firsts))) for ids in firsts if r < len(ids)]
  return np.asarray(order[:count])


@inference.cli
def main(argv=None):
  parser = inference.tool_parser(__doc__, 'python -m hybrid_flax.attention_maps')
  parser.add_argument('--num_images', type=int, default=10, help='test images (rows)')
  parser.add_argument('--out', default='',
                      help='PNG path (default: WORKDIR/figures/attention_step_<N>.png)')
  args = parser.parse_args(argv)
  if args.num_images <= 0:
    raise ValueError(f'--num_images must be positive, got {args.num_images}')
  input_pipeline.hide_gpus_from_tensorflow()
  run = inference.load_run(args.workdir)
  inference.require_attention(run)  # before the test split is read
  images, labels = input_pipeline.load_split(run.config.dataset, run.config.eval_split,
                                             run.config.data_dir)
  idx = pick_examples(labels, args.num_images)
  images, labels = images[idx], labels[idx]
  weights = inference.attention_weights(run, images)
  predicted = inference.predict_logits(run, images).argmax(-1)
  classes = input_pipeline.CIFAR10_CLASSES
  captions = [f'{classes[t]} -> {classes[p]}' for t, p in zip(labels, predicted)]
  maps = {name: received_attention(w) for name, w in weights.items()}
  for name, m in maps.items():
    print(f'{name}: {weights[name].shape[1]} heads over {m.shape[1]}x{m.shape[2]} positions; '
          f'received attention from {m.min():.2f} to {m.max():.2f} times uniform')
  out = args.out or os.path.join(run.workdir, 'figures', f'attention_step_{run.step}.png')
  title = (f'{run.workdir}, step {run.step}: attention received per position '
           '(mean over heads and queries)')
  print(f'wrote {figures.attention_grid(images, maps, captions, out, title=title)}')
  return maps


if __name__ == '__main__':
  main()
