"""The project's folder for what it builds or computes once and keeps between runs.

`$HYBRID_FLAX_CACHE`, default `$XDG_CACHE_HOME/hybrid_flax` (`~/.cache/hybrid_flax`). Under it:
the C++ kernels' builds (onednn_conv), JAX's compilation cache (`jax/`, compilation_cache) and the
decoded splits (`splits/`, split_cache). A module of its own so that the two caches find it
without importing the kernels' module (and with it JAX's FFI) first.
"""

import os
import pathlib

ENV = 'HYBRID_FLAX_CACHE'


def folder() -> pathlib.Path:
  default = pathlib.Path(os.environ.get('XDG_CACHE_HOME', pathlib.Path.home() / '.cache'))
  return pathlib.Path(os.environ.get(ENV, default / 'hybrid_flax'))
