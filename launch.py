r"""Trains a hybrid-flax model.

  python launch.py --config configs/cifar_hybrid.py --workdir runs/hybrid [--config.x=y ...]

Rerunning the same command with the same --workdir resumes from the latest checkpoint there.
Several processes (one per host, or per GPU) train one model together when each is started with
--coordinator_address=HOST:PORT --num_processes=N --process_id=I (process 0 runs on HOST), or
under SLURM / Open MPI / JAX_COORDINATOR_ADDRESS, which jax.distributed reads by itself.
"""

import logging as std_logging
import sys

from hybrid_flax import host_memory

if __name__ == '__main__':
  # Before the imports below, so that only the re-executed process pays for them.
  host_memory.reexec_with_fast_malloc()

# pylint: disable=g-import-not-at-top,wrong-import-position
import jax
from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from hybrid_flax import checkpointing
from hybrid_flax import compilation_cache
from hybrid_flax import distributed
from hybrid_flax import fused_batch_norm
from hybrid_flax import host_cpu
from hybrid_flax import input_pipeline
from hybrid_flax import onednn_attention
from hybrid_flax import onednn_conv
from hybrid_flax import train
from hybrid_flax import xla_cpu_flags
# pylint: enable=g-import-not-at-top,wrong-import-position

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
  try:
    xla_cpu_flags.apply(config.xla_cpu_convolutions)  # before anything starts a JAX backend
  except ValueError as e:
    sys.exit(f'error: {e}')
  cache_status = compilation_cache.enable_default()  # before anything compiles
  if distributed.wanted(_DISTRIBUTED.value, _COORDINATOR.value, _NUM_PROCESSES.value,
                       _PROCESS_ID.value):
    try:
      distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
                             _COORDINATOR_TIMEOUT.value)
    except distributed.StartError as e:
      sys.exit(f'error: {e}')
  input_pipeline.hide_gpus_from_tensorflow()
  logging.info('JAX %s, process %d of %d, local devices: %s; %d devices in all.', jax.__version__,
               jax.process_index(), jax.process_count(), jax.local_devices(), jax.device_count())
  logging.info('%s', host_cpu.describe())
  logging.info('%s', host_memory.status())
  logging.info('%s', xla_cpu_flags.status(config.xla_cpu_convolutions))
  logging.info('%s', cache_status)
  logging.info('Config:\n%s', config)
  try:
    logging.info('%s', onednn_conv.status(config.model.conv_impl, config.model.dtype,
                                          config.model.conv_winograd))
    logging.info('%s', onednn_attention.status(config.model.attention_kernel,
                                               config.model.dtype))
    logging.info('%s', fused_batch_norm.status(config.model.bn_kernel, config.model.dtype))
    train.train_and_evaluate(config, _WORKDIR.value)
  except (input_pipeline.DatasetUnavailableError, ValueError, train.NonFiniteLossError,
          train.WorkdirBusyError, train.DiskFullError, checkpointing.CheckpointWriteError) as e:
    logging.error('%s', e)
    sys.exit(f'error: {e}')


if __name__ == '__main__':
  jax.config.config_with_absl()
  app.run(main, flags_parser=_parse_flags)
