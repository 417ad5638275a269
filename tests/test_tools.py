"""The researcher tools on a run trained here: evaluate, predict, plots, attention maps."""

import dataclasses
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from configs import cifar_tiny
from hybrid_flax import attention_maps
from hybrid_flax import evaluate
from hybrid_flax import figures
from hybrid_flax import inference
from hybrid_flax import input_pipeline
from hybrid_flax import metric_writer
from hybrid_flax import compare
from hybrid_flax import plots
from hybrid_flax import predict
from hybrid_flax import train
from tests import conftest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='module')
def workdir(tmp_path_factory, tiny_data_dir):
  config = cifar_tiny.get_config()
  config.dataset = 'cifar10_folder'
  config.data_dir = tiny_data_dir
  config.progress_bar = False
  path = str(tmp_path_factory.mktemp('run'))
  train.train_and_evaluate(config, path)
  return path


@pytest.fixture(scope='module')
def recipe_workdir(tmp_path_factory, tiny_data_dir):
  """A tiny run with the strong recipe's evaluation-time switches on: EMA weights, flip TTA."""
  config = cifar_tiny.get_config()
  config.dataset, config.data_dir, config.progress_bar = 'cifar10_folder', tiny_data_dir, False
  config.num_epochs, config.ema_decay, config.eval_flip = 1, 0.5, True
  config.augment.crop_padding, config.augment.flip, config.label_smoothing = 4, True, 0.1
  path = str(tmp_path_factory.mktemp('recipe_run'))
  train.train_and_evaluate(config, path)
  return path


@pytest.fixture(scope='module')
def run(workdir):
  return inference.load_run(workdir)


@pytest.fixture(scope='module')
def test_split(tiny_data_dir):
  return input_pipeline.load_split('cifar10_folder', 'test', tiny_data_dir)


def _error(excinfo) -> str:
  message = excinfo.value.code
  assert isinstance(message, str) and message.startswith('error: ') and '\n' not in message
  return message


def _is_png(path) -> bool:
  with Image.open(path) as image:
    return image.format == 'PNG' and min(image.size) > 100


def test_evaluate_agrees_with_the_runs_own_evaluation(workdir, run, capsys):
  result = evaluate.main(['--workdir', workdir])
  last_epoch = [r for r in metric_writer.read_metrics(workdir) if r['kind'] == 'epoch'][-1]
  assert result['step'] == run.step == last_epoch['step']
  assert result['accuracy'] == pytest.approx(last_epoch['test_accuracy'], abs=1e-6)  # f32 there
  assert result['loss'] == pytest.approx(last_epoch['test_loss'], rel=1e-5)
  confusion = np.asarray(result['confusion_matrix'])
  assert confusion.sum() == result['examples'] == 10 * conftest.TEST_PER_CLASS
  np.testing.assert_array_equal(confusion.sum(1), conftest.TEST_PER_CLASS)
  np.testing.assert_allclose(result['per_class_accuracy'],
                             confusion.diagonal() / conftest.TEST_PER_CLASS)
  out = capsys.readouterr().out
  assert 'per-class accuracy' in out and 'confusion matrix' in out
  assert all(name in out for name in input_pipeline.CIFAR10_CLASSES)
  with open(os.path.join(workdir, 'eval', f'step_{run.step}.json')) as f:
    assert json.load(f)['accuracy'] == result['accuracy']
  assert _is_png(os.path.join(workdir, 'figures', f'confusion_step_{run.step}.png'))


def test_evaluate_on_another_split_writes_beside_the_runs_own_report(workdir, run):
  result = evaluate.main(['--workdir', workdir, '--split', 'train[:30]'])
  assert result['examples'] == 30 and result['split'] == 'train[:30]'
  name = f'step_{run.step}_cifar10_folder_train_30'
  with open(os.path.join(workdir, 'eval', f'{name}.json')) as f:
    assert json.load(f)['accuracy'] == result['accuracy']
  assert _is_png(os.path.join(workdir, 'figures', f'confusion_{name}.png'))


