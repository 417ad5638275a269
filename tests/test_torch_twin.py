"""The PyTorch twin is the same network as the Flax model (runs where the `bench` extra is)."""

import jax
import jax.numpy as jnp
import pytest

from configs import cifar_cnn
from configs import cifar_hybrid
from configs import cifar_hybrid_noembed
from configs import cifar_tiny
from hybrid_flax import bench
from hybrid_flax import models

torch = pytest.importorskip('torch')
from hybrid_flax import torch_twin  # pylint: disable=g-import-not-at-top,wrong-import-position


@pytest.mark.parametrize('get_config', [cifar_hybrid.get_config, cifar_hybrid_noembed.get_config,
                                        cifar_cnn.get_config, cifar_tiny.get_config])
def test_parameter_counts_match_the_flax_model(get_config):
  model_config = get_config().model
  variables = jax.eval_shape(
      lambda: models.create_model(model_config).init(
          jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3), jnp.uint8)))
  flax_count = sum(x.size for x in jax.tree.leaves(variables['params']))
  assert torch_twin.param_count(torch_twin.HybridNet(model_config)) == flax_count


def test_forward_and_a_timed_training_step():
  config = cifar_tiny.get_config()
  logits = torch_twin.HybridNet(config.model)(torch.zeros(2, 3, 32, 32))
  assert tuple(logits.shape) == (2, 10)
  result = torch_twin.measure_train(config, steps=1, warmup=0)
  assert result['images_per_sec'] > 0 and result['batch_size'] == config.batch_size


def test_bench_times_the_twin_in_its_own_process_and_checks_its_size():
  config = cifar_tiny.get_config()
  result = bench.measure_torch(config, 40_122, steps=1, warmup=0)  # the tiny model's count
  assert result['param_count'] == 40_122 and result['images_per_sec'] > 0
  with pytest.raises(AssertionError, match='not the same network'):
    bench.measure_torch(config, 40_123, steps=1, warmup=0)
