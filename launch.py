r"""Trains a hybrid-flax model.

  python launch.py --config configs/cifar_hybrid.py --workdir runs/hybrid [--config.x=y ...]

Rerunning the same command with the same --workdir resumes from the latest checkpoint there.
Several processes (one per host, or per GPU) train one model together when each is started with
--coordinator_address=HOST:PORT --num_processes=N --process_id=I (process 0 runs on HOST), or
under SLURM / Open MPI / JAX_COORDINATOR_ADDRESS, which jax.distributed reads by itself.
"""

import logging as std_logging
import os
import sys
import threading

import jax
from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from hybrid_flax import input_pipeline
from hybrid_flax import train

_WORKDIR = flags.DEFINE_string('workdir', None, 'Where checkpoints and metrics go.',
                               required=True)
_CONFIG = config_flags.DEFINE_config_file('config', None, 'Training config file.',
                                          lock_config=True)
flags.mark_flags_as_required(['config'])
_DISTRIBUTED = flags.DEFINE_enum(
    'distributed', 'auto', ['auto', 'on', 'off'],
    'Start jax.distributed (several processes training one model). auto: when a flag below is '
    'given or the environment is a multi-process launch (JAX_COORDINATOR_ADDRESS, a SLURM step '
    'with several tasks, Open MPI); on: always, JAX filling in what the flags leave out from '
    'SLURM, Open MPI, Kubernetes (needs jax[k8s]) or Cloud TPU; off: never.')
_COORDINATOR = flags.DEFINE_string(
    'coordinator_address', None, 'HOST:PORT where process 0 serves the coordinator; the same for '
    'every process (default: $JAX_COORDINATOR_ADDRESS or the cluster\'s).')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'How many processes train together.',
                                      lower_bound=1)
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'This process\'s index, 0..num_processes-1.',
                                   lower_bound=0)
_COORDINATOR_TIMEOUT = flags.DEFINE_integer(
    'coordinator_timeout', 300, 'Seconds to wait for all processes to reach the coordinator '
    'before giving up with an error.', lower_bound=1)


def _quiet_orbax(record) -> bool:
  # Orbax logs every step of every save at INFO; keep its warnings and errors only.
  # record.levelno is a standard level: absl's logging.WARNING (1) would let everything through.
  return record.levelno >= std_logging.WARNING or '/orbax/' not in record.pathname


def _one_line(text: str) -> str:
  return ' '.join(text.split())


def _parse_flags(argv):
  # ml_collections reports a misspelt --config.field as a traceback from inside flag parsing.
  try:
    return flags.FLAGS(argv)
  except flags.Error:
    raise  # absl prints these in one line with a usage hint
  except (AttributeError, KeyError) as e:
    # ml_collections wraps a KeyError's repr: unwrap its quotes and escaped newline.
    text = str(e).strip('\'"').replace('\\n', ' ').replace("\\'", "'")
    sys.exit(f'error: bad config override: {_one_line(text)}')
  except Exception as e:  # pylint: disable=broad-except  # the config file itself failed
    sys.exit(f'error: cannot load the --config file: {type(e).__name__}: {_one_line(str(e))}')


def _multiprocess_environment() -> bool:
  env = os.environ
  slurm_step = all(v in env for v in ('SLURM_JOB_ID', 'SLURM_STEP_NODELIST', 'SLURM_PROCID',
                                      'SLURM_LOCALID'))
  return ('JAX_COORDINATOR_ADDRESS' in env
          or (slurm_step and int(env.get('SLURM_NTASKS', '1')) > 1)
          or int(env.get('OMPI_COMM_WORLD_SIZE', '1')) > 1)


def _initialize_distributed() -> None:
  """Starts jax.distributed if asked to; a coordinator nobody reaches is an error, not a hang."""
  explicit = (_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  if _DISTRIBUTED.value == 'off' or (
      _DISTRIBUTED.value == 'auto' and explicit == (None,) * 3 and
      not _multiprocess_environment()):
    return
  timeout = _COORDINATOR_TIMEOUT.value
  address = _COORDINATOR.value or os.environ.get('JAX_COORDINATOR_ADDRESS', "the cluster's")
  unknown = lambda v: '?' if v is None else v  # pylint: disable=unnecessary-lambda-assignment
  who = f'process {unknown(_PROCESS_ID.value)} of {unknown(_NUM_PROCESSES.value)}'

  def give_up():
    # JAX's own deadline (set later, below) aborts from C++ with a stack trace; this says why.
    sys.stderr.write(
        f'error: jax.distributed did not start within {timeout}s: {who} could not reach the '
        f'coordinator at {address}, or not all processes joined it. Start every process with '
        'the same --coordinator_address and --num_processes and its own --process_id, process 0 '
        'on the coordinator host, and check that the port is reachable from every host.\n')
    sys.stderr.flush()
    os._exit(1)  # pylint: disable=protected-access  # the main thread is blocked inside JAX

  watchdog = threading.Timer(timeout, give_up)
  watchdog.daemon = True
  logging.info('Starting jax.distributed: %s, coordinator %s (waiting up to %ds).', who, address,
               timeout)
  watchdog.start()
  try:
    jax.distributed.initialize(coordinator_address=_COORDINATOR.value,
                               num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value,
                               initialization_timeout=timeout + 60)
  except (ValueError, TypeError, RuntimeError) as e:
    sys.exit(f'error: cannot start jax.distributed: {_one_line(str(e))}')
  finally:
    watchdog.cancel()


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  config = _CONFIG.value
  try:
    config.keys()  # config_flags defers a missing or broken config file's error to first use
  except Exception as e:  # pylint: disable=broad-except  # OSError, SyntaxError, ... from the file
    cause = e.__cause__ or e
    sys.exit(f'error: cannot load the --config file: {type(cause).__name__}: '
             f'{_one_line(str(cause).strip().splitlines()[-1])}')
  logging.get_absl_handler().addFilter(_quiet_orbax)
  _initialize_distributed()
  input_pipeline.hide_gpus_from_tensorflow()
  logging.info('JAX %s, process %d of %d, local devices: %s; %d devices in all.', jax.__version__,
               jax.process_index(), jax.process_count(), jax.local_devices(), jax.device_count())
  logging.info('Config:\n%s', config)
  try:
    train.train_and_evaluate(config, _WORKDIR.value)
  except (input_pipeline.DatasetUnavailableError, ValueError, train.NonFiniteLossError,
          train.WorkdirBusyError) as e:
    logging.error('%s', e)
    sys.exit(f'error: {e}')


if __name__ == '__main__':
  jax.config.config_with_absl()
  app.run(main, flags_parser=_parse_flags)
