"""Orbax checkpoints of the train state plus a JSON record of where the input stream stands."""

import logging as std_logging

import jax
import orbax.checkpoint as ocp
from absl import logging


def make_manager(directory: str, keep: int) -> ocp.CheckpointManager:
  # Async: the device->host copy happens inside save(), the disk write overlaps training. A
  # checkpoint only becomes visible once fully written, so a kill mid-write leaves the
  # previous ones intact.
  return ocp.CheckpointManager(
      directory,
      options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           enable_async_checkpointing=True),
  )


def _not_read_only_notice(record) -> bool:
  # Orbax warns, at every open, that a read-only manager will not save: that is the point.
  message = record.getMessage()
  return 'read_only=True' not in message and 'is read only' not in message


def open_read_only(directory: str) -> ocp.CheckpointManager:
  # The tools read a run that may still be training: they must never create, save or delete.
  absl_logger = std_logging.getLogger('absl')
  if _not_read_only_notice not in absl_logger.filters:
    absl_logger.addFilter(_not_read_only_notice)
  return ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(read_only=True))


def save(manager: ocp.CheckpointManager, state, meta: dict) -> bool:
  step = int(jax.device_get(state.step))
  if step in manager.all_steps():
    return False
  return manager.save(
      step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                    meta=ocp.args.JsonSave(meta)))


def restore_latest(manager: ocp.CheckpointManager, abstract_state):
  """Returns (state, meta) from the newest readable checkpoint, or (None, None) if there is none.

  A checkpoint that fails to restore (corrupted on disk) is skipped with a warning in favour of
  the one before it.
  """
  for step in sorted(manager.all_steps(), reverse=True):
    try:
      restored = manager.restore(
          step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                        meta=ocp.args.JsonRestore()))
    except Exception as e:  # pylint: disable=broad-except  # orbax raises many types here
      logging.warning('Checkpoint at step %d is unreadable (%s: %s); trying the previous one.',
                      step, type(e).__name__, e)
      continue
    return restored.state, restored.meta
  return None, None
