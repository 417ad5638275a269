"""Metrics as JSON lines in the workdir (process 0 only), echoed to the log."""

import json
import math
import os

import jax
from absl import logging


class MetricWriter:

  def __init__(self, workdir: str, filename: str = 'metrics.jsonl'):
    self.path = os.path.join(workdir, filename)
    self.enabled = jax.process_index() == 0

  def write(self, record: dict) -> None:
    if not self.enabled:
      return
    record = {k: _plain(v) for k, v in record.items()}
    with open(self.path, 'a') as f:
      f.write(json.dumps(record) + '\n')
    logging.info('%s', ' '.join(f'{k}={_fmt(v)}' for k, v in record.items()))


def _plain(v):
  if hasattr(v, 'item'):
    v = v.item()
  if isinstance(v, float) and not math.isfinite(v):
    return str(v)  # JSON has no NaN/inf
  return v


def _fmt(v):
  return f'{v:.5g}' if isinstance(v, float) else str(v)
