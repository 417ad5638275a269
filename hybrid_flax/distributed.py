"""Starting JAX's multi-controller runtime (`jax.distributed`) for a multi-process run."""

import os
import sys
import threading

import jax
from absl import logging


class StartError(RuntimeError):
  """jax.distributed was asked for but cannot start with what it was given."""


def wanted(mode: str, coordinator_address, num_processes, process_id) -> bool:
  """Whether to start jax.distributed: mode 'on', 'off', or 'auto' (asked for by flags or env)."""
  if mode != 'auto':
    return mode == 'on'
  if (coordinator_address, num_processes, process_id) != (None, None, None):
    return True
  env = os.environ
  # The launches JAX detects by itself, when they start several processes. Kubernetes sets
  # KUBERNETES_SERVICE_HOST in every pod, one-process ones too, so it needs mode 'on'.
  slurm_step = all(v in env for v in ('SLURM_JOB_ID', 'SLURM_STEP_NODELIST', 'SLURM_PROCID',
                                      'SLURM_LOCALID'))
  return ('JAX_COORDINATOR_ADDRESS' in env
          or (slurm_step and int(env.get('SLURM_NTASKS', '1')) > 1)
          or int(env.get('OMPI_COMM_WORLD_SIZE', '1')) > 1)


def initialize(coordinator_address, num_processes, process_id, timeout: int) -> None:
  """jax.distributed.initialize; a coordinator not all processes join is an error in `timeout` s.

  Arguments left None are filled in by JAX from the environment (SLURM, Open MPI, Kubernetes,
  JAX_COORDINATOR_ADDRESS, ...).
  """
  address = coordinator_address or os.environ.get('JAX_COORDINATOR_ADDRESS', "the cluster's")
  who = 'process {} of {}'.format(*('?' if v is None else v for v in (process_id, num_processes)))

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
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id,
                               initialization_timeout=timeout + 60)
  except (ValueError, TypeError, RuntimeError) as e:
    raise StartError(f'cannot start jax.distributed: {" ".join(str(e).split())}') from None
  finally:
    watchdog.cancel()
