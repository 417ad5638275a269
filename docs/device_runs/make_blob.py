"""Packs the JPEG copy's image bytes, unchanged, into `.gpu/cifar10_jpeg.npz` for the GPU calls.

Run from the repo root. Per split: the concatenated bytes, their offsets and the labels, in
`cifar10_folder`'s order (what the TFDS import reads).
"""
import zipfile

import numpy as np

from hybrid_flax import cifar10_folder, input_pipeline

SOURCE = '../shared/data/cifar10-jpeg.zip'
by_split = cifar10_folder.scan_source(SOURCE)
out = {}
with zipfile.ZipFile(SOURCE) as zf:
  for split, items in by_split.items():
    blobs = [zf.read(name) for name, _ in items]
    out[f'{split}_bytes'] = np.frombuffer(b''.join(blobs), np.uint8)
    out[f'{split}_offsets'] = np.cumsum([0] + [len(b) for b in blobs]).astype(np.int64)
    out[f'{split}_labels'] = np.array(
        [input_pipeline.CIFAR10_CLASSES.index(c) for _, c in items], np.int32)
    print(split, len(items), out[f'{split}_bytes'].nbytes)
np.savez('.gpu/cifar10_jpeg.npz', **out)
