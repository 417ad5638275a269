"""Paper ablation: self-attention without the Dense embedding around it (paper: 60%)."""

from configs import cifar_hybrid


def get_config():
  config = cifar_hybrid.get_config()
  config.model.embed = False
  return config
