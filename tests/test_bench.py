"""The benchmark's measurements on the tiny config (figures are printed by the tool, not
asserted)."""

import importlib.util
import math
import pathlib
import sys

import jax
import numpy as np
import pytest

from configs import cifar_hybrid
from configs import cifar_tiny
from hybrid_flax import bench
from hybrid_flax import input_pipeline
from tests import conftest


def _docs_script(folder, name):
  path = pathlib.Path(__file__).resolve().parents[1] / 'docs' / folder / f'{name}.py'
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_steps_are_measured_with_xla_flop_counts():
  config = cifar_tiny.get_config()
  results = bench.measure_steps(config, steps=2, warmup=1)
  for name, batch_size in (('train', config.batch_size), ('eval', config.eval_batch_size)):
    r = results[name]
    assert r['batch_size'] == batch_size
    assert all(math.isfinite(v) and v > 0 for v in r.values()), r
    assert r['images_per_sec'] == pytest.approx(r['steps_per_sec'] * batch_size)
  # A training step is a forward pass plus a backward pass of about twice its cost.
  ratio = results['train']['flops_per_image'] / results['eval']['flops_per_image']
  assert 2.0 < ratio < 4.0, ratio


def test_flop_count_is_the_whole_batch_s_and_matches_an_analytic_count():
  # Counted on the lowered program: global shapes whatever the device count, and convolutions
  # counted on every backend (GPU-compiled programs hide them in cuDNN calls).
  config = cifar_tiny.get_config()
  config.model.attention = False
  results = bench.measure_steps(config, steps=1, warmup=0)
  widths, pool = config.model.widths, config.model.pool
  size, cin, macs = 32, 3, 0
  for stage in range(2):
    for i in (2 * stage, 2 * stage + 1):
      # XLA counts a 3x3 'same' convolution's in-bounds taps only: (3n - 2)^2 per n x n map.
      macs += (3 * size - 2) ** 2 * cin * widths[i]  # the conv runs before the block's max-pool
      size, cin = (size // 2 if pool[i] else size), widths[i]
    macs += 2 * (3 * size - 2) ** 2 * cin * cin  # the residual block's two convs
  analytic = 2 * (macs + cin * config.model.num_classes)
  # The forward pass: convolutions and the head dominate; batch norm, ReLU and pooling add a
  # few percent.
  assert analytic < results['eval']['flops_per_image'] < 1.1 * analytic


def test_pipeline_is_measured_on_the_data_set_and_reported(tiny_data_dir):
  config = cifar_tiny.get_config()
  config.dataset, config.data_dir = 'cifar10_folder', tiny_data_dir
  pipeline = bench.measure_pipeline(config, steps=50)
  assert pipeline['steps'] == 80 // config.batch_size  # capped at one epoch of the tiny split
  assert pipeline['images_per_sec'] > 0
  steps = bench.measure_steps(config, steps=1, warmup=0)
  text = bench.report(config, steps, pipeline)
  assert [line.split()[0] for line in text.splitlines()[2:]] == ['train', 'eval', 'pipeline']
  assert 'pipeline  skipped: not imported' in bench.report(config, steps, 'not imported')
  half = bench.report(config, steps, 'not imported',
                      peak_gflops=2 * steps['train']['gflops_per_sec'])
  assert 'train 50.0%' in half.splitlines()[4], half


def test_data_on_device_is_measured_as_the_gathering_step_and_index_batches(tiny_data_dir):
  config = cifar_tiny.get_config()
  config.dataset, config.data_dir = 'cifar10_folder', tiny_data_dir
  config.data_on_device = True
  pipeline = bench.measure_pipeline(config, steps=50)
  assert pipeline['load_seconds'] > 0 and pipeline['images_per_sec'] > 0
  steps = bench.measure_steps(config, steps=1, warmup=0)
  host = bench.measure_steps(cifar_tiny.get_config(), steps=1, warmup=0)
  # The gather adds no arithmetic worth counting: the same step, fed differently.
  assert steps['train']['flops_per_image'] == pytest.approx(host['train']['flops_per_image'],
                                                            rel=0.01)
  assert 'indices into the split on the device' in bench.report(config, steps, pipeline)


def test_the_gpu_drivers_stand_in_data_set_serves_the_benchmark_and_the_readers(
    tiny_data_dir, tmp_path, monkeypatch):
  # The GPU machine has no TFDS: docs/device_runs/gpu_run.py replaces open_split, which must
  # take every argument the callers give the real one.
  gpu_run = _docs_script('device_runs', 'gpu_run')
  images, labels = input_pipeline.load_split('cifar10_folder', 'train', tiny_data_dir)
  blob = tmp_path / 'decoded.npz'
  np.savez(blob, train_images=images, train_labels=labels, test_images=images[:20],
           test_labels=labels[:20])
  monkeypatch.setattr(gpu_run, 'CACHE', str(blob))
  monkeypatch.setattr(input_pipeline, 'open_split', input_pipeline.open_split)  # restored after
  gpu_run.patch()
  config = cifar_tiny.get_config()
  config.dataset, config.data_dir = 'cifar10_folder', tiny_data_dir
  assert bench.measure_pipeline(config, steps=50)['steps'] == 80 // config.batch_size
  np.testing.assert_array_equal(input_pipeline.load_split('x', 'test')[0], images[:20])


def test_the_pytorch_comparison_refuses_a_config_its_twin_does_not_train():
  config = cifar_tiny.get_config()
  bench.check_torch_twin_matches(config)
  config.model.bn_group_size = 4
  with pytest.raises(ValueError, match='bn_group_size=0'):
    bench.check_torch_twin_matches(config)
  config.model.bn_group_size, config.optimizer = 0, 'muon'
  with pytest.raises(ValueError, match='optimizer=sgd'):
    bench.check_torch_twin_matches(config)


def test_the_early_crops_step_is_timed_on_its_own_row():
  config = cifar_tiny.get_config()
  config.augment.early_crop_size, config.augment.early_crop_epochs = 16, 1
  results = bench.measure_steps(config, steps=1, warmup=0)
  # 16x16 crops: a quarter of the pixels, so well under half the full step's FLOPs.
  ratio = results['early']['flops_per_image'] / results['train']['flops_per_image']
  assert 0.15 < ratio < 0.5, ratio
  assert 'early 16px' in bench.report(config, results, 'not imported')


def _torch_round(config, images_per_sec):
  """A PyTorch timing as `bench.measure_torch` returns it."""
  return {'batch_size': config.batch_size, 'images_per_sec': images_per_sec, 'version': 'x',
          'device': 'cpu', 'dtype': 'float32', 'threads': 2, 'param_count': 1}


def test_rounds_alternate_with_the_callback_and_report_the_median():
  config = cifar_tiny.get_config()
  calls = []
  results = bench.measure_steps(config, steps=1, warmup=0, rounds=3,
                                between_rounds=lambda: calls.append(len(calls)))
  assert calls == [0, 1, 2]
  rates = results['train_rounds']
  assert len(rates) == 3 and all(r > 0 for r in rates)
  assert results['train']['images_per_sec'] == pytest.approx(sorted(rates)[1])
  # The ratio is taken round by round, then its median.
  torch_rounds = [_torch_round(config, r / k) for r, k in zip(rates, (1.0, 2.0, 4.0))]
  text = bench.report(config, results, 'not imported', torch_rounds)
  assert [line.split(':')[0] for line in text.splitlines()[-4:-1]] == ['round 1', 'round 2',
                                                                         'round 3']
  assert text.splitlines()[-3].endswith(', 2.00x')
  assert text.splitlines()[-1] == ('JAX / PyTorch training throughput: 2.00x, the median of 3 '
                                   'interleaved rounds (1.00x to 4.00x)')
  with pytest.raises(ValueError, match='--rounds must be at least 1'):
    bench.measure_steps(config, rounds=0)


def test_one_round_reports_one_ratio():
  config = cifar_tiny.get_config()
  results = bench.measure_steps(config, steps=1, warmup=0)
  rate = results['train']['images_per_sec']
  text = bench.report(config, results, 'not imported', [_torch_round(config, rate / 2)])
  assert text.splitlines()[-1] == 'JAX / PyTorch training throughput: 2.00x'
  assert 'round 1' not in text


def test_median_ms_times_each_call_after_a_warm_up():
  calls = []
  def fn():
    calls.append(1)
  assert bench.median_ms(fn, repeats=3) >= 0.0
  assert len(calls) == 4  # one warm-up, three timed


def test_conv_layers_script_lists_the_model_s_convs_and_times_them():
  conv_layers = _docs_script('cpu_runs', 'conv_layers')
  assert conv_layers.conv_layers(cifar_hybrid.get_config().model) == [
      ('conv1', 32, 3, 64), ('conv2', 32, 64, 128),
      ('residual1.0', 16, 128, 128), ('residual1.1', 16, 128, 128),
      ('conv3', 16, 128, 256), ('conv4', 8, 256, 512),
      ('residual2.0', 4, 512, 512), ('residual2.1', 4, 512, 512)]
  config = cifar_tiny.get_config()
  layers = conv_layers.conv_layers(config.model)
  assert len(layers) == 8 and layers[-1] == ('residual2.1', 4, 32, 32)
  # A layer's four timers run its jitted parts on the batch split over the devices.
  _, size, cin, cout = layers[1]
  forward, input_grad, weight_grad, all_three = (
      fn() for fn in conv_layers._jax_timers(config, size, cin, cout))
  y = (config.batch_size, size, size, cout)
  assert forward.shape == y
  assert input_grad[0].shape == (config.batch_size, size, size, cin)
  assert weight_grad[0].shape == (3, 3, cin, cout)
  assert ([a.shape for a in jax.tree.leaves(all_three)]
          == [y, input_grad[0].shape, weight_grad[0].shape])


@conftest.needs_kernels()
def test_attention_core_script_lists_the_model_s_blocks_and_times_both_ways():
  script = _docs_script('cpu_runs', 'attention_core')
  paper = cifar_hybrid.get_config().model
  assert script.attention_blocks(paper) == [('attention1', 256, 128, 8),
                                            ('attention2', 16, 512, 8)]
  assert script.attention_blocks(paper, 24) == [('attention1', 144, 128, 8),
                                                ('attention2', 9, 512, 8)]
  paper.attention = False
  assert not script.attention_blocks(paper)
  config = cifar_tiny.get_config()
  (name, tokens, channels, heads), _ = script.attention_blocks(config.model)
  assert (name, tokens, channels, heads) == ('attention1', 256, 16, 2)
  # Each way, the three parts run on the batch split over the devices, with the same results.
  outputs = {impl: [fn() for fn in fns]
             for impl, fns in script.timers(config, tokens, channels, heads).items()}
  assert list(outputs) == ['kernel', 'xla']
  core = (config.batch_size, tokens, heads, channels // heads)
  for got, want in zip(outputs['kernel'], outputs['xla'], strict=True):
    assert [a.shape for a in jax.tree.leaves(got)] == [a.shape for a in jax.tree.leaves(want)]
    # The tolerance is the part's own scale: the key bias's gradient is zero up to round-off.
    scale = max(float(np.abs(b).max()) for b in jax.tree.leaves(want))
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * scale)
  assert outputs['kernel'][0].shape == core
  assert [a.shape for a in outputs['kernel'][1]] == [core] * 3


def test_gpu_screen_builds_each_wave_on_the_best_finished_run():
  screen = _docs_script('device_runs', 'screen')
  run = lambda overrides, accuracy, rc=0: {'overrides': overrides, 'test_accuracy': accuracy,
                                           'rc': rc}
  assert screen.second_wave({}) == {} and screen.seeds_wave({}) == {}
  results = {'muon08': run(screen.WAVE1['muon08'], 0.91),
             # cut short: not a candidate
             'cpu_recipe': run(screen.WAVE1['cpu_recipe'], 0.95, rc=-9),
             'altflip_shift2': run(screen.AIRBENCH, 0.90),
             # the config again without GPU autotuning: a timing, not a recipe to build on
             'config_alone_autotune0': {**run([], 0.99), 'xla_flags': '--xla_gpu_autotune_level=0'}}
  assert screen.best(results) == 'muon08'
  second = screen.second_wave(results)
  assert list(second) == ['muon08' + suffix for suffix in screen.WAVE2]
  assert second['muon08+lookahead5'] == screen.WAVE1['muon08'] + screen.WAVE2['+lookahead5']
  # A switch the best run already has is not tried again.
  results['altflip_shift2']['test_accuracy'] = 0.92
  assert 'altflip_shift2+altflip_shift2' not in screen.second_wave(results)
  assert screen.seeds_wave(results) == {
      'altflip_shift2_seed1': screen.AIRBENCH + ['--config.seed=1'],
      'altflip_shift2_seed2': screen.AIRBENCH + ['--config.seed=2']}


def test_gpu_screen_times_the_solo_run_to_the_target_and_kills_a_silent_one(tmp_path):
  screen = _docs_script('device_runs', 'screen')
  epochs = ('import time\n'
            'print("I kind=epoch step=1 epoch=1 test_accuracy=0.5", flush=True)\n'
            'time.sleep(1)\n'
            'print("I kind=epoch step=2 epoch=2 test_accuracy=0.82", flush=True)\n')
  reached, wall, rc = screen.alone_to_target([sys.executable, '-c', epochs], None,
                                             str(tmp_path / 'a.log'), timeout=60)
  assert rc == 0 and 1.0 <= reached <= wall < 60
  assert '# 81.6% reached' in (tmp_path / 'a.log').read_text()
  # No output at all: the watchdog still ends it at its limit.
  reached, wall, rc = screen.alone_to_target(
      [sys.executable, '-c', 'import time; time.sleep(60)'], None, str(tmp_path / 'b.log'),
      timeout=2)
  assert reached is None and rc != 0 and wall < 30
