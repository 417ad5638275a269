"""The 3x3 convolutions through oneDNN on CPUs (`model.conv_impl`), as an XLA FFI custom call.

Why: XLA's CPU backend has no oneDNN convolution (jaxlib 0.10.2 runs Eigen's, or YNNPACK's), and
on a 2-core Intel Xeon (AVX-512) oneDNN, which PyTorch's CPU convolutions use, runs the
paper-width model's 3x3 convolutions on 8x8 maps and larger, forward and both gradients, in
67-85% of the time of XLA's own, layer by layer (docs/benchmark.md); the convolutions are about
half the training step. `csrc/onednn_conv.cc` calls
it: compiled with the host's C++ compiler (`$CXX`, else g++) on first use, against Intel's
`onednn-cpu-gomp` wheel (`pip install -e ".[onednn]"`), and cached under
`$HYBRID_FLAX_CACHE` (default `~/.cache/hybrid_flax`).

Each device runs its own share of the batch (`shard_map` over the training mesh) on the host's
cores divided among the local devices; the weight gradient is summed over the devices. The
results are the convolution's up to float32 rounding (summation order): tests/test_onednn_conv.py.
On maps narrower than MIN_SIZE the activations go to oneDNN's blocked layout and the weight
gradient to XLA; below BLOCKED_MIN_SIZE `models.conv_function` leaves all of it to XLA.

With `model.conv_winograd` all three go through `csrc/winograd.cc` instead, Winograd's
F(2x2, 3x3) on oneDNN's sgemm: 16 multiply-adds per input-output channel pair for each 2x2
block of outputs, where the direct convolution does 36 (oneDNN 3.2 has no float32 Winograd for
these CPUs). Alone on one core of a Zen 4 it ran the paper-width layers' forwards 1.5-1.7x
faster than oneDNN's direct kernels; in the training step the forward and input gradient gave
+17% and the weight gradient another +16% (docs/benchmark.md). Its results differ from the
direct convolution's by ~3e-7 of the largest output rather than ~1e-7.

The same library carries the other C++ kernels' handlers (the attention core's,
`csrc/attention.cc` and `onednn_attention`; the dense layers', `onednn_dense`; the conv blocks'
batch norm, `csrc/batch_norm.cc` and `fused_batch_norm`), so this module builds, loads and gates
them all, and hands them the per-device helpers (`threads_per_device`, `on_each_device`,
`summed_on_each_device`).
"""

import ctypes
import functools
import hashlib
import importlib.metadata
import os
import pathlib
import shutil
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from hybrid_flax import cache_home
from hybrid_flax import host_cpu

IMPLS = ('auto', 'onednn', 'xla')  # config.model.conv_impl
# Maps at least MIN_SIZE wide run all three through oneDNN in XLA's NHWC layout. Smaller ones,
# down to BLOCKED_MIN_SIZE, run the forward and the input gradient in oneDNN's blocked layout
# (its NHWC kernels lose to XLA's there, its blocked ones win by more than the reorders cost)
# and the weight gradient in XLA's, which beats both of oneDNN's; smaller still, all XLA's.
# docs/benchmark.md has the per-layer timings.
MIN_SIZE = 8
BLOCKED_MIN_SIZE = 4

# One library for all the C++ kernels: these convolutions, the attention core
# (`onednn_attention`, which calls oneDNN's sgemm), the dense layers' sgemm (`onednn_dense`) and
# the conv blocks' batch norm (`fused_batch_norm`).
_SOURCES = tuple(pathlib.Path(__file__).with_name('csrc') / name
                 for name in ('onednn_conv.cc', 'winograd.cc', 'attention.cc', 'dense.cc',
                              'batch_norm.cc'))
_SOURCE_NAMES = ' and '.join(source.name for source in _SOURCES)  # for messages
# What they include beside the FFI and oneDNN headers.
_HEADERS = (pathlib.Path(__file__).with_name('csrc') / 'parallel.h',)
_HANDLERS = ('HfConvForward', 'HfConvInputGrad', 'HfConvWeightGrad', 'HfWinogradConv',
             'HfWinogradWeightGrad')
_OTHER_HANDLERS = ('HfAttentionForward', 'HfAttentionBackward', 'HfMatmul', 'HfBnStats',
                   'HfBnReluForward', 'HfBnReluBackwardSums', 'HfBnReluBackward')
_INSTALL = 'pip install -e ".[onednn]"'


class Unavailable(RuntimeError):
  """oneDNN's convolutions cannot be built or loaded here; the message says why."""


