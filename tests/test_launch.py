"""launch.py end to end on a tiny imported data set: train, kill, resume, and errors."""

import glob
import gzip
import json
import os
import re
import shutil
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from hybrid_flax import split_cache
from tests import conftest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS_PER_EPOCH = 10 * conftest.TRAIN_PER_CLASS // 16
EPOCHS = 3
TOTAL_STEPS = EPOCHS * STEPS_PER_EPOCH

# Each launcher patches one hook of the package, then runs launch.py in-process.
_HEADER = '''
import os, runpy, signal, sys
sys.path.insert(0, {repo!r})
'''
_RUN_LAUNCH = '''
sys.argv = ['launch.py'] + sys.argv[1:]
runpy.run_path(os.path.join({repo!r}, 'launch.py'), run_name='__main__')
'''

# Says at exit whether the run imported TensorFlow: training reads its data without it, and
# importing it (only to hide the GPUs) once cost every launch 4-9 s.
_REPORTING_LAUNCHER = _HEADER + '''
import atexit
atexit.register(lambda: print('tensorflow imported:', 'tensorflow' in sys.modules, file=sys.stderr))
''' + _RUN_LAUNCH

# SIGKILL right after saving step KILL_AT_STEP: a kill at an exact, reproducible point.
_KILLING_LAUNCHER = _HEADER + '''
from hybrid_flax import checkpointing
_save = checkpointing.save
def save(manager, state, meta):
  out = _save(manager, state, meta)
  if meta['step'] == int(os.environ['KILL_AT_STEP']):
    if os.environ['KILL_MODE'] == 'after_write':
      manager.wait_until_finished()
    os.kill(os.getpid(), signal.SIGKILL)  # 'mid_write': the async write may be in flight
  return out
checkpointing.save = save
''' + _RUN_LAUNCH

# SIGTERM right after the metrics of step TERM_AT_STEP are written: between checkpoints.
_TERM_LAUNCHER = _HEADER + '''
from hybrid_flax import metric_writer
_write = metric_writer.MetricWriter.write
def write(self, record):
  _write(self, record)
  if record.get('step') == int(os.environ['TERM_AT_STEP']):
    os.kill(os.getpid(), signal.SIGTERM)
metric_writer.MetricWriter.write = write
''' + _RUN_LAUNCH


def _launch_args(data_dir, *extra):
  return ['--config', os.path.join(REPO, 'configs/cifar_tiny.py'),
          '--config.dataset=cifar10_folder', f'--config.data_dir={data_dir}',
          f'--config.num_epochs={EPOCHS}', '--config.model.dropout=0.1',
          '--config.progress_bar=False', *extra]


def _launch(workdir, data_dir, *extra, env=None, launcher=None):
  cmd = [sys.executable] + (['-c', launcher] if launcher else [os.path.join(REPO, 'launch.py')])
  return subprocess.run(cmd + _launch_args(data_dir, *extra) + ['--workdir', str(workdir)],
                        capture_output=True, text=True, timeout=300, cwd=REPO,
                        env={**os.environ, **(env or {})}, check=False)


def compiled_ahead(proc):
  """The programs a launch compiled in the background, by name, in the order they finished."""
  return re.findall(r'Compiled the (.+?) in [0-9.]+s \(in the background\)', proc.stderr)


def _metrics(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f]


def _final_params(workdir):
  step = max(int(d) for d in os.listdir(os.path.join(workdir, 'checkpoints')) if d.isdigit())
  state = ocp.StandardCheckpointer().restore(
      os.path.join(workdir, 'checkpoints', str(step), 'state'))
  return step, state

# Fills the workdir's disk once the checkpoint of step FILL_AT_STEP is on it, so that a later
# write, whichever comes first (metrics, events, the next checkpoint), finds no space.
_FILLING_LAUNCHER = _HEADER + '''
from hybrid_flax import checkpointing
_save = checkpointing.save
def save(manager, state, meta):
  out = _save(manager, state, meta)
  if meta['step'] == int(os.environ['FILL_AT_STEP']):
    manager.wait_until_finished()
    with open(os.environ['FILLER'], 'wb') as f:
      try:
        while True:
          f.write(bytes(1 << 16))
          f.flush()
      except OSError:
        pass
  return out
checkpointing.save = save
''' + _RUN_LAUNCH


@pytest.fixture(scope='module')
def reference_run(tmp_path_factory, tiny_data_dir):
  workdir = tmp_path_factory.mktemp('reference')
  proc = _launch(workdir, tiny_data_dir, launcher=_REPORTING_LAUNCHER.format(repo=REPO))
  assert proc.returncode == 0, proc.stderr[-4000:]
  return workdir, proc


