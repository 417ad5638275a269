"""A run's jitted programs, compiled in background threads while the run loads and starts.

XLA compiles outside Python's lock, so the train step (with early crops, both of its
programs) and the eval step compile beside what a launch does before its first step anyway:
initialising or restoring the state and reading the data. The eval step no longer stalls the
first evaluation, nor the full-size step the end of the early crops. Each program is compiled
for the exact shapes, dtypes and shardings of its arguments (`jax.ShapeDtypeStruct`s), as
`jax.jit(...).lower(...).compile()`; calling it with anything else is a TypeError, not a
silent recompile.
"""

import concurrent.futures
import time

import jax
from absl import logging

from hybrid_flax import host_cpu


class Program:
  """`jitted` compiled for `abstract_args` on `pool`; the first call waits for it."""

  def __init__(self, name: str, jitted, abstract_args, pool: concurrent.futures.Executor):
    self.name = name
    self._future = pool.submit(self._compile, jitted, abstract_args)
    self._compiled = None

  def _compile(self, jitted, abstract_args):
    start = time.perf_counter()
    compiled = jitted.lower(*abstract_args).compile()
    logging.info('Compiled the %s in %.1fs (in the background).', self.name,
                 time.perf_counter() - start)
    return compiled

  def wait(self):
    """The compiled program (re-raising what its compilation raised)."""
    if self._compiled is None:
      self._compiled = self._future.result()
    return self._compiled

  def __call__(self, *args):
    return self.wait()(*args)


def pool(programs: int) -> concurrent.futures.ThreadPoolExecutor:
  """Threads for `programs` compilations, taken in the order they are submitted."""
  # A compilation keeps about two cores busy (XLA's own threads); more at once on a small host
  # only slow the data reading they overlap.
  workers = max(1, host_cpu.usable_cpus() // 2)
  return concurrent.futures.ThreadPoolExecutor(max_workers=min(programs, workers),
                                               thread_name_prefix='compile-ahead')


def abstract(tree, sharding):
  """`tree`'s shapes and dtypes (arrays or ShapeDtypeStructs) placed on `sharding`."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)
