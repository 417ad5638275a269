"""launch.py as several processes on localhost (jax.distributed, gloo collectives on CPU).

Each process has 2 fake CPU devices; the reference is one process with 4, the same global batch.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import warnings

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from hybrid_flax import split_cache
from tests import conftest
from tests import test_launch

REPO = test_launch.REPO
NUM_TRAIN, NUM_TEST = 10 * conftest.TRAIN_PER_CLASS, 10 * conftest.TEST_PER_CLASS
BATCH, EPOCHS = 32, 2
STEPS_PER_EPOCH = NUM_TRAIN // BATCH  # 2: four steps in all
# 20 test examples in global eval batches of 12: the second batch is 8 real rows then 4 padding
# rows, so process 0 gets 6 real rows of it and process 1 gets 2 real rows and all the padding.
EVAL_BATCH = 12
# Two processes sum gradients and batch statistics through gloo, one process inside XLA: the
# same numbers added in a different order, so the parameters agree to float32 rounding after one
# step (measured max |diff| 1.2e-7), where a wrong batch on any process is off by ~1e-2: the
# first step is compared at FIRST_TOL, with a margin of ~100x on both sides. After that the runs
# drift apart by about 3x per step on this tiny model (max-pool and ReLU switch on near-ties):
# 4.0e-6 after the 4 steps trained here, 6.7e-5 after 5. The runs use Flax's attention core:
# the default one (models.SelfAttention, the same function to rounding, tested in
# test_models.py) starts this trajectory from different rounding, which meets a max-pool near-tie
# in step 2 and ends 1.5e-3 apart. On an Intel Xeon host (family 6 model 167) the Flax-core runs
# meet such a near-tie too and end 1.49e-3 apart (measured); on a Zen 4 (family 25 model 17)
# with Winograd's convolutions (model.conv_winograd) 2.4e-7 after one step and 1.75e-3 after
# four, in three runs of three. So the last step is compared at LAST_TOL: it still catches a
# wrong batch in the later steps (1e-2 after one step, more after several), with a narrower
# margin than the first step's check has. The tests compile at XLA's optimisation level 0
# (conftest.xla_flags): on a Zen 3 (family 25 model 1), with Winograd's convolutions, the runs
# ended 1.19e-7 apart after one step and 1.29e-3 after four, against 1.52e-7 and 1.28e-3 at
# XLA's default level 3.
FIRST_TOL = 1e-5
LAST_TOL = 3e-3


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def _env(devices):
  # The compilation cache (conftest) comes with os.environ: the runs of one topology compile
  # the same programs. No split cache: the tests count each process's reads.
  return {**os.environ, 'JAX_PLATFORMS': 'cpu', split_cache.ENV: '',
          'XLA_FLAGS': conftest.xla_flags(devices)}


def _args(data_dir, workdir, *extra):
  return (test_launch._launch_args(  # pylint: disable=protected-access
      data_dir, f'--config.num_epochs={EPOCHS}', f'--config.batch_size={BATCH}',
      f'--config.eval_batch_size={EVAL_BATCH}', '--config.checkpoint_every_steps=1',
      f'--config.keep_checkpoints={EPOCHS * STEPS_PER_EPOCH}',  # step 1's too, for the tests
      '--config.model.attention_impl=flax', *extra)
          + ['--workdir', str(workdir)])


class _Run:
  """Processes of one launch: return codes and logs (files, so a chatty process never blocks)."""

  def __init__(self, procs, logs):
    self.procs, self.logs = procs, logs

  def wait(self, timeout=300):
    deadline = time.time() + timeout
    for p in self.procs:
      p.wait(timeout=max(1, deadline - time.time()))
    return self

  @property
  def returncodes(self):
    return [p.returncode for p in self.procs]

  @property
  def stderr(self):
    out = []
    for log in self.logs:
      with open(log) as f:
        out.append(f.read())
    return out


def _start(workdir, data_dir, processes, *extra, launcher=None, env=None,
           coordinator=None, logdir=None):
  """Starts `processes` processes of launch.py that train one model together.

  `env`: extra environment variables for every process, or a list of them, one per process.
  """
  coordinator = coordinator or f'localhost:{_free_port()}'
  logdir = logdir or workdir
  os.makedirs(logdir, exist_ok=True)
  cmd = [sys.executable] + (['-c', launcher] if launcher else [os.path.join(REPO, 'launch.py')])
  procs, logs = [], []
  for i in range(processes):
    dist = ([f'--coordinator_address={coordinator}', f'--num_processes={processes}',
             f'--process_id={i}'] if processes > 1 else [])
    logs.append(os.path.join(logdir, f'process{i}.{time.time_ns()}.log'))
    extra_env = env[i] if isinstance(env, list) else env or {}
    with open(logs[-1], 'w') as log:
      procs.append(subprocess.Popen(cmd + _args(data_dir, workdir, *extra) + dist, cwd=REPO,
                                    stdout=subprocess.DEVNULL, stderr=log,
                                    env={**_env(4 // processes), **extra_env}))
  return _Run(procs, logs)


# On a loaded 2-core host (CI runs two test workers beside these processes) gloo's TCP
# handshake between the processes, made at their first collective under gloo's own deadline,
# which JAX exposes no setting for, timed out once in a suite run ("Gloo context initialization
# failed: ... Connect timeout"; the test passed when rerun alone). Every process then exits 1
# before its first step, having written nothing, so such a start is retried once, with a fresh
# coordinator port; any other failure, or a second one, fails the test.
GLOO_FLAKE = 'Gloo context initialization failed'


def _settled(start, settle=_Run.wait, first=None):
  """settle(start()) (or of `first`, already started), started again once if gloo's handshake
  timed out."""
  run = settle(first or start())
  if any(GLOO_FLAKE in log for log in run.stderr):
    warnings.warn(f'{GLOO_FLAKE} (localhost handshake timed out); starting the processes again')
    run = settle(start())
  return run


def _final_state(workdir, step=None):
  """The (last) checkpoint's leaves by path, restored onto this process's first device."""
  step = step or max(int(d) for d in os.listdir(os.path.join(workdir, 'checkpoints'))
                     if d.isdigit())
  path = os.path.join(workdir, 'checkpoints', str(step), 'state')
  checkpointer = ocp.StandardCheckpointer()
  # The writers' devices are not this process's: restore onto a target given here.
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                        checkpointer.metadata(path).item_metadata.tree)
  state = checkpointer.restore(path, target)
  return step, {jax.tree_util.keystr(p): np.asarray(x)
                for p, x in jax.tree_util.tree_flatten_with_path(state)[0]}


def _one_and_two(tmp_path_factory, data_dir, *extra):
  """One process on 4 devices and two processes on 2 devices each, run side by side."""
  one_dir, two_dir = tmp_path_factory.mktemp('one'), tmp_path_factory.mktemp('two')
  one = _start(one_dir, data_dir, 1, *extra)
  two = _start(two_dir, data_dir, 2, *extra)
  one.wait()
  two = _settled(lambda: _start(two_dir, data_dir, 2, *extra), first=two)
  assert one.returncodes == [0], one.stderr[0][-4000:]
  assert two.returncodes == [0, 0], '\n'.join(e[-3000:] for e in two.stderr)
  return (one_dir, one), (two_dir, two)


@pytest.fixture(scope='module')
def runs(tmp_path_factory, tiny_data_dir):
  return _one_and_two(tmp_path_factory, tiny_data_dir)


def _compare_trained(one_dir, two_dir, step, tol):
  step_one, ref = _final_state(one_dir, step)
  step_two, got = _final_state(two_dir, step)
  assert step_one == step_two == (step or EPOCHS * STEPS_PER_EPOCH)
  assert ref.keys() == got.keys()
  compared = [k for k in ref if k.startswith(("['params']", "['batch_stats']"))]
  diff = max(float(np.max(np.abs(got[k].astype(np.float64) - ref[k]))) for k in compared)
  print(f'\nmax |two processes - one process| over {len(compared)} parameter and batch '
        f'statistics leaves after {step_one} steps: {diff:.3g}')
  for k in compared:
    np.testing.assert_allclose(got[k], ref[k], rtol=tol, atol=tol, err_msg=k)


def test_two_processes_end_with_the_parameters_of_one(runs):
  (one_dir, _), (two_dir, _) = runs
  _compare_trained(one_dir, two_dir, 1, FIRST_TOL)
  _compare_trained(one_dir, two_dir, None, LAST_TOL)
  one_epochs = [m for m in test_launch._metrics(one_dir) if m['kind'] == 'epoch']  # pylint: disable=protected-access
  two_epochs = [m for m in test_launch._metrics(two_dir) if m['kind'] == 'epoch']  # pylint: disable=protected-access
  # Only process 0 writes: one record per epoch, not one per process.
  assert [m['epoch'] for m in two_epochs] == list(range(1, EPOCHS + 1))
  for a, b in zip(one_epochs, two_epochs):
    assert a['test_examples'] == b['test_examples'] == NUM_TEST  # each test example once
    assert a['test_accuracy'] == b['test_accuracy']
    # The tiny model's test loss after 4 steps is ~36 (extreme logits), so the Xeon host's
    # 1.5e-3 parameter drift moves it 0.9% (36.63 against 36.31); accuracy still matches exactly.
    assert b['test_loss'] == pytest.approx(a['test_loss'], rel=2e-2)


def test_two_processes_share_out_muons_kernels_as_one_process_does(tmp_path_factory,
                                                                   tiny_data_dir):
  # Each device orthogonalises its share of the conv kernels and a sum over the devices (gloo
  # between the processes) gives everyone the whole update.
  (one_dir, _), (two_dir, _) = _one_and_two(tmp_path_factory, tiny_data_dir,
                                            '--config.optimizer=muon')
  _compare_trained(one_dir, two_dir, 1, FIRST_TOL)


def test_each_process_logs_its_place_and_reads_only_its_rows(runs):
  (_, _), (_, two) = runs
  test_reads, per = 0, BATCH // 2
  for i, log in enumerate(two.stderr):
    assert f'process {i} of 2, local devices' in log and '4 devices in all' in log
    assert "Mesh {'data': 4} over 4 devices in 2 processes" in log
    assert (f'process {i} feeds rows {per * i}..{per * (i + 1) - 1} of each global batch of '
            f'{BATCH}') in log
    read = log.split(f'Process {i} decoded ')[1].split()
    train_read, test_read = int(read[0]), int(read[5])
    # Epoch 1: exactly its rows' examples; epoch 2 adds the new ones among its rows then.
    assert STEPS_PER_EPOCH * per <= train_read < EPOCHS * STEPS_PER_EPOCH * per
    test_reads += test_read
    assert ('train_loss=' in log) == (i == 0)  # metrics echoed by process 0 only
  assert test_reads == NUM_TEST  # the processes' test shards are disjoint and cover the split


def _kill_all_when_one_dies(run, timeout=300):
  deadline = time.time() + timeout
  while all(p.poll() is None for p in run.procs):
    assert time.time() < deadline, 'no process died'
    time.sleep(0.2)
  for p in run.procs:  # a job scheduler would take the rest down with it
    if p.poll() is None:
      p.send_signal(signal.SIGKILL)
  return run.wait()


def test_two_processes_killed_at_a_checkpoint_resume_to_the_same_result(runs, tiny_data_dir,
                                                                        tmp_path):
  (_, _), (two_dir, _) = runs
  kill_at = STEPS_PER_EPOCH + 1  # mid-epoch 2
  killed = _settled(lambda: _start(
      tmp_path, tiny_data_dir, 2, launcher=test_launch._KILLING_LAUNCHER.format(repo=REPO),  # pylint: disable=protected-access
      env={'KILL_AT_STEP': str(kill_at), 'KILL_MODE': 'after_write'}), _kill_all_when_one_dies)
  assert -signal.SIGKILL in killed.returncodes, killed.stderr
  assert f'{kill_at}' in os.listdir(tmp_path / 'checkpoints')
  meta = json.load(open(tmp_path / 'checkpoints' / str(kill_at) / 'meta' / 'metadata'))
  assert meta['process_count'] == 2

  alone = _start(tmp_path, tiny_data_dir, 1).wait()  # the wrong process count: refused
  assert alone.returncodes[0] != 0
  assert alone.stderr[0].splitlines()[-1] == (
      f'error: the checkpoint in {tmp_path} was written by 2 process(es) and this run has 1; '
      'resume with --num_processes=2 or use a new --workdir')

  resumed = _settled(lambda: _start(tmp_path, tiny_data_dir, 2))
  assert resumed.returncodes == [0, 0], '\n'.join(e[-3000:] for e in resumed.stderr)
  for log in resumed.stderr:
    assert f'Resumed from step {kill_at} (epoch 1, batch 1 of {STEPS_PER_EPOCH})' in log
  _, ref = _final_state(two_dir)
  _, got = _final_state(tmp_path)
  assert ref.keys() == got.keys()
  for k in ref:  # same processes, same devices: bit for bit
    np.testing.assert_array_equal(got[k], ref[k], err_msg=k)


def test_sigterm_to_one_process_stops_all_at_one_checkpointed_step(tiny_data_dir, tmp_path):
  # A scheduler's preemption notice reaching one host: process 0 gets SIGTERM after step 2
  # (its first metrics record).
  epochs = 10  # 20 steps: room to agree on a step (JAX's protocol takes a few) before the end
  run = _settled(lambda: _start(
      tmp_path, tiny_data_dir, 2, f'--config.num_epochs={epochs}', '--config.log_every_steps=1',
      '--config.checkpoint_every_steps=100',
      launcher=test_launch._TERM_LAUNCHER.format(repo=REPO),  # pylint: disable=protected-access
      env=[{'TERM_AT_STEP': '2'}, {'TERM_AT_STEP': '-1'}]))
  assert run.returncodes == [0, 0], '\n'.join(e[-3000:] for e in run.stderr)
  stopped = [int(log.split('Stopped at step ')[1].split()[0]) for log in run.stderr]
  assert stopped[0] == stopped[1] and 2 < stopped[0] < epochs * STEPS_PER_EPOCH
  assert all(f'on signal {signal.SIGTERM:d}' in log for log in run.stderr)
  steps = sorted(int(d) for d in os.listdir(tmp_path / 'checkpoints') if d.isdigit())
  assert steps[-1] == stopped[0]  # saved by both processes at the step they agreed on


@pytest.mark.parametrize('process_id', [0, 1])
def test_a_coordinator_nobody_joins_is_a_clear_error_after_the_timeout(tiny_data_dir, tmp_path,
                                                                       process_id):
  # Process 1 finds no coordinator; process 0 serves one that process 1 never joins.
  port = _free_port()
  cmd = [sys.executable, os.path.join(REPO, 'launch.py'), *_args(tiny_data_dir, tmp_path),
         f'--coordinator_address=localhost:{port}', '--num_processes=2',
         f'--process_id={process_id}', '--coordinator_timeout=3']
  proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=REPO, env=_env(2),
                        check=False)
  assert proc.returncode == 1
  assert proc.stderr.splitlines()[-1].startswith(
      f'error: jax.distributed did not start within 3s: process {process_id} of 2 could not '
      f'reach the coordinator at localhost:{port}, or not all processes joined it.')
  assert 'Traceback' not in proc.stderr and not (tmp_path / 'checkpoints').exists()