def test_launch_trains_evaluates_and_checkpoints(reference_run):
  workdir, proc = reference_run
  assert sorted(compiled_ahead(proc)) == ['eval step', 'train step']
  epochs = [m for m in _metrics(workdir) if m['kind'] == 'epoch']
  assert [m['epoch'] for m in epochs] == list(range(1, EPOCHS + 1))
  for m in epochs:
    assert m['test_examples'] == 10 * conftest.TEST_PER_CLASS  # padding not counted
    for key in ('train_loss', 'train_accuracy', 'test_accuracy', 'learning_rate',
                'images_per_sec', 'epoch_seconds'):
      assert key in m
  assert any(m['kind'] == 'train' and 'steps_per_sec' in m for m in _metrics(workdir))
  steps = sorted(int(d) for d in os.listdir(workdir / 'checkpoints') if d.isdigit())
  assert steps[-1] == TOTAL_STEPS and len(steps) == 3  # keep_checkpoints
  assert 'No checkpoint' in proc.stderr
  # The time left, after every epoch but the last (a background run's log has no progress bar).
  left = re.findall(r'Epoch (\d) of 3 done; at its pace the remaining (\d+) steps take ~\d+s',
                    proc.stderr)
  assert left == [(str(e), str(TOTAL_STEPS - e * STEPS_PER_EPOCH)) for e in (1, 2)], left
  assert 'host CPU: ' in proc.stderr  # wall times in the log need the CPU beside them
  assert 'tensorflow imported: False' in proc.stderr
  # conftest's shared cache, given as --jax_compilation_cache_dir's variable, stays the cache.
  assert (f'JAX compilation cache: {os.environ["JAX_COMPILATION_CACHE_DIR"]} '
          '(--jax_compilation_cache_dir)') in proc.stderr
  assert json.load(open(workdir / 'config.json'))['dataset'] == 'cifar10_folder'


def _tensorboard_scalars(workdir):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top  # test extra: reads events
  scalars = {}
  for path in (workdir / 'tensorboard').iterdir():
    for event in tf.compat.v1.train.summary_iterator(str(path)):
      for value in event.summary.value:
        scalars.setdefault(value.tag, {})[event.step] = value.simple_value
  return scalars


def test_tensorboard_events_mirror_the_metrics_file(reference_run):
  workdir, _ = reference_run
  scalars = _tensorboard_scalars(workdir)
  for record in _metrics(workdir):
    for key in ('train_loss', 'test_accuracy', 'learning_rate', 'steps_per_sec'):
      if key in record:
        assert scalars[f'{record["kind"]}/{key}'][record['step']] == pytest.approx(record[key])
  assert len(scalars['epoch/test_accuracy']) == EPOCHS


def test_rerunning_a_finished_run_only_evaluates(reference_run, tiny_data_dir):
  workdir, _ = reference_run
  before = _final_params(workdir)
  proc = _launch(workdir, tiny_data_dir)
  assert proc.returncode == 0, proc.stderr[-4000:]
  assert 'Training already finished' in proc.stderr
  assert compiled_ahead(proc) == ['eval step']  # no train step to compile for nothing
  assert _metrics(workdir)[-1]['kind'] == 'final'
  assert _final_params(workdir)[0] == before[0]


@pytest.mark.parametrize('mode', ['after_write', 'mid_write'])
def test_killed_and_resumed_run_equals_uninterrupted_run(reference_run, tiny_data_dir,
                                                         tmp_path, mode):
  kill_at = STEPS_PER_EPOCH + 1  # mid-epoch 2; the tiny config checkpoints every 2 steps
  assert kill_at % 2 == 0
  launcher = _KILLING_LAUNCHER.format(repo=REPO)
  killed = _launch(tmp_path, tiny_data_dir, launcher=launcher,
                   env={'KILL_AT_STEP': str(kill_at), 'KILL_MODE': mode})
  assert killed.returncode == -9, killed.stderr[-4000:]
  resumed = _launch(tmp_path, tiny_data_dir)
  assert resumed.returncode == 0, resumed.stderr[-4000:]
  if mode == 'after_write':
    assert f'Resumed from step {kill_at} (epoch 1, batch 1 of {STEPS_PER_EPOCH})' in resumed.stderr
  else:
    assert 'Resumed from step' in resumed.stderr
  ref_step, ref = _final_params(reference_run[0])
  step, got = _final_params(tmp_path)
  assert step == ref_step == TOTAL_STEPS
  # Bit-for-bit: params, batch statistics, optimizer state, step and RNG.
  ref_leaves, ref_def = jax.tree_util.tree_flatten_with_path(ref)
  got_leaves, got_def = jax.tree_util.tree_flatten_with_path(got)
  assert ref_def == got_def
  assert {p[0].key for p, _ in ref_leaves} == {'params', 'batch_stats', 'opt_state', 'step',
                                               'rng'}
  for (path, a), (_, b) in zip(ref_leaves, got_leaves):
    np.testing.assert_array_equal(np.asarray(b), np.asarray(a), err_msg=jax.tree_util.keystr(path))
  ref_test = [m['test_accuracy'] for m in _metrics(reference_run[0]) if m['kind'] == 'epoch']
  got_test = [m['test_accuracy'] for m in _metrics(tmp_path) if m['kind'] == 'epoch']
  assert got_test == ref_test[:len(got_test)] and len(got_test) == EPOCHS


