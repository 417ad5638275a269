r"""Classifies image files with a trained run: the top-k classes and their probabilities.

  python -m hybrid_flax.predict --workdir runs/hybrid [--top_k 3] IMAGE_OR_FOLDER [...]

Any image Pillow reads, of any size or mode: converted to RGB and resized to 32x32, the model's
input. Folders are searched recursively for files with an image extension Pillow knows; a file
named on the command line must be an image. Every file is read before the model is loaded, so
a bad one is reported (by name) at once.
"""

import os

import numpy as np
from PIL import Image

from hybrid_flax import inference
from hybrid_flax import input_pipeline

class ImageError(ValueError):
  """A path that does not exist, holds no images, or is not a readable image."""


def image_paths(paths) -> list[str]:
  extensions = set(Image.registered_extensions())
  found = []
  for path in paths:
    if os.path.isdir(path):
      inside = sorted(os.path.join(root, name) for root, _, names in os.walk(path)
                      for name in names if os.path.splitext(name)[1].lower() in extensions)
      if not inside:
        raise ImageError(f'{path} holds no image files')
      found += inside
    elif os.path.isfile(path):
      found.append(path)
    else:
      raise ImageError(f'{path} does not exist')
  return found


def load_image(path: str) -> np.ndarray:
  """uint8 [32, 32, 3]; ImageError naming the file if Pillow cannot decode it."""
  height, width, _ = input_pipeline.IMAGE_SHAPE
  try:
    with Image.open(path) as image:
      # Pillow's resize filters over the whole source footprint, so large photos are
      # anti-aliased rather than sampled.
      return np.asarray(image.convert('RGB').resize((width, height), Image.Resampling.BICUBIC))
  except (OSError, SyntaxError, ValueError) as e:  # Pillow's ways of saying "not an image"
    raise ImageError(f'{path} is not an image Pillow can read ({type(e).__name__}: {e})') from e


def top_k(probabilities: np.ndarray, classes, k: int) -> list[list[tuple[str, float]]]:
  order = np.argsort(-probabilities, axis=-1, kind='stable')[:, :k]
  return [[(classes[j], float(p[j])) for j in row] for p, row in zip(probabilities, order)]


@inference.cli
def main(argv=None):
  parser = inference.tool_parser(__doc__, 'python -m hybrid_flax.predict')
  parser.add_argument('--top_k', type=int, default=3, help='classes listed per image')
  parser.add_argument('paths', nargs='+', metavar='IMAGE_OR_FOLDER')
  args = parser.parse_args(argv)
  classes = input_pipeline.CIFAR10_CLASSES
  if not 1 <= args.top_k <= len(classes):
    raise ValueError(f'--top_k must be in 1..{len(classes)}, got {args.top_k}')
  paths = image_paths(args.paths)
  images = np.stack([load_image(p) for p in paths])
  run = inference.load_run(args.workdir)
  probabilities = inference.softmax(inference.predict_logits(run, images))
  print(f'{run.workdir}: checkpoint at step {run.step}, {len(paths)} images')
  predictions = top_k(probabilities, classes, args.top_k)
  for path, best in zip(paths, predictions):
    print(f'{path}: ' + ', '.join(f'{name} {p:.1%}' for name, p in best))
  return dict(zip(paths, predictions))


if __name__ == '__main__':
  main()
