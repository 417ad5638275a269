"""Training-time augmentation, run on the accelerator inside the jitted train step.

Random crop with padding and random horizontal flip, the augmentation of the fast CIFAR-10
trainers (ResNet-9 / airbench). Drawn from a key the step derives from the state, so a resumed
run sees the same augmented images it would have seen without the interruption.
"""

import jax
import jax.numpy as jnp


def random_crop_flip(images: jax.Array, rng: jax.Array, padding: int, flip: bool) -> jax.Array:
  """images [B, H, W, C] -> the same shape: reflect-padded random crops, half of them mirrored."""
  b, h, w, _ = images.shape
  crop_rng, flip_rng = jax.random.split(rng)
  if padding:
    # Reflection, not zeros: no black borders the model could learn to look for.
    padded = jnp.pad(images, ((0, 0), (padding, padding), (padding, padding), (0, 0)),
                     mode='reflect')
    offsets = jax.random.randint(crop_rng, (b, 2), 0, 2 * padding + 1)
    crop = lambda im, o: jax.lax.dynamic_slice(im, (o[0], o[1], 0), (h, w, im.shape[-1]))
    images = jax.vmap(crop)(padded, offsets)
  if flip:
    mirror = jax.random.bernoulli(flip_rng, 0.5, (b, 1, 1, 1))
    images = jnp.where(mirror, images[:, :, ::-1, :], images)
  return images
