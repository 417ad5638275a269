"""Paper ablation: conv + residual only, no attention (paper: 73%)."""

from configs import cifar_hybrid


def get_config():
  config = cifar_hybrid.get_config()
  config.model.attention = False
  return config