def test_missing_dataset_stops_at_once_with_import_instructions(tmp_path):
  proc = _launch(tmp_path / 'wd', tmp_path / 'empty_tfds')
  assert proc.returncode != 0
  assert 'not prepared' in proc.stderr and 'python -m hybrid_flax.import_data' in proc.stderr
  assert 'Traceback' not in proc.stderr


@pytest.mark.parametrize('override, message', [
    ('--config.batch_size=18', 'batch_size=18 must be a positive multiple of the 4 devices'),
    ('--config.learning_rate=-1', 'learning_rate must be positive'),
    ('--config.learnig_rate=0.1',
     'error: bad config override: \'learnig_rate\' Did you mean "learning_rate"'),
    ('--config.model.num_heads=3', 'is not divisible by model.num_heads=3'),
    ('--config.dataset=cifar11', "error: unknown data set 'cifar11'"),
    ('--config.profile_steps=-1', 'profile_steps must be >= 0, got -1'),
    ('--config.eval_split=tset', "error: 'cifar10_folder' has no split 'tset' (Unknown split"),
    ('--config=configs/nope.py', 'error: cannot load the --config file: OSError'),
    ('--config.xla_cpu_convolutions=fast',
     "error: xla_cpu_convolutions must be one of ('xla', 'default'), got 'fast'"),
])
def test_bad_config_is_one_clear_error(tmp_path, tiny_data_dir, override, message):
  proc = _launch(tmp_path, tiny_data_dir, override)
  assert proc.returncode != 0 and message in proc.stderr.splitlines()[-1]
  assert 'Traceback' not in proc.stderr and not (tmp_path / 'checkpoints').exists()


def test_checkpoints_this_config_cannot_read_stop_the_run_instead_of_restarting(
    reference_run, tiny_data_dir, tmp_path):
  workdir = tmp_path / 'run'
  shutil.copytree(reference_run[0], workdir)
  before = sorted(os.listdir(workdir / 'checkpoints'))
  # The weight average adds state that the reference run's checkpoints do not hold.
  proc = _launch(workdir, tiny_data_dir, '--config.ema_decay=0.9')
  last = proc.stderr.splitlines()[-1]
  assert proc.returncode != 0 and last.startswith('error: none of the 3 checkpoints in ')
  assert 'use a new --workdir' in last and 'Traceback' not in proc.stderr
  assert 'starting from scratch' not in proc.stderr
  assert sorted(os.listdir(workdir / 'checkpoints')) == before  # nothing written or deleted


def test_a_held_out_slice_of_the_training_split_is_evaluated_and_overlap_flagged(
    tmp_path, tiny_data_dir):
  # 64 of the 80 training examples train; the evaluation reads the last 32, half of them trained on.
  proc = _launch(tmp_path, tiny_data_dir, '--config.train_split=train[:64]',
                 '--config.eval_split=train[48:]', '--config.num_epochs=1')
  assert proc.returncode == 0, proc.stderr[-4000:]
  assert ('16 of the 32 evaluation examples (train[48:]) are also training examples '
          '(train[:64])') in proc.stderr
  assert 'Opened cifar10_folder[train[:64]]: 64 examples' in proc.stderr
  epochs = [m for m in _metrics(tmp_path) if m['kind'] == 'epoch']
  assert [m['test_examples'] for m in epochs] == [32]
  assert epochs[0]['step'] == 64 // 16


