"""Decoded splits on disk: the same arrays as decoding, read back only when they are still right."""

import logging
import os
import shutil
import time

import numpy as np
import pytest

from hybrid_flax import input_pipeline
from hybrid_flax import split_cache

NUM_TRAIN = 80  # conftest's tiny zip: 8 training images per class


@pytest.fixture
def cache(tmp_path, monkeypatch):
  root = tmp_path / 'splits'
  monkeypatch.setenv(split_cache.ENV, str(root))
  return root


@pytest.fixture
def data_dir(tmp_path, tiny_data_dir):
  """A copy of the tiny data set that a test may change."""
  return shutil.copytree(tiny_data_dir, tmp_path / 'tfds')


def _entries(root):
  return sorted(p.name for p in root.iterdir()) if root.exists() else []


def _read_all(split, data_dir, cache=True):
  reader = input_pipeline.open_split('cifar10_folder', split, str(data_dir), cache=cache)
  return reader, reader.read(np.arange(len(reader)))


def test_a_split_read_whole_is_read_back_from_the_cache_as_decoded(cache, data_dir):
  decoded, want = _read_all('train', data_dir, cache=False)
  assert not decoded.from_cache and _entries(cache) == []
  first, got = _read_all('train', data_dir)
  assert not first.from_cache and first.num_read == NUM_TRAIN
  assert len(_entries(cache)) == 1
  second, again = _read_all('train', data_dir)
  assert second.from_cache and second.num_read == 0
  for batch in got, again:
    np.testing.assert_array_equal(batch['image'], want['image'])
    np.testing.assert_array_equal(batch['label'], want['label'])
    assert batch['image'].dtype == np.uint8 and batch['label'].dtype == np.int32
  idx = np.array([5, 3, 5, 79])  # any order, repeats: as the reader that decodes gives them
  np.testing.assert_array_equal(second.read(idx)['image'], want['image'][idx])
  # The test split is an entry of its own.
  _read_all('test', data_dir)
  assert len(_entries(cache)) == 2
  assert _read_all('test', data_dir)[0].from_cache


def test_slices_naming_the_same_examples_share_an_entry_and_others_do_not(cache, data_dir):
  _, want = _read_all('train', data_dir, cache=False)
  _read_all('train[:40]', data_dir)
  reader, got = _read_all('train[:50%]', data_dir)
  assert reader.from_cache and len(_entries(cache)) == 1
  np.testing.assert_array_equal(got['image'], want['image'][:40])
  reader, got = _read_all('train[40:]', data_dir)
  assert not reader.from_cache and len(_entries(cache)) == 2
  np.testing.assert_array_equal(got['image'], want['image'][40:])


def test_only_a_split_read_whole_is_saved(cache, data_dir):
  reader = input_pipeline.open_split('cifar10_folder', 'train', str(data_dir))
  reader.read(np.arange(NUM_TRAIN - 1))
  reader.read(np.arange(NUM_TRAIN - 1))  # read again: still one example short
  assert _entries(cache) == []
  reader.read(np.array([NUM_TRAIN - 1]))
  assert len(_entries(cache)) == 1


def test_a_changed_data_set_misses(cache, data_dir):
  _read_all('train', data_dir)
  record = next(p for p in data_dir.rglob('*train.array_record*'))
  st = record.stat()
  os.utime(record, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # as a re-import would
  assert not _read_all('train', data_dir)[0].from_cache
  assert len(_entries(cache)) == 2


def test_a_damaged_entry_is_decoded_again_and_replaced(cache, data_dir, caplog):
  _, want = _read_all('train', data_dir)
  (entry,) = _entries(cache)
  image = cache / entry / 'image.npy'
  image.write_bytes(image.read_bytes()[:1000])
  reader, got = _read_all('train', data_dir)
  assert not reader.from_cache and 'Removing the split cache entry' in caplog.text
  np.testing.assert_array_equal(got['image'], want['image'])
  reader, got = _read_all('train', data_dir)  # the reader above saved it anew
  assert reader.from_cache and _entries(cache) == [entry]
  np.testing.assert_array_equal(got['image'], want['image'])


def test_empty_variable_turns_the_cache_off(monkeypatch, data_dir, caplog, tmp_path):
  caplog.set_level(logging.INFO)
  monkeypatch.setenv(split_cache.ENV, '')
  monkeypatch.setenv('HYBRID_FLAX_CACHE', str(tmp_path / 'home'))
  reader, _ = _read_all('train', data_dir)
  assert not reader.from_cache and not (tmp_path / 'home').exists()
  assert 'no split cache' in caplog.text


def test_default_folder_is_under_hybrid_flax_cache(monkeypatch, tmp_path):
  monkeypatch.delenv(split_cache.ENV, raising=False)
  monkeypatch.setenv('HYBRID_FLAX_CACHE', str(tmp_path))
  assert split_cache.directory() == str(tmp_path / 'splits')


def test_an_unwritable_cache_only_warns(tmp_path, monkeypatch, data_dir, caplog):
  blocker = tmp_path / 'a-file'
  blocker.write_text('')
  monkeypatch.setenv(split_cache.ENV, str(blocker / 'splits'))
  reader, got = _read_all('train', data_dir)
  assert got['image'].shape == (NUM_TRAIN, 32, 32, 3)
  assert 'Could not save the decoded split' in caplog.text


def test_least_recently_used_entries_go_past_the_limit(cache, data_dir, monkeypatch):
  _read_all('train[:40]', data_dir)
  (old,) = (cache / n for n in _entries(cache))
  _read_all('train[40:]', data_dir)
  (new,) = (cache / n for n in _entries(cache) if cache / n != old)
  os.utime(old, (1, 1))
  os.utime(new, (2, 2))
  assert _read_all('train[:40]', data_dir)[0].from_cache  # a hit makes it the most recent
  partial = cache / '.partial-crashed'
  partial.mkdir()
  os.utime(partial, (time.time() - 7200,) * 2)
  one_entry = sum(f.stat().st_size for f in old.iterdir())
  monkeypatch.setattr(split_cache, 'MAX_BYTES', 2 * one_entry)
  _read_all('test', data_dir)  # a third entry, ~1/4 the size of the others
  assert old.exists() and not new.exists() and not partial.exists()
  assert len(_entries(cache)) == 2


def test_a_data_set_whose_files_cannot_be_listed_is_not_cached(cache):
  assert split_cache.entry('gs://bucket/cifar10/3.0.2', 'cifar10', [('train', range(10))],
                           (32, 32, 3)) is None
