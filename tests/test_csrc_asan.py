"""The C++ kernels (hybrid_flax/csrc) under AddressSanitizer.

tests/asan/<source>_asan.cc calls one source's functions for a few shapes, on one thread and two,
alone and then from four threads at once, and exits non-zero on the first invalid memory access
(the sanitizer's report) or where a concurrent call's results differ from the lone call's. Why:
Winograd's weight gradient once added its per-thread sums after their scratch was freed. Every
value test passed (alone, the freed memory still held the sums); only training runs with other
threads allocating came out wrong, now and then (docs/benchmark.md).
"""

import os
import subprocess

import pytest

from hybrid_flax import onednn_conv
from tests import conftest

_HARNESSES = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'asan')
_SOURCES = os.path.join(os.path.dirname(os.path.abspath(onednn_conv.__file__)), 'csrc')


def _sanitizer_missing(compiler: str, tmp_path) -> str | None:
  """Why `compiler` cannot build with AddressSanitizer here (no runtime library), or None."""
  probe = tmp_path / 'probe.cc'
  probe.write_text('int main() { return 0; }\n')
  built = subprocess.run([compiler, '-fsanitize=address', str(probe), '-o', str(tmp_path / 'probe')],
                         capture_output=True, text=True, check=False)
  return built.stderr[-300:] if built.returncode else None


@conftest.needs_kernels()
@pytest.mark.parametrize('source', ['winograd', 'attention', 'batch_norm', 'onednn_conv'])
def test_kernels_are_clean_under_address_sanitizer(source, tmp_path):
  (compiler, *includes), link = onednn_conv.toolchain()
  missing = _sanitizer_missing(compiler, tmp_path)
  if missing:
    pytest.skip(f'{compiler} has no AddressSanitizer runtime here: {missing}')
  binary = tmp_path / source
  build = subprocess.run(
      [compiler, '-O1', '-g', '-std=c++17', '-fopenmp', '-pthread', '-fsanitize=address',
       '-fno-omit-frame-pointer', *includes, f'-I{_SOURCES}',
       os.path.join(_HARNESSES, f'{source}_asan.cc'), *link, '-o', str(binary)],
      capture_output=True, text=True, check=False)
  assert build.returncode == 0, build.stderr[-3000:]
  # Leaks are not the question: oneDNN keeps its generated kernels to the end.
  run = subprocess.run([str(binary)], capture_output=True, text=True, check=False, timeout=300,
                       env={**os.environ, 'ASAN_OPTIONS': 'detect_leaks=0'})
  assert run.returncode == 0, run.stdout + run.stderr[-4000:]
  assert run.stdout.endswith('0 results differed from the same call alone\n'), run.stdout
