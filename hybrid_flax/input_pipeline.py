"""CIFAR-10 from a prepared TFDS data set onto the device mesh.

Examples are read through `tfds.data_source` (array_record, decoded with Pillow: no TensorFlow
needed at train time) by index, into host memory, each at most once per process; CIFAR-10 is
150 MB as uint8. A split read whole is kept decoded on disk for later launches
(hybrid_flax/split_cache.py). The order of training examples is a pure function of (seed,
step), so a run resumed from a checkpoint at step s sees exactly the batches an uninterrupted
run would have seen from step s on, and a global batch is the same whatever the number of
processes: each process reads only its rows of it (the rows its devices hold). Batches travel as
uint8 (4x less host->device traffic) and are normalised on the device inside the jitted step.
"""

import collections
import importlib.abc
import importlib.util
import itertools
import sys
from collections.abc import Iterator

import jax
import numpy as np
from absl import logging

from hybrid_flax import split_cache

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


def _hide_gpus(tf) -> None:
  tf.config.set_visible_devices([], 'GPU')


class _HideGpusOnImport(importlib.abc.MetaPathFinder):
  """Finds `tensorflow` as the other finders do, and hides the GPUs as soon as it has loaded."""

  def find_spec(self, name, path=None, target=None):
    del path, target
    if name != 'tensorflow':
      return None
    sys.meta_path.remove(self)  # once: the finders below then find it as usual
    spec = importlib.util.find_spec(name)
    if spec is not None and spec.loader is not None:
      exec_module = spec.loader.exec_module

      def exec_and_hide(module):
        exec_module(module)
        _hide_gpus(module)

      spec.loader.exec_module = exec_and_hide  # this spec's own loader object
    return spec


def hide_gpus_from_tensorflow() -> None:
  """Keeps TensorFlow off the GPUs that JAX will use, whenever this process imports it.

  Training never needs TensorFlow (`tfds.data_source` reads without it), and importing it only
  to hide the GPUs cost every launch 4-9 s on a 2-core CPU. So where it is not imported yet, the
  GPUs are hidden the moment something imports it (TFDS building a data set, say), before it can
  run anything on them.
  """
  if 'tensorflow' in sys.modules:
    _hide_gpus(sys.modules['tensorflow'])
  elif importlib.util.find_spec('tensorflow') is not None and not any(
      isinstance(f, _HideGpusOnImport) for f in sys.meta_path):
    sys.meta_path.insert(0, _HideGpusOnImport())


class SplitReader:
  """Random access to a split's examples, each read from disk (and decoded) at most once.

  A process reads only the examples its rows of the global batches need, when it first needs
  them: in the first epoch its reads are disjoint from every other process's, and over a run it
  never reads more than the split (what loading the whole split up front would read). The host
  buffers are allocated untouched, so memory grows only with what was read; a split from the
  split cache is memory-mapped instead, its pages read from disk when first indexed.
  """

  def __init__(self, source, image_shape, examples=None, cache=None):
    # `source`: a TFDS data source, or anything with len() and __getitems__(indices).
    # `examples`: where they lie in the data set, [(split name, range of indices)], if known.
    # `cache`: a split_cache.Entry: read from it where it holds the split, else saved to once
    # every example has been read.
    self._source = source
    self.examples = examples
    n = len(source)
    self.image_shape = tuple(image_shape)
    self.num_read = 0
    cached = cache.load() if cache is not None else None
    self.from_cache = cached is not None
    self._cache = None if self.from_cache else cache  # the entry to save to, once read whole
    if self.from_cache:
      self._images, self._labels = cached
      self._have = np.ones((n,), bool)
    else:
      self._images = np.empty((n,) + self.image_shape, np.uint8)
      self._labels = np.empty((n,), np.int32)
      self._have = np.zeros((n,), bool)

  def __len__(self) -> int:
    return len(self._have)

  def read(self, idx: np.ndarray) -> dict[str, np.ndarray]:
    """Returns {'image', 'label'} of examples `idx`, in that order."""
    idx = np.asarray(idx)
    missing = np.unique(idx[~self._have[idx]])  # sorted: sequential reads where they can be
    if missing.size:
      records = self._source.__getitems__(missing.tolist())
      self._images[missing] = np.stack([r['image'] for r in records])
      self._labels[missing] = [r['label'] for r in records]
      self._have[missing] = True
      self.num_read += missing.size
      if self._cache is not None and self.num_read == len(self):
        self._cache.save(self._images, self._labels)
        self._cache = None
    return {'image': self._images[idx], 'label': self._labels[idx]}


def open_split(dataset: str, split: str, data_dir: str | None = None,
               cache: bool = True) -> SplitReader:
  """A SplitReader over a prepared TFDS split; nothing is read yet, except from the split cache
  (hybrid_flax/split_cache.py) where it holds the split and `cache` is on."""
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
  sizes = {name: info.num_examples for name, info in builder.info.splits.items()}
  try:
    # TFDS's split syntax: 'train', 'train[:45000]', 'train[90%:]', 'train[:10%]+test', ...
    examples = [(e.splitname, range(sizes[e.splitname])[e.from_:e.to]) for e in
                tfds.core.ReadInstruction.from_spec(split).to_absolute(builder.info.splits)]
  except (KeyError, ValueError, AssertionError) as e:
    raise DatasetUnavailableError(
        f'{dataset!r} has no split {split!r} ({_one_line(e)}); it has {sizes}, and slices of '
        "them such as 'train[:45000]' or 'train[90%:]'") from None
  if not any(rows for _, rows in examples):
    raise DatasetUnavailableError(f'split {split!r} of {dataset!r} is empty; it has {sizes}')
  shape = builder.info.features['image'].shape
  entry = split_cache.entry(builder.data_dir, dataset, examples, shape) if cache else None
  reader = SplitReader(builder.as_data_source(split=split), shape, examples=examples, cache=entry)
  if reader.from_cache:
    how = f'decoded, from the split cache {entry.path}'
  elif entry is not None:
    how = f'to be decoded, then saved to the split cache {entry.path}'
  else:
    how = 'to be decoded (no split cache)'
  logging.info('Opened %s[%s]: %d examples in %s, %s', dataset, split, len(reader),
               builder.data_dir, how)
  return reader


