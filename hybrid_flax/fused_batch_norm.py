"""A conv block's batch norm, ReLU and 2x2 max-pool as one C++ kernel on CPUs
(`model.bn_kernel`), as XLA FFI custom calls.

Why: XLA's CPU backend runs a training-mode `nn.BatchNorm` -> ReLU -> `models.max_pool_2x2` as
six element-wise passes over the conv's output forward (the two statistics reductions, the
centring, the normalisation with the ReLU, the pool's max and its first-max index) and six
backward, several at a fraction of memory speed: 51 ms a step for conv2's alone at paper width
on a 2-core Zen 4, where the kernel's four passes take 19 (docs/benchmark.md). `csrc/batch_norm.cc` makes one pass for the
statistics and one for normalise-ReLU-pool (which also writes each window's chosen element as
a byte), and backward one for the per-channel sums and one for the input gradient, in
closed form:

  dx = mul (dz - sum(dz) / n) - (x - mean) mul r^2 sum(dz (x - mean)) / n

with r = 1 / sqrt(var + eps), mul = scale r and dz the gradient below the ReLU. The
per-channel arithmetic between the passes, and the sums over devices (the statistics are the
whole batch's, as `nn.BatchNorm`'s), run in XLA. Evaluation normalises with the running
averages in the forward pass's kernel.

The conv's bias is folded in rather than added (`shift`): batch norm subtracts the batch mean,
so a per-channel shift changes only that mean (and through it the running average), and its
gradient is the mean's cotangent (zero in training, where only the running average reads the
mean). That saves a pass adding it over the maps and one reducing its gradient; XLA's path
gets the same zero as round-off.

The variables are `nn.BatchNorm`'s (same names and updates), so checkpoints carry over, and
the results are the unfused block's up to float32 rounding (summation order; the statistics'
sums are accumulated in float64): tests/test_fused_batch_norm.py. Built and loaded with the
convolutions' handlers (`onednn_conv`), whose switch semantics it shares: 'auto' runs it on a
CPU backend with float32 compute where the library is built, 'xla' never, 'onednn' always or
refuses.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from hybrid_flax import onednn_conv


def status(impl: str, dtype) -> str:
  """One line for the logs: what runs the conv blocks' batch norm, ReLU and pool, and why."""
  return onednn_conv.switch_status("conv blocks' batch norm + ReLU + pool", 'the C++ kernel',
                                   impl, dtype, 'bn_kernel')


def covers(shape, pool: bool, group_size: int) -> bool:
  """Whether the kernel runs a block on NHWC `shape`: whole-batch statistics only (ghost batch
  norm stays XLA's), and even maps where it pools."""
  return group_size == 0 and not (pool and (shape[1] % 2 or shape[2] % 2))


