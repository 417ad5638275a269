"""Orbax checkpoints of the train state plus a JSON record of where the input stream stands."""

import dataclasses
import logging as std_logging
import os

import jax
import orbax.checkpoint as ocp
from absl import logging


def _save_replicated_arrays_whole() -> None:
  """Has Orbax copy each replicated array to the host once, from one device, to save it.

  Orbax's default off GPUs ("replica-parallel") gives each of N replicas 1/N of every
  replicated array to save, for hosts that share the writing; a data-parallel train state is all
  replicated, so each save dispatched N device slices per array before its copies. On one host
  that cost the tiny config's save 0.76-0.82 s where a whole copy takes 0.25-0.29 s (4 devices,
  2-core CPU), and it is what Orbax already does on GPUs. The same checkpoint contents; each
  array is written as one chunk, and checkpoints written either way restore either way.
  """
  handler = ocp.type_handlers.get_type_handler(jax.Array)
  # The option is a constructor argument, and the registered handler carries other settings
  # (its metadata store): switch it on that instance rather than register a new one.
  if getattr(handler, '_use_replica_parallel', False):
    handler._use_replica_parallel = False  # pylint: disable=protected-access


def checkpoint_dir(workdir: str) -> str:
  """Where a run in `workdir` keeps its checkpoints."""
  return os.path.join(workdir, 'checkpoints')


def steps_on_disk(directory: str) -> list[int]:
  """The complete checkpoints in `directory`, oldest first: Orbax's temporary folders of writes
  in progress (or killed) are not among them."""
  return sorted(ocp.utils.checkpoint_steps(directory)) if os.path.isdir(directory) else []


def _absolute(directory: str) -> str:
  # Orbax's array writer (TensorStore's OCDBT spec) refuses a relative path, and only when the
  # first save commits, so a run given `--workdir runs/x` trained to its first checkpoint and died.
  return os.path.abspath(directory)


def make_manager(directory: str, keep: int) -> ocp.CheckpointManager:
  _save_replicated_arrays_whole()
  # Async: the device->host copy happens inside save(), the disk write overlaps training. A
  # checkpoint only becomes visible once fully written, so a kill mid-write leaves the
  # previous ones intact.
  return ocp.CheckpointManager(
      _absolute(directory),
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
  return ocp.CheckpointManager(_absolute(directory),
                               options=ocp.CheckpointManagerOptions(read_only=True))


def _ends(error: Exception, width: int = 150) -> str:
  # TensorStore's write errors name the file first and the cause ("No space left on device")
  # last: keep both ends.
  text = ' '.join(str(error).split())
  return text if len(text) <= 2 * width + 5 else f'{text[:width]} ... {text[-width:]}'


class UnreadableCheckpointsError(ValueError):
  """Checkpoints exist but none restores: starting over would silently discard the run."""


def _as_tree(state):
  """A train state's array fields as a dict, without the optional ones left unset (None).

  So switching an optional field such as the EMA weights into the code does not change what a
  run without it saves, and checkpoints written before the field existed still restore.
  """
  if not dataclasses.is_dataclass(state):
    return state
  return {f.name: getattr(state, f.name) for f in dataclasses.fields(state)
          if f.metadata.get('pytree_node', True) and getattr(state, f.name) is not None}


class CheckpointWriteError(RuntimeError):
  """Writing a checkpoint failed (a full disk, say); the ones already on disk are intact."""


def resume_hint(directory: str) -> str:
  """What a failed write leaves to resume from: the complete checkpoints in `directory`."""
  # From the disk, not a manager's list, which already counts a step it failed to write. Orbax
  # removes a failed write's temporary folder when that step is saved again.
  intact = steps_on_disk(directory)
  if not intact:
    return 'no checkpoint was written before it: rerun the same command to start again'
  return (f'the checkpoints on disk (steps {intact}) are intact: rerun the same command to '
          f'resume from step {intact[-1]}')


def _write_failed(manager: ocp.CheckpointManager, error: Exception) -> CheckpointWriteError:
  return CheckpointWriteError(
      f'could not write a checkpoint in {manager.directory} ({type(error).__name__}: '
      f'{_ends(error)}); {resume_hint(manager.directory)}, once the cause (disk space, '
      'permissions) is fixed')


# What a failed write raises: TensorStore's errors come as ValueError (RESOURCE_EXHAUSTED: ...),
# Orbax's metadata writes' as OSError, its background threads' as RuntimeError. Anything else
# (a TypeError, say) is a bug, and keeps its traceback.
_WRITE_ERRORS = (OSError, ValueError, RuntimeError)


def save(manager: ocp.CheckpointManager, state, meta: dict) -> bool:
  """Starts writing `state` at its step (the disk write continues in the background).

  Raises CheckpointWriteError where this or the previous, background, write failed.
  """
  step = int(jax.device_get(state.step))
  if step in manager.all_steps():
    return False
  try:
    return manager.save(
        step, args=ocp.args.Composite(state=ocp.args.StandardSave(_as_tree(state)),
                                      meta=ocp.args.JsonSave(meta)))
  except _WRITE_ERRORS as e:
    raise _write_failed(manager, e) from e


def finish(manager: ocp.CheckpointManager) -> None:
  """Waits for the background writes to end and closes `manager`; CheckpointWriteError where
  one failed."""
  try:
    manager.wait_until_finished()
  except _WRITE_ERRORS as e:
    raise _write_failed(manager, e) from e
  manager.close()


def _short(error: Exception) -> str:
  # Orbax's structure-mismatch message prints the whole abstract tree: keep its start.
  text = ' '.join(str(error).split())
  return text if len(text) <= 300 else text[:300] + ' ...'


def restore_latest(manager: ocp.CheckpointManager, abstract_state):
  """Returns (state, meta) from the newest readable checkpoint, or (None, None) if there is none.

  A checkpoint that fails to restore (corrupted on disk) is skipped with a warning in favour of
  the one before it. If none restores, raises UnreadableCheckpointsError rather than let the
  caller start from scratch over a run it could not read (other code, another config, damage).
  """
  steps = sorted(manager.all_steps(), reverse=True)
  first_error = None
  for step in steps:
    try:
      restored = manager.restore(
          step, args=ocp.args.Composite(state=ocp.args.StandardRestore(_as_tree(abstract_state)),
                                        meta=ocp.args.JsonRestore()))
    except Exception as e:  # pylint: disable=broad-except  # orbax raises many types here
      logging.warning('Checkpoint at step %d is unreadable (%s: %s); trying the previous one.',
                      step, type(e).__name__, _short(e))
      first_error = first_error or e
      continue
    state = restored.state
    if dataclasses.is_dataclass(abstract_state):
      state = abstract_state.replace(**state)
    return state, restored.meta
  if steps:
    raise UnreadableCheckpointsError(
        f'none of the {len(steps)} checkpoints in {manager.directory} (steps {steps}) restores '
        f'into this train state ({type(first_error).__name__}: {_short(first_error)}); they '
        'were written by other code or another model/recipe config, or are damaged. Resume with '
        'the config they were written with, or use a new --workdir')
  return None, None
