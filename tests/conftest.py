"""Test setup: 4 fake CPU devices so the sharded code paths run without a GPU."""

import os

# XLA's backend optimisation level for the tests' programs, unless XLA_FLAGS names one: 0 skips
# LLVM's optimisations of XLA's generated code, which were most of the compile time of the
# tests' tiny programs (the whole suite 1156 s -> 888 s on a 2-core Zen 3). Every number a test
# compares comes from programs compiled under the same flags; the C++ kernels are g++'s -O3
# builds either way, and outside the tests launches, the benchmark and the tools keep XLA's
# default.
# `XLA_FLAGS=--xla_backend_optimization_level=3 pytest ...` tests at that level instead.
_OPT_LEVEL = '--xla_backend_optimization_level'


def xla_flags(devices: int) -> str:
  """XLA_FLAGS for a test process with `devices` fake CPU devices: this process's flags (the
  user's, where conftest set them already), the test optimisation level unless they name one,
  and the device count."""
  flags = [f for f in os.environ.get('XLA_FLAGS', '').split()
           if not f.startswith('--xla_force_host_platform_device_count')]
  if not any(f.startswith(_OPT_LEVEL) for f in flags):
    flags.append(f'{_OPT_LEVEL}=0')
  return ' '.join(flags + [f'--xla_force_host_platform_device_count={devices}'])


# Before JAX initialises its backend: every test sees 4 CPU devices.
os.environ['XLA_FLAGS'] = xla_flags(4)
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import atexit  # pylint: disable=g-import-not-at-top,wrong-import-position,wrong-import-order
import shutil  # pylint: disable=g-import-not-at-top,wrong-import-position,wrong-import-order
import tempfile  # pylint: disable=g-import-not-at-top,wrong-import-position,wrong-import-order


def _session_folder(variable: str, prefix: str) -> str:
  """A temporary folder of this test session, named by $`variable`. Under pytest-xdist the
  workers inherit it from the process that made it, which alone removes it at exit."""
  folder = os.environ.get(variable)
  if folder is None:
    folder = tempfile.mkdtemp(prefix=prefix)
    os.environ[variable] = folder
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
  return folder


# Most subprocess tests launch the tiny config again and again (killed, resumed, stopped):
# compile each program once per session, in this process and every one it starts. The cache
# lives in this session's temporary folder only, so it never outlives the code it was compiled
# from. Without XLA's own (GPU autotuning) caches the keys do not depend on the folder's path,
# so a copy of the cache hits too, and a program one xdist worker compiled is a hit in the other.
JIT_CACHE = _session_folder('HYBRID_FLAX_TESTS_JIT_CACHE', 'hybrid-flax-tests-jit-cache-')
os.environ['JAX_COMPILATION_CACHE_DIR'] = JIT_CACHE
os.environ['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'] = '0'
os.environ['JAX_PERSISTENT_CACHE_ENABLE_XLA_CACHES'] = 'none'
# Decoded splits too: never into the user's cache.
from hybrid_flax import split_cache  # pylint: disable=g-import-not-at-top,wrong-import-position

os.environ[split_cache.ENV] = _session_folder('HYBRID_FLAX_TESTS_SPLIT_CACHE',
                                              'hybrid-flax-tests-split-cache-')

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position

jax.config.update('jax_platforms', 'cpu')

import io  # pylint: disable=g-import-not-at-top,wrong-import-position,wrong-import-order
import zipfile  # pylint: disable=g-import-not-at-top,wrong-import-position,wrong-import-order

import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position
import pytest  # pylint: disable=g-import-not-at-top,wrong-import-position
from PIL import Image  # pylint: disable=g-import-not-at-top,wrong-import-position

CLASSES = ('airplane', 'automobile', 'bird', 'cat', 'deer', 'dog', 'frog', 'horse', 'ship',
           'truck')
TRAIN_PER_CLASS, TEST_PER_CLASS = 8, 2


