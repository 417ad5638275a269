"""The offline import into TFDS, reading it back without TensorFlow, and batch order."""

import os
import re
import subprocess
import sys
import tarfile
import zipfile

import jax
import numpy as np
import pytest

from hybrid_flax import cifar10_folder
from hybrid_flax import import_data
from hybrid_flax import input_pipeline
from tests import conftest


def test_import_builds_both_splits_with_labels(tiny_data_dir):
  images, labels = input_pipeline.load_split('cifar10_folder', 'train', tiny_data_dir)
  assert images.shape == (10 * conftest.TRAIN_PER_CLASS, 32, 32, 3) and images.dtype == np.uint8
  np.testing.assert_array_equal(np.bincount(labels), [conftest.TRAIN_PER_CLASS] * 10)
  test_images, test_labels = input_pipeline.load_split('cifar10_folder', 'test', tiny_data_dir)
  assert len(test_images) == 10 * conftest.TEST_PER_CLASS
  # Labels follow CIFAR-10's order: the class encoded in each image matches its label.
  for img, label in zip(test_images, test_labels):
    stripe = img.mean(axis=(0, 2))  # per column: the class stripe is brightest
    assert label * 3 <= int(np.argmax(stripe)) < label * 3 + 3


def test_import_keeps_the_image_bytes_unchanged(tiny_data_dir, tiny_zip):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  source = tfds.builder('cifar10_folder', data_dir=tiny_data_dir).as_data_source(
      split='train', decoders={'image': tfds.decode.SkipDecoding()})
  with zipfile.ZipFile(tiny_zip) as zf:
    for record in source:
      name = record['id'].decode() if isinstance(record['id'], bytes) else record['id']
      assert record['image'] == zf.read(name)


def test_reimport_is_a_no_op_and_overwrite_rebuilds(tiny_data_dir, tiny_zip):
  path = os.path.join(tiny_data_dir, 'cifar10_folder', '1.0.0', 'dataset_info.json')
  before = os.stat(path).st_mtime_ns
  import_data.import_source(tiny_zip, tiny_data_dir)
  assert os.stat(path).st_mtime_ns == before


def test_import_from_a_folder(tmp_path, tiny_zip):
  with zipfile.ZipFile(tiny_zip) as zf:
    zf.extractall(tmp_path / 'extracted')
  data_dir = str(tmp_path / 'tfds')
  import_data.import_source(str(tmp_path / 'extracted'), data_dir)
  images, _ = input_pipeline.load_split('cifar10_folder', 'test', data_dir)
  assert len(images) == 10 * conftest.TEST_PER_CLASS


def _no_dataset_left(data_dir):
  return not os.path.exists(data_dir)  # it did not exist before the import