def test_profile_steps_trace_a_window_after_the_first_step(tmp_path, tiny_data_dir):
  proc = _launch(tmp_path, tiny_data_dir, '--config.profile_steps=2', '--config.num_epochs=1')
  assert proc.returncode == 0, proc.stderr[-4000:]
  assert re.search(r'Profiled steps 2-3 \([0-9.]+s\) into .*profile/plugins/profile', proc.stderr)
  traces = glob.glob(str(tmp_path / 'profile' / 'plugins' / 'profile' / '*' / '*.trace.json.gz'))
  assert len(traces) == 1 and glob.glob(os.path.join(os.path.dirname(traces[0]), '*.xplane.pb'))
  with gzip.open(traces[0], 'rt') as f:
    events = json.load(f)['traceEvents']
  # Each traced step is named, with its number, and only the window's steps were traced.
  steps = {e['args']['step_num'] for e in events
           if e.get('name') == 'train' and 'step_num' in e.get('args', {})}
  assert steps == {'2', '3'}


def _checkpoint_meta_files(workdir):
  return [os.path.join(d, 'meta', 'metadata')
          for d in glob.glob(os.path.join(workdir, 'checkpoints', '[0-9]*'))]


def test_resuming_on_another_training_split_is_refused(reference_run, tiny_data_dir, tmp_path):
  workdir = tmp_path / 'run'
  shutil.copytree(reference_run[0], workdir)
  # As many examples as the reference run's 'train', so only the split's name tells them apart.
  proc = _launch(workdir, tiny_data_dir, '--config.train_split=train[16:]+test[:16]')
  last = proc.stderr.splitlines()[-1]
  assert proc.returncode != 0 and 'written with a different input stream' in last
  assert "'train_split': ('train', 'train[16:]+test[:16]')" in last
  # Checkpoints written before the field existed were all on 'train', and still resume.
  files = _checkpoint_meta_files(workdir)
  assert files
  for path in files:
    with open(path) as f:
      meta = json.load(f)
    assert meta.pop('train_split') == 'train'
    with open(path, 'w') as f:
      json.dump(meta, f)
  proc = _launch(workdir, tiny_data_dir)
  assert proc.returncode == 0 and 'Training already finished' in proc.stderr, proc.stderr[-4000:]


def test_sigterm_saves_a_checkpoint_at_the_current_step_and_resume_continues(
    reference_run, tiny_data_dir, tmp_path):
  no_periodic = ('--config.log_every_steps=3', '--config.checkpoint_every_steps=100')
  stopped = _launch(tmp_path, tiny_data_dir, *no_periodic,
                    launcher=_TERM_LAUNCHER.format(repo=REPO), env={'TERM_AT_STEP': '3'})
  assert stopped.returncode == 0, stopped.stderr[-4000:]
  assert 'Stopped at step 3 on signal 15' in stopped.stderr
  assert [d for d in os.listdir(tmp_path / 'checkpoints') if d.isdigit()] == ['3']
  resumed = _launch(tmp_path, tiny_data_dir, *no_periodic)
  assert resumed.returncode == 0 and 'Resumed from step 3' in resumed.stderr
  (_, ref), (_, got) = _final_params(reference_run[0]), _final_params(tmp_path)
  jax.tree.map(np.testing.assert_array_equal, got['params'], ref['params'])


@pytest.fixture
def small_disk(tmp_path):
  """A 16 MiB tmpfs to fill; skipped where this user cannot mount one (not root, a container
  without the capability)."""
  disk = tmp_path / 'disk'
  disk.mkdir()
  try:
    mounted = subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=16m', 'tmpfs', str(disk)],
                             capture_output=True, text=True, timeout=30, check=False)
  except OSError as e:  # no mount command
    pytest.skip(f'cannot mount a tmpfs to fill: {e}')
  if mounted.returncode:
    pytest.skip(f'cannot mount a tmpfs to fill: {mounted.stderr.strip()}')
  yield disk
  subprocess.run(['umount', '-l', str(disk)], timeout=30, check=False)


def test_a_full_disk_stops_the_run_in_one_line_and_resume_continues_it(reference_run,
                                                                       tiny_data_dir, small_disk):
  fill_at = 4  # a checkpoint step: the tiny config checkpoints every 2 steps
  workdir, filler = small_disk / 'run', small_disk / 'filler'
  full = _launch(workdir, tiny_data_dir, launcher=_FILLING_LAUNCHER.format(repo=REPO),
                 env={'FILL_AT_STEP': str(fill_at), 'FILLER': str(filler)})
  assert full.returncode == 1, full.stderr[-4000:]
  # Orbax logs its threads' tracebacks; the run's own verdict is one line.
  errors = [line for line in full.stderr.splitlines() if line.startswith('error: ')]
  assert len(errors) == 1, full.stderr[-4000:]
  assert 'No space left on device' in errors[0], errors[0]
  assert f'rerun the same command to resume from step {fill_at},' in errors[0], errors[0]
  filler.unlink()
  resumed = _launch(workdir, tiny_data_dir)
  assert resumed.returncode == 0, resumed.stderr[-4000:]
  assert f'Resumed from step {fill_at} ' in resumed.stderr
  (ref_step, ref), (step, got) = _final_params(reference_run[0]), _final_params(workdir)
  assert step == ref_step == TOTAL_STEPS
  jax.tree.map(np.testing.assert_array_equal, got, ref)  # the whole state, bit for bit


