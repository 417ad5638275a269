"""The PyTorch twin is the same network as the Flax model (runs where the `bench` extra is).

PyTorch runs in subprocesses only, as in the benchmark: importing its compiler stack into a
process that has loaded TensorFlow (as other tests' fixtures do) crashes.
"""

import importlib.util
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from configs import cifar_cnn
from configs import cifar_hybrid
from configs import cifar_hybrid_noembed
from configs import cifar_tiny
from hybrid_flax import bench
from hybrid_flax import models

pytestmark = pytest.mark.skipif(importlib.util.find_spec('torch') is None,
                                reason='PyTorch (the bench extra) is not installed')

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = {'hybrid': cifar_hybrid, 'noembed': cifar_hybrid_noembed, 'cnn': cifar_cnn,
           'tiny': cifar_tiny}
NORMS = ('batch', 'layer')  # tiny with each model.attention_norm

_TWIN = '''
import json, sys, torch
from configs import cifar_cnn, cifar_hybrid, cifar_hybrid_noembed, cifar_tiny
from hybrid_flax import torch_twin
configs = dict(hybrid=cifar_hybrid, noembed=cifar_hybrid_noembed, cnn=cifar_cnn, tiny=cifar_tiny)
models = {name: torch_twin.HybridNet(c.get_config().model) for name, c in configs.items()}
for norm in sys.argv[1:]:
  config = cifar_tiny.get_config().model
  config.attention_norm, config.logit_scale = norm, 0.125
  models['tiny_' + norm] = torch_twin.HybridNet(config)
logits = models['tiny'](torch.zeros(2, 3, 32, 32))
print(json.dumps({'counts': {n: torch_twin.param_count(m) for n, m in models.items()},
                  'logits_shape': list(logits.shape)}))
'''


def _flax_param_count(model_config) -> int:
  variables = jax.eval_shape(
      lambda: models.create_model(model_config).init(
          jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3), jnp.uint8)))
  return sum(x.size for x in jax.tree.leaves(variables['params']))


def test_parameter_counts_and_output_shape_match_the_flax_model():
  proc = subprocess.run([sys.executable, '-c', _TWIN, *NORMS], capture_output=True, text=True,
                        cwd=REPO, timeout=300, check=True)
  twin = json.loads(proc.stdout.splitlines()[-1])
  assert twin['logits_shape'] == [2, 10]
  expected = {name: _flax_param_count(c.get_config().model) for name, c in CONFIGS.items()}
  for norm in NORMS:
    config = cifar_tiny.get_config().model
    config.attention_norm = norm
    expected['tiny_' + norm] = _flax_param_count(config)
    assert expected['tiny_' + norm] > expected['tiny']
  assert twin['counts'] == expected


def test_bench_times_the_twin_in_its_own_process_and_checks_its_size():
  config = cifar_tiny.get_config()
  count = _flax_param_count(config.model)
  result = bench.measure_torch(config, count, steps=1, warmup=0)
  assert result['param_count'] == count and result['images_per_sec'] > 0
  assert result['batch_size'] == config.batch_size
  with pytest.raises(AssertionError, match='not the same network'):
    bench.measure_torch(config, count + 1, steps=1, warmup=0)