def test_evaluate_uses_the_ema_weights_and_flip_tta_as_training_did(recipe_workdir):
  result = evaluate.main(['--workdir', recipe_workdir])
  last_epoch = [r for r in metric_writer.read_metrics(recipe_workdir) if r['kind'] == 'epoch'][-1]
  assert result['accuracy'] == pytest.approx(last_epoch['test_accuracy'], abs=1e-6)
  assert result['loss'] == pytest.approx(last_epoch['test_loss'], rel=1e-5)
  loaded = inference.load_run(recipe_workdir)
  state_ema = loaded.variables['params']['head']['kernel']
  # The tools load the averaged weights, which differ from the last step's.
  assert not np.allclose(state_ema, loaded.state.params['head']['kernel'])
  np.testing.assert_array_equal(state_ema, loaded.state.ema['params']['head']['kernel'])


def test_compare_prints_a_table_and_plots_accuracy_per_epoch(workdir, recipe_workdir, tmp_path,
                                                            capsys):
  out = str(tmp_path / 'acc.png')
  compare.main(['--run', f'paper={workdir}', '--run', f'recipe={recipe_workdir}',
                '--reference', 'paper=0.816', '--out', out])
  printed = capsys.readouterr().out
  last = [r for r in metric_writer.read_metrics(workdir) if r['kind'] == 'epoch'][-1]
  assert f'| paper | {last["epoch"]} | {last["test_accuracy"]:.2%} |' in printed
  assert '| recipe | 1 |' in printed and _is_png(out)
  with pytest.raises(SystemExit) as excinfo:
    compare.main(['--run', f'a={workdir}', '--reference', 'b=0.5'])
  assert "names no --run" in _error(excinfo)


def test_accuracy_plot_styles_stay_distinct_past_matplotlibs_ten_colours():
  styles = figures.run_styles(25)  # the results plot passed 10 runs
  assert len(set(styles)) == 25
  assert [marker for _, marker in figures.run_styles(10)] == ['o'] * 10  # plain up to 10
  with pytest.raises(ValueError, match='more than 100 distinct styles'):
    figures.run_styles(101)


def test_evaluate_can_override_the_runs_test_time_augmentation(recipe_workdir):
  default = evaluate.main(['--workdir', recipe_workdir])
  plain = evaluate.main(['--workdir', recipe_workdir, '--eval_flip', 'false'])
  shifted = evaluate.main(['--workdir', recipe_workdir, '--eval_translate', '1'])
  assert (default['eval_flip'], default['eval_translate']) == (True, 0)
  assert (plain['eval_flip'], shifted['eval_translate']) == (False, 1)
  assert len({default['loss'], plain['loss'], shifted['loss']}) == 3  # three different views
  with pytest.raises(SystemExit) as excinfo:
    evaluate.main(['--workdir', recipe_workdir, '--eval_translate', '32'])
  assert 'eval_translate must be in [0, 32)' in _error(excinfo)


def test_evaluate_other_split(workdir):
  result = evaluate.main(['--workdir', workdir, '--split', 'train'])
  assert result['examples'] == 10 * conftest.TRAIN_PER_CLASS and result['split'] == 'train'


def test_predict_matches_the_model_on_exact_images_and_reads_any_image(
    workdir, run, test_split, tmp_path, capsys):
  images, _ = test_split
  for i, image in enumerate(images[:4]):
    Image.fromarray(image).save(tmp_path / f'{i}.png')  # lossless and already 32x32
  odd = tmp_path / 'odd' / 'deeper'
  odd.mkdir(parents=True)
  rng = np.random.default_rng(0)
  Image.fromarray(rng.integers(0, 255, (300, 200, 4), np.uint8)).save(odd / 'rgba.png')
  Image.fromarray(rng.integers(0, 255, (64, 48), np.uint8)).save(odd / 'grey.jpg')
  Image.fromarray(rng.integers(0, 255, (20, 20, 3), np.uint8)).convert('P').save(odd / 'pal.gif')
  (odd / 'notes.txt').write_text('not an image, and skipped in a folder')

  predictions = predict.main(['--workdir', workdir, '--top_k', '10', str(tmp_path)])
  assert len(predictions) == 7 and not any(p.endswith('.txt') for p in predictions)
  probabilities = inference.softmax(inference.predict_logits(run, images[:4]))
  for i in range(4):
    best = predictions[str(tmp_path / f'{i}.png')]
    assert best[0][0] == input_pipeline.CIFAR10_CLASSES[probabilities[i].argmax()]
    assert best[0][1] == pytest.approx(probabilities[i].max(), rel=1e-5)
  for best in predictions.values():
    p = [prob for _, prob in best]
    assert len({name for name, _ in best}) == 10 and p == sorted(p, reverse=True)
    assert sum(p) == pytest.approx(1.0, rel=1e-5)
  assert str(odd / 'pal.gif') in capsys.readouterr().out