def _find(distribution: str, suffix: str) -> pathlib.Path:
  """The installed file of `distribution` whose path ends with `suffix`."""
  try:
    files = importlib.metadata.files(distribution) or []
  except importlib.metadata.PackageNotFoundError:
    raise Unavailable(f'{distribution} is not installed ({_INSTALL})') from None
  for f in files:
    if str(f).endswith(suffix):
      return pathlib.Path(f.locate())
  raise Unavailable(f'{distribution} has no {suffix} ({_INSTALL})')


def toolchain() -> tuple[list[str], list[str]]:
  """The C++ compiler with the include flags for oneDNN's and XLA's FFI headers, and the flags
  that link oneDNN; raises Unavailable naming what is missing."""
  library = _find('onednn-cpu-gomp', '/libdnnl.so')
  header = _find('onednn-devel-cpu-gomp', '/oneapi/dnnl/dnnl.hpp')
  include = header.parent.parent.parent
  compiler = shutil.which(os.environ.get('CXX', 'g++'))
  if compiler is None:
    raise Unavailable(f'no C++ compiler to build {_SOURCE_NAMES} with (set $CXX or install g++)')
  return ([compiler, f'-I{include}', f'-I{jax.ffi.include_dir()}'],
          [f'-L{library.parent}', '-ldnnl', f'-Wl,-rpath,{library.parent}'])


def _build() -> pathlib.Path:
  """The compiled handler library, built now unless the cache has this build already."""
  (compiler, *includes), link = toolchain()
  # -O3: the attention's softmax loops must vectorize.
  command = [compiler, '-O3', '-std=c++17', '-shared', '-fPIC', '-fopenmp', *includes,
             *map(str, _SOURCES), *link]
  # A new source or header, jaxlib (its FFI headers) or oneDNN gets a new build.
  key = hashlib.sha256(b''.join(source.read_bytes() for source in _SOURCES + _HEADERS) +
                       ' '.join(command).encode() + jax.lib.__version__.encode()).hexdigest()[:16]
  target = cache_home.folder() / f'onednn_conv-{key}.so'
  if target.exists():
    return target
  target.parent.mkdir(parents=True, exist_ok=True)
  partial = target.with_suffix(f'.{os.getpid()}.tmp')  # processes building at once never collide
  result = subprocess.run(command + ['-o', str(partial)], capture_output=True, text=True,
                          check=False)
  if result.returncode:
    partial.unlink(missing_ok=True)
    raise Unavailable(f'building {_SOURCE_NAMES} failed:\n{result.stderr[-3000:]}')
  os.replace(partial, target)
  return target


@functools.cache
def unavailable_reason() -> str | None:
  """None once the handlers are built and registered with XLA; else why they cannot be."""
  try:
    library = ctypes.CDLL(str(_build()))
  except (Unavailable, OSError) as e:
    return str(e)
  for name in _HANDLERS + _OTHER_HANDLERS:
    jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(library, name)), platform='cpu')
  return None


def check(impl: str, field: str = 'conv_impl') -> None:
  """Raises ValueError for a `model.<field>` (conv_impl, attention_kernel or bn_kernel) not in
  IMPLS."""
  if impl not in IMPLS:
    raise ValueError(f'model.{field} must be one of {IMPLS}, got {impl!r}')


def reason_not_here(dtype) -> str | None:
  """Why the C++ kernels (the convs, the attention core) cannot run here, for compute `dtype`;
  None where they can."""
  if jax.default_backend() != 'cpu':
    return f'the backend is {jax.default_backend()!r}, not the CPU'
  if jnp.dtype(dtype) != jnp.float32:
    return f'the compute dtype is {jnp.dtype(dtype).name}, not float32'
  return unavailable_reason()


def use_onednn(impl: str, dtype, field: str = 'conv_impl') -> bool:
  """Whether `model.<field>` = `impl` runs its kernels (the convs; `model.attention_kernel`:
  the attention core; `model.bn_kernel`: the conv blocks' batch norm) here, for `dtype`.

  'auto': where it can (CPU backend, float32, oneDNN built); 'xla': never; 'onednn': always,
  raising ValueError with the reason where it cannot.
  """
  check(impl, field)
  reason = None if impl == 'xla' else reason_not_here(dtype)
  if reason and impl == 'onednn':
    raise ValueError(f"model.{field}='onednn' cannot run here: {reason}")
  return impl != 'xla' and reason is None


