r"""Kill-anywhere check: SIGKILL a training run at random moments, rerun it, compare the result.

  python -m hybrid_flax.kill_anywhere --workdir /tmp/ka --kills 10 -- \
      --config configs/cifar_tiny.py --config.dataset=cifar10_folder --config.data_dir=DIR

Everything after `--` is passed to launch.py. The check first trains an uninterrupted reference
run (BASE/reference; or reuses a finished one given with --reference), then runs the same
command in BASE/killed, SIGKILLing it `--kills` times and restarting it with the same command
each time until it finishes. Each kill is either after a random delay (start-up, compilation,
training, evaluation, checkpointing: anywhere), or during the n-th checkpoint write of that
start (n random), while Orbax's temporary folder exists; both are drawn within the share of the
reference run's wall time and writes that the killed run has left. It then compares the two
final checkpoints (params, batch_stats, optimizer state, step, rng) bit for bit and exits
non-zero unless they are identical.
"""

import os
import random
import re
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import app
from absl import flags
from absl import logging

from hybrid_flax import checkpointing

_WORKDIR = flags.DEFINE_string('workdir', None, 'Base folder for the runs and their logs.',
                               required=True)
_KILLS = flags.DEFINE_integer('kills', 10, 'How many times to SIGKILL the run.')
_SEED = flags.DEFINE_integer('seed', 0, 'Seed for the kill moments.')
_REFERENCE = flags.DEFINE_string('reference', None,
                                 'A finished, uninterrupted run of the same command to compare '
                                 'against (default: train one in WORKDIR/reference).')
_MAX_WRITES = flags.DEFINE_integer('max_writes', None,
                                   'Latest checkpoint write to kill in (default: the number of '
                                   'writes in the reference run).')
_MAX_DELAY = flags.DEFINE_float('max_delay', None,
                                'Latest random kill moment, seconds after a start (default: the '
                                "reference run's wall time).")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_TMP_SUFFIX = '.orbax-checkpoint-tmp'


def _checkpoint_steps(workdir: str) -> list[int]:
  return checkpointing.steps_on_disk(checkpointing.checkpoint_dir(workdir))


def _writes_in_progress(workdir: str) -> set[tuple[str, int]]:
  """Orbax's temporary checkpoint folders, by identity: a killed write leaves a stale one behind
  that the next start removes and may recreate under the same name."""
  folder = checkpointing.checkpoint_dir(workdir)
  found = set()
  try:
    for entry in os.scandir(folder):
      if _TMP_SUFFIX in entry.name:
        found.add((entry.name, entry.inode()))
  except FileNotFoundError:
    pass
  return found


def _command(launch_args, workdir):
  return [sys.executable, os.path.join(REPO, 'launch.py'), *launch_args, '--workdir', workdir]


def _run(launch_args, workdir, log_path) -> tuple[float, int]:
  """Runs to completion; returns (wall seconds, checkpoint writes seen)."""
  start, seen = time.time(), set()
  with open(log_path, 'w') as log:
    proc = subprocess.Popen(_command(launch_args, workdir), stdout=log, stderr=subprocess.STDOUT,
                            cwd=REPO)
    while proc.poll() is None:
      seen |= _writes_in_progress(workdir)
      time.sleep(0.002)
  if proc.returncode:
    raise RuntimeError(f'run in {workdir} failed with exit code {proc.returncode}; see '
                       f'{log_path}')
  return time.time() - start, len(seen)