def _operators(mesh, pool: bool):
  """The four passes, each device of `mesh` (None: one device) on its share of the batch; the
  per-channel sums added over the devices."""
  threads = np.int64(onednn_conv.threads_per_device(mesh))
  batch, channel = (None, None) if mesh is None else (P(mesh.axis_names), P())
  idx_spec = batch if pool else channel  # not pooling, the index is one unused byte

  def out_shape(x):
    n, h, w, c = x.shape
    return (n, h // 2, w // 2, c) if pool else x.shape

  def stats(x):
    fn = lambda x: jax.ffi.ffi_call(
        'HfBnStats', jax.ShapeDtypeStruct((2, x.shape[-1]), jnp.float32))(x, threads=threads)
    return onednn_conv.summed_on_each_device(mesh, fn, (batch,), x.shape[0])(x)

  def forward(x, mean, mul, bias):
    def fn(x, mean, mul, bias):
      out = (jax.ShapeDtypeStruct(out_shape(x), jnp.float32),
             jax.ShapeDtypeStruct(out_shape(x) if pool else (1,), jnp.uint8))
      return jax.ffi.ffi_call('HfBnReluForward', out)(x, mean, mul, bias, pool=pool,
                                                      threads=threads)
    return onednn_conv.on_each_device(mesh, fn, (batch,) + (channel,) * 3,
                                      (batch, idx_spec), x.shape[0])(
                                          x, mean, mul, bias)

  def backward_sums(x, y, idx, dy, mean):
    fn = lambda x, y, idx, dy, mean: jax.ffi.ffi_call(
        'HfBnReluBackwardSums', jax.ShapeDtypeStruct((2, x.shape[-1]), jnp.float32))(
            x, y, idx, dy, mean, pool=pool, threads=threads)
    return onednn_conv.summed_on_each_device(mesh, fn, (batch, batch, idx_spec, batch, channel),
                                             x.shape[0])(x, y, idx, dy, mean)

  def backward(x, y, idx, dy, mean, mul, k0, k1):
    fn = lambda x, y, idx, dy, *channels: jax.ffi.ffi_call(
        'HfBnReluBackward', jax.ShapeDtypeStruct(x.shape, jnp.float32))(
            x, y, idx, dy, *channels, pool=pool, threads=threads)
    return onednn_conv.on_each_device(mesh, fn, (batch, batch, idx_spec, batch) + (channel,) * 4,
                                      batch, x.shape[0])(x, y, idx, dy, mean, mul, k0, k1)

  return stats, forward, backward_sums, backward


def train_function(mesh, pool: bool, epsilon: float):
  """f(x, shift, scale, bias) -> (relu(batch_norm(x + shift)), pooled 2x2 where `pool`; the
  batch's mean; its variance), with the batch statistics of training mode, differentiable in
  all four inputs; `shift` is per channel and never added to the maps."""
  stats, forward, backward_sums, backward = _operators(mesh, pool)

  def moments(x):
    n = x.size // x.shape[-1]
    sums = stats(x)
    mean = sums[0] / n
    # As nn.BatchNorm: E[x^2] - E[x]^2, clipped at 0 against round-off.
    return mean, jnp.maximum(0.0, sums[1] / n - jnp.square(mean))

  def run(x, shift, scale, bias):
    mean, var = moments(x)  # x + shift's variance is x's
    r = jax.lax.rsqrt(var + epsilon)
    y, idx = forward(x, mean, r * scale, bias)
    return (y, mean + shift, var), (x, y, idx, mean, r, scale)

  @jax.custom_vjp
  def fn(x, shift, scale, bias):
    return run(x, shift, scale, bias)[0]

  def fn_backward(saved, cotangents):
    x, y, idx, mean, r, scale = saved
    dy, dmean, dvar = cotangents
    n = x.size // x.shape[-1]
    sums = backward_sums(x, y, idx, dy, mean)
    mul = r * scale
    # The mean's and the variance's own cotangents (zero when they only feed the running
    # averages) join the normalisation's: d mean / dx = 1 / n, d var / dx = 2 (x - mean) / n.
    k0 = (mul * sums[0] - dmean) / n
    k1 = (mul * jnp.square(r) * sums[1] - 2 * dvar) / n
    dx = backward(x, y, idx, dy, mean, mul, k0, k1)
    # The output is the same for any shift; only the mean moves with it.
    return dx, dmean, sums[1] * r, sums[0]

  fn.defvjp(run, fn_backward)
  return fn


def eval_function(mesh, pool: bool):
  """f(x, mean, mul, bias) -> relu((x - mean) mul + bias), pooled 2x2 where `pool`: evaluation
  with the running averages (not differentiable; a shift goes into `mean`)."""
  return lambda x, mean, mul, bias: _operators(mesh, pool)[1](x, mean, mul, bias)[0]


class BatchNormRelu(nn.Module):
  """`nn.BatchNorm` -> ReLU -> optional 2x2 max-pool (`models.max_pool_2x2`) on `x + shift`
  (`shift`, per channel: the conv's bias, folded into the statistics) through the C++ kernel;
  `nn.BatchNorm`'s variables, names and running-average updates."""

  pool: bool
  use_running_average: bool
  momentum: float
  epsilon: float
  mesh: Any = None

  @nn.compact
  def __call__(self, x, shift=None):
    if x.ndim != 4 or x.dtype != jnp.float32:
      raise ValueError(f'the batch-norm kernel takes float32 [n, h, w, c] maps; got {x.shape} '
                       f'{x.dtype}')
    c = x.shape[-1]
    shift = jnp.zeros((c,), jnp.float32) if shift is None else shift
    scale = self.param('scale', nn.initializers.ones, (c,), jnp.float32)
    bias = self.param('bias', nn.initializers.zeros, (c,), jnp.float32)
    ra_mean = self.variable('batch_stats', 'mean', lambda: jnp.zeros((c,), jnp.float32))
    ra_var = self.variable('batch_stats', 'var', lambda: jnp.ones((c,), jnp.float32))
    if self.use_running_average:
      mul = jax.lax.rsqrt(ra_var.value + self.epsilon) * scale
      return eval_function(self.mesh, self.pool)(x, ra_mean.value - shift, mul, bias)
    y, mean, var = train_function(self.mesh, self.pool, self.epsilon)(x, shift, scale, bias)
    if not self.is_initializing():
      ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
      ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * var
    return y