def switch_status(subject: str, kernels: str, impl: str, dtype, field: str) -> str:
  """One line for the logs: what runs `subject`, `kernels` where `model.<field>` = `impl` runs
  them here (`use_onednn`), else XLA's and why not."""
  if use_onednn(impl, dtype, field):
    return f'{subject}: {kernels} (model.{field}={impl!r})'
  why = '' if impl == 'xla' else f': {reason_not_here(dtype)}'
  return f"{subject}: XLA's (model.{field}={impl!r}{why})"


def status(impl: str, dtype, winograd: bool = False) -> str:
  """One line for the logs: which kernels run the 3x3 convolutions, and why."""
  small, large = (f'{n}x{n}' for n in (BLOCKED_MIN_SIZE, MIN_SIZE))
  kernels = (f"oneDNN on maps of {small} and larger (below {large} in its blocked layout, with "
             f"XLA's weight gradient), XLA's below")
  if winograd:
    kernels += (f"; Winograd F(2x2, 3x3) instead on even maps with {WINOGRAD_MIN_CHANNELS}+ "
                f"channels in and out (model.conv_winograd)")
  return switch_status('3x3 convolutions', kernels, impl, dtype, 'conv_impl')


def threads_per_device(mesh) -> int:
  """The host's cores shared among this process's devices, at least one each."""
  if mesh is None:
    local = 1
  else:
    local = sum(d.process_index == jax.process_index() for d in mesh.devices.flat)
  return max(1, host_cpu.usable_cpus() // max(local, 1))


def splits(mesh, batch_size: int) -> bool:
  """Whether the devices of `mesh` split a batch of `batch_size`: a batch they cannot split
  evenly (`nn.Module.init`'s one example) runs unsplit."""
  return mesh is not None and batch_size % mesh.size == 0


def on_each_device(mesh, fn, in_specs, out_specs, batch_size: int):
  """`fn` on each device's share of the batch (`shard_map` over `mesh`), or `fn` itself where
  `splits` says the batch stays whole."""
  if not splits(mesh, batch_size):
    return fn
  return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)


def summed_on_each_device(mesh, fn, in_specs, batch_size: int):
  """`fn` on each device's share of the batch, its results summed over the devices (a weight
  gradient), or `fn` itself where `splits` says the batch stays whole."""
  if not splits(mesh, batch_size):
    return fn
  summed = lambda *args: jax.lax.psum(fn(*args), mesh.axis_names)
  return on_each_device(mesh, summed, in_specs, P(), batch_size)


def covers(size: int) -> bool:
  """Whether oneDNN runs (some of) the convolutions of `size`-wide maps."""
  return size >= BLOCKED_MIN_SIZE


def _call(handler: str, shape, threads: int, blocked: bool, *operands):
  out = jax.ShapeDtypeStruct(tuple(shape), jnp.float32)
  return jax.ffi.ffi_call(handler, out)(*operands, pad=np.int64(1), threads=np.int64(threads),
                                        blocked=np.int64(blocked))


def _xla_weight_grad(x, dy, w):
  conv = lambda w: jax.lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)),
                                                dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  return jax.vjp(conv, w)[1](dy)[0]


def _small(x) -> bool:
  """Whether `x`'s maps are narrower than MIN_SIZE: oneDNN's blocked layout, XLA's weight grad."""
  return min(x.shape[1:3]) < MIN_SIZE


# Below this many input or output channels the 16 products are too thin to beat the direct
# convolution. Each layer alone, the CPU-scale config (batch 256 over 2 devices, Zen 4; ms for
# the forward and both gradients, Winograd against direct): 16 -> 32 on 32x32 maps 45.7 against
# 37.7, 32 -> 32 on 16x16 16.6 and 17.4 against 18.4 and 17.1, 32 -> 128 47.7 against 65.5,
# wider 1.3-1.6x faster; conv1's input gradient (3 output channels) 10.4 against 5.9.
WINOGRAD_MIN_CHANNELS = 32


def winograd_covers(shape, out_channels: int) -> bool:
  """Whether the Winograd kernel runs the convolution of NHWC `shape` to `out_channels`, all
  three ways: even maps, at least WINOGRAD_MIN_CHANNELS channels in and out."""
  return (shape[1] % 2 == 0 and shape[2] % 2 == 0
          and min(shape[3], out_channels) >= WINOGRAD_MIN_CHANNELS)


def winograd_kernel(w):
  """The HWIO kernel `w` [3, 3, c, k] in the Winograd domain, G w G^T: [16, c, k], with
  G = [[1, 0, 0], [1/2, 1/2, 1/2], [1/2, -1/2, 1/2], [0, 0, 1]]."""
  def g(rows):  # G applied along the first axis: element-wise, one fusion (a dot with a
    # 4-wide side ran at a fraction of memory speed)
    outer, middle = 0.5 * (rows[0] + rows[2]), 0.5 * rows[1]
    return jnp.stack([rows[0], outer + middle, outer - middle, rows[2]])
  return g(jnp.moveaxis(g(w), 1, 0)).transpose(1, 0, 2, 3).reshape((16,) + w.shape[2:])


