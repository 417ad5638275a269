"""The optimizer: the learning-rate schedule, SGD with its masks, and Muon for the conv kernels.

The schedule lives in the optax transform, so the train state's `step` is the only clock.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from optax.contrib import _muon as optax_muon
from jax.sharding import Mesh, PartitionSpec as P

from hybrid_flax import models

SCHEDULES = ('constant', 'cosine', 'linear')
OPTIMIZERS = ('sgd', 'muon')


def create_learning_rate_fn(config, steps_per_epoch: int) -> optax.Schedule:
  """`config.schedule` after a linear warmup of `config.warmup_epochs`, as a function of step."""
  total = config.num_epochs * steps_per_epoch
  warmup = int(config.warmup_epochs * steps_per_epoch)
  if config.schedule == 'constant':
    main = optax.constant_schedule(config.learning_rate)
  elif config.schedule == 'cosine':
    main = optax.cosine_decay_schedule(config.learning_rate, decay_steps=total - warmup)
  else:  # 'linear': with warmup, the one-cycle triangle of the fast CIFAR-10 trainers
    main = optax.linear_schedule(config.learning_rate, 0.0, total - warmup)
  if not warmup:
    return main
  ramp = optax.linear_schedule(0.0, config.learning_rate, warmup)
  return optax.join_schedules([ramp, main], boundaries=[warmup])


def _path_names(path) -> tuple[str, ...]:
  return tuple(str(getattr(k, 'key', k)) for k in path)


def _param_mask(predicate):
  """An optax mask: predicate(path names, parameter) for every parameter."""
  return lambda params: jax.tree_util.tree_map_with_path(
      lambda path, p: predicate(_path_names(path), p), params)


def create_optimizer(config, learning_rate_fn, mesh: Mesh | None = None
                     ) -> optax.GradientTransformation:
  """The paper's SGD (coupled weight decay, momentum) with the strong recipe's switches, or
  Muon on the conv kernels beside it (`config.optimizer`); `mesh` shares out Muon's work."""
  # Read now: the masks are called at init and update time, when the config may have changed.
  whiten, decay_all = bool(config.model.whiten), bool(config.weight_decay_norm_and_bias)
  frozen = lambda names: whiten and names == models.WHITENED_KERNEL
  # The whitened first layer is fixed: its gradient is zeroed before anything sees it (XLA
  # then drops its computation), so it is neither clipped for, decayed nor moved.
  freeze = ([optax.masked(optax.set_to_zero(), _param_mask(lambda n, p: frozen(n)))]
            if whiten else [])
  clip = [optax.clip_by_global_norm(config.grad_clip_norm)] if config.grad_clip_norm else []
  # PyTorch's SGD(weight_decay=...) adds wd * param to the gradient before momentum, on every
  # parameter: the paper's setup, so the same here. With weight_decay_norm_and_bias off,
  # batch-norm scales/offsets and biases (every 1-D parameter) are not decayed, as the fast
  # trainers do; decaying them only fights the normalisation.
  decay = _param_mask(lambda n, p: not frozen(n) and (decay_all or p.ndim > 1))
  # airbench's bias scaler: batch-norm offsets move `bn_bias_lr_scale` times faster (SGD is
  # linear in the gradient, so scaling it before momentum scales their learning rate).
  bias_scale = ([optax.masked(optax.scale(config.bn_bias_lr_scale), _param_mask(
      lambda n, p: n[-1] == 'bias' and n[-2].startswith('BatchNorm')))]
                if config.bn_bias_lr_scale != 1 else [])
  sgd = [
      optax.add_decayed_weights(config.weight_decay, mask=decay),
      *bias_scale,
      optax.sgd(learning_rate_fn, momentum=config.momentum or None, nesterov=config.nesterov),
  ]
  if config.optimizer == 'sgd':
    # One flat chain, as before Muon: checkpoints written before the switch still restore.
    return optax.chain(*freeze, *clip, *sgd)
  # Muon: the conv kernels step along their orthogonalised momentum, the rest stays on SGD.
  # The frozen conv1 stays with SGD too, whose zero gradient leaves it where it is.
  muon_kernel = lambda n, p: p.ndim == 4 and not frozen(n)
  labels = lambda params: jax.tree.map(lambda m: 'muon' if m else 'sgd',
                                       _param_mask(muon_kernel)(params))
  return optax.chain(*freeze, *clip, optax.partition(
      {'sgd': optax.chain(*sgd), 'muon': muon(config, learning_rate_fn, mesh)}, labels))


# A [kh, kw, in, out] conv kernel is a matrix from its kh * kw * in inputs to its out channels.
_CONV_AS_MATRIX = optax.contrib.MuonDimensionNumbers(reduction_axis=(0, 1, 2), output_axis=(3,))


