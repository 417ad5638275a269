"""Launches keep compiled programs in JAX's persistent cache unless told otherwise."""

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# What a launch does before anything compiles, then a compilation (cached even if quick).
_ENABLE_THEN_COMPILE = '''
import json, os, sys
if os.environ.get('HIDE_FILELOCK'):
  sys.modules['filelock'] = None  # as if not installed
import jax, jax.numpy as jnp
from hybrid_flax import compilation_cache
status = compilation_cache.enable_default()
jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)
jax.jit(lambda x: jnp.sin(x) * 2)(jnp.ones(3)).block_until_ready()
print(json.dumps({'status': status, 'dir': jax.config.jax_compilation_cache_dir,
                  'max_size': jax.config.jax_compilation_cache_max_size}))
'''


def _run(tmp_path, cache_env):
  env = {k: v for k, v in os.environ.items() if k != 'JAX_COMPILATION_CACHE_DIR'}
  env.update(HYBRID_FLAX_CACHE=str(tmp_path / 'hf'), PYTHONPATH=REPO)
  env.update(cache_env)
  proc = subprocess.run([sys.executable, '-c', _ENABLE_THEN_COMPILE], capture_output=True,
                        text=True, timeout=120, env=env, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(proc.stdout.splitlines()[-1])


def _entries(folder):
  return os.listdir(folder) if os.path.isdir(folder) else []


def test_the_cache_defaults_to_the_projects_cache_folder(tmp_path):
  got = _run(tmp_path, {})
  default = str(tmp_path / 'hf' / 'jax')
  assert got['dir'] == default and got['max_size'] == 1 << 30
  assert got['status'].startswith(f'JAX compilation cache: {default} (the default, up to 1 GiB')
  assert any(name.startswith('jit_') for name in _entries(default))


@pytest.mark.parametrize('chosen', ['elsewhere', ''])
def test_a_chosen_folder_or_none_is_kept(tmp_path, chosen):
  folder = str(tmp_path / chosen) if chosen else ''
  got = _run(tmp_path, {'JAX_COMPILATION_CACHE_DIR': folder})
  assert got['dir'] == folder and got['max_size'] == -1  # JAX's own default: no limit
  assert got['status'] == ('JAX compilation cache: off (--jax_compilation_cache_dir is empty)'
                           if not chosen else
                           f'JAX compilation cache: {folder} (--jax_compilation_cache_dir)')
  assert not _entries(tmp_path / 'hf' / 'jax')
  if chosen:
    assert any(name.startswith('jit_') for name in _entries(folder))


def test_without_filelock_the_default_cache_has_no_size_limit(tmp_path):
  # JAX's size limit needs filelock; set without it, JAX would warn at each compilation instead.
  got = _run(tmp_path, {'HIDE_FILELOCK': '1'})
  assert got['max_size'] == -1 and '(the default, no size limit;' in got['status']
  assert any(name.startswith('jit_') for name in _entries(tmp_path / 'hf' / 'jax'))


def test_a_default_folder_that_cannot_be_made_leaves_the_cache_off(tmp_path):
  (tmp_path / 'file').write_text('')
  got = _run(tmp_path, {'HYBRID_FLAX_CACHE': str(tmp_path / 'file')})
  assert got['dir'] is None
  assert got['status'] == (f'JAX compilation cache: off ({tmp_path / "file" / "jax"} cannot be '
                           'made: Not a directory)')