def test_predict_errors_name_the_bad_input_before_loading_any_model(tmp_path):
  good = tmp_path / 'good.png'
  Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(good)
  truncated = tmp_path / 'truncated.jpg'
  truncated.write_bytes(conftest.class_image(1, 0)[:200])
  (tmp_path / 'notes.png').write_text('plain text with an image name')
  (tmp_path / 'empty').mkdir()
  no_run = str(tmp_path / 'no-run')  # never reached: the images are read first
  for args, expected in [
      ([str(tmp_path / 'notes.png')], 'notes.png is not an image Pillow can read'),
      ([str(good), str(truncated)], 'truncated.jpg is not an image Pillow can read'),
      ([str(tmp_path / 'missing.png')], 'missing.png does not exist'),
      ([str(tmp_path / 'empty')], 'empty holds no image files'),
      (['--top_k', '11', str(good)], '--top_k must be in 1..10'),
  ]:
    with pytest.raises(SystemExit) as excinfo:
      predict.main(['--workdir', no_run, *args])
    assert expected in _error(excinfo)
  with pytest.raises(SystemExit) as excinfo:
    predict.main(['--workdir', no_run, str(good)])
  assert 'holds no training run' in _error(excinfo)


def test_tool_errors_are_one_line_on_the_command_line(workdir, tmp_path):
  (tmp_path / 'bad.jpg').write_bytes(b'\xff\xd8 not really a jpeg')
  proc = subprocess.run([sys.executable, '-m', 'hybrid_flax.predict', '--workdir', workdir,
                         str(tmp_path / 'bad.jpg')], capture_output=True, text=True, cwd=REPO,
                        timeout=120, check=False)
  assert proc.returncode == 1 and 'Traceback' not in proc.stderr
  assert proc.stderr.splitlines()[-1].startswith(f'error: {tmp_path / "bad.jpg"} is not an image')


def test_plots_draw_the_runs_curves(workdir):
  out = plots.main(['--workdir', workdir])
  assert _is_png(out)


def test_plots_name_the_split_a_run_evaluated_on(tmp_path, monkeypatch):
  epoch = {'kind': 'epoch', 'step': 4, 'epoch': 1, 'train_loss': 1.2, 'test_loss': 1.3,
           'train_accuracy': 0.5, 'test_accuracy': 0.4}
  (tmp_path / 'metrics.jsonl').write_text(json.dumps(epoch) + '\n')
  drawn = []
  monkeypatch.setattr(figures, '_save', lambda fig, path: drawn.append(fig) or path)
  plots.main(['--workdir', str(tmp_path)])  # no config.json: the run's test split
  (tmp_path / 'config.json').write_text(json.dumps({'eval_split': 'train[45000:]'}))
  plots.main(['--workdir', str(tmp_path)])
  for fig, split in zip(drawn, ('test', 'train[45000:]')):
    assert fig.axes[1].get_legend_handles_labels()[1][-1] == split
    assert fig.get_suptitle().endswith(f'(final {split} accuracy 40.00%)')


def test_metrics_count_a_resumed_runs_replayed_records_once(tmp_path):
  lines = [{'kind': 'train', 'step': 2, 'train_loss': 2.0},
           {'kind': 'train', 'step': 4, 'train_loss': 1.9},  # killed run, replayed below
           {'kind': 'train', 'step': 4, 'train_loss': 1.8},
           {'kind': 'epoch', 'step': 4, 'test_loss': 'nan'}]
  (tmp_path / 'metrics.jsonl').write_text(
      ''.join(json.dumps(r) + '\n' for r in lines) + '{"kind": "train", "st')  # torn last line
  records = metric_writer.read_metrics(str(tmp_path))
  assert [(r['kind'], r['step']) for r in records] == [('train', 2), ('train', 4), ('epoch', 4)]
  assert records[1]['train_loss'] == 1.8 and np.isnan(records[2]['test_loss'])


