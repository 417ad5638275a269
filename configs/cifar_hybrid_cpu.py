"""The strong recipe at CPU scale: the same blocks, narrower, for checking the recipe on a CPU.

Widths 16-32-128-192 (1,178,122 parameters) with one attention head: on a CPU the multi-head
attention at 16x16 (256 tokens, head size 8 at 4 heads) costs more than its convolutions, and
one head trains about a third faster; a 192-wide last stage instead of 256 makes the step ~1.25x
faster, which buys more epochs than the width costs. `cifar_hybrid_fast.py`'s switches (logit
scale 0.125, dirac init, bias scaler 64, label smoothing 0.1, the split on the device), batch
256, lr 0.16 with weight decay 1e-3, 2-pixel crops (4 is too strong for so few epochs),
airbench's alternating flip and frozen patch-whitening conv1 (the paper's 64-wide conv1 is too
wide for it), evaluation only at the end (each costs ~30 s of the budget per pair of views)
with flips and 2-pixel shifts averaged. 13 epochs, the first 7 on 24x24 crops, whose steps cost
about 0.6x as much. On a 2-core CPU run it with `--jax_num_cpu_devices=8` (eight data-parallel
shards keep both cores busy; README, Benchmark): 88.23% on CIFAR-10 (JPEG copy) in 25 min 22 s
wall, with `launch.py`'s huge-page malloc; seeds 1, 2 and 3 gave 87.73%, 87.95% and 87.65%, a mean
of 87.89% over the four (README, Results).
"""

from configs import cifar_hybrid_fast


def get_config():
  config = cifar_hybrid_fast.get_config()
  config.model.widths = (16, 32, 128, 192)
  config.model.num_heads = 1
  config.num_epochs = 13
  config.eval_every_epochs = 13  # and the last epoch, always
  config.batch_size = 256
  config.eval_batch_size = 200
  config.learning_rate = 0.16
  config.weight_decay = 1e-3
  config.warmup_epochs = 1.0
  config.augment.crop_padding = 2
  config.augment.alternate_flip = True
  config.augment.early_crop_size = 24
  config.augment.early_crop_epochs = 7
  config.eval_translate = 2
  config.model.whiten = True
  config.log_every_steps = 50
  # YNNPACK's convolutions: at these widths XLA's own make the 24x24 step ~4% slower (Benchmark).
  config.xla_cpu_convolutions = 'default'
  return config
