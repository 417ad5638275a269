"""The strong recipe: the paper's hybrid model trained the way the fast CIFAR-10 trainers train.

Same architecture and width as `cifar_hybrid.py` (8,250,378 parameters); only training changes,
and every change is a switch of the base config, so each trick's effect can be measured by
turning it off (`--config.label_smoothing=0`, `--config.ema_decay=0`, ...):
random 4-pixel crops and flips on the device, label smoothing 0.2, Nesterov momentum, batch 512
with a linear warmup then linear decay to zero (one-cycle), weight decay on kernels only,
a weight moving average for evaluation, test-time flip averaging, and gradient clipping against
the attention blocks' gradient spikes. On GPUs add `--config.model.dtype=bfloat16`.
Peak learning rate and weight decay from 12-epoch bf16 runs on an H200 (CIFAR-10 JPEG copy):
lr 0.4 (ResNet-9's) and 0.2 diverge within two epochs, the attention blocks having no
normalisation; 0.1 gives 83.99%, 0.05 86.38%, 0.05 with weight decay 2e-3 instead of 5e-4
87.32% (README, Results). The goal, 94% within the paper's 12 epochs, is not reached yet.
"""

from configs import cifar_hybrid


def get_config():
  config = cifar_hybrid.get_config()
  config.batch_size = 512
  config.eval_batch_size = 1000
  config.learning_rate = 0.05
  config.schedule = 'linear'
  config.warmup_epochs = 2.0
  config.nesterov = True
  config.weight_decay = 2e-3
  config.weight_decay_norm_and_bias = False
  config.grad_clip_norm = 5.0
  config.augment.crop_padding = 4
  config.augment.flip = True
  config.label_smoothing = 0.2
  config.ema_decay = 0.99
  config.eval_flip = True
  config.log_every_steps = 20
  return config
