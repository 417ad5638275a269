"""TFDS builder for a CIFAR-10 copy laid out as image files: `{train,test}/<class>/*.{png,jpg}`.

The source may be a folder or a zip (such as the JPEG re-encoding in ../shared/data). Image bytes
are stored as they are, never re-encoded, so a JPEG copy stays compact and takes no second lossy
pass. Every file is checked to decode as a 32x32 RGB image before anything is written; TFDS
builds into a temporary folder and only renames it into place on success, so a failed import
leaves no partial data set.
"""

import io
import os
import re
import zipfile
from collections.abc import Iterator

import tensorflow_datasets as tfds
from PIL import Image

from hybrid_flax import input_pipeline

NAME = 'cifar10_folder'
CLASSES = input_pipeline.CIFAR10_CLASSES
SPLITS = ('train', 'test')
_IMAGE_RE = re.compile(r'(?:^|/)(train|test)/([^/]+)/([^/]+\.(?:png|jpe?g))$', re.IGNORECASE)


class SourceError(ValueError):
  """The source is missing, corrupt, or not laid out as `{train,test}/<class>/<image>`."""


def _list_images(source: str) -> list[str]:
  """Relative paths of every file under a folder, or every member of a zip."""
  if not os.path.exists(source):
    raise SourceError(f'import source {source} does not exist')
  if os.path.isdir(source):
    names = []
    for root, dirs, files in os.walk(source):
      dirs[:] = sorted(d for d in dirs if not d.startswith('.'))
      rel = os.path.relpath(root, source)
      names += [f if rel == '.' else f'{rel}/{f}'.replace(os.sep, '/') for f in sorted(files)]
    return names
  if not zipfile.is_zipfile(source):
    raise SourceError(f'{source} is neither a folder nor a readable zip file (truncated or '
                       'corrupt?)')
  try:
    with zipfile.ZipFile(source) as zf:
      return [n for n in zf.namelist() if not n.endswith('/')]
  except (zipfile.BadZipFile, OSError) as e:
    raise SourceError(f'{source}: cannot read the zip ({e})') from e


def scan_source(source: str) -> dict[str, list[tuple[str, str]]]:
  """Maps split -> sorted [(relative path, class name)], checking the layout and class names."""
  by_split = {s: [] for s in SPLITS}
  for name in _list_images(source):
    if '__MACOSX' in name or os.path.basename(name).startswith('.'):
      continue
    m = _IMAGE_RE.search(name)
    if m:
      by_split[m.group(1).lower()].append((name, m.group(2)))
  for split, items in by_split.items():
    if not items:
      raise SourceError(f'{source}: no images found under {split}/<class>/ (expected the layout '
                         '{train,test}/<class>/*.{png,jpg})')
    found = sorted({c for _, c in items})
    if sorted(found) != sorted(CLASSES):
      missing = sorted(set(CLASSES) - set(found))
      unexpected = sorted(set(found) - set(CLASSES))
      raise SourceError(
          f'{source}: {split}/ has {len(found)} class folders, CIFAR-10 needs exactly the 10 '
          f'classes {list(CLASSES)} (missing: {missing}, unexpected: {unexpected})')
    items.sort()
  return by_split


def _read_checked(reader, name: str, source: str) -> bytes:
  try:
    data = reader(name)
  except (zipfile.BadZipFile, OSError, EOFError) as e:
    raise SourceError(f'{source}: cannot read {name} ({e})') from e
  try:
    with Image.open(io.BytesIO(data)) as img:
      img.load()
      size, mode = img.size, img.mode
  except Image.UnidentifiedImageError as e:
    raise SourceError(f'{source}: {name} is not a decodable image (unknown format)') from e
  except Exception as e:  # Pillow raises many types for truncated or corrupt data
    raise SourceError(f'{source}: {name} is not a decodable image ({e})') from e
  if size != (32, 32) or mode != 'RGB':
    raise SourceError(f'{source}: {name} is {size[0]}x{size[1]} {mode}, CIFAR-10 images are '
                       '32x32 RGB')
  return data


class Cifar10Folder(tfds.core.GeneratorBasedBuilder):
  """CIFAR-10 imported from a folder or zip of image files."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Image bytes stored as found in the source.'}

  def __init__(self, *, source: str | None = None, **kwargs):
    self._source = source
    # Scanned here so a bad layout fails before TFDS creates any folder.
    self._items = scan_source(source) if source else None
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=('CIFAR-10 imported from image files'
                     + (f' ({os.path.basename(self._source)})' if self._source else '')
                     + '. A re-encoded copy (e.g. JPEG) is close to, not the same as, the '
                     'official CIFAR-10: report accuracy on it as measured on the copy.'),
        features=tfds.features.FeaturesDict({
            'id': tfds.features.Text(),
            'image': tfds.features.Image(shape=(32, 32, 3)),
            'label': tfds.features.ClassLabel(names=list(CLASSES)),
        }),
        supervised_keys=('image', 'label'),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing is downloaded: the source is local.
    if not self._source:
      raise SourceError(f'{NAME} is built from a local copy: pass source=PATH')
    return {split: self._generate_examples(items) for split, items in self._items.items()}

  def _generate_examples(self, items) -> Iterator[tuple[str, dict]]:
    source = self._source
    if os.path.isdir(source):
      def read(name):
        with open(os.path.join(source, name), 'rb') as f:
          return f.read()
      yield from self._examples(items, read)
    else:
      with zipfile.ZipFile(source) as zf:
        yield from self._examples(items, zf.read)

  def _examples(self, items, reader):
    for name, label in items:
      yield name, {'id': name, 'image': _read_checked(reader, name, self._source), 'label': label}