def needs_kernels():
  """The skip marker of the C++ kernels' tests (hybrid_flax/csrc): they skip where the kernels
  cannot be built or loaded, except under HYBRID_FLAX_REQUIRE_ONEDNN=1 (CI on x86-64 Linux,
  which installs the oneDNN extra), where that is an error, so they cannot pass by skipping."""
  from hybrid_flax import onednn_conv  # pylint: disable=g-import-not-at-top
  reason = onednn_conv.unavailable_reason()
  if os.environ.get('HYBRID_FLAX_REQUIRE_ONEDNN') == '1' and reason:
    raise RuntimeError(f'HYBRID_FLAX_REQUIRE_ONEDNN=1 but the C++ kernels cannot run: {reason}')
  return pytest.mark.skipif(reason is not None, reason=f'C++ kernels unavailable: {reason}')


def class_image(label: int, index: int, fmt: str = 'JPEG') -> bytes:
  """A 32x32 image whose colour and stripe encode its class: learnable in a few steps."""
  rng = np.random.default_rng((label, index))
  img = rng.integers(0, 60, (32, 32, 3)).astype(np.uint8)
  img[..., label % 3] += np.uint8(120)
  img[:, (label * 3):(label * 3) + 3] = 255
  buf = io.BytesIO()
  Image.fromarray(img).save(buf, format=fmt, quality=90)
  return buf.getvalue()


def write_cifar_zip(path, train_per_class=TRAIN_PER_CLASS, test_per_class=TEST_PER_CLASS,
                    classes=CLASSES, extra=None):
  """A zip laid out cifar10/{train,test}/<class>/NNNN.jpg like ../shared/data's copy."""
  with zipfile.ZipFile(path, 'w') as zf:
    for split, n in (('train', train_per_class), ('test', test_per_class)):
      for label, name in enumerate(classes):
        for i in range(n):
          zf.writestr(f'cifar10/{split}/{name}/{i:04d}.jpg', class_image(label, i))
    for name, data in (extra or {}).items():
      zf.writestr(name, data)
  return str(path)


@pytest.fixture(scope='session')
def tiny_zip(tmp_path_factory):
  return write_cifar_zip(tmp_path_factory.mktemp('src') / 'tiny-cifar.zip')


@pytest.fixture(scope='session')
def tiny_data_dir(tmp_path_factory, tiny_zip):
  """A TFDS data dir holding `cifar10_folder` imported from `tiny_zip` by the real import."""
  from hybrid_flax import import_data  # pylint: disable=g-import-not-at-top
  data_dir = str(tmp_path_factory.mktemp('tfds'))
  assert import_data.import_source(tiny_zip, data_dir) == 'cifar10_folder'
  return data_dir


# The files that take longest, longest first (seconds of their tests over 3 s, summed, in a
# 2-core Zen 3 run of the whole suite: 338, 173, 164, 116, 78, 71, 63, 48). Under `-n auto
# --dist loadfile` pytest-xdist hands out whole files in this order, so the long ones start at
# once and the short ones fill in at the end, instead of a long file starting last while the
# other worker idles.
_LONGEST_FIRST = ('test_launch.py', 'test_distributed.py', 'test_recipe.py', 'test_models.py',
                  'test_tools.py', 'test_train.py', 'test_bench.py', 'test_csrc_asan.py')


def pytest_configure(config):
  # xdist would otherwise reorder the files by their number of tests, which for these files is
  # no measure of their time (test_distributed.py: 7 tests, the second longest). This overrides
  # a --loadscope-reorder given on the command line too.
  if hasattr(config.option, 'loadscopereorder'):
    config.option.loadscopereorder = False


def pytest_collection_modifyitems(items):
  def rank(item):
    name = item.path.name
    return _LONGEST_FIRST.index(name) if name in _LONGEST_FIRST else len(_LONGEST_FIRST)
  items.sort(key=rank)  # stable: each file keeps its own order
