"""JAX's persistent compilation cache, on by default for training launches.

A launch compiles the same programs as the last launch of its config (a resume, a rerun, another
seed), so it loads them from disk instead (README, Train, has the seconds this saves). The
executable is the one a fresh compilation builds; JAX keys it on the program, the devices, the
compile options and XLA_FLAGS.
"""

import importlib.util
import os

import jax

from hybrid_flax import cache_home

# Least recently used entries go beyond this (the CPU-scale config's five programs: 1.3 MB).
MAX_BYTES = 1 << 30


def enable_default() -> str:
  """Points the cache at $HYBRID_FLAX_CACHE/jax unless --jax_compilation_cache_dir (or
  $JAX_COMPILATION_CACHE_DIR) chose a folder, or '' for none; returns the log line saying which.
  Must run before anything compiles."""
  chosen = jax.config.jax_compilation_cache_dir
  if chosen is None:
    chosen = str(cache_home.folder() / 'jax')
    try:
      os.makedirs(chosen, exist_ok=True)
    except OSError as e:  # JAX would warn at every compilation instead
      return f'JAX compilation cache: off ({chosen} cannot be made: {e.strerror})'
    jax.config.update('jax_compilation_cache_dir', chosen)
    # JAX's size limit needs `filelock` (else it warns at every compilation and caches nothing).
    if jax.config.jax_compilation_cache_max_size == -1 and importlib.util.find_spec('filelock'):
      jax.config.update('jax_compilation_cache_max_size', MAX_BYTES)
      limit = f'up to {MAX_BYTES >> 30} GiB'
    else:
      limit = 'no size limit'
    return (f'JAX compilation cache: {chosen} (the default, {limit}; '
            '--jax_compilation_cache_dir=DIR moves it, --jax_compilation_cache_dir= turns it off)')
  if not chosen:
    return 'JAX compilation cache: off (--jax_compilation_cache_dir is empty)'
  return f'JAX compilation cache: {chosen} (--jax_compilation_cache_dir)'
