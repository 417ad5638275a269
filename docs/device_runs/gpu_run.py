"""GPU-machine driver: serves CIFAR-10 (JPEG copy) from a carried npz instead of TFDS.

The device machine has no TensorFlow Datasets; everything else is the project's own code path
(input_pipeline.SplitReader over a source with __len__/__getitems__, train.py, bench.py).
  python3 .gpu/gpu_run.py decode
  python3 .gpu/gpu_run.py launch --config ... --workdir ...
  python3 .gpu/gpu_run.py bench --config ...
"""
import io
import os
import runpy
import sys
import time

import numpy as np

CACHE = '/tmp/cifar10_decoded.npz'
HERE = os.path.dirname(os.path.abspath(__file__))


def decode():
  from PIL import Image
  t = time.time()
  blob = np.load(os.path.join(HERE, 'cifar10_jpeg.npz'))
  out = {}
  for split in ('train', 'test'):
    b, off = blob[f'{split}_bytes'].tobytes(), blob[f'{split}_offsets']
    out[f'{split}_images'] = np.stack([
        np.asarray(Image.open(io.BytesIO(b[off[i]:off[i + 1]])).convert('RGB'))
        for i in range(len(off) - 1)])
    out[f'{split}_labels'] = blob[f'{split}_labels']
  np.savez(CACHE, **out)
  print({k: v.shape for k, v in out.items()}, f'decoded in {time.time() - t:.1f}s', flush=True)


class ArraySource:

  def __init__(self, images, labels):
    self.images, self.labels = images, labels

  def __len__(self):
    return len(self.labels)

  def __getitems__(self, idx):
    return [{'image': self.images[i], 'label': self.labels[i]} for i in idx]


def patch():
  from hybrid_flax import input_pipeline
  data = np.load(CACHE)

  def open_split(dataset, split, data_dir=None, cache=True):
    del dataset, data_dir, cache  # the blob is decoded already
    return input_pipeline.SplitReader(
        ArraySource(data[f'{split}_images'], data[f'{split}_labels']), (32, 32, 3))
  input_pipeline.open_split = open_split


if __name__ == '__main__':
  cmd = sys.argv.pop(1)
  if cmd == 'decode':
    decode()
  else:
    patch()
    sys.argv[0] = cmd
    if cmd == 'launch':
      runpy.run_path('launch.py', run_name='__main__')
    else:
      runpy.run_module('hybrid_flax.bench', run_name='__main__')
