"""The test session's own setup (tests/conftest.py): XLA's flags and the order of the files."""

import os

import pytest

from tests import conftest

_TESTS = os.path.dirname(os.path.abspath(__file__))


@pytest.mark.parametrize('user, expected', [
    ('', '--xla_backend_optimization_level=0 --xla_force_host_platform_device_count=2'),
    # The user's flags stay, a device count is replaced, a chosen level is kept.
    ('--xla_cpu_enable_fast_math=false --xla_force_host_platform_device_count=8',
     '--xla_cpu_enable_fast_math=false --xla_backend_optimization_level=0 '
     '--xla_force_host_platform_device_count=2'),
    ('--xla_backend_optimization_level=3',
     '--xla_backend_optimization_level=3 --xla_force_host_platform_device_count=2'),
])
def test_xla_flags_add_the_tests_level_unless_one_is_named(monkeypatch, user, expected):
  monkeypatch.setenv('XLA_FLAGS', user)
  assert conftest.xla_flags(2) == expected
  # Applying it again (an xdist worker inherits the flags conftest set) changes nothing.
  monkeypatch.setenv('XLA_FLAGS', expected)
  assert conftest.xla_flags(2) == expected


def test_this_session_runs_with_them():
  assert os.environ['XLA_FLAGS'] == conftest.xla_flags(4)
  assert '--xla_force_host_platform_device_count=4' in os.environ['XLA_FLAGS']


def test_the_longest_first_files_exist():
  # A renamed file would silently drop back to the end of the order.
  for name in conftest._LONGEST_FIRST:  # pylint: disable=protected-access
    assert os.path.isfile(os.path.join(_TESTS, name)), name
