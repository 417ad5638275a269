"""Gives the process a malloc that keeps the memory each step frees: tcmalloc where installed,
else glibc's with transparent huge pages.

Why: XLA's CPU runtime mallocs every step's buffers and frees them when the step ends, and
glibc hands large blocks back to the kernel on free, so each step faults its memory in again,
zeroed by the kernel. With 4 KiB pages the CPU-scale config's 26-27-minute runs on the 2-core
CPU took 207-222 million minor page faults and 472-512 s of system time (docs/benchmark.md).
glibc 2.35+ can ask for 2 MiB pages instead (the `glibc.malloc.hugetlb=1` tunable, with the
kernel's transparent huge pages in `madvise` or `always` mode): ~9x fewer faults. That still
leaves each device's one block of temporaries per step (337 MiB at paper width, batch 128, 2
devices), above the largest mmap threshold glibc allows (32 MiB), to be mapped and zeroed anew
every step: 11% of the CPU's samples on the AVX-512 EPYC went to the kernel clearing pages.
gperftools' tcmalloc (`apt-get install libtcmalloc-minimal4`) keeps freed memory for reuse:
the paper-width step 4-10% faster there, the CPU-scale one no slower (docs/benchmark.md). Turning
glibc's own mmap and trimming off instead slowed the CPU-scale step by 3-5%.

Both are set at process start (LD_PRELOAD, GLIBC_TUNABLES), so the entry points re-execute
themselves once with them. Processes they start (the benchmark's PyTorch timing) inherit them.
Nothing computed changes: only where the memory comes from.
"""

import ctypes.util
import functools
import os
import sys

_TUNABLE_NAME = 'glibc.malloc.hugetlb'
TUNABLE = f'{_TUNABLE_NAME}=1'
OPT_OUT = 'HYBRID_FLAX_HUGE_PAGES'  # set to 0 to keep glibc's malloc tunables as they are
TCMALLOC_OPT_OUT = 'HYBRID_FLAX_TCMALLOC'  # set to 0 to keep glibc's malloc
_THP_MODE = '/sys/kernel/mm/transparent_hugepage/enabled'
_MIN_GLIBC = (2, 35)  # the first glibc with the hugetlb tunable
_TCMALLOC_NAMES = ('tcmalloc_minimal', 'tcmalloc')  # gperftools' libraries, either will do


def _glibc_version() -> tuple[int, ...] | None:
  try:
    name, version = os.confstr('CS_GNU_LIBC_VERSION').split()
  except (AttributeError, ValueError, OSError):  # not glibc (musl, macOS, Windows)
    return None
  return tuple(int(part) for part in version.split('.')[:2]) if name == 'glibc' else None


def _kernel_allows_huge_pages() -> bool:
  try:
    with open(_THP_MODE) as f:
      mode = f.read()
  except OSError:
    return False
  return '[always]' in mode or '[madvise]' in mode


def _tunable_set(environ) -> bool:
  return _TUNABLE_NAME in environ.get('GLIBC_TUNABLES', '')


@functools.cache  # asked by wanted() and twice by environment(); each lookup runs ldconfig
def _find_tcmalloc() -> str | None:
  """tcmalloc's library name as the dynamic loader finds it, or None where not installed."""
  for name in _TCMALLOC_NAMES:
    found = ctypes.util.find_library(name)
    if found:
      return found
  return None


def _tcmalloc_preloaded(environ) -> bool:
  return 'tcmalloc' in environ.get('LD_PRELOAD', '')


def tcmalloc_wanted(environ=os.environ) -> bool:
  """Whether to preload tcmalloc: installed, not opted out and not preloaded already."""
  if environ.get(TCMALLOC_OPT_OUT) == '0' or _tcmalloc_preloaded(environ):
    return False
  return _find_tcmalloc() is not None


def huge_pages_wanted(environ=os.environ) -> bool:
  """Whether setting glibc's huge-page tunable would change anything, and glibc takes it."""
  if environ.get(OPT_OUT) == '0' or _tunable_set(environ):  # opted out, or the user's own value
    return False
  version = _glibc_version()
  return version is not None and version >= _MIN_GLIBC and _kernel_allows_huge_pages()


def wanted(environ=os.environ) -> bool:
  """Whether re-executing with either would change anything here."""
  return tcmalloc_wanted(environ) or huge_pages_wanted(environ)


def environment(environ=os.environ) -> dict[str, str]:
  """`environ` with tcmalloc added to LD_PRELOAD and the tunable to GLIBC_TUNABLES, where
  wanted. The tunable goes in with tcmalloc too: it then serves what glibc still allocates."""
  env = dict(environ)
  if tcmalloc_wanted(environ):
    env['LD_PRELOAD'] = ':'.join(p for p in (env.get('LD_PRELOAD'), _find_tcmalloc()) if p)
  if huge_pages_wanted(environ):
    env['GLIBC_TUNABLES'] = ':'.join(t for t in (env.get('GLIBC_TUNABLES'), TUNABLE) if t)
  return env


def reexec_with_fast_malloc() -> None:
  """Replaces this process by the same command with `environment()`, when `wanted()`.

  Call first thing in a `__main__` block, before JAX allocates. The same interpreter, options
  and arguments (`sys.orig_argv`) and the same process id, so launchers and signals see no
  difference. Returns (doing nothing) where it does not apply.
  """
  if wanted():
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, sys.orig_argv, environment())


def _tcmalloc_loaded() -> bool:
  """Whether this process has tcmalloc mapped (a preload the loader could not do is skipped)."""
  try:
    with open('/proc/self/maps') as f:
      return 'tcmalloc' in f.read()
  except OSError:
    return False


def status() -> str:
  """One line for the log: which malloc this process runs, and with which pages."""
  if _tcmalloc_preloaded(os.environ):
    if _tcmalloc_loaded():
      return f'host malloc: tcmalloc (LD_PRELOAD={os.environ["LD_PRELOAD"]})'
    return f'host malloc: glibc\'s, tcmalloc did not load (LD_PRELOAD={os.environ["LD_PRELOAD"]})'
  if _tunable_set(os.environ):
    return f'host malloc: transparent huge pages (GLIBC_TUNABLES={os.environ["GLIBC_TUNABLES"]})'
  if os.environ.get(OPT_OUT) == '0':
    return f'host malloc: 4 KiB pages ({OPT_OUT}=0)'
  return 'host malloc: 4 KiB pages (needs Linux, glibc >= 2.35 and transparent huge pages)'