def run_with_kills(launch_args, workdir, logs_dir, kills, max_delay, max_writes, final_step,
                   rng) -> list[dict]:
  """Runs to completion, SIGKILLing `kills` times; returns one record per attempt."""
  attempts = []
  while True:
    i = len(attempts)
    log_path = os.path.join(logs_dir, f'attempt-{i:02d}.log')
    mode = 'none' if i >= kills else rng.choice(('random', 'checkpoint_write'))
    # Aim within what is left of the run: a kill planned past its end would never happen, and
    # the run would finish with fewer kills than asked for.
    left = max(final_step - (_checkpoint_steps(workdir) or [0])[-1], 1) / final_step
    delay = rng.uniform(0.0, max_delay * left)
    nth_write = rng.randint(1, max(1, round(max_writes * left)))
    start, stale, seen = time.time(), _writes_in_progress(workdir), set()
    with open(log_path, 'w') as log:
      proc = subprocess.Popen(_command(launch_args, workdir), stdout=log,
                              stderr=subprocess.STDOUT, cwd=REPO)
      killed, mid_write = False, False
      while proc.poll() is None:
        writing = _writes_in_progress(workdir) - stale
        seen |= writing
        if (mode == 'random' and time.time() - start >= delay) or (
            mode == 'checkpoint_write' and writing and len(seen) >= nth_write):
          mid_write = bool(writing)
          proc.kill()
          proc.wait()
          killed = True
          break
        time.sleep(0.002)
    with open(log_path) as f:
      resumed = re.findall(r'Resumed from step (\d+)', f.read())
    record = {'attempt': i, 'mode': f'write#{nth_write}' if mode == 'checkpoint_write' else mode,
              'killed': killed,
              'seconds': round(time.time() - start, 2), 'mid_write': mid_write,
              'resumed_from': int(resumed[0]) if resumed else None,
              'checkpoints_after': _checkpoint_steps(workdir)}
    attempts.append(record)
    print(' '.join(f'{k}={v}' for k, v in record.items()), flush=True)
    if not killed:
      if proc.returncode:
        raise RuntimeError(f'attempt {i} failed with exit code {proc.returncode}; see {log_path}')
      return attempts


def final_state(workdir: str):
  step = _checkpoint_steps(workdir)[-1]
  return step, ocp.StandardCheckpointer().restore(  # Orbax reads absolute paths only
      os.path.abspath(os.path.join(checkpointing.checkpoint_dir(workdir), str(step), 'state')))


def compare(reference: str, killed: str) -> list[str]:
  """Names of the leaves that differ between the two runs' final checkpoints ([] if none)."""
  (ref_step, ref), (got_step, got) = final_state(reference), final_state(killed)
  if ref_step != got_step:
    return [f'final step {got_step} != reference {ref_step}']
  ref_leaves = jax.tree_util.tree_flatten_with_path(ref)[0]
  got_leaves = dict(jax.tree_util.tree_flatten_with_path(got)[0])
  return [jax.tree_util.keystr(path) for path, x in ref_leaves
          if path not in got_leaves or not np.array_equal(np.asarray(x),
                                                          np.asarray(got_leaves[path]))]


def main(argv):
  logging.set_verbosity(logging.WARNING)  # Orbax logs every restore step at INFO
  launch_args = argv[1:]
  if not launch_args:
    raise app.UsageError('pass the launch.py arguments after --, e.g. -- --config '
                         'configs/cifar_tiny.py')
  if any(a.startswith('--workdir') for a in launch_args):
    raise app.UsageError('the launch.py arguments must not set --workdir: the check sets it')
  base = os.path.abspath(_WORKDIR.value)
  killed_dir, logs_dir = os.path.join(base, 'killed'), os.path.join(base, 'logs')
  if os.path.exists(killed_dir):
    sys.exit(f'error: {killed_dir} exists; use a fresh --workdir')
  os.makedirs(logs_dir, exist_ok=True)

  reference, max_delay, max_writes = _REFERENCE.value, _MAX_DELAY.value, _MAX_WRITES.value
  if reference is None:
    reference = os.path.join(base, 'reference')
    log_path = os.path.join(logs_dir, 'reference.log')
    seconds, writes = _run(launch_args, reference, log_path)
    print(f'reference run: {seconds:.1f}s, {writes} checkpoint writes, final step '
          f'{_checkpoint_steps(reference)[-1]}', flush=True)
    max_delay, max_writes = max_delay or seconds, max_writes or writes
  elif max_delay is None or max_writes is None:
    raise app.UsageError('--max_delay and --max_writes are needed with --reference')

  attempts = run_with_kills(launch_args, killed_dir, logs_dir, _KILLS.value, max_delay,
                            max(max_writes, 1), _checkpoint_steps(reference)[-1],
                            random.Random(_SEED.value))
  kills = [a for a in attempts if a['killed']]
  differ = compare(reference, killed_dir)
  print(f'{len(kills)} kills ({sum(a["mid_write"] for a in kills)} during a checkpoint write), '
        f'{len(attempts)} starts; final state '
        + ('IDENTICAL to the uninterrupted run' if not differ else
           f'DIFFERS from the uninterrupted run in {len(differ)} leaves: {differ[:5]}'))
  if differ:
    sys.exit(1)


if __name__ == '__main__':
  jax.config.update('jax_platforms', 'cpu')  # only reads checkpoints; leave accelerators alone
  app.run(main)
