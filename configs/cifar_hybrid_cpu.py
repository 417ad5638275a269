"""The strong recipe at CPU scale: the same blocks at a quarter of the paper's widths.

Lets anyone check the recipe on a laptop-class CPU: 16-32-64-128 channels (518,922 parameters,
~1/16 of the paper model's FLOPs) trained with `cifar_hybrid_fast.py`'s switches for 7 epochs
at batch 256. On a 2-core CPU run it with `--jax_num_cpu_devices=4` (the step then runs as four
data-parallel shards, which keeps both cores busy; see README, Benchmark).
"""

from configs import cifar_hybrid_fast


def get_config():
  config = cifar_hybrid_fast.get_config()
  config.model.widths = (16, 32, 64, 128)
  config.model.num_heads = 4
  config.num_epochs = 7
  config.batch_size = 256
  config.eval_batch_size = 200
  config.learning_rate = 0.08
  config.warmup_epochs = 1.0
  config.log_every_steps = 50
  return config
