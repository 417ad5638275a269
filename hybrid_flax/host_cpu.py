"""Names the host's CPU and its widest vector instructions, for logs and benchmark headers.

Why: a wall time or an img/s figure on a CPU means little without the CPU. This project's
"2-core CPU" was an AVX-512 EPYC (float32 matmul ~195 GFLOP/s) in most sessions and an AVX2-only
first-generation EPYC (~72 GFLOP/s) in others, under the same name ("AMD EPYC") and core count,
and XLA's CPU kernels differ between the two, so even the same seed trains to different digits
(README, Results). One line in every log tells them apart.
"""

import os
import platform

_CPUINFO = '/proc/cpuinfo'

# Widest first: the first one present names the level.
_X86_LEVELS = (('amx_bf16', 'AMX'), ('avx512_bf16', 'AVX-512 with BF16'),
               ('avx512f', 'AVX-512'), ('avx2', 'AVX2'), ('avx', 'AVX'))
_ARM_LEVELS = (('sve2', 'SVE2'), ('sve', 'SVE'), ('asimd', 'NEON'))


def _first_block(text: str) -> dict[str, str]:
  """The first processor's `key: value` lines (every processor repeats them)."""
  fields = {}
  for line in text.splitlines():
    if not line.strip():
      if fields:
        break
      continue
    key, sep, value = line.partition(':')
    if sep:
      fields.setdefault(key.strip(), value.strip())
  return fields


def _vector_level(flags: set[str]) -> str:
  for flag, name in _X86_LEVELS:
    if flag in flags:
      # A reader comparing hosts wants to know what is missing too.
      return name if 'avx512f' in flags else f'{name} (no AVX-512)'
  for flag, name in _ARM_LEVELS:
    if flag in flags:
      return name
  return 'no AVX or NEON'


def usable_cpus() -> int:
  """The CPUs this process may run on (its affinity mask, where the OS has one)."""
  return len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count() or 1


def describe(cpuinfo: str | None = None, cpu_count: int | None = None) -> str:
  """One line: `host CPU: <model> (<family/model>), <n> CPUs usable, <vector level>`.

  `cpuinfo` is the text of /proc/cpuinfo (read here when None); where there is none (macOS,
  Windows) the line falls back to what `platform` knows.
  """
  if cpuinfo is None:
    try:
      with open(_CPUINFO) as f:
        cpuinfo = f.read()
    except OSError:
      cpuinfo = ''
  if cpu_count is None:
    cpu_count = usable_cpus()
  fields = _first_block(cpuinfo)
  name = (fields.get('model name') or fields.get('Model name') or platform.processor()
          or platform.machine() or 'unknown')
  if 'cpu family' in fields:  # x86: the same model name covers several generations
    name += f' (family {fields["cpu family"]} model {fields.get("model", "?")})'
  elif 'CPU implementer' in fields:  # Arm
    name += f' (implementer {fields["CPU implementer"]} part {fields.get("CPU part", "?")})'
  flags = set((fields.get('flags') or fields.get('Features') or '').split())
  level = _vector_level(flags) if flags else 'vector instructions unknown'
  return f'host CPU: {name}, {cpu_count} CPUs usable, {level}'
