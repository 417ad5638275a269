"""The attention blocks' dense layers through oneDNN's sgemm on CPUs (`model.attention_kernel`),
as a `dot_general` for Flax's `nn.Dense` / `nn.DenseGeneral`.

Why: XLA's CPU dots ran the paper-width attention blocks' projections (16,384 x 128 x 128 and
1,024 x 512 x 512 a device) at ~90 GFLOP/s on one core of a 2-core Intel Xeon, where oneDNN's
sgemm (`csrc/dense.cc`, an XLA FFI handler built with the convolutions') runs the same products
at ~150 (docs/benchmark.md). Each device multiplies its own share of the batch (`shard_map`,
one thread a device, as the convolutions); the kernel's gradient is summed over the devices.
The same products up to float32 rounding: tests/test_onednn_attention.py.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from hybrid_flax import onednn_conv


def _matmul(a, b, transpose_a: bool, transpose_b: bool, threads: int):
  """op(a) op(b) for 2-D float32 a, b."""
  m = a.shape[1] if transpose_a else a.shape[0]
  n = b.shape[0] if transpose_b else b.shape[1]
  out = jax.ShapeDtypeStruct((m, n), jnp.float32)
  return jax.ffi.ffi_call('HfMatmul', out)(a, b, transpose_a=transpose_a,
                                           transpose_b=transpose_b, threads=np.int64(threads))


def dot_general(mesh):
  """A `jax.lax.dot_general` for `nn.Dense` and `nn.DenseGeneral` (float32 inputs whose last
  axes contract with the kernel's first, no batch dimensions) running through oneDNN's sgemm:
  each device of `mesh` (the batch's split along the inputs' first axis; None: one device) its
  own share of the batch.
  """
  threads = onednn_conv.threads_per_device(mesh)
  batch = None if mesh is None else P(mesh.axis_names)

  @functools.cache
  def product(contracted: int):
    """The custom-gradient product contracting x's last `contracted` axes with w's first."""

    def flat(x, w):
      k = math.prod(w.shape[:contracted])
      return x.reshape(-1, k), w.reshape(k, -1)

    def forward(x, w):
      def local(x, w):
        x2, w2 = flat(x, w)
        return _matmul(x2, w2, False, False, threads).reshape(x.shape[:-contracted] +
                                                              w.shape[contracted:])
      return onednn_conv.on_each_device(mesh, local, (batch, P()), batch, x.shape[0])(x, w)

    def input_grad(dy, w):
      def local(dy, w):
        w2 = w.reshape(math.prod(w.shape[:contracted]), -1)
        return _matmul(dy.reshape(-1, w2.shape[1]), w2, False, True, threads).reshape(
            dy.shape[:dy.ndim - (w.ndim - contracted)] + w.shape[:contracted])
      return onednn_conv.on_each_device(mesh, local, (batch, P()), batch, dy.shape[0])(dy, w)

    def kernel_grad(x, dy, w_shape):
      def local(x, dy):
        k = math.prod(w_shape[:contracted])
        grad = _matmul(x.reshape(-1, k), dy.reshape(x.size // k, -1), True, False, threads)
        return grad.reshape(w_shape)
      return onednn_conv.summed_on_each_device(mesh, local, (batch, batch), x.shape[0])(x, dy)

    @jax.custom_vjp
    def dense(x, w):
      return forward(x, w)

    def dense_forward(x, w):
      return forward(x, w), (x, w)

    def dense_backward(saved, dy):
      x, w = saved
      return input_grad(dy, w), kernel_grad(x, dy, w.shape)

    dense.defvjp(dense_forward, dense_backward)
    return dense

  def dot_general_fn(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
    del precision, preferred_element_type  # float32 in, float32 out
    (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = dimension_numbers
    n = len(lhs_contract)
    if (lhs_batch or rhs_batch or tuple(lhs_contract) != tuple(range(lhs.ndim - n, lhs.ndim))
        or tuple(rhs_contract) != tuple(range(n)) or lhs.ndim <= n
        or lhs.dtype != jnp.float32 or rhs.dtype != jnp.float32):
      raise ValueError(f'the sgemm dense layers contract float32 inputs\' last axes with the '
                       f'kernel\'s first, no batch axes; got {lhs.shape} {lhs.dtype} x '
                       f'{rhs.shape} {rhs.dtype}, dimension numbers {dimension_numbers}')
    return product(n)(lhs, rhs)

  return dot_general_fn