def _one_line(error: Exception) -> str:
  return ' '.join(str(error).split())


def shared_examples(a: SplitReader, b: SplitReader) -> int:
  """How many examples two splits of one data set have in common (0 where either is unknown)."""
  if a.examples is None or b.examples is None:
    return 0
  return sum(len(range(max(x.start, y.start), min(x.stop, y.stop)))
             for name_a, x in a.examples for name_b, y in b.examples if name_a == name_b)


def load_split(dataset: str, split: str,
               data_dir: str | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Returns (images uint8 [N,H,W,3], labels int32 [N]): the whole split, in order."""
  reader = open_split(dataset, split, data_dir)
  batch = reader.read(np.arange(len(reader)))
  return batch['image'], batch['label']


def process_rows(sharding, batch_size: int) -> np.ndarray:
  """The rows of a global batch that this process supplies, in its local-data order.

  make_array_from_process_local_data lays a process's data out over the slices its devices hold,
  in increasing order; reading exactly those rows keeps every global batch, and so the results,
  independent of how many processes share it.
  """
  slices = {idx[0].indices(batch_size)
            for idx in sharding.addressable_devices_indices_map((batch_size,)).values()}
  return np.concatenate([np.arange(*s) for s in sorted(slices)])


def epoch_permutation(seed: int, epoch: int, n: int) -> np.ndarray:
  return np.random.default_rng((seed, epoch)).permutation(n)


def train_indices(num_examples: int, *, batch_size: int, seed: int, start_step: int,
                  num_steps: int) -> Iterator[np.ndarray]:
  """Yields the example indices of global batches `start_step` .. `num_steps - 1`.

  Each epoch is a fresh permutation of the training set (the last partial batch is dropped so
  every step has the same shape and the step count alone locates a batch): a global batch is a
  function of (seed, step) only.
  """
  steps_per_epoch = num_examples // batch_size
  epoch, perm = -1, None
  for step in range(start_step, num_steps):
    if step // steps_per_epoch != epoch:
      epoch = step // steps_per_epoch
      perm = epoch_permutation(seed, epoch, num_examples)
    i = (step % steps_per_epoch) * batch_size
    # Sorted over the whole global batch (not per process): the row order, and with it the
    # summation order on the devices, is the same for any process count.
    yield np.sort(perm[i:i + batch_size])


def train_batches(reader: SplitReader, *, batch_size: int, seed: int, start_step: int,
                  num_steps: int, rows: np.ndarray) -> Iterator[dict[str, np.ndarray]]:
  """Yields rows `rows` of the global batches of `train_indices`: each process reads just its
  rows, with their indices in the split (`index`, which `augment.alternate_flip` keys on)."""
  for idx in train_indices(len(reader), batch_size=batch_size, seed=seed,
                           start_step=start_step, num_steps=num_steps):
    yield {**reader.read(idx[rows]), 'index': idx[rows].astype(np.int32)}


def train_index_batches(num_examples: int, *, batch_size: int, seed: int, start_step: int,
                        num_steps: int, rows: np.ndarray) -> Iterator[dict[str, np.ndarray]]:
  """The same batches as `train_batches`, as indices into a split kept on the device."""
  for idx in train_indices(num_examples, batch_size=batch_size, seed=seed,
                           start_step=start_step, num_steps=num_steps):
    yield {'index': idx[rows].astype(np.int32)}


def eval_batches(reader: SplitReader, batch_size: int,
                 rows: np.ndarray) -> Iterator[dict[str, np.ndarray]]:
  """Yields rows `rows` of global batches covering every example once; padding has mask 0.

  A process's rows are the same at every evaluation, so it reads its share of the split once.
  """
  n = len(reader)
  for start in range(0, n, batch_size):
    idx = start + rows
    mask = idx < n
    real = reader.read(idx[mask])  # padding is zeros, not a read of someone else's example
    batch = {k: np.zeros((len(idx),) + v.shape[1:], v.dtype) for k, v in real.items()}
    for k, v in real.items():
      batch[k][mask] = v
    yield {**batch, 'mask': mask.astype(np.float32)}


def batch_shapes(reader: SplitReader, batch_size: int,
                 kind: str) -> dict[str, jax.ShapeDtypeStruct]:
  """The global shapes and dtypes of what reaches the devices from `reader`: the batches that
  `train_batches` ('train'), `train_index_batches` ('index') or `eval_batches` ('eval') yield,
  or the whole split ('split': `config.data_on_device`'s copy, `batch_size` unused)."""
  rows = len(reader) if kind == 'split' else batch_size
  example = reader.read(np.arange(0))  # reads nothing: empty arrays of the right dtypes
  image = jax.ShapeDtypeStruct((rows,) + reader.image_shape, example['image'].dtype)
  label = jax.ShapeDtypeStruct((rows,), example['label'].dtype)
  index = jax.ShapeDtypeStruct((rows,), np.int32)
  return {'train': {'image': image, 'label': label, 'index': index},
          'index': {'index': index},
          'eval': {'image': image, 'label': label,
                   'mask': jax.ShapeDtypeStruct((rows,), np.float32)},
          'split': {'image': image, 'label': label}}[kind]


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