@pytest.mark.parametrize('case, match', [
    ('missing', 'does not exist'),
    ('truncated', 'neither a folder nor a readable zip'),
    ('nine_classes', 'missing: \\[.truck.\\]'),
    ('no_test_split', 'no images found under test'),
    ('undecodable', 'cifar10/train/cat/9999.jpg is not a decodable image'),
    ('wrong_size', '9999.jpg is 64x64 RGB'),
    ('truncated_image', 'cifar10/test/dog/0001.jpg is not a decodable image'),
])
def test_bad_import_sources_fail_clearly_and_leave_nothing(tmp_path, tiny_zip, case, match):
  src = tmp_path / 'src.zip'
  if case == 'truncated':
    data = open(tiny_zip, 'rb').read()
    src.write_bytes(data[:len(data) // 2])
  elif case == 'nine_classes':
    conftest.write_cifar_zip(src, 1, 1, classes=conftest.CLASSES[:9])
  elif case == 'no_test_split':
    conftest.write_cifar_zip(src, 1, 0)
  elif case == 'undecodable':
    conftest.write_cifar_zip(src, 1, 1, extra={'cifar10/train/cat/9999.jpg': b'not an image'})
  elif case == 'wrong_size':
    import io  # pylint: disable=g-import-not-at-top
    from PIL import Image  # pylint: disable=g-import-not-at-top
    buf = io.BytesIO()
    Image.new('RGB', (64, 64)).save(buf, format='JPEG')
    conftest.write_cifar_zip(src, 1, 1, extra={'cifar10/test/dog/9999.jpg': buf.getvalue()})
  elif case == 'truncated_image':
    data = conftest.class_image(5, 1)
    conftest.write_cifar_zip(src, 1, 1, extra={'cifar10/test/dog/0001.jpg': data[:len(data) // 2]})
  data_dir = str(tmp_path / 'tfds')
  with pytest.raises(cifar10_folder.SourceError, match=match):
    import_data.import_source(str(src), data_dir)
  assert _no_dataset_left(data_dir)


def test_failed_overwrite_keeps_the_previous_data_set(tmp_path, tiny_zip):
  data_dir = str(tmp_path / 'tfds')
  import_data.import_source(tiny_zip, data_dir)
  before = input_pipeline.load_split('cifar10_folder', 'test', data_dir)
  bad = conftest.write_cifar_zip(tmp_path / 'bad.zip', 1, 1,
                                 extra={'cifar10/train/cat/9999.jpg': b'not an image'})
  with pytest.raises(cifar10_folder.SourceError, match='9999.jpg is not a decodable image'):
    import_data.import_source(bad, data_dir, overwrite=True)
  after = input_pipeline.load_split('cifar10_folder', 'test', data_dir)
  np.testing.assert_array_equal(before[0], after[0])
  assert sorted(os.listdir(os.path.join(data_dir, 'cifar10_folder'))) == ['1.0.0']


def test_official_archive_goes_through_tfds_checksum_verification(tmp_path):
  fake = tmp_path / 'cifar-10-binary.tar.gz'
  with tarfile.open(fake, 'w:gz') as tf:
    tf.add(__file__, arcname='cifar-10-batches-bin/readme.txt')
  with pytest.raises(cifar10_folder.SourceError, match='checksum does not match') as e:
    import_data.import_source(str(fake), str(tmp_path / 'tfds'))
  assert 'NonMatchingChecksumError' in type(e.value.__cause__).__name__
  assert not os.path.exists(tmp_path / 'tfds' / 'cifar10' / '3.0.2' / 'dataset_info.json')


def test_import_cli_reports_a_bad_source_in_one_line(tmp_path):
  proc = subprocess.run([sys.executable, '-m', 'hybrid_flax.import_data', '--source',
                         str(tmp_path / 'nope.zip'), '--data_dir', str(tmp_path)],
                        capture_output=True, text=True, timeout=120, check=False)
  assert proc.returncode != 0
  assert 'import failed:' in proc.stderr and 'does not exist' in proc.stderr
  assert 'Traceback' not in proc.stderr


def test_missing_dataset_says_how_to_import(tmp_path):
  with pytest.raises(input_pipeline.DatasetUnavailableError, match='hybrid_flax.import_data'):
    input_pipeline.load_split('cifar10_folder', 'train', str(tmp_path))
  with pytest.raises(input_pipeline.DatasetUnavailableError, match='not prepared'):
    input_pipeline.load_split('cifar10', 'train', str(tmp_path))
  with pytest.raises(input_pipeline.DatasetUnavailableError, match="unknown data set 'cifar11'"):
    input_pipeline.load_split('cifar11', 'train', str(tmp_path))


def test_slices_of_a_split_read_its_examples_and_say_what_they_share(tiny_data_dir):
  images, labels = input_pipeline.load_split('cifar10_folder', 'train', tiny_data_dir)
  n = len(labels)
  read = {s: input_pipeline.open_split('cifar10_folder', s, tiny_data_dir)
          for s in ('train', 'train[:60]', 'train[60:]', 'train[:25%]', 'train[50:]+test')}
  for split, rows in (('train[:60]', slice(0, 60)), ('train[60:]', slice(60, n)),
                      ('train[:25%]', slice(0, n // 4))):
    got = read[split].read(np.arange(len(read[split])))
    np.testing.assert_array_equal(got['image'], images[rows])
    np.testing.assert_array_equal(got['label'], labels[rows])
  assert len(read['train[50:]+test']) == n - 50 + 10 * conftest.TEST_PER_CLASS
  shared = input_pipeline.shared_examples
  assert shared(read['train[:60]'], read['train[60:]']) == 0  # a held-out set
  assert shared(read['train'], read['train[60:]']) == n - 60
  assert shared(read['train[:60]'], read['train[50:]+test']) == 10  # only train[50:60]
  assert shared(read['train[:25%]'], _reader(4)) == 0  # a source that cannot say


@pytest.mark.parametrize('split, match', [
    ('tset', "'cifar10_folder' has no split 'tset' (Unknown split 'tset'. Should be one of "
             "['train', 'test'].); it has {'train': 80, 'test': 20}, and slices"),
    ('train[abc]', "has no split 'train[abc]' (Error parsing split"),
    ('train[:0]', "split 'train[:0]' of 'cifar10_folder' is empty"),
    ('train[90:]', "has no split 'train[90:]' (Requested slice [90:80] incompatible with 80 "
                   "examples.)"),
    ('train[10:5]', "split 'train[10:5]' of 'cifar10_folder' is empty"),
])
def test_a_bad_split_names_the_splits_there_are(tiny_data_dir, split, match):
  with pytest.raises(input_pipeline.DatasetUnavailableError, match=re.escape(match)):
    input_pipeline.open_split('cifar10_folder', split, tiny_data_dir)


_READ_WITHOUT_TF = '''
import importlib.machinery, sys
class Hide(importlib.machinery.PathFinder):
  @classmethod
  def find_spec(cls, name, path=None, target=None):
    if name.split('.')[0] == 'tensorflow':
      return None
    return importlib.machinery.PathFinder.find_spec(name, path, target)
sys.meta_path[:] = [Hide if f is importlib.machinery.PathFinder else f for f in sys.meta_path]
from hybrid_flax import input_pipeline
images, labels = input_pipeline.load_split('cifar10_folder', 'train', sys.argv[1])
assert 'tensorflow' not in sys.modules
print(images.shape, labels.sum())
'''


def test_training_data_reads_without_tensorflow(tiny_data_dir):
  proc = subprocess.run([sys.executable, '-c', _READ_WITHOUT_TF, tiny_data_dir],
                        capture_output=True, text=True, timeout=120, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  n = 10 * conftest.TRAIN_PER_CLASS
  assert proc.stdout.split() == ['(%d,' % n, '32,', '32,', '3)', str(sum(range(10)) *
                                                                    conftest.TRAIN_PER_CLASS)]


# A stand-in for TensorFlow that records what is asked of its device configuration.
_FAKE_TENSORFLOW = '''
class config:
  calls = []

  @staticmethod
  def set_visible_devices(devices, kind):
    config.calls.append((devices, kind))
'''

_HIDE_THEN_IMPORT = '''
import sys
from hybrid_flax import input_pipeline
input_pipeline.hide_gpus_from_tensorflow()
input_pipeline.hide_gpus_from_tensorflow()
assert 'tensorflow' not in sys.modules, 'imported only to hide the GPUs'
import tensorflow
print(tensorflow.config.calls)
input_pipeline.hide_gpus_from_tensorflow()
print(tensorflow.config.calls)
'''


def test_gpus_are_hidden_from_tensorflow_once_something_imports_it(tmp_path):
  (tmp_path / 'tensorflow').mkdir()
  (tmp_path / 'tensorflow' / '__init__.py').write_text(_FAKE_TENSORFLOW)
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  proc = subprocess.run([sys.executable, '-c', _HIDE_THEN_IMPORT], capture_output=True, text=True,
                        timeout=120, check=False,
                        env={**os.environ, 'PYTHONPATH': os.pathsep.join([str(tmp_path), repo])})
  assert proc.returncode == 0, proc.stderr[-3000:]
  # Hidden once on import (two calls before it add one hook), then again when asked after it.
  assert proc.stdout.splitlines() == ["[([], 'GPU')]", "[([], 'GPU'), ([], 'GPU')]"]


class _Source:
  """The random-access protocol of a TFDS data source; example i's image and label are i."""

  def __init__(self, n):
    self.n, self.reads = n, []

  def __len__(self):
    return self.n

  def __getitems__(self, indices):
    self.reads.extend(indices)
    return [{'image': np.full((1,), i, np.uint8), 'label': i} for i in indices]


def _reader(n):
  return input_pipeline.SplitReader(_Source(n), image_shape=(1,))


def _stream(n, batch_size, start_step, num_steps, seed=0, rows=None, reader=None):
  rows = np.arange(batch_size) if rows is None else rows
  return [b['label'] for b in input_pipeline.train_batches(
      reader or _reader(n), batch_size=batch_size, seed=seed, start_step=start_step,
      num_steps=num_steps, rows=rows)]


def test_each_epoch_is_a_seeded_permutation_of_the_training_set():
  batches = _stream(n=50, batch_size=8, start_step=0, num_steps=12)  # 6 steps/epoch, 2 left out
  epoch0, epoch1 = np.concatenate(batches[:6]), np.concatenate(batches[6:])
  assert len(set(epoch0)) == 48 and len(set(epoch1)) == 48
  assert not np.array_equal(epoch0, epoch1)
  assert not np.array_equal(batches[0], _stream(50, 8, 0, 1, seed=1)[0])


def test_stream_resumed_at_any_step_matches_the_uninterrupted_stream():
  full = _stream(n=50, batch_size=8, start_step=0, num_steps=20)
  for start in (1, 5, 6, 13):
    resumed = _stream(n=50, batch_size=8, start_step=start, num_steps=20)
    for a, b in zip(full[start:], resumed, strict=True):
      np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize('rows', [np.arange(8), np.arange(4, 8)])
def test_index_batches_name_the_examples_the_host_pipeline_reads(rows):
  # config.data_on_device gathers these indices from the split on the device.
  host = _stream(n=50, batch_size=8, start_step=3, num_steps=15, rows=rows)
  indices = [b['index'] for b in input_pipeline.train_index_batches(
      50, batch_size=8, seed=0, start_step=3, num_steps=15, rows=rows)]
  assert len(indices) == len(host) == 12
  for idx, labels in zip(indices, host):  # example i's label is i
    assert idx.dtype == np.int32
    np.testing.assert_array_equal(idx, labels)


@pytest.mark.parametrize('processes', [2, 4])
def test_processes_read_disjoint_rows_that_make_up_the_one_process_batches(processes):
  n, batch, steps = 50, 8, 12  # 6 steps per epoch: two epochs
  single = _stream(n, batch, 0, steps)
  per = batch // processes
  readers = [_reader(n) for _ in range(processes)]
  parts = [_stream(n, batch, 0, steps, rows=np.arange(p * per, (p + 1) * per), reader=r)
           for p, r in enumerate(readers)]
  for step in range(steps):  # the same global batch, row for row, whatever the process count
    np.testing.assert_array_equal(np.concatenate([part[step] for part in parts]), single[step])
  # Epoch 1: each process read exactly the examples of its rows, none twice, none another's.
  first = [set(np.concatenate(part[:6]).tolist()) for part in parts]
  assert sum(map(len, first)) == len(set().union(*first)) == 48
  for reader, part in zip(readers, parts):
    reads = reader._source.reads  # pylint: disable=protected-access
    assert len(reads) == len(set(reads)) == reader.num_read  # never read twice
    assert set(reads) == set(np.concatenate(part).tolist())  # only what its rows needed


@pytest.mark.parametrize('processes, batch', [(1, 8), (2, 8), (4, 8), (2, 12)])
def test_eval_batches_cover_every_example_once_with_padding_masked(processes, batch):
  n = 23
  per = batch // processes
  seen, count = [], 0
  for p in range(processes):
    reader = _reader(n)
    batches = list(input_pipeline.eval_batches(reader, batch, np.arange(p * per, (p + 1) * per)))
    assert len(batches) == -(-n // batch) and all(len(b['label']) == per for b in batches)
    seen += [b['label'][b['mask'] == 1] for b in batches]
    count += sum(b['mask'].sum() for b in batches)
    assert reader.num_read == sum((b['mask'] == 1).sum() for b in batches)  # no reads for padding
  np.testing.assert_array_equal(np.sort(np.concatenate(seen)), np.arange(n))
  assert count == n


def test_batch_shapes_are_those_of_the_batches_the_pipelines_yield():
  # The steps compile ahead for these shapes; a batch of any other is a TypeError at the call.
  def shapes(batch):
    return {k: (v.shape, v.dtype) for k, v in batch.items()}

  def spec(kind, batch_size):
    reader = _reader(13)
    out = {k: (v.shape, v.dtype)
           for k, v in input_pipeline.batch_shapes(reader, batch_size, kind).items()}
    assert reader.num_read == 0
    return out

  rows = np.arange(4)
  fed = next(input_pipeline.train_batches(_reader(13), batch_size=4, seed=0, start_step=0,
                                          num_steps=1, rows=rows))
  index = next(input_pipeline.train_index_batches(13, batch_size=4, seed=0, start_step=0,
                                                  num_steps=1, rows=rows))
  last_eval = list(input_pipeline.eval_batches(_reader(13), 5, np.arange(5)))[-1]  # padded
  assert spec('train', 4) == shapes(fed)
  assert spec('index', 4) == shapes(index)
  assert spec('eval', 5) == shapes(last_eval)
  reader = _reader(13)
  assert spec('split', 0) == shapes(reader.read(np.arange(13)))


def test_batches_land_sharded_over_the_data_axis():
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # pylint: disable=g-import-not-at-top
  mesh = Mesh(np.asarray(jax.devices()), ('data',))
  sharding = NamedSharding(mesh, P('data'))
  batches = list(input_pipeline.to_device(
      ({'x': np.full((8, 2), i)} for i in range(5)), sharding, prefetch=2))
  assert [int(b['x'][0, 0]) for b in batches] == [0, 1, 2, 3, 4]
  assert batches[0]['x'].sharding == sharding
  assert len(batches[0]['x'].addressable_shards) == jax.device_count() == 4
