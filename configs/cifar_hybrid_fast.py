"""The strong recipe: the paper's hybrid model trained the way the fast CIFAR-10 trainers train.

Same architecture and width as `cifar_hybrid.py` (8,250,378 parameters); only training and
initialisation change, and every change is a switch of the base config, so each trick's effect
can be measured by turning it off (`--config.label_smoothing=0`, `--config.ema_decay=0`, ...):
random 4-pixel crops and flips on the device, label smoothing 0.1, Nesterov momentum, batch 512
with a linear warmup then linear decay to zero (one-cycle), weight decay on kernels only, a
weight moving average for evaluation, test-time flip averaging, gradient clipping against the
attention blocks' gradient spikes, ResNet-9's logit scale 0.125, airbench's identity-initialised
convs and 64x batch-norm offset learning rate, and the split held on the device. On GPUs add
`--config.model.dtype=bfloat16`.
Chosen from 12-epoch bf16 runs on an H100 (CIFAR-10 JPEG copy; docs/results.md): without the
logit scale, dirac and bias scaler, lr 0.2 and 0.4 diverged and 0.05 with weight decay 2e-3 gave
87.32% (H200); with them lr 0.4 trains, and weight decay 2.5e-4 (lr x decay as at 0.05 x 2e-3)
with label smoothing 0.1 gave 90.38% (90.13% rerun alone: 57 s wall from launch). The goal, 94%
within the paper's 12 epochs, is not reached yet.
"""

from configs import cifar_hybrid


def get_config():
  config = cifar_hybrid.get_config()
  config.data_on_device = True  # the same batches; the host's per-step gather starved GPUs
  config.batch_size = 512
  config.eval_batch_size = 1000
  config.learning_rate = 0.4
  config.schedule = 'linear'
  config.warmup_epochs = 2.0
  config.nesterov = True
  config.weight_decay = 2.5e-4
  config.weight_decay_norm_and_bias = False
  config.bn_bias_lr_scale = 64.0
  config.grad_clip_norm = 5.0
  config.augment.crop_padding = 4
  config.augment.flip = True
  config.label_smoothing = 0.1
  config.ema_decay = 0.99
  config.eval_flip = True
  config.model.logit_scale = 0.125
  config.model.dirac = True
  config.log_every_steps = 20
  return config
