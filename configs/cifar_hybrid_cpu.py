"""The strong recipe at CPU scale: the same blocks, narrower, for checking the recipe on a CPU.

Widths 16-32-128-256 (1,941,578 parameters, ~1/7 of the paper model's FLOPs) with one attention
head: on a CPU the multi-head attention at 16x16 (256 tokens, head size 8 at 4 heads) costs more
than its convolutions, and one head trains about a third faster. `cifar_hybrid_fast.py`'s
switches (logit scale 0.125, dirac init, bias scaler 64, label smoothing 0.1, the split on the
device), batch 256, lr 0.16 with weight decay 1e-3, 2-pixel crops (4 is too strong for so few
epochs), evaluation only at the end (each costs ~35 s of the budget), and airbench's frozen
patch-whitening conv1 (the paper's 64-wide conv1 is too wide for it). 10 epochs, the first 5
on 24x24 crops, whose steps cost half as much: 10 epochs in the time of about 7.5 full-size
ones. On a 2-core CPU run it with `--jax_num_cpu_devices=8` (eight data-parallel shards keep
both cores busy; README, Benchmark): 87.30% on CIFAR-10 (JPEG copy) in 26 min 59 s wall, with
`launch.py`'s huge-page malloc (README, Results).
"""

from configs import cifar_hybrid_fast


def get_config():
  config = cifar_hybrid_fast.get_config()
  config.model.widths = (16, 32, 128, 256)
  config.model.num_heads = 1
  config.num_epochs = 10
  config.eval_every_epochs = 10  # and the last epoch, always
  config.batch_size = 256
  config.eval_batch_size = 200
  config.learning_rate = 0.16
  config.weight_decay = 1e-3
  config.warmup_epochs = 1.0
  config.augment.crop_padding = 2
  config.augment.early_crop_size = 24
  config.augment.early_crop_epochs = 5
  config.model.whiten = True
  config.log_every_steps = 50
  return config
