"""The entry points' re-execution with tcmalloc or huge pages (hybrid_flax/host_memory.py)."""

import os
import subprocess
import sys

import pytest

from hybrid_flax import host_memory

# Prints what the re-executed process sees: its pid, its tunables and its arguments.
_CHILD = '''
import os, sys
print('start', os.getpid(), flush=True)
from hybrid_flax import host_memory
host_memory.reexec_with_fast_malloc()
print('after', os.getpid(), sys.argv[1:], host_memory.status())
'''


_TCMALLOC = 'libtcmalloc_minimal.so.4'


@pytest.fixture
def supported(monkeypatch):
  monkeypatch.setattr(host_memory, '_glibc_version', lambda: (2, 36))
  monkeypatch.setattr(host_memory, '_kernel_allows_huge_pages', lambda: True)
  monkeypatch.setattr(host_memory, '_find_tcmalloc', lambda: None)


@pytest.fixture
def tcmalloc(supported, monkeypatch):
  monkeypatch.setattr(host_memory, '_find_tcmalloc', lambda: _TCMALLOC)


def test_wanted_on_a_new_enough_glibc_unless_set_or_opted_out(supported):
  assert host_memory.wanted({})
  assert host_memory.wanted({'GLIBC_TUNABLES': 'glibc.malloc.arena_max=2'})
  assert not host_memory.wanted({'GLIBC_TUNABLES': 'glibc.malloc.hugetlb=0'})  # the user's call
  assert not host_memory.wanted({host_memory.OPT_OUT: '0'})
  assert host_memory.wanted({host_memory.OPT_OUT: '1'})


@pytest.mark.parametrize('glibc, kernel', [((2, 34), True), (None, True), ((2, 36), False)])
def test_not_wanted_without_the_tunable_or_huge_pages(monkeypatch, glibc, kernel):
  monkeypatch.setattr(host_memory, '_glibc_version', lambda: glibc)
  monkeypatch.setattr(host_memory, '_kernel_allows_huge_pages', lambda: kernel)
  monkeypatch.setattr(host_memory, '_find_tcmalloc', lambda: None)
  assert not host_memory.wanted({})


def test_environment_adds_the_tunable_to_the_ones_set(supported):
  env = host_memory.environment({'GLIBC_TUNABLES': 'glibc.malloc.arena_max=2', 'A': 'b'})
  assert env == {'GLIBC_TUNABLES': 'glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1', 'A': 'b'}
  assert host_memory.environment({}) == {'GLIBC_TUNABLES': 'glibc.malloc.hugetlb=1'}


def test_tcmalloc_is_preloaded_where_installed_unless_there_or_opted_out(tcmalloc):
  env = host_memory.environment({'LD_PRELOAD': 'libother.so'})
  assert env == {'LD_PRELOAD': f'libother.so:{_TCMALLOC}',
                 'GLIBC_TUNABLES': 'glibc.malloc.hugetlb=1'}
  assert host_memory.wanted({'GLIBC_TUNABLES': 'glibc.malloc.hugetlb=1'})  # for tcmalloc alone
  done = {'LD_PRELOAD': _TCMALLOC, 'GLIBC_TUNABLES': 'glibc.malloc.hugetlb=1'}
  assert not host_memory.wanted(done)
  assert host_memory.environment(done) == done
  opted_out = {host_memory.TCMALLOC_OPT_OUT: '0'}
  assert 'LD_PRELOAD' not in host_memory.environment(opted_out)
  assert not host_memory.wanted({**opted_out, host_memory.OPT_OUT: '0'})


def test_status_names_the_malloc_and_the_page_size(monkeypatch):
  monkeypatch.setenv('LD_PRELOAD', _TCMALLOC)
  monkeypatch.setattr(host_memory, '_tcmalloc_loaded', lambda: True)
  assert host_memory.status() == f'host malloc: tcmalloc (LD_PRELOAD={_TCMALLOC})'
  monkeypatch.setattr(host_memory, '_tcmalloc_loaded', lambda: False)
  assert 'tcmalloc did not load' in host_memory.status()
  monkeypatch.delenv('LD_PRELOAD')
  monkeypatch.setenv('GLIBC_TUNABLES', 'glibc.malloc.hugetlb=1')
  assert 'transparent huge pages' in host_memory.status()
  monkeypatch.delenv('GLIBC_TUNABLES')
  monkeypatch.setenv(host_memory.OPT_OUT, '0')
  assert '4 KiB pages (HYBRID_FLAX_HUGE_PAGES=0)' in host_memory.status()


def _run_child(**env):
  return subprocess.run([sys.executable, '-c', _CHILD, 'x', '--flag=1'], capture_output=True,
                        text=True, timeout=120, env={**os.environ, **env}, check=True).stdout


_CLEAN = ('GLIBC_TUNABLES', 'LD_PRELOAD', host_memory.OPT_OUT, host_memory.TCMALLOC_OPT_OUT)


@pytest.mark.skipif(not host_memory.wanted({}),
                    reason='needs tcmalloc, or Linux, glibc >= 2.35 and THP')
def test_reexecutes_once_in_the_same_process_with_the_same_arguments(monkeypatch):
  for name in _CLEAN:
    monkeypatch.delenv(name, raising=False)
  lines = _run_child().splitlines()
  # Started twice (before and after the exec), finished once, with the same pid throughout.
  assert [line.split()[0] for line in lines] == ['start', 'start', 'after'], lines
  pids = {line.split()[1] for line in lines}
  assert len(pids) == 1, lines
  # What the parent would set, and the status line naming it.
  expected = host_memory.environment({})
  malloc = (f'tcmalloc (LD_PRELOAD={expected["LD_PRELOAD"]})' if 'LD_PRELOAD' in expected else
            f'transparent huge pages (GLIBC_TUNABLES={expected["GLIBC_TUNABLES"]})')
  assert lines[2].endswith(f"['x', '--flag=1'] host malloc: {malloc}"), lines


def test_opting_out_runs_the_process_once_as_it_is(monkeypatch):
  for name in _CLEAN:
    monkeypatch.delenv(name, raising=False)
  lines = _run_child(**{host_memory.OPT_OUT: '0', host_memory.TCMALLOC_OPT_OUT: '0'}).splitlines()
  assert [line.split()[0] for line in lines] == ['start', 'after'], lines
  assert 'host malloc: 4 KiB pages' in lines[1]
