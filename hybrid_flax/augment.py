"""Training-time augmentation, run on the accelerator inside the jitted train step.

Random crop with padding and random horizontal flip, the augmentation of the fast CIFAR-10
trainers (ResNet-9 / airbench), and airbench's alternating flip. Drawn from a key the step
derives from the state, so a resumed run sees the same augmented images it would have seen
without the interruption.
"""

import jax
import jax.numpy as jnp


def random_crop_flip(images: jax.Array, rng: jax.Array, padding: int, flip: bool,
                     mirror: jax.Array | None = None, size: int = 0) -> jax.Array:
  """images [B, H, W, C] -> reflect-padded random crops, half of them mirrored.

  The crops are H x W, or `size` x `size` when `size` > 0 (smaller crops: cheaper steps, the
  objects at their usual scale). `mirror` (bool [B]), when given, says which images to mirror
  instead of a coin per image.
  """
  b, h, w, _ = images.shape
  crop_h, crop_w = (size, size) if size else (h, w)
  crop_rng, flip_rng = jax.random.split(rng)
  if padding or (crop_h, crop_w) != (h, w):
    # Reflection, not zeros: no black borders the model could learn to look for.
    padded = jnp.pad(images, ((0, 0), (padding, padding), (padding, padding), (0, 0)),
                     mode='reflect')
    high = jnp.asarray([h - crop_h, w - crop_w]) + 2 * padding + 1
    offsets = jax.random.randint(crop_rng, (b, 2), 0, high)
    crop = lambda im, o: jax.lax.dynamic_slice(im, (o[0], o[1], 0),
                                               (crop_h, crop_w, im.shape[-1]))
    images = jax.vmap(crop)(padded, offsets)
  if flip:
    if mirror is None:
      mirror = jax.random.bernoulli(flip_rng, 0.5, (b,))
    images = jnp.where(mirror[:, None, None, None], images[:, :, ::-1, :], images)
  return images


def alternating_flip(rng: jax.Array, index: jax.Array, epoch: jax.Array) -> jax.Array:
  """airbench's derandomised flip: which of the examples `index` [B] to mirror in `epoch`.

  Epoch 0 mirrors a random half, each example's coin drawn from (`rng`, its index) alone; every
  later epoch mirrors exactly the examples the previous one did not, so over any two epochs in
  a row each image is seen both ways, where independent coins repeat a view half the time.
  """
  coin = jax.vmap(lambda i: jax.random.bernoulli(jax.random.fold_in(rng, i)))(index)
  return coin ^ (epoch % 2 == 1)
