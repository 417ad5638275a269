"""CIFAR-10 from a prepared TFDS data set onto the device mesh.

The split is read once through `tfds.data_source` (array_record, decoded with Pillow: no
TensorFlow needed at train time) into host memory; CIFAR-10 is 150 MB as uint8. The order of
training examples is a pure function of (seed, step), so a run resumed from a checkpoint at step
s sees exactly the batches an uninterrupted run would have seen from step s on. Batches travel as
uint8 (4x less host->device traffic) and are normalised on the device inside the jitted step.
"""

import collections
import importlib.util
import itertools
from collections.abc import Iterator

import jax
import numpy as np
from absl import logging

# CIFAR-10's label order (TFDS's `cifar10` and our `cifar10_folder` both use it).
CIFAR10_CLASSES = ('airplane', 'automobile', 'bird', 'cat', 'deer', 'dog', 'frog', 'horse',
                   'ship', 'truck')
IMAGE_SHAPE = (32, 32, 3)
# Per-channel mean/std of the CIFAR-10 training set, in [0, 1] units.
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)

IMPORT_HINT = (
    'Import a local copy first (no network is needed):\n'
    '  python -m hybrid_flax.import_data --source cifar-10-binary.tar.gz        '
    '# official archive -> cifar10\n'
    '  python -m hybrid_flax.import_data --source ../shared/data/cifar10-jpeg.zip  '
    '# image zip/folder -> cifar10_folder\n'
    'then pass --config.dataset=<name> (and --config.data_dir=DIR if you imported into one).')


# Official CIFAR-10 from TFDS, and the builder for imported image copies (cifar10_folder.NAME).
KNOWN_DATASETS = ('cifar10', 'cifar10_folder')


class DatasetUnavailableError(RuntimeError):
  """The requested TFDS data set is not prepared in the data dir."""


def hide_gpus_from_tensorflow() -> None:
  """Keeps TensorFlow (pulled in by TFDS when installed) off the GPUs that JAX will use."""
  if importlib.util.find_spec('tensorflow') is None:
    return
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  tf.config.set_visible_devices([], 'GPU')


def load_split(dataset: str, split: str, data_dir: str | None = None,
               chunk: int = 2000) -> tuple[np.ndarray, np.ndarray]:
  """Returns (images uint8 [N,H,W,3], labels int32 [N]) of a prepared TFDS split."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  data_dir = data_dir or None
  where = data_dir or 'the default TFDS data dir ($TFDS_DATA_DIR or ~/tensorflow_datasets)'
  try:
    builder = tfds.builder(dataset, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError:
    if dataset not in KNOWN_DATASETS:
      raise DatasetUnavailableError(
          f'unknown data set {dataset!r}: TFDS has no such data set and none was imported under '
          f'that name in {where} (CIFAR-10 is {" or ".join(map(repr, KNOWN_DATASETS))})') from None
    raise DatasetUnavailableError(
        f'TFDS data set {dataset!r} is not prepared in {where}.\n{IMPORT_HINT}') from None
  if not builder.is_prepared():
    raise DatasetUnavailableError(
        f'TFDS data set {dataset!r} is not prepared in {where}.\n{IMPORT_HINT}')
  if split not in builder.info.splits:
    raise DatasetUnavailableError(
        f'{dataset!r} has no split {split!r}; it has {sorted(builder.info.splits)}')
  source = builder.as_data_source(split=split)
  n = len(source)
  images, labels = None, np.empty((n,), np.int32)
  for start in range(0, n, chunk):
    records = source.__getitems__(range(start, min(start + chunk, n)))
    block = np.stack([r['image'] for r in records])
    if images is None:
      images = np.empty((n,) + block.shape[1:], np.uint8)
    images[start:start + len(records)] = block
    labels[start:start + len(records)] = [r['label'] for r in records]
  logging.info('Loaded %s[%s]: %d examples from %s', dataset, split, n, builder.data_dir)
  return images, labels


def epoch_permutation(seed: int, epoch: int, n: int) -> np.ndarray:
  return np.random.default_rng((seed, epoch)).permutation(n)


def train_batches(images: np.ndarray, labels: np.ndarray, *, batch_size: int, seed: int,
                  start_step: int, num_steps: int) -> Iterator[dict[str, np.ndarray]]:
  """Yields this process's part of global batches `start_step` .. `num_steps - 1`.

  Each epoch is a fresh permutation of the training set (the last partial batch is dropped so
  every step has the same shape and the step count alone locates a batch).
  """
  steps_per_epoch = len(images) // batch_size
  per_process = batch_size // jax.process_count()
  lo = jax.process_index() * per_process
  epoch, perm = -1, None
  for step in range(start_step, num_steps):
    if step // steps_per_epoch != epoch:
      epoch = step // steps_per_epoch
      perm = epoch_permutation(seed, epoch, len(images))
    i = (step % steps_per_epoch) * batch_size
    idx = np.sort(perm[i + lo:i + lo + per_process])  # sorted: cache-friendly gather
    yield {'image': images[idx], 'label': labels[idx]}


def eval_batches(images: np.ndarray, labels: np.ndarray,
                 batch_size: int) -> Iterator[dict[str, np.ndarray]]:
  """Yields this process's part of every example exactly once; padding has mask 0."""
  n = len(images)
  per_process = batch_size // jax.process_count()
  lo = jax.process_index() * per_process
  for start in range(0, n, batch_size):
    idx = np.arange(start + lo, start + lo + per_process)
    mask = idx < n
    idx = np.where(mask, idx, 0)
    yield {'image': images[idx], 'label': labels[idx], 'mask': mask.astype(np.float32)}


def to_device(batches, sharding, prefetch: int = 2):
  """Assembles global arrays from process-local batches, keeping `prefetch` batches in flight."""
  def put(batch):
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), batch)
  queue = collections.deque()
  batches = iter(batches)
  for batch in itertools.islice(batches, prefetch):
    queue.append(put(batch))
  while queue:
    yield queue.popleft()
    for batch in itertools.islice(batches, 1):
      queue.append(put(batch))

