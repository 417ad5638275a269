r"""Trains a hybrid-flax model.

  python launch.py --config configs/cifar_hybrid.py --workdir runs/hybrid [--config.x=y ...]

Rerunning the same command with the same --workdir resumes from the latest checkpoint there.
"""

import logging as std_logging
import sys

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
  input_pipeline.hide_gpus_from_tensorflow()
  logging.info('JAX %s, process %d of %d, local devices: %s', jax.__version__,
               jax.process_index(), jax.process_count(), jax.local_devices())
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