def test_diverging_loss_stops_naming_the_step_and_keeps_good_checkpoints(tiny_data_dir,
                                                                        tmp_path):
  proc = _launch(tmp_path, tiny_data_dir, '--config.learning_rate=1e12')
  assert proc.returncode != 0
  assert 'training diverged' in proc.stderr and 'Traceback' not in proc.stderr
  bad_step = int(proc.stderr.split('at step ')[1].split(':')[0])
  steps = [int(d) for d in os.listdir(tmp_path / 'checkpoints') if d.isdigit()]
  assert all(s < bad_step for s in steps)
  for s in steps:
    state = ocp.StandardCheckpointer().restore(str(tmp_path / 'checkpoints' / str(s) / 'state'))
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(state['params']))


def test_random_sigkills_anywhere_leave_the_final_state_unchanged(reference_run, tiny_data_dir,
                                                                 tmp_path):
  del reference_run  # only for the programs it compiled into the cache
  # The tool times its own uninterrupted run to place the kills, so that run and the killed ones
  # must find the same programs compiled. A private copy of the cache: a kill mid-write may leave
  # a truncated entry there (JAX then warns and recompiles), never in the session's.
  cache = tmp_path / 'jit_cache'
  shutil.copytree(conftest.JIT_CACHE, cache)
  check = subprocess.run(
      [sys.executable, '-m', 'hybrid_flax.kill_anywhere', '--workdir', str(tmp_path / 'runs'),
       '--kills=4', '--seed=3', '--', *_launch_args(tiny_data_dir)],
      capture_output=True, text=True, timeout=600, cwd=REPO, check=False,
      env={**os.environ, 'JAX_COMPILATION_CACHE_DIR': str(cache)})
  assert check.returncode == 0, check.stdout + check.stderr[-3000:]
  assert 'reference run: ' in check.stdout
  assert 'IDENTICAL to the uninterrupted run' in check.stdout
  kills = int(check.stdout.split(' kills (')[0].split()[-1])
  assert kills >= 1, check.stdout


def test_data_on_device_trains_exactly_like_the_host_pipeline(reference_run, tiny_data_dir,
                                                              tmp_path):
  proc = _launch(tmp_path, tiny_data_dir, '--config.data_on_device=True')
  assert proc.returncode == 0, proc.stderr[-4000:]
  # The same batches, gathered on the device instead of on the host: the same training.
  ref_step, ref = _final_params(reference_run[0])
  step, got = _final_params(tmp_path)
  assert step == ref_step == TOTAL_STEPS
  for (path, a), (_, b) in zip(jax.tree_util.tree_flatten_with_path(ref)[0],
                               jax.tree_util.tree_flatten_with_path(got)[0]):
    np.testing.assert_array_equal(np.asarray(b), np.asarray(a), err_msg=jax.tree_util.keystr(path))
  ref_test = [m['test_accuracy'] for m in _metrics(reference_run[0]) if m['kind'] == 'epoch']
  assert [m['test_accuracy'] for m in _metrics(tmp_path) if m['kind'] == 'epoch'] == ref_test


def test_a_second_launch_reads_the_splits_decoded_from_the_split_cache(tmp_path, tiny_data_dir):
  env = {split_cache.ENV: str(tmp_path / 'splits')}
  first = _launch(tmp_path / 'first', tiny_data_dir, '--config.num_epochs=1', env=env)
  assert first.returncode == 0, first.stderr[-4000:]
  assert first.stderr.count('Saved the decoded split to ') == 2  # train and test, read whole
  assert 'Process 0 decoded 80 of 80 training and 20 of 20 test examples' in first.stderr
  second = _launch(tmp_path / 'second', tiny_data_dir, '--config.num_epochs=1', env=env)
  assert second.returncode == 0, second.stderr[-4000:]
  assert second.stderr.count('decoded, from the split cache ') == 2
  assert 'Process 0 decoded 0 of 80 training and 0 of 20 test examples' in second.stderr
  timings = ('steps_per_sec', 'images_per_sec', 'epoch_seconds', 'eval_seconds')
  untimed = lambda workdir: [{k: v for k, v in m.items() if k not in timings}
                             for m in _metrics(workdir)]
  assert untimed(tmp_path / 'first') == untimed(tmp_path / 'second')
