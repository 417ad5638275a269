"""A trained run loaded from its workdir, for the tools: class probabilities and attention weights.

The run's `config.json` rebuilds the model; the latest readable checkpoint supplies its
parameters and batch statistics (read-only: a run still training is never disturbed).
"""

import argparse
import dataclasses
import functools
import json
import os
import sys
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from configs import cifar_hybrid
from hybrid_flax import checkpointing
from hybrid_flax import input_pipeline
from hybrid_flax import models
from hybrid_flax import train


class RunNotFoundError(RuntimeError):
  """The workdir holds no config or no readable checkpoint."""


@dataclasses.dataclass(frozen=True)
class Run:
  workdir: str
  config: ml_collections.ConfigDict
  model: models.HybridNet
  state: train.TrainState

  @property
  def variables(self) -> dict[str, Any]:
    """{'params': ..., 'batch_stats': ...} to evaluate: the averaged ones under EMA."""
    return train.eval_variables(self.state)

  @property
  def step(self) -> int:
    return int(self.state.step)


def tool_parser(doc: str, prog: str) -> argparse.ArgumentParser:
  """The tools' common command line: argparse (not absl flags, whose global registry would
  clash between tools imported into one process, such as the tests)."""
  parser = argparse.ArgumentParser(prog=prog, description=doc,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--workdir', required=True, help='the launch.py run to read')
  return parser


def cli(main):
  """Wraps a tool's main: bad input ends it with one 'error: ...' line and exit status 1."""
  @functools.wraps(main)
  def wrapped(argv=None):
    try:
      return main(argv)
    except (RunNotFoundError, input_pipeline.DatasetUnavailableError, FileNotFoundError,
            ValueError) as e:
      sys.exit(f'error: {e}')
  return wrapped


def load_run(workdir: str) -> Run:
  config_path = os.path.join(workdir, 'config.json')
  checkpoint_dir = checkpointing.checkpoint_dir(workdir)
  if not os.path.isfile(config_path) or not os.path.isdir(checkpoint_dir):
    raise RunNotFoundError(f'{workdir} holds no training run (no config.json or checkpoints/): '
                           'pass the --workdir of a launch.py run')
  with open(config_path) as f:
    # Over the base config's defaults: runs saved before a switch existed trained without it.
    config = ml_collections.ConfigDict(_merged(cifar_hybrid.get_config().to_dict(),
                                               json.load(f)))
  mesh = train.data_mesh()
  replicated = NamedSharding(mesh, P())
  # The schedule's length does not change the state's structure, so any steps_per_epoch will do.
  _, _, abstract_state = train.state_factory(config, 1, input_pipeline.IMAGE_SHAPE, replicated)
  manager = checkpointing.open_read_only(checkpoint_dir)
  try:
    state, _ = checkpointing.restore_latest(manager, abstract_state)
  finally:
    manager.close()
  if state is None:
    raise RunNotFoundError(f'{checkpoint_dir} holds no readable checkpoint')
  # The mesh that predict_logits splits batches over, for the model's per-device oneDNN convs.
  return Run(workdir=workdir, config=config, model=models.create_model(config.model, mesh),
             state=state)


def _merged(base: dict, saved: dict) -> dict:
  out = dict(base)
  for key, value in saved.items():
    out[key] = _merged(base[key], value) if isinstance(base.get(key), dict) else value
  return out


def predict_logits(run: Run, images: np.ndarray, batch_size: int = 500) -> np.ndarray:
  """Logits [N, classes] for uint8 images [N, 32, 32, 3], batches sharded over all devices."""
  mesh = train.data_mesh()
  apply = jax.jit(
      functools.partial(train.eval_logits, run.model.apply,
                        **train.test_time_augmentation(run.config)),
      in_shardings=(NamedSharding(mesh, P()), NamedSharding(mesh, P('data'))))
  out = [np.zeros((0, run.model.num_classes), np.float32)]
  for start in range(0, len(images), batch_size):
    chunk = images[start:start + batch_size]
    pad = -len(chunk) % mesh.size  # every device takes an equal share
    padded = np.concatenate([chunk, np.zeros((pad,) + chunk.shape[1:], chunk.dtype)])
    out.append(np.asarray(apply(run.variables, padded))[:len(chunk)])
  return np.concatenate(out)


def softmax(logits: np.ndarray) -> np.ndarray:
  z = np.exp(logits - logits.max(-1, keepdims=True))
  return z / z.sum(-1, keepdims=True)


def require_attention(run: Run) -> None:
  if not run.config.model.attention:
    raise ValueError(f'the model of {run.workdir} has no attention blocks (model.attention=False)')


def attention_weights(run: Run, images: np.ndarray) -> dict[str, np.ndarray]:
  """{block name: weights [N, heads, queries, keys]} of each attention block, in order."""
  require_attention(run)
  _, state = jax.jit(lambda v, x: run.model.apply(v, train.preprocess(x), train=False,
                                                  mutable=['intermediates']))(
                                                      run.variables, images)
  inter = state['intermediates']
  return {name: np.asarray(inter[name]['mhsa']['attention_weights'][0])
          for name in sorted(inter) if name.startswith('attention')}
