"""hybrid-flax: a JAX/Flax reimplementation of a hybrid CNN + self-attention CIFAR-10 classifier."""
