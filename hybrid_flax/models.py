"""The paper's hybrid CNN + multi-head self-attention classifier, as Flax linen modules.

Layout (NHWC throughout): two identical stages of (conv, conv, attention, residual), then a
classifier head. The paper fixes the blocks but not the widths; the defaults follow the ResNet-9
trunk (64-128-256-512) whose `conv_block(..., pool=False)` the paper's conv module describes.
"""

import functools
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from hybrid_flax import fused_batch_norm
from hybrid_flax import onednn_attention
from hybrid_flax import onednn_conv
from hybrid_flax import onednn_dense

# PyTorch's BatchNorm2d defaults (momentum 0.1 there is 1 - 0.9 here), so the paper's learning
# rate sees the same normalisation statistics.
_BN_MOMENTUM = 0.9
_BN_EPSILON = 1e-5
DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}
ATTENTION_NORMS = ('none', 'batch', 'layer')
# conv1 is 3x3 on RGB: a whitened conv1 has two channels per eigenvector of a 27-value patch.
_MAX_WHITENED_WIDTH = 2 * 3 * 3 * 3


def dirac_init(base=nn.initializers.lecun_normal()):
  """`base`, except that output channel i < input channels is the identity on input channel i.

  airbench's identity initialisation: each block then starts close to passing its input on,
  which lets a short schedule train the deep layers from the first steps. Only the start
  changes, not the model's function.
  """
  def init(key, shape, dtype=jnp.float32):
    kernel = base(key, shape, dtype)
    kh, kw, cin, cout = shape
    n = min(cin, cout)
    identity = jnp.zeros((kh, kw, n, n), dtype).at[kh // 2, kw // 2].set(jnp.eye(n, dtype=dtype))
    return kernel.at[:, :, :n, :n].set(identity)
  return init


# The parameter that `model.whiten` sets from the data and then freezes.
WHITENED_KERNEL = ('conv1', 'Conv_0', 'kernel')
_WHITENING_CHUNK = 256  # images


def whitening_kernel(images: np.ndarray, features: int, size: int = 3,
                     eps: float = 5e-4) -> np.ndarray:
  """A conv kernel [size, size, C, features] that whitens the images' size x size patches.

  Page (2018) / airbench: the first layer starts as (and stays, being frozen) the projection of
  each patch onto the top features/2 eigenvectors of the patch covariance, each scaled by
  1/sqrt(eigenvalue), and its negation, so after the ReLU both signs survive. `images` are
  preprocessed [N, H, W, C] float arrays (a few thousand training images are plenty).
  """
  images = np.asarray(images)  # as given (float32 from training): float64 chunk by chunk below
  c = images.shape[-1]
  dim = size * size * c
  if features % 2 or not 0 < features <= 2 * dim:
    raise ValueError(f'a whitened first layer needs an even width of at most {2 * dim} '
                     f'(two per eigenvector of a {size}x{size}x{c} patch), got {features}')
  h, w = images.shape[1:3]
  # The patch covariance, summed over chunks of images: all 5,000 images' patches at once took
  # 2 GB (float64, and a centred copy) and 5-6 s on a 2-core CPU; this ~50 MB and 1.7-2.0 s, the
  # same kernel to the bit on CIFAR-10 (docs/benchmark.md).
  total, outer, count = np.zeros(dim), np.zeros((dim, dim)), 0
  for start in range(0, len(images), _WHITENING_CHUNK):
    chunk = np.asarray(images[start:start + _WHITENING_CHUNK], np.float64)
    # Every valid patch, flattened in the kernel's (row, column, channel) order.
    patches = np.stack([chunk[:, i:i + h - size + 1, j:j + w - size + 1]
                        for i in range(size) for j in range(size)], axis=3).reshape(-1, dim)
    total += patches.sum(0)
    outer += patches.T @ patches
    count += len(patches)
  mean = total / count
  eigenvalues, eigenvectors = np.linalg.eigh(outer / count - np.outer(mean, mean))
  top = np.argsort(eigenvalues)[::-1][:features // 2]
  filters = eigenvectors[:, top] / np.sqrt(eigenvalues[top] + eps)
  kernel = np.concatenate([filters, -filters], axis=1)
  return kernel.reshape(size, size, c, features).astype(np.float32)


def whitened_width(model_config) -> int:
  """How many of conv1's channels `model.whiten` fills with whitening filters: all of them up
  to two per patch eigenvector (54); a wider conv1 (the paper's 64) gets its first 54 that way,
  as a conv of their own, and learns the rest (`HybridNet.conv1_split`)."""
  return min(model_config.widths[0], _MAX_WHITENED_WIDTH)


def _pool_windows(x):
  """[B, H, W, C] -> [B, H/2, 2, W/2, 2, C]: the 2x2 windows (an odd last row/column dropped)."""
  b, h, w, c = x.shape
  return x[:, :h // 2 * 2, :w // 2 * 2].reshape(b, h // 2, 2, w // 2, 2, c)


@jax.custom_jvp
def max_pool_2x2(x):
  """`nn.max_pool(x, (2, 2), strides=(2, 2))` with the same values and the same gradient.

  Why not `nn.max_pool`: XLA's CPU backend turns its gradient (select-and-scatter) into a
  reduce-window that carries four index arrays, 4-5x slower than this elementwise form
  (tests/test_models.py checks both agree, ties included).
  """
  return jnp.max(_pool_windows(x), axis=(2, 4))


@max_pool_2x2.defjvp
def _max_pool_2x2_jvp(primals, tangents):
  (x,), (dx,) = primals, tangents
  windows = _pool_windows(x)
  peak = jnp.max(windows, axis=(2, 4), keepdims=True)
  # Each output follows its window's first maximum in row-major order, the element that
  # select-and-scatter sends the gradient to: ties (common after a ReLU) must not split it.
  order = (2 * jax.lax.broadcasted_iota(jnp.int32, windows.shape, 2)
           + jax.lax.broadcasted_iota(jnp.int32, windows.shape, 4))
  first = jnp.min(jnp.where(windows == peak, order, 4), axis=(2, 4), keepdims=True)
  chosen = jnp.where(order == first, _pool_windows(dx), 0)
  return peak[:, :, 0, :, 0], jnp.sum(chosen, axis=(2, 4))


class GhostBatchNorm(nn.Module):
  """Batch norm whose training statistics come from groups of `group_size` examples.

  Ghost batch norm (Hoffer et al. 2017; Page's "bag of tricks" ResNet uses groups of 32):
  consecutive examples 0..g-1, g..2g-1, ... are normalised with their own group's mean and
  variance. Why: with the batch split over devices, `nn.BatchNorm` averages its statistics
  over the whole batch, a cross-device all-reduce in every layer forward and backward; groups
  that lie inside one device's share need none. The running statistics average the groups'
  (evaluation normalises as `nn.BatchNorm` does); the variables and their names are
  `nn.BatchNorm`'s, so checkpoints and the optimizer's masks carry over, and with one group
  (`group_size` = the batch) training is `nn.BatchNorm`'s too.
  """

  group_size: int
  use_running_average: bool
  momentum: float = _BN_MOMENTUM
  epsilon: float = _BN_EPSILON
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    scale = self.param('scale', nn.initializers.ones, (c,), jnp.float32)
    bias = self.param('bias', nn.initializers.zeros, (c,), jnp.float32)
    ra_mean = self.variable('batch_stats', 'mean', lambda: jnp.zeros((c,), jnp.float32))
    ra_var = self.variable('batch_stats', 'var', lambda: jnp.ones((c,), jnp.float32))
    shape = x.shape
    if self.use_running_average:
      mean, var = ra_mean.value, ra_var.value
    else:
      b = shape[0]
      if b % self.group_size:
        raise ValueError(f'a batch of {b} does not split into batch-norm groups of '
                         f'{self.group_size} (model.bn_group_size)')
      x = x.reshape((b // self.group_size, self.group_size) + shape[1:])
      axes = tuple(range(1, x.ndim - 1))
      # As nn.BatchNorm: E[x^2] - E[x]^2 in at least float32, clipped at 0 against round-off.
      stats_x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
      mean = stats_x.mean(axes, keepdims=True)
      var = jnp.maximum(0.0, jnp.square(stats_x).mean(axes, keepdims=True) - jnp.square(mean))
      if not self.is_initializing():
        ra_mean.value = (self.momentum * ra_mean.value
                         + (1 - self.momentum) * mean.reshape(-1, c).mean(0))
        ra_var.value = (self.momentum * ra_var.value
                        + (1 - self.momentum) * var.reshape(-1, c).mean(0))
    y = (x - mean) * (jax.lax.rsqrt(var + self.epsilon) * scale) + bias
    y = y.reshape(shape)
    return y.astype(self.dtype)


def batch_norm(train: bool, group_size: int = 0, momentum: float = _BN_MOMENTUM,
               dtype: Any = jnp.float32, name: str | None = None) -> nn.Module:
  """`nn.BatchNorm` over the whole batch (group_size 0), else `GhostBatchNorm`; same variables."""
  if group_size:
    return GhostBatchNorm(group_size, use_running_average=not train, momentum=momentum,
                          epsilon=_BN_EPSILON, dtype=dtype, name=name)
  return nn.BatchNorm(use_running_average=not train, momentum=momentum, epsilon=_BN_EPSILON,
                      dtype=dtype, name=name)


def _opaque_identity(xs, token):
  """`xs` (a pytree) unchanged, through a while loop whose trip count XLA cannot know.

  The loop runs once (zero times when `token` is NaN) and multiplies by a 1 read from `token`,
  so the result is exactly `xs`; but XLA can neither remove the loop nor fuse across it, so
  what reads the result reads a stored tensor. `token` must be a replicated scalar (a
  parameter's element): one read from a batch-sharded array would need a collective.
  """
  trips = (token == token).astype(jnp.int32)
  one = trips.astype(jnp.float32)
  def body(carry):
    i, values = carry
    return i + 1, jax.tree.map(lambda v: v * one.astype(v.dtype), values)
  return jax.lax.while_loop(lambda carry: carry[0] < trips, body, (jnp.int32(0), xs))[1]


def conv_with_grad_barrier(lhs, rhs, *args, **kwargs):
  """`jax.lax.conv_general_dilated` whose gradients read its input and output gradient stored.

  Why: XLA's CPU backend computes a weight gradient as a convolution over transposed copies of
  the input and of the output's gradient, and fuses their producers (batch norm and ReLU in
  the forward, batch norm's backward) into those strided copies, recomputing them element by
  element at a fraction of memory speed. Passing both through `_opaque_identity` first leaves
  plain copies of stored tensors: the paper-width step 3-10% faster on a 2-core Intel Xeon
  (docs/benchmark.md). The values are the convolution's, and so are the gradients: the same
  backward, on the same numbers.
  """
  def conv(x, w):
    return jax.lax.conv_general_dilated(x, w, *args, **kwargs)

  @jax.custom_vjp
  def barrier_conv(x, w):
    return conv(x, w)

  def forward(x, w):
    return conv(x, w), (x, w)

  def backward(saved, dy):
    x, w = saved
    x, dy = _opaque_identity((x, dy), w.ravel()[0])
    return jax.vjp(conv, x, w)[1](dy)

  barrier_conv.defvjp(forward, backward)
  return barrier_conv(lhs, rhs)


def conv_function(size: int, grad_barrier: bool, onednn: bool, mesh, winograd: bool = False):
  """The `conv_general_dilated` a `ConvBlock` with these switches runs on `size`-wide maps."""
  if onednn and onednn_conv.covers(size):
    return onednn_conv.conv_3x3(mesh, winograd)
  # CPUs only: on a GPU each loop of the barrier would wait for the host.
  if grad_barrier and jax.default_backend() == 'cpu':
    return conv_with_grad_barrier
  return jax.lax.conv_general_dilated


class ConvReturningBias(nn.Conv):
  """`nn.Conv` (built with `use_bias=False`) that returns (output, bias) instead of adding the
  bias, for a batch-norm kernel that folds it into its statistics (`fused_batch_norm`).
  Variables, names and initial values are `nn.Conv`'s: the bias is drawn after the kernel,
  as there."""

  @nn.compact
  def __call__(self, inputs):
    y = super().__call__(inputs)
    return y, self.param('bias', self.bias_init, (self.features,), self.param_dtype)


class ConvBlock(nn.Module):
  """Conv 3x3 (padding 1) -> BatchNorm -> ReLU -> optional 2x2 max-pool.

  `grad_barrier`, on CPUs: the conv's backward reads stored tensors (`conv_with_grad_barrier`).
  `onednn`: maps oneDNN covers (`onednn_conv.covers`) go through it, each device of `mesh`
  (None: one device) its share of the batch (`onednn_conv.conv_3x3`); with `winograd`, by
  Winograd's F(2x2, 3x3) where it covers them (`onednn_conv.winograd_covers`).
  `bn_kernel`: batch norm, ReLU and pool as one C++ kernel where it covers the block
  (`fused_batch_norm`), each device of `mesh` likewise; the conv's bias goes into its
  statistics, not onto the maps.
  `split` (0 < split < features): the conv as two, `Conv_0` for the first `split` output
  channels and `Conv_1` for the rest, side by side: the same function and parameter count,
  so that an optimizer can freeze one part and train the other.
  """

  features: int
  pool: bool = False
  bn_momentum: float = _BN_MOMENTUM
  bn_group_size: int = 0
  dirac: bool = False
  dtype: Any = jnp.float32
  grad_barrier: bool = False
  onednn: bool = False
  winograd: bool = False
  bn_kernel: bool = False
  mesh: Any = None
  split: int = 0

  def _conv(self, layer, x):
    init = dirac_init() if self.dirac else nn.initializers.lecun_normal()
    conv = dict(kernel_size=(3, 3), padding=((1, 1), (1, 1)), kernel_init=init,
                dtype=self.dtype,
                conv_general_dilated=conv_function(min(x.shape[1:3]), self.grad_barrier,
                                                   self.onednn, self.mesh, self.winograd))
    if not 0 < self.split < self.features:
      return layer(features=self.features, name='Conv_0', **conv)(x)
    parts = [layer(features=n, name=f'Conv_{i}', **conv)(x)
             for i, n in enumerate((self.split, self.features - self.split))]
    if isinstance(parts[0], tuple):  # (output, bias) pairs
      return tuple(jnp.concatenate(p, axis=-1) for p in zip(*parts))
    return jnp.concatenate(parts, axis=-1)

  @nn.compact
  def __call__(self, x, train: bool):
    # Named as nn.BatchNorm names itself, so the bias scaler and checkpoints find it either way.
    if self.bn_kernel and fused_batch_norm.covers(x.shape[:3] + (self.features,), self.pool,
                                                  self.bn_group_size):
      x, shift = self._conv(functools.partial(ConvReturningBias, use_bias=False), x)
      return fused_batch_norm.BatchNormRelu(self.pool, use_running_average=not train,
                                            momentum=self.bn_momentum, epsilon=_BN_EPSILON,
                                            mesh=self.mesh, name='BatchNorm_0')(x, shift)
    x = self._conv(nn.Conv, x)
    x = batch_norm(train, self.bn_group_size, self.bn_momentum, self.dtype, 'BatchNorm_0')(x)
    x = nn.relu(x)
    if self.pool:
      x = max_pool_2x2(x)
    return x


ATTENTION_IMPLS = ('deferred', 'flax')


def _attention_scores(q, k):
  """exp(q k^T - max) over the last two axes, and its sum over keys."""
  # The softmax in float32 at least: for a bfloat16 model Flax's runs in bfloat16, whose
  # 8-bit mantissa rounds the exponentials' sum.
  logits = jnp.einsum('...qd,...kd->...qk', q, k)
  logits = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))
  # The max only guards exp against overflow; the result does not depend on it.
  scores = jnp.exp(logits - jax.lax.stop_gradient(logits.max(-1, keepdims=True)))
  return scores, scores.sum(-1, keepdims=True)


def _attention_core(q, k, v):
  """softmax(q k^T) v as exp(q k^T - max) v / sum: one division per output, not per score."""
  scores, total = _attention_scores(q, k)
  return jnp.einsum('...qk,...kd->...qd', scores.astype(v.dtype), v) / total.astype(v.dtype)


def _pairs_per_chunk(pairs: int, length: int, kib: int) -> int:
  """The most (example, head) pairs whose [length, length] float32 scores fit in `kib` KiB and
  that divide `pairs` (at least 1)."""
  chunk = max(1, min(pairs, kib * 1024 // (length * length * 4)))
  while pairs % chunk:
    chunk -= 1
  return chunk


def _attention_core_grads(q, k, v, y, dy):
  """The gradients of `_attention_core` (output `y`) for `dy`, from recomputed scores.

  Each transposed product (scores^T x) is written as (x^T scores)^T, so XLA's CPU dot reads the
  [length, length] scores in their own layout; autodiff's versions ran as plain `dot`s at
  ~10 GFLOP/s.
  """
  q, k, v, y, dy = (x.astype(jnp.promote_types(x.dtype, jnp.float32)) for x in (q, k, v, y, dy))
  scores, total = _attention_scores(q, k)
  dy = dy / total  # the gradient of the undivided output
  dscores = scores * (jnp.einsum('...qd,...kd->...qk', dy, v) - (dy * y).sum(-1, keepdims=True))
  swap = functools.partial(jnp.swapaxes, axis1=-1, axis2=-2)
  return (jnp.einsum('...qk,...kd->...qd', dscores, k),
          jnp.einsum('...dq,...qk->...dk', swap(q), dscores),  # dk, transposed
          jnp.einsum('...dq,...qk->...dk', swap(dy), scores))  # dv, transposed


@functools.lru_cache(maxsize=None)
def _chunked_attention_core(chunk_kib: int, mesh):
  """`_attention_core` whose backward pass loops over chunks of (example, head) pairs.

  Why: autodiff's backward keeps the whole [batch, heads, L, L] score tensor (134 MB a device
  at paper width, L = 256, 64 examples) and passes over it about ten times, at memory speed.
  Recomputing each chunk's scores inside a loop keeps them in the core's cache instead: the
  16x16 block's core, forward and backward, 335 -> 107 ms for batch 128 on 2 CPU devices
  (docs/benchmark.md). Each device loops over its own examples (`shard_map` over `mesh`, whose
  axes split the batch): a loop over a sharded axis would run every chunk on every device.
  The forward pass is `_attention_core`'s; only what it saves differs (q, k, v and the output
  instead of the scores).
  """
  batch_axes = P(mesh.axis_names)

  def local_grads(q, k, v, y, dy):
    b, h, length, _ = q.shape
    chunk = _pairs_per_chunk(b * h, length, chunk_kib)
    split = lambda x: x.reshape(-1, chunk, *x.shape[2:])
    dq, dk_t, dv_t = jax.lax.map(lambda xs: _attention_core_grads(*xs),
                                 tuple(split(x) for x in (q, k, v, y, dy)))
    return (dq.reshape(q.shape).astype(q.dtype),
            jnp.swapaxes(dk_t, -1, -2).reshape(k.shape).astype(k.dtype),
            jnp.swapaxes(dv_t, -1, -2).reshape(v.shape).astype(v.dtype))

  @jax.custom_vjp
  def core(q, k, v):
    return _attention_core(q, k, v)

  def forward(q, k, v):
    y = _attention_core(q, k, v)
    return y, (q, k, v, y)

  def backward(saved, dy):
    return jax.shard_map(local_grads, mesh=mesh, in_specs=batch_axes,
                         out_specs=batch_axes)(*saved, dy)

  core.defvjp(forward, backward)
  return core


def xla_attention_core(grad_chunk_kib: int, mesh, dtype: Any = jnp.float32):
  """softmax(q k^T / sqrt(depth)) v through XLA, for q, k, v in the projections'
  [batch, length, heads, depth] layout: `SelfAttention`'s core without the C++ kernel, its
  backward chunked (`_chunked_attention_core`) on CPUs where `grad_chunk_kib` > 0 and `mesh`
  splits the batch. Heads go in front for the two batched matmuls and back after."""
  core = _attention_core
  if grad_chunk_kib > 0 and mesh is not None and jax.default_backend() == 'cpu':
    core = _chunked_attention_core(grad_chunk_kib, mesh)
  heads_first = lambda a: a.transpose(0, 2, 1, 3)

  def run(q, k, v):
    q = heads_first(q) / jnp.sqrt(q.shape[-1]).astype(dtype)
    return heads_first(core(q, heads_first(k), heads_first(v)))
  return run


def _dense_products(onednn: bool, mesh) -> dict:
  """The `nn.Dense` arguments for an attention block's dense layers: oneDNN's sgemm where
  `onednn` (`onednn_dense`), each device of `mesh` its share of the batch; else XLA's dots."""
  return {'dot_general': onednn_dense.dot_general(mesh)} if onednn else {}


class SelfAttention(nn.Module):
  """Multi-head self-attention with `nn.MultiHeadDotProductAttention`'s parameters and math.

  The same query/key/value/out projections (the same names, shapes and initial values, so
  checkpoints and the PyTorch twin carry over) and softmax(q k^T / sqrt(d)) v, arranged for
  speed on CPUs: heads go in front ([B, H, L, D]) before the two batched matmuls, and the
  softmax's division is deferred until after the value matmul (exp(s - max) v / sum, one
  division per output element instead of per score). On the 2-core CPU the 16x16 attention
  block's forward + backward is ~1.5x faster at one head, and the 8-head forward ~8x faster
  (docs/benchmark.md). The result differs from Flax's by rounding only (tested).
  """

  num_heads: int
  dtype: Any = jnp.float32
  # > 0 with a `mesh` (the devices the batch is split over), on CPUs: the backward pass
  # recomputes the scores in chunks of at most this many KiB (`_chunked_attention_core`).
  grad_chunk_kib: int = 0
  mesh: Any = None
  # The core through the C++ kernel (`onednn_attention`), in the projections' own layout; then
  # `grad_chunk_kib` is unused.
  onednn: bool = False

  @nn.compact
  def __call__(self, x):
    b, length, c = x.shape
    depth = c // self.num_heads
    products = _dense_products(self.onednn, self.mesh)
    dense = functools.partial(nn.DenseGeneral, features=(self.num_heads, depth), dtype=self.dtype,
                              **products)
    q, k, v = (dense(name=name)(x) for name in ('query', 'key', 'value'))  # [B, L, H, D]
    heads_first = lambda a: a.transpose(0, 2, 1, 3)
    scaled = lambda q: q / jnp.sqrt(depth).astype(self.dtype)
    if self.is_mutable_collection('intermediates'):
      scores, total = _attention_scores(scaled(heads_first(q)), heads_first(k))
      self.sow('intermediates', 'attention_weights', (scores / total).astype(self.dtype))
    if self.onednn:
      y = onednn_attention.attention_core(self.mesh)(q, k, v)
    else:
      y = xla_attention_core(self.grad_chunk_kib, self.mesh, self.dtype)(q, k, v)
    return nn.DenseGeneral(c, axis=(-2, -1), dtype=self.dtype, name='out', **products)(y)


class AttentionBlock(nn.Module):
  """Self-attention over the H*W positions of a feature map (paper eqs. 8-13).

  (B,H,W,C) -> (B,HW,C) -> Dense -> MHSA(x) + x -> Dense -> (B,H,W,C). With `embed=False`
  the two Dense layers are dropped: the paper's 60% ablation. `impl` picks the attention core,
  `SelfAttention` ('deferred') or Flax's own ('flax'): the same function. `norm` ('batch' or
  'layer'; not in the paper) normalises the block's output, which the paper's block leaves
  unbounded (the second block reaches the classifier through a residual block and a max-pool
  only): a switch for testing whether that is what makes large learning rates diverge.
  `grad_chunk_kib`, `mesh` and `onednn` (the core through the C++ kernel, 'deferred' only) go
  to `SelfAttention`.
  """

  num_heads: int
  embed: bool = True
  norm: str = 'none'
  impl: str = 'deferred'
  bn_momentum: float = _BN_MOMENTUM
  bn_group_size: int = 0
  dtype: Any = jnp.float32
  grad_chunk_kib: int = 0
  mesh: Any = None
  onednn: bool = False

  @nn.compact
  def __call__(self, x, train: bool = False):
    b, h, w, c = x.shape
    if c % self.num_heads:
      raise ValueError(f'{c} channels do not split into {self.num_heads} attention heads')
    x = x.reshape(b, h * w, c)
    products = _dense_products(self.onednn, self.mesh)
    if self.embed:
      x = nn.Dense(c, dtype=self.dtype, name='embed_in', **products)(x)
    # Both record the (B, heads, HW, HW) weights only when the caller makes 'intermediates'
    # mutable (the attention-map tool); training never pays for it.
    if self.impl == 'deferred':
      x = SelfAttention(self.num_heads, dtype=self.dtype, grad_chunk_kib=self.grad_chunk_kib,
                        mesh=self.mesh, onednn=self.onednn, name='mhsa')(x) + x
    elif self.impl == 'flax':
      attn = nn.MultiHeadDotProductAttention(
          num_heads=self.num_heads, qkv_features=c, out_features=c, dtype=self.dtype, name='mhsa'
      )
      x = attn(x, sow_weights=True) + x
    else:
      raise ValueError(f'attention impl must be one of {ATTENTION_IMPLS}, got {self.impl!r}')
    if self.embed:
      x = nn.Dense(c, dtype=self.dtype, name='embed_out', **products)(x)
    if self.norm == 'batch':
      x = batch_norm(train, self.bn_group_size, self.bn_momentum, self.dtype, 'norm')(x)
    elif self.norm == 'layer':
      x = nn.LayerNorm(epsilon=_BN_EPSILON, dtype=self.dtype, name='norm')(x)
    elif self.norm != 'none':
      raise ValueError(f'attention norm must be one of {ATTENTION_NORMS}, got {self.norm!r}')
    return x.reshape(b, h, w, c)


class ResidualBlock(nn.Module):
  """x + ConvBlock(ConvBlock(x)); no pooling, so shape and channels are unchanged."""

  bn_momentum: float = _BN_MOMENTUM
  bn_group_size: int = 0
  dirac: bool = False
  dtype: Any = jnp.float32
  grad_barrier: bool = False
  onednn: bool = False
  winograd: bool = False
  bn_kernel: bool = False
  mesh: Any = None

  @nn.compact
  def __call__(self, x, train: bool):
    block = functools.partial(ConvBlock, x.shape[-1], bn_momentum=self.bn_momentum,
                              bn_group_size=self.bn_group_size, dirac=self.dirac,
                              dtype=self.dtype, grad_barrier=self.grad_barrier,
                              onednn=self.onednn, winograd=self.winograd,
                              bn_kernel=self.bn_kernel, mesh=self.mesh)
    y = block()(x, train)  # ConvBlock_0, then ConvBlock_1, as checkpoints name them
    y = block()(y, train)
    return x + y


class HybridNet(nn.Module):
  """Two stages of (conv, conv, attention, residual), then max-pool + dropout + Dense.

  `widths` and `pool` list the four conv blocks in order (two per stage); `num_heads` applies
  to both attention blocks. `logit_scale` multiplies the logits (ResNet-9's 0.125; 1 in the
  paper). `dirac` starts every conv but the first as an identity where it can (`dirac_init`).
  `mesh`: the devices a training step splits its batch over, for the attention's chunked
  backward pass on CPUs (`attention_grad_chunk_kib`, `SelfAttention`; None turns it off) and
  the oneDNN convs' per-device calls (None: one unsplit call).
  `conv_grad_barrier`: every conv's backward reads stored tensors on CPUs (`ConvBlock`).
  `onednn`: the convs of maps oneDNN covers (`onednn_conv.covers`) run through it
  (`ConvBlock`; `onednn_conv.use_onednn` decides it from `model.conv_impl`); `winograd`, by
  Winograd's F(2x2, 3x3) (`model.conv_winograd`).
  `attention_onednn`: the attention core runs through the C++ kernel (`onednn_attention`) and
  the blocks' dense layers through oneDNN's sgemm (`onednn_dense`); from
  `model.attention_kernel`.
  `bn_kernel`: the conv blocks' batch norm, ReLU and pool as one C++ kernel
  (`fused_batch_norm`; `ConvBlock`); from `model.bn_kernel`.
  `conv1_split`: conv1 as two convs side by side (`ConvBlock.split`); `create_model` sets it
  to `whitened_width` under `model.whiten`, which splits only a conv1 wider than its filters.
  """

  widths: Sequence[int] = (64, 128, 256, 512)
  pool: Sequence[bool] = (False, True, True, True)
  attention: bool = True
  embed: bool = True
  num_heads: int = 8
  attention_norm: str = 'none'
  attention_impl: str = 'deferred'
  logit_scale: float = 1.0
  num_classes: int = 10
  dropout: float = 0.0
  bn_momentum: float = _BN_MOMENTUM
  bn_group_size: int = 0  # > 0: ghost batch norm over groups of this many examples
  dirac: bool = False
  dtype: Any = jnp.float32  # compute dtype; parameters stay float32
  attention_grad_chunk_kib: int = 0
  mesh: Any = None
  conv_grad_barrier: bool = False
  onednn: bool = False
  winograd: bool = False
  attention_onednn: bool = False
  bn_kernel: bool = False
  conv1_split: int = 0

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = x.astype(self.dtype)
    for stage in range(2):
      for i in (2 * stage, 2 * stage + 1):
        x = ConvBlock(self.widths[i], pool=self.pool[i], bn_momentum=self.bn_momentum,
                      bn_group_size=self.bn_group_size, dirac=self.dirac and i > 0,
                      dtype=self.dtype, grad_barrier=self.conv_grad_barrier,
                      onednn=self.onednn, winograd=self.winograd, bn_kernel=self.bn_kernel,
                      mesh=self.mesh, split=self.conv1_split if i == 0 else 0,
                      name=f'conv{i + 1}')(x, train)
      if self.attention:
        x = AttentionBlock(self.num_heads, embed=self.embed, norm=self.attention_norm,
                           impl=self.attention_impl,
                           bn_momentum=self.bn_momentum, bn_group_size=self.bn_group_size,
                           dtype=self.dtype, grad_chunk_kib=self.attention_grad_chunk_kib,
                           mesh=self.mesh, onednn=self.attention_onednn,
                           name=f'attention{stage + 1}')(x, train)
      x = ResidualBlock(bn_momentum=self.bn_momentum, bn_group_size=self.bn_group_size,
                        dirac=self.dirac, dtype=self.dtype, grad_barrier=self.conv_grad_barrier,
                        onednn=self.onednn, winograd=self.winograd, bn_kernel=self.bn_kernel,
                        mesh=self.mesh, name=f'residual{stage + 1}')(x, train)
    # Global max-pool: the ResNet-9 head's MaxPool2d(4) on its 4x4 map, for any pooling layout.
    x = jnp.max(x, axis=(1, 2))
    x = nn.Dropout(self.dropout, deterministic=not train)(x)
    x = nn.Dense(self.num_classes, dtype=self.dtype, name='head')(x)
    return x.astype(jnp.float32) * self.logit_scale


def validate_model_config(model_config) -> None:
  """Raises ValueError with a one-line reason for an inconsistent model config."""
  widths, pool = tuple(model_config.widths), tuple(model_config.pool)
  if len(widths) != 4 or len(pool) != 4:
    raise ValueError(f'model.widths and model.pool need 4 entries (two conv blocks per stage), '
                     f'got widths={widths} pool={pool}')
  if any(w <= 0 for w in widths):
    raise ValueError(f'model.widths must be positive, got {widths}')
  if model_config.num_heads <= 0:
    raise ValueError(f'model.num_heads must be positive, got {model_config.num_heads}')
  if model_config.attention:
    for w in (widths[1], widths[3]):
      if w % model_config.num_heads:
        raise ValueError(f'attention width {w} (model.widths={widths}) is not divisible by '
                         f'model.num_heads={model_config.num_heads}')
  if model_config.attention_norm not in ATTENTION_NORMS:
    raise ValueError(f'model.attention_norm must be one of {ATTENTION_NORMS}, '
                     f'got {model_config.attention_norm!r}')
  if model_config.attention_impl not in ATTENTION_IMPLS:
    raise ValueError(f'model.attention_impl must be one of {ATTENTION_IMPLS}, '
                     f'got {model_config.attention_impl!r}')
  if not model_config.logit_scale > 0:
    raise ValueError(f'model.logit_scale must be positive, got {model_config.logit_scale}')
  if not 0.0 <= model_config.dropout < 1.0:
    raise ValueError(f'model.dropout must be in [0, 1), got {model_config.dropout}')
  if model_config.bn_group_size < 0:
    raise ValueError(f'model.bn_group_size must be >= 0 (0: the whole batch), '
                     f'got {model_config.bn_group_size}')
  if not 0.0 <= model_config.bn_momentum < 1.0:
    raise ValueError(f'model.bn_momentum must be in [0, 1), got {model_config.bn_momentum}')
  if model_config.whiten and widths[0] <= _MAX_WHITENED_WIDTH and widths[0] % 2:
    raise ValueError(f'model.whiten needs an even first width up to {_MAX_WHITENED_WIDTH} '
                     f'(two channels per eigenvector of a 3x3x3 patch), got '
                     f'model.widths[0]={widths[0]}')
  if model_config.attention_grad_chunk_kib < 0:
    raise ValueError(f'model.attention_grad_chunk_kib must be >= 0 (0: off), '
                     f'got {model_config.attention_grad_chunk_kib}')
  onednn_conv.check(model_config.conv_impl)
  onednn_conv.check(model_config.attention_kernel, 'attention_kernel')
  onednn_conv.check(model_config.bn_kernel, 'bn_kernel')
  if model_config.attention_kernel == 'onednn' and model_config.attention_impl != 'deferred':
    raise ValueError(f"model.attention_kernel='onednn' runs the 'deferred' core, not "
                     f"model.attention_impl={model_config.attention_impl!r}")
  if model_config.dtype not in DTYPES:
    raise ValueError(f'model.dtype must be one of {tuple(DTYPES)}, got {model_config.dtype!r}')


def create_model(model_config, mesh=None) -> HybridNet:
  """The config's model; `mesh` (the training step's batch split) as `HybridNet` takes it."""
  validate_model_config(model_config)
  return HybridNet(
      widths=tuple(model_config.widths),
      pool=tuple(model_config.pool),
      attention=model_config.attention,
      embed=model_config.embed,
      num_heads=model_config.num_heads,
      attention_norm=model_config.attention_norm,
      attention_impl=model_config.attention_impl,
      logit_scale=model_config.logit_scale,
      num_classes=model_config.num_classes,
      dropout=model_config.dropout,
      bn_momentum=model_config.bn_momentum,
      bn_group_size=model_config.bn_group_size,
      dirac=model_config.dirac,
      dtype=DTYPES[model_config.dtype],
      attention_grad_chunk_kib=model_config.attention_grad_chunk_kib,
      mesh=mesh,
      conv_grad_barrier=model_config.conv_grad_barrier,
      onednn=onednn_conv.use_onednn(model_config.conv_impl, DTYPES[model_config.dtype]),
      winograd=model_config.conv_winograd,
      attention_onednn=model_config.attention_impl == 'deferred' and onednn_conv.use_onednn(
          model_config.attention_kernel, DTYPES[model_config.dtype], 'attention_kernel'),
      bn_kernel=onednn_conv.use_onednn(model_config.bn_kernel, DTYPES[model_config.dtype],
                                       'bn_kernel'),
      conv1_split=whitened_width(model_config) if model_config.whiten else 0,
  )
