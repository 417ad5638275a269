"""The entry points' re-execution with glibc's huge-page tunable (hybrid_flax/host_memory.py)."""

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
host_memory.reexec_with_huge_pages()
print('after', os.getpid(), os.environ.get('GLIBC_TUNABLES'), sys.argv[1:], host_memory.status())
'''


@pytest.fixture
def supported(monkeypatch):
  monkeypatch.setattr(host_memory, '_glibc_version', lambda: (2, 36))
  monkeypatch.setattr(host_memory, '_kernel_allows_huge_pages', lambda: True)


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
  assert not host_memory.wanted({})


def test_environment_adds_the_tunable_to_the_ones_set():
  env = host_memory.environment({'GLIBC_TUNABLES': 'glibc.malloc.arena_max=2', 'A': 'b'})
  assert env == {'GLIBC_TUNABLES': 'glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1', 'A': 'b'}
  assert host_memory.environment({}) == {'GLIBC_TUNABLES': 'glibc.malloc.hugetlb=1'}


def test_status_names_the_page_size(monkeypatch):
  monkeypatch.setenv('GLIBC_TUNABLES', 'glibc.malloc.hugetlb=1')
  assert 'transparent huge pages' in host_memory.status()
  monkeypatch.delenv('GLIBC_TUNABLES')
  monkeypatch.setenv(host_memory.OPT_OUT, '0')
  assert '4 KiB pages (HYBRID_FLAX_HUGE_PAGES=0)' in host_memory.status()


def _run_child(**env):
  return subprocess.run([sys.executable, '-c', _CHILD, 'x', '--flag=1'], capture_output=True,
                        text=True, timeout=120, env={**os.environ, **env}, check=True).stdout


@pytest.mark.skipif(not host_memory.wanted(), reason='needs Linux, glibc >= 2.35 and THP')
def test_reexecutes_once_in_the_same_process_with_the_same_arguments(monkeypatch):
  monkeypatch.delenv('GLIBC_TUNABLES', raising=False)
  monkeypatch.delenv(host_memory.OPT_OUT, raising=False)
  lines = _run_child().splitlines()
  # Started twice (before and after the exec), finished once, with the same pid throughout.
  assert [line.split()[0] for line in lines] == ['start', 'start', 'after'], lines
  pids = {line.split()[1] for line in lines}
  assert len(pids) == 1, lines
  assert "glibc.malloc.hugetlb=1 ['x', '--flag=1'] host malloc: transparent huge pages" in lines[2]


def test_opting_out_runs_the_process_once_as_it_is():
  lines = _run_child(**{host_memory.OPT_OUT: '0'}).splitlines()
  assert [line.split()[0] for line in lines] == ['start', 'after'], lines
  assert 'host malloc: 4 KiB pages' in lines[1]