def muon(config, learning_rate_fn, mesh: Mesh | None = None) -> optax.GradientTransformation:
  """airbench94_muon's optimizer for conv kernels: Muon on the same schedule, then renormalised.

  optax.contrib's Muon orthogonalises each kernel's Nesterov momentum ([kh * kw * in, out])
  with `muon_ns_steps` Newton-Schulz iterations; its peak learning rate is
  `muon_learning_rate`, following `learning_rate`'s warmup and decay. With
  `muon_normalize` every kernel is then rescaled to Frobenius norm sqrt(out), what a
  fan-in-scaled initialisation starts at: a batch norm follows each conv, so only the kernel's
  direction matters, and a fixed norm keeps the step's angle from shrinking as the weights
  grow (airbench's reason; no weight decay is needed on these kernels then, and none is applied).
  """
  ratio = config.muon_learning_rate / config.learning_rate
  chain = [
      _scale_by_muon(config, mesh),
      optax.scale_by_learning_rate(lambda step: ratio * learning_rate_fn(step)),
  ]
  if config.muon_normalize:
    chain.append(_renormalize_kernels())
  return optax.chain(*chain)


def _scale_by_muon(config, mesh: Mesh | None) -> optax.GradientTransformation:
  """optax.contrib's scale_by_muon, its Newton-Schulz work shared out over `mesh`'s devices.

  The parameters are replicated, so left to itself every device would orthogonalise every
  kernel, repeating the same products (at 4 CPU devices the update cost 4x one device's).
  Here each device orthogonalises only the kernels given to it, balanced by their products'
  FLOPs, and a sum over devices (the others contribute zeros) replicates the result. The state
  is scale_by_muon's own, so checkpoints restore either way.
  """
  options = dict(beta=config.muon_momentum,
                 weight_dimension_numbers=lambda u: jax.tree.map(lambda _: _CONV_AS_MATRIX, u))
  whole = optax.contrib.scale_by_muon(ns_steps=config.muon_ns_steps, **options)
  if mesh is None or mesh.shape[mesh.axis_names[0]] == 1:
    return whole
  axis = mesh.axis_names[0]  # the data axis; the kernels are shared out along it
  # With no iterations scale_by_muon updates the momentum and returns its Nesterov step
  # normalised to unit Frobenius norm, where the iterations start (they normalise it again,
  # which changes it by float32 rounding at most).
  momentum = optax.contrib.scale_by_muon(ns_steps=0, **options)

  def update(updates, state, params=None):
    del params
    updates, state = momentum.update(updates, state)
    leaves, treedef = jax.tree.flatten(updates)
    owners = _share_out([_newton_schulz_flops(x.shape) for x in leaves], mesh.shape[axis])

    def orthogonalise_own(ns_coeffs, *leaves):
      me = jax.lax.axis_index(axis)
      # scale_by_muon's own iterations (not exported; tests compare the two paths' updates).
      orthogonalise = functools.partial(
          optax_muon.orthogonalize_via_newton_schulz, ns_coeffs=ns_coeffs,
          ns_steps=config.muon_ns_steps, dimension_numbers=_CONV_AS_MATRIX)
      return jax.lax.psum([jax.lax.cond(me == owner, orthogonalise, jnp.zeros_like, x)
                           for x, owner in zip(leaves, owners)], axis)

    leaves = jax.shard_map(orthogonalise_own, mesh=mesh, in_specs=P(), out_specs=P())(
        state.ns_coeffs, *leaves)
    return treedef.unflatten(leaves), state
  return optax.GradientTransformation(whole.init, update)


def _newton_schulz_flops(shape) -> int:
  """A Newton-Schulz iteration's multiply-adds on a [kh, kw, in, out] kernel, up to a factor."""
  m, n = sorted((int(np.prod(shape[:-1])), shape[-1]))
  return 2 * m * m * n + m ** 3  # X X^T and B X, then A A


def _share_out(costs: list[int], devices: int) -> list[int]:
  """Each job's device: the costliest first, each to the least loaded device so far."""
  load, owners = [0] * devices, [0] * len(costs)
  for i in sorted(range(len(costs)), key=lambda i: -costs[i]):
    owners[i] = load.index(min(load))
    load[owners[i]] += costs[i]
  return owners


def _renormalize_kernels() -> optax.GradientTransformation:
  """Turns each update u of a kernel p into the one that lands on (p + u) at norm sqrt(out)."""
  def update(updates, state, params):
    def landing(u, p):
      moved = p + u
      return moved * (np.sqrt(p.shape[-1]) / jnp.linalg.norm(moved)) - p
    return jax.tree.map(landing, updates, params), state
  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)
