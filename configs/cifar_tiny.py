"""A tiny variant of the paper's model for tests and smoke runs: same blocks, narrow widths."""

from configs import cifar_hybrid


def get_config():
  config = cifar_hybrid.get_config()
  config.model.widths = (8, 16, 16, 32)
  config.model.num_heads = 2
  config.num_epochs = 2
  config.batch_size = 16
  config.eval_batch_size = 16
  config.learning_rate = 0.05
  config.log_every_steps = 2
  config.checkpoint_every_steps = 2
  return config
