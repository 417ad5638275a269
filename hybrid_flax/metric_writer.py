"""Metrics as JSON lines and TensorBoard events in the workdir (process 0 only), echoed to the log.

`metrics.jsonl` is the record the tools read; the event files under `workdir/tensorboard` are for
`tensorboard --logdir`. Both are flushed on every write, so a killed run loses no logged metric.
"""

import json
import math
import os
import sys

import jax
from absl import logging

TENSORBOARD_DIR = 'tensorboard'


class MetricWriter:

  def __init__(self, workdir: str, start_step: int = 0, filename: str = 'metrics.jsonl'):
    self.path = os.path.join(workdir, filename)
    self.enabled = jax.process_index() == 0
    self._tb = None
    if self.enabled:
      tensorboardX = _import_tensorboardx()
      # A resumed run replays the steps after its checkpoint; purge_step hides the killed run's
      # events from there on, so each curve in TensorBoard is drawn once.
      self._tb = tensorboardX.SummaryWriter(os.path.join(workdir, TENSORBOARD_DIR),
                                            purge_step=start_step + 1 if start_step else None,
                                            flush_secs=10)

  def write(self, record: dict) -> None:
    if not self.enabled:
      return
    record = {k: _plain(v) for k, v in record.items()}
    with open(self.path, 'a') as f:
      f.write(json.dumps(record) + '\n')
    step, kind = record.get('step'), record.get('kind', 'metrics')
    for key, value in record.items():
      if key not in ('step', 'kind') and isinstance(value, (int, float)):
        self._tb.add_scalar(f'{kind}/{key}', value, global_step=step)
    self._tb.flush()
    logging.info('%s', ' '.join(f'{k}={_fmt(v)}' for k, v in record.items()))

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


def _import_tensorboardx():
  """tensorboardX, imported without PyTorch where nothing has imported PyTorch yet.

  Its writer module imports torch where it is installed (the `bench` extra, most GPU hosts) only
  to accept torch tensors, which this writer never passes: 2.0-3.1 s of every launch on the
  2-core CPU, against 0.13-0.16 s with torch hidden (docs/benchmark.md). Hidden as Python
  documents, a None in sys.modules, for the import's duration only.
  """
  if 'tensorboardX' in sys.modules or 'torch' in sys.modules:
    import tensorboardX  # pylint: disable=g-import-not-at-top
    return tensorboardX
  sys.modules['torch'] = None  # `import torch` raises ImportError, which tensorboardX expects
  try:
    import tensorboardX  # pylint: disable=g-import-not-at-top,redefined-outer-name
  finally:
    if sys.modules.get('torch', ...) is None:
      del sys.modules['torch']
  return tensorboardX


def read_metrics(workdir: str, filename: str = 'metrics.jsonl') -> list[dict]:
  """The run's records in step order, each (kind, step) once.

  A resumed run rewrites the records logged after its checkpoint; the later copy wins. NaN and
  infinities, stored as strings, come back as floats.
  """
  path = os.path.join(workdir, filename)
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{path} does not exist: pass the --workdir of a launch.py run')
  latest = {}
  with open(path) as f:
    for number, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError:
        # A run killed mid-write can leave a torn last line; anything else is damage to report.
        logging.warning('%s:%d is not a JSON record; skipped', path, number)
        continue
      record = {k: float(v) if v in _NON_FINITE else v for k, v in record.items()}
      latest[(record.get('kind'), record.get('step'))] = record
  return sorted(latest.values(), key=lambda r: (r.get('step') or 0))


_NON_FINITE = ('nan', '-nan', 'inf', '-inf')


def _plain(v):
  if hasattr(v, 'item'):
    v = v.item()
  if isinstance(v, float) and not math.isfinite(v):
    return str(v)  # JSON has no NaN/inf
  return v


def _fmt(v):
  return f'{v:.5g}' if isinstance(v, float) else str(v)
