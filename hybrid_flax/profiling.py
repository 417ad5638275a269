"""A JAX profiler trace of a window of training steps (config.profile_steps), into WORKDIR/profile.

The window starts after a launch's first step, so it shows steady-state steps rather than the
compilation, and ends once its last step has finished on the device (dispatch is asynchronous).
TensorBoard's profile plugin (xprof) reads the trace, and Perfetto (ui.perfetto.dev) opens its
`*.trace.json.gz`. Only process 0 traces, as only it writes metrics.
"""

import os
import time

import jax
from absl import logging


class StepWindow:
  """Traces steps after_step+1 .. after_step+num_steps (at most total_steps); no-op for 0 steps."""

  def __init__(self, directory: str, num_steps: int, after_step: int, total_steps: int,
               enabled: bool = True):
    self.directory = directory
    self.first = after_step + 1
    self.last = min(after_step + num_steps, total_steps)
    self.enabled = enabled and num_steps > 0 and self.last >= self.first
    self.tracing = False
    self._started = 0.0

  def before(self, step: int) -> None:
    if self.enabled and step == self.first:
      jax.profiler.start_trace(self.directory)
      self.tracing, self._started = True, time.time()

  def after(self, step: int, state) -> None:
    if self.tracing and step == self.last:
      jax.block_until_ready(state)
      self._stop(f'steps {self.first}-{self.last}')

  def __enter__(self):
    return self

  def __exit__(self, *exc_info):
    if self.tracing:  # stopped or failed inside the window: keep what was traced
      self._stop(f'steps from {self.first}, cut short')

  def _stop(self, what: str) -> None:
    jax.profiler.stop_trace()
    self.tracing = False
    logging.info('Profiled %s (%.1fs) into %s: open it with TensorBoard\'s profile plugin, or its '
                 '*.trace.json.gz in ui.perfetto.dev.', what, time.time() - self._started,
                 os.path.join(self.directory, 'plugins', 'profile'))
