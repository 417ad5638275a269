"""Backs the process's malloc with transparent huge pages, where Linux and glibc allow it.

Why: XLA's CPU runtime mallocs every step's buffers and frees them when the step ends, and
glibc hands large blocks back to the kernel on free, so each step faults its memory in again,
one 4 KiB page at a time: the CPU-scale config's 26-27-minute runs on the 2-core CPU took
207-222 million minor page faults and 472-512 s of system time (docs/benchmark.md). glibc
2.35+ can ask for 2 MiB pages instead (the `glibc.malloc.hugetlb=1` tunable, with the kernel's
transparent huge pages in `madvise` or `always` mode): ~9x fewer faults and a faster step.
Tunables are read only when a process starts, so the entry points re-execute themselves once
with it set.
Nothing computed changes: only where the memory comes from.
"""

import os
import sys

_TUNABLE_NAME = 'glibc.malloc.hugetlb'
TUNABLE = f'{_TUNABLE_NAME}=1'
OPT_OUT = 'HYBRID_FLAX_HUGE_PAGES'  # set to 0 to keep the process's malloc as it is
_THP_MODE = '/sys/kernel/mm/transparent_hugepage/enabled'
_MIN_GLIBC = (2, 35)  # the first glibc with the hugetlb tunable


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


def wanted(environ=os.environ) -> bool:
  """Whether re-executing with the tunable would change anything here."""
  if environ.get(OPT_OUT) == '0' or _tunable_set(environ):  # opted out, or the user's own value
    return False
  version = _glibc_version()
  return version is not None and version >= _MIN_GLIBC and _kernel_allows_huge_pages()


def environment(environ=os.environ) -> dict[str, str]:
  """`environ` with the tunable added to any GLIBC_TUNABLES already set."""
  env = dict(environ)
  env['GLIBC_TUNABLES'] = ':'.join(t for t in (env.get('GLIBC_TUNABLES'), TUNABLE) if t)
  return env


def reexec_with_huge_pages() -> None:
  """Replaces this process by the same command with the tunable set, when `wanted()`.

  Call first thing in a `__main__` block, before JAX allocates. The same interpreter, options
  and arguments (`sys.orig_argv`) and the same process id, so launchers and signals see no
  difference. Returns (doing nothing) where it does not apply.
  """
  if wanted():
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, sys.orig_argv, environment())


def status() -> str:
  """One line for the log: whether this process's malloc uses huge pages."""
  if _tunable_set(os.environ):
    return f'host malloc: transparent huge pages (GLIBC_TUNABLES={os.environ["GLIBC_TUNABLES"]})'
  if os.environ.get(OPT_OUT) == '0':
    return f'host malloc: 4 KiB pages ({OPT_OUT}=0)'
  return 'host malloc: 4 KiB pages (needs Linux, glibc >= 2.35 and transparent huge pages)'