def conv_3x3(mesh, winograd: bool = False):
  """A `jax.lax.conv_general_dilated` for `nn.Conv`, running 3x3, stride-1, padding-1 NHWC/HWIO
  float32 convolutions through oneDNN (on maps narrower than MIN_SIZE the weight gradient
  through XLA): each device of `mesh` (the batch's split; None: one device) its own share of
  the batch. `winograd`: the forward, the input gradient and the weight gradient by Winograd's
  F(2x2, 3x3) (`csrc/winograd.cc`) where `winograd_covers` the layer (even maps, enough
  channels in and out); oneDNN's direct convolutions for all three elsewhere.
  """
  threads = threads_per_device(mesh)
  batch = None if mesh is None else P(mesh.axis_names)

  def winograd_conv(x, u, flip: bool):
    def fn(x, u):
      out = jax.ShapeDtypeStruct(x.shape[:3] + (u.shape[1] if flip else u.shape[2],),
                                 jnp.float32)
      return jax.ffi.ffi_call(_HANDLERS[3], out)(x, u, flip=flip, threads=np.int64(threads))
    return on_each_device(mesh, fn, (batch, P()), batch, x.shape[0])(x, u)

  def winograd_weight_grad(x, dy, w):
    # The kernel's gradient from the transformed kernel's: the transform's transpose, in XLA.
    transform_t = jax.linear_transpose(winograd_kernel, jax.ShapeDtypeStruct(w.shape, w.dtype))
    def fn(x, dy):
      out = jax.ShapeDtypeStruct((16, x.shape[3], dy.shape[3]), jnp.float32)
      du = jax.ffi.ffi_call(_HANDLERS[4], out)(x, dy, threads=np.int64(threads))
      return transform_t(du)[0]
    return summed_on_each_device(mesh, fn, (batch, batch), x.shape[0])(x, dy)

  def forward(x, w):
    fn = lambda x, w: _call(_HANDLERS[0], x.shape[:3] + w.shape[3:], threads, _small(x), x, w)
    return on_each_device(mesh, fn, (batch, P()), batch, x.shape[0])(x, w)

  def input_grad(dy, w):
    fn = lambda dy, w: _call(_HANDLERS[1], dy.shape[:3] + w.shape[2:3], threads, _small(dy),
                             dy, w)
    return on_each_device(mesh, fn, (batch, P()), batch, dy.shape[0])(dy, w)

  def weight_grad(x, dy):
    fn = lambda x, dy: _call(_HANDLERS[2], (3, 3, x.shape[3], dy.shape[3]), threads, False, x, dy)
    return summed_on_each_device(mesh, fn, (batch, batch), x.shape[0])(x, dy)

  def conv_forward(x, w):
    # The transformed kernel serves the input gradient too (`flip`): worked out once a step.
    u = winograd_kernel(w) if winograd and winograd_covers(x.shape, w.shape[3]) else None
    y = forward(x, w) if u is None else winograd_conv(x, u, False)
    return y, (x, w, u)

  @jax.custom_vjp
  def conv(x, w):
    return conv_forward(x, w)[0]

  def conv_backward(saved, dy):
    x, w, u = saved
    if u is not None:
      return winograd_conv(dy, u, True), winograd_weight_grad(x, dy, w)
    return input_grad(dy, w), _xla_weight_grad(x, dy, w) if _small(x) else weight_grad(x, dy)

  conv.defvjp(conv_forward, conv_backward)

  def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None,
                           rhs_dilation=None, dimension_numbers=None, feature_group_count=1,
                           precision=None):
    del dimension_numbers, precision  # nn.Conv's: NHWC inputs, HWIO kernels
    one = (1, 1)
    if (tuple(rhs.shape[:2]) != (3, 3) or tuple(window_strides) != one
        or [tuple(p) for p in padding] != [one, one] or tuple(lhs_dilation or one) != one
        or tuple(rhs_dilation or one) != one or feature_group_count != 1
        or lhs.dtype != jnp.float32 or rhs.dtype != jnp.float32):
      raise ValueError(f'oneDNN convs here are 3x3, stride 1, padding 1, float32; got kernel '
                       f'{rhs.shape} {rhs.dtype}, strides {window_strides}, padding {padding}')
    return conv(lhs, rhs)

  return conv_general_dilated
