"""The self-attention core through a C++ kernel on CPUs (`model.attention_kernel`), as XLA FFI
custom calls.

Why: XLA runs softmax(q k^T / sqrt(d)) v as batched matmuls over [batch, heads, L, L] scores,
with transposes into and out of the heads-first layout, and its backward, even chunked
(`models._chunked_attention_core`), as a loop of small dots, slices and copies. At paper width
the 16x16 block's core (L = 256, 8 heads of 16) is ~10% of the training step, the layout copies
around it ~3% more. `csrc/attention.cc` takes q, k and v in the projections' own
[batch, L, heads, depth] layout and, for each (example, head) pair, keeps the [L, L] scores in
the core's cache: two oneDNN sgemms and a softmax forward; the backward recomputes the scores
from the forward's row log-sum-exps and runs five sgemms. On a 2-core Intel Xeon (batch 128 on
2 devices) that core's forward took 38 ms against XLA's 60 and forward + backward 108 against
189 (docs/benchmark.md).

The same switch moves the blocks' dense layers (embeddings and projections) to oneDNN's sgemm
(`onednn_dense`). Built and loaded with the convolutions' handlers (`onednn_conv`), whose switch
semantics it shares: 'auto' runs it on a CPU backend with float32 compute where oneDNN is
built, 'xla' never, 'onednn' always or refuses. Each device runs its own share of the batch
under `shard_map`, on its share of the host's cores. The results are the core's up to float32 rounding (summation
order; exp to within 1e-7 relative): tests/test_onednn_attention.py.
"""

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from hybrid_flax import onednn_conv


def status(impl: str, dtype) -> str:
  """One line for the logs: what runs the attention blocks' core and dense layers, and why."""
  return onednn_conv.switch_status(
      'attention blocks', "the C++ core and oneDNN's sgemm for the dense layers", impl, dtype,
      'attention_kernel')


def attention_core(mesh):
  """softmax(q k^T / sqrt(depth)) v for float32 q, k, v of shape [batch, length, heads, depth],
  the result in the same layout, through the C++ kernel: each device of `mesh` (the batch's
  split; None: one device) its own share of the batch.
  """
  threads = onednn_conv.threads_per_device(mesh)
  batch = None if mesh is None else P(mesh.axis_names)

  def attrs(q):
    return {'scale': np.float32(1 / np.sqrt(q.shape[-1])), 'threads': np.int64(threads)}

  def forward(q, k, v):
    def fn(q, k, v):
      b, length, heads, _ = q.shape
      out = (jax.ShapeDtypeStruct(q.shape, jnp.float32),
             jax.ShapeDtypeStruct((b, heads, length), jnp.float32))  # the rows' log-sum-exps
      return jax.ffi.ffi_call('HfAttentionForward', out)(q, k, v, **attrs(q))
    return onednn_conv.on_each_device(mesh, fn, (batch,) * 3, (batch,) * 2, q.shape[0])(q, k, v)

  def backward(saved, dy):
    def fn(q, k, v, y, lse, dy):
      out = (jax.ShapeDtypeStruct(q.shape, jnp.float32),) * 3
      return jax.ffi.ffi_call('HfAttentionBackward', out)(q, k, v, y, lse, dy, **attrs(q))
    return onednn_conv.on_each_device(mesh, fn, (batch,) * 6, (batch,) * 3, dy.shape[0])(
        *saved, dy)

  @jax.custom_vjp
  def core(q, k, v):
    return forward(q, k, v)[0]

  def core_forward(q, k, v):
    y, lse = forward(q, k, v)
    return y, (q, k, v, y, lse)

  core.defvjp(core_forward, backward)

  def checked(q, k, v):
    if q.ndim != 4 or not q.shape == k.shape == v.shape or any(
        x.dtype != jnp.float32 for x in (q, k, v)):
      raise ValueError(f'the attention kernel takes float32 q, k, v of one shape [batch, length, '
                       f'heads, depth]; got {q.shape} {q.dtype}, {k.shape} {k.dtype}, '
                       f'{v.shape} {v.dtype}')
    return core(q, k, v)

  return checked
