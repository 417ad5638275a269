"""Has XLA's CPU backend run convolutions with its own kernels instead of YNNPACK's.

Why: jaxlib 0.10's CPU backend hands each convolution to YNNPACK by default, whose kernels are
slow where the input has few channels at a large map: on the 2-core CPU the paper's 32x32
64->128 conv ran at ~95 GFLOP/s forward, where XLA's own convolution (the plain HLO
convolution, left to XLA's runtime) runs it at ~200, and its forward + backward at PyTorch's
speed. Without YNNPACK's convolutions the paper-width training step is 5-11% faster on 4 CPU
devices (docs/benchmark.md), and nothing else changes: YNNPACK keeps its other fusions (dots,
element-wise), and the math is the same up to round-off (another summation order).

Narrow models gain less, or lose a little, depending on the CPU and the device count (the
CPU-scale config's step ran 1-8% slower with it at 8 devices on the AVX-512 EPYC, faster at 4,
and faster at 4 or 8 on the AVX2-only one; docs/benchmark.md), so the config chooses:
`config.xla_cpu_convolutions`, 'xla' or 'default' (jaxlib's choice).
XLA reads XLA_FLAGS when JAX first starts a backend, so `apply()` must run before that. A value
XLA does not know aborts the process, and JAX's version is not pinned, so the flag is added
only where jaxlib's binary names it. `HYBRID_FLAX_XLA_CPU_FLAGS=0` opts out whatever the config
says; a user's own `--xla_cpu_experimental_ynn_fusion_type` in XLA_FLAGS is left as it is.
"""

import glob
import mmap
import os

_NAME = 'xla_cpu_experimental_ynn_fusion_type'
FLAG = f'--{_NAME}=-individual_convolution'
OPT_OUT = 'HYBRID_FLAX_XLA_CPU_FLAGS'  # set to 0 to leave XLA_FLAGS as it is
CHOICES = ('xla', 'default')  # config.xla_cpu_convolutions
# What XLA parses the value into (LIBRARY_FUSION_TYPE_ + its upper case), in its flag table.
_MARKERS = (_NAME.encode(), b'LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION')


def binaries_name_flag(directory: str) -> bool:
  """Whether one of the shared libraries in `directory` holds both the flag and its value."""
  for path in sorted(glob.glob(os.path.join(directory, '*.so'))):
    try:
      with open(path, 'rb') as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as binary:
        if all(binary.find(marker) >= 0 for marker in _MARKERS):
          return True
    except (OSError, ValueError):  # unreadable, or empty (mmap refuses length 0)
      continue
  return False


def _jaxlib_knows_flag() -> bool:
  try:
    import jaxlib  # pylint: disable=import-outside-toplevel
  except ImportError:
    return False
  return binaries_name_flag(os.path.dirname(jaxlib.__file__))


def check(choice: str) -> None:
  """Raises ValueError for a `config.xla_cpu_convolutions` that is not one of CHOICES."""
  if choice not in CHOICES:
    raise ValueError(f'xla_cpu_convolutions must be one of {CHOICES}, got {choice!r}')


def wanted(choice: str, environ=os.environ) -> bool:
  """Whether adding the flag would change anything, and XLA would accept it."""
  check(choice)
  if (choice != 'xla' or environ.get(OPT_OUT) == '0' or
      _NAME in environ.get('XLA_FLAGS', '')):
    return False
  return _jaxlib_knows_flag()


def apply(choice: str, environ=os.environ) -> None:
  """Adds the flag to XLA_FLAGS in `environ` where `wanted()`; before JAX starts a backend."""
  if wanted(choice, environ):
    environ['XLA_FLAGS'] = ' '.join(f for f in (environ.get('XLA_FLAGS', '').strip(), FLAG) if f)


def status(choice: str, environ=os.environ) -> str:
  """One line for the log: which kernels XLA's CPU backend runs convolutions with."""
  flags = environ.get('XLA_FLAGS', '')
  if FLAG in flags.split():
    return f'XLA CPU convolutions: XLA\'s own ({FLAG})'
  if _NAME in flags:
    return f'XLA CPU convolutions: as XLA_FLAGS sets {_NAME}'
  if choice != 'xla':
    return f'XLA CPU convolutions: jaxlib\'s default (xla_cpu_convolutions={choice!r})'
  if environ.get(OPT_OUT) == '0':
    return f'XLA CPU convolutions: jaxlib\'s default ({OPT_OUT}=0)'
  return 'XLA CPU convolutions: jaxlib\'s default (this jaxlib does not know the flag)'
