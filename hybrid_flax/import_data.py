r"""Imports a local copy of CIFAR-10 into a TFDS data dir, for machines without network access.

  python -m hybrid_flax.import_data --source cifar-10-binary.tar.gz [--data_dir DIR]
      The official archive. Builds TFDS's own `cifar10` data set from it; TFDS verifies the
      archive against its registered checksum.
  python -m hybrid_flax.import_data --source ../shared/data/cifar10-jpeg.zip [--data_dir DIR]
      A zip or folder laid out {train,test}/<class>/*.{png,jpg}. Builds `cifar10_folder`;
      train on it with --config.dataset=cifar10_folder.

Building needs TensorFlow (the `prepare` extra); training on the result does not.
"""

import os
import shutil
import sys
import tempfile

from absl import app
from absl import flags
from absl import logging

from hybrid_flax import input_pipeline

OFFICIAL_ARCHIVE = 'cifar-10-binary.tar.gz'

_SOURCE = flags.DEFINE_string('source', None, 'Archive, zip or folder to import.', required=True)
_DATA_DIR = flags.DEFINE_string('data_dir', '', "TFDS data dir ('' = TFDS's default).")
_OVERWRITE = flags.DEFINE_bool('overwrite', False, 'Rebuild even if the data set exists.')


def import_source(source: str, data_dir: str | None = None, overwrite: bool = False) -> str:
  """Builds the TFDS data set for `source` in `data_dir`; returns the data set's name."""
  input_pipeline.hide_gpus_from_tensorflow()
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from hybrid_flax import cifar10_folder  # pylint: disable=g-import-not-at-top

  data_dir = data_dir or None
  source = os.path.abspath(os.path.expanduser(source))
  if not os.path.exists(source):
    raise cifar10_folder.SourceError(f'import source {source} does not exist')
  official = source.endswith(('.tar.gz', '.tgz'))
  if official:
    builder = tfds.builder('cifar10', data_dir=data_dir, file_format='array_record')
  else:
    builder = cifar10_folder.Cifar10Folder(source=source, data_dir=data_dir,
                                           file_format='array_record')
  if builder.is_prepared() and not overwrite:
    logging.info('%s is already prepared in %s (pass --overwrite to rebuild)', builder.name,
                 builder.data_dir)
    return builder.name
  # TFDS builds into a temporary folder and renames it on success, but leaves the empty folders
  # it made on the way: a failed import removes what it created and puts back what it replaced.
  root = os.path.dirname(os.path.dirname(builder.data_dir))
  made = [p for p in (os.path.join(root, builder.name), os.path.join(root, 'downloads'), root)
          if not os.path.exists(p)]
  previous = None
  if builder.is_prepared():
    previous = builder.data_dir + '.previous'
    shutil.rmtree(previous, ignore_errors=True)
    os.rename(builder.data_dir, previous)
  try:
    _build(builder, source, official)
  except BaseException:
    for path in made:
      shutil.rmtree(path, ignore_errors=True)
    if previous:
      shutil.rmtree(builder.data_dir, ignore_errors=True)
      os.rename(previous, builder.data_dir)
    raise
  if previous:
    shutil.rmtree(previous)
  logging.info('Imported %s into %s: %s', source, builder.data_dir,
               {k: v.num_examples for k, v in builder.info.splits.items()})
  return builder.name


def _build(builder, source: str, official: bool) -> None:
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from hybrid_flax import cifar10_folder  # pylint: disable=g-import-not-at-top
  if official:
    # TFDS looks in manual_dir for a file named as in its download URL and checks its checksum.
    with tempfile.TemporaryDirectory() as manual_dir:
      os.symlink(source, os.path.join(manual_dir, OFFICIAL_ARCHIVE))
      try:
        builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
      except tfds.core.download.download_manager.NonMatchingChecksumError as e:
        raise cifar10_folder.SourceError(
            f'{source} is not the official {OFFICIAL_ARCHIVE}: its checksum does not match the '
            'one TFDS registered (a re-packed or truncated archive? import an image folder or '
            'zip instead)') from e
  else:
    builder.download_and_prepare()


def main(argv):
  del argv
  from hybrid_flax import cifar10_folder  # pylint: disable=g-import-not-at-top
  try:
    name = import_source(_SOURCE.value, _DATA_DIR.value, _OVERWRITE.value)
  except cifar10_folder.SourceError as e:
    sys.exit(f'import failed: {e}')
  hint = '' if name == 'cifar10' else f' --config.dataset={name}'
  data_dir = f' --config.data_dir={_DATA_DIR.value}' if _DATA_DIR.value else ''
  print(f'Imported as TFDS data set {name!r}. Train with:\n'
        f'  python launch.py --config configs/cifar_hybrid.py --workdir DIR{hint}{data_dir}')


if __name__ == '__main__':
  app.run(main)
