"""Decoded splits kept on disk, so that a launch after the first does not decode them again.

TFDS stores CIFAR-10's images as PNGs, and decoding the 50,000 training images (Pillow, one
image at a time, Python-bound) took ~15 s of every launch on a 2-core CPU: half the time to the
first step of a launch whose programs come from JAX's compilation cache. Once a process has read
every example of a split, the uint8 arrays go to `$HYBRID_FLAX_SPLIT_CACHE` (default
`$HYBRID_FLAX_CACHE/splits`; set it to '' for none) as .npy files, and later readers of that split
memory-map them (150 MB; ~0.3 s to read from disk, nothing while the OS holds them in memory).

An entry is keyed by the data set's files (path, size, modification time, so a re-imported data
set misses) and the examples the split names (so 'train[:45000]' and 'train[:90%]' share one).
The arrays are exactly what decoding gives. Least recently used entries go beyond MAX_BYTES.
"""

import hashlib
import json
import os
import shutil
import tempfile
import time

import numpy as np
from absl import logging

from hybrid_flax import cache_home

ENV = 'HYBRID_FLAX_SPLIT_CACHE'
MAX_BYTES = 2 << 30  # CIFAR-10's train and test splits: 185 MB
_FORMAT = 1  # bump when the layout of an entry changes


def directory() -> str | None:
  """The cache's folder, or None where $HYBRID_FLAX_SPLIT_CACHE is set to ''."""
  chosen = os.environ.get(ENV)
  if chosen is None:
    return str(cache_home.folder() / 'splits')
  return chosen or None


class Entry:
  """One split's decoded images and labels, in `directory()`/<name>/."""

  def __init__(self, root: str, name: str, num_examples: int, image_shape: tuple[int, ...]):
    self.path = os.path.join(root, name)
    self._root = root
    self._shape = (num_examples,) + tuple(image_shape)

  def load(self) -> tuple[np.ndarray, np.ndarray] | None:
    """(images, labels) memory-mapped read-only, or None where the entry is absent or unusable."""
    try:
      images = np.load(os.path.join(self.path, 'image.npy'), mmap_mode='r')
      labels = np.load(os.path.join(self.path, 'label.npy'), mmap_mode='r')
    except FileNotFoundError:
      return None
    except (OSError, ValueError) as e:
      return self._discard(str(e))
    if (images.shape, images.dtype, labels.shape) != (self._shape, np.uint8, self._shape[:1]):
      return self._discard(f'it holds {images.shape} {images.dtype} images and {labels.shape} '
                           f'labels, not {self._shape} uint8 and ({self._shape[0]},)')
    try:
      os.utime(self.path)  # its last use, for the eviction order
    except OSError:
      pass
    return images, np.asarray(labels, np.int32)

  def _discard(self, why: str) -> None:
    # Damaged (a disk error, an edit): removed, so that this reader's save replaces it.
    logging.warning('Removing the split cache entry %s (%s): the split is decoded again.',
                    self.path, why)
    shutil.rmtree(self.path, ignore_errors=True)

  def save(self, images: np.ndarray, labels: np.ndarray) -> None:
    """Writes the entry (whole or not at all); never raises for the disk's sake, only logs."""
    start = time.perf_counter()
    try:
      os.makedirs(self._root, exist_ok=True)
      staging = tempfile.mkdtemp(prefix='.partial-', dir=self._root)
      try:
        np.save(os.path.join(staging, 'image.npy'), np.asarray(images, np.uint8))
        np.save(os.path.join(staging, 'label.npy'), np.asarray(labels, np.int32))
        os.rename(staging, self.path)  # atomic; fails where another process saved it first
      except OSError:
        shutil.rmtree(staging, ignore_errors=True)
        if not os.path.isdir(self.path):
          raise
        return
    except OSError as e:
      logging.warning('Could not save the decoded split to %s (%s): later launches decode it '
                      'again.', self.path, e)
      return
    logging.info('Saved the decoded split to %s (%.0f MB, %.1fs): later launches read it from '
                 'there instead of decoding it.', self.path, _size(self.path) / 1e6,
                 time.perf_counter() - start)
    _evict(self._root, keep=self.path)


def entry(data_dir: str, name: str, examples: list[tuple[str, range]],
          image_shape: tuple[int, ...]) -> Entry | None:
  """The entry of the `examples` of the prepared TFDS data set in `data_dir` (its version's
  folder), or None where the cache is turned off."""
  root = directory()
  if root is None:
    return None
  try:
    files = sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns)
                   for f in os.scandir(data_dir) if f.is_file())
  except OSError as e:  # not a local folder (gs://...): no key to trust
    logging.info('No split cache for %s: its files cannot be listed here (%s).', data_dir, e)
    return None
  key = json.dumps([_FORMAT, os.path.abspath(data_dir), files,
                    [(split, rows.start, rows.stop) for split, rows in examples],
                    list(image_shape)])
  num_examples = sum(len(rows) for _, rows in examples)
  return Entry(root, f'{name}-{hashlib.sha256(key.encode()).hexdigest()[:20]}', num_examples,
               image_shape)


def _size(path: str) -> int:
  return sum(f.stat().st_size for f in os.scandir(path) if f.is_file())


def _evict(root: str, keep: str) -> None:
  """Removes least recently used entries (never `keep`) until the rest fit in MAX_BYTES, and
  what saves cut short by a crash left behind."""
  entries = []
  for d in os.scandir(root):
    try:
      if d.name.startswith('.partial-'):
        if d.stat().st_mtime < time.time() - 3600:  # a save that a crash cut short
          shutil.rmtree(d.path, ignore_errors=True)
      elif d.is_dir():
        entries.append((d.stat().st_mtime, _size(d.path), d.path))
    except OSError:  # removed meanwhile by another process
      pass
  total = sum(size for _, size, _ in entries)
  for _, size, path in sorted(entries):
    if total <= MAX_BYTES:
      break
    if path != keep:
      shutil.rmtree(path, ignore_errors=True)
      total -= size