_WRITE_EVENTS = f'''
import sys
sys.path.insert(0, {REPO!r})
from hybrid_flax import metric_writer
BEFORE
writer = metric_writer.MetricWriter(sys.argv[1])
print('writer made', file=sys.stderr)
writer.write({{'kind': 'train', 'step': 3, 'train_loss': 1.5}})
writer.close()
import torch
print('torch is', torch.__name__, torch.Tensor.__name__, file=sys.stderr)
'''


@pytest.mark.parametrize('before', ['', 'import torch'])
def test_the_metric_writer_imports_tensorboardx_without_torch(tmp_path, before):
  # A stand-in torch, importable as the real one is where installed (the bench extra), which
  # tensorboardX's writer imports when it can.
  site = tmp_path / 'site'
  (site / 'torch').mkdir(parents=True)
  (site / 'torch' / '__init__.py').write_text(
      "import sys\nprint('stand-in torch imported', file=sys.stderr)\nclass Tensor: pass\n")
  env = {**os.environ, 'PYTHONPATH': str(site)}
  plain = subprocess.run([sys.executable, '-c', 'import tensorboardX'], env=env,
                         capture_output=True, text=True, timeout=120, check=True)
  assert 'stand-in torch imported' in plain.stderr  # what the writer avoids
  workdir = tmp_path / 'run'
  code = _WRITE_EVENTS.replace('BEFORE', before)
  proc = subprocess.run([sys.executable, '-c', code, str(workdir)], env=env,
                        capture_output=True, text=True, timeout=120, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stderr.count('stand-in torch imported') == 1  # once: at `import torch`
  made, imported = proc.stderr.index('writer made'), proc.stderr.index('stand-in torch imported')
  assert (imported > made) == (not before)  # torch imported first stays imported, as it was
  assert 'torch is torch Tensor' in proc.stderr  # an `import torch` afterwards is not blocked
  assert len(os.listdir(workdir / metric_writer.TENSORBOARD_DIR)) == 1  # the events were written
  assert metric_writer.read_metrics(str(workdir))[0]['train_loss'] == 1.5


def test_plots_and_evaluate_on_a_workdir_without_a_run(tmp_path):
  with pytest.raises(SystemExit) as excinfo:
    plots.main(['--workdir', str(tmp_path)])
  assert 'metrics.jsonl does not exist' in _error(excinfo)
  with pytest.raises(SystemExit) as excinfo:
    evaluate.main(['--workdir', str(tmp_path)])
  assert 'holds no training run' in _error(excinfo)


def test_attention_weights_are_distributions_and_do_not_change_the_model(run, test_split):
  images = test_split[0][:4]
  weights = inference.attention_weights(run, images)
  heads = run.config.model.num_heads
  assert {k: v.shape for k, v in weights.items()} == {
      'attention1': (4, heads, 16 * 16, 16 * 16), 'attention2': (4, heads, 4 * 4, 4 * 4)}
  for w in weights.values():
    np.testing.assert_allclose(w.sum(-1), 1.0, rtol=1e-5)
    received = attention_maps.received_attention(w)
    np.testing.assert_allclose(received.mean(axis=(1, 2)), 1.0, rtol=1e-5)
  # Sowing the weights is a side channel: the logits are those of the plain forward pass.
  plain = run.model.apply(run.variables, train.preprocess(images), train=False)
  sowing, _ = run.model.apply(run.variables, train.preprocess(images), train=False,
                              mutable=['intermediates'])
  np.testing.assert_array_equal(jax.device_get(plain), jax.device_get(sowing))


def test_attention_maps_png(workdir, run, capsys):
  maps = attention_maps.main(['--workdir', workdir, '--num_images', '3'])
  assert [m.shape for m in maps.values()] == [(3, 16, 16), (3, 4, 4)]
  out = capsys.readouterr().out
  assert _is_png(os.path.join(workdir, 'figures', f'attention_step_{run.step}.png'))
  assert 'attention1: 2 heads over 16x16 positions' in out


def test_attention_maps_pick_one_image_per_class_first():
  labels = np.asarray([3, 3, 1, 0, 1, 0, 2])
  np.testing.assert_array_equal(attention_maps.pick_examples(labels, 5), [3, 2, 6, 0, 5])


def test_attention_tools_refuse_a_model_without_attention(run):
  config = run.config.copy_and_resolve_references()
  config.model.attention = False
  with pytest.raises(ValueError, match='has no attention blocks'):
    inference.attention_weights(dataclasses.replace(run, config=config), np.zeros((1, 32, 32, 3)))
