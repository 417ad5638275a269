"""The strong recipe at CPU scale: the same blocks, narrower, for checking the recipe on a CPU.

Widths 16-32-128-256 (1,941,578 parameters, ~1/7 of the paper model's FLOPs) with one attention
head: on a CPU the multi-head attention at 16x16 (256 tokens, head size 8 at 4 heads) costs more
than its convolutions, and one head trains about a third faster. `cifar_hybrid_fast.py`'s
switches, 6 epochs at batch 256, 2-pixel crops (4 is too strong for so few epochs), evaluation
only at the end (each costs ~40 s of the budget), and ResNet-9's logit scale 0.125, which let
the learning rate double (0.08 -> 0.16: 72.17% -> 73.89% in 2-epoch screening runs; the scale
alone at 0.08 gave 70.59%). On a 2-core CPU run it with `--jax_num_cpu_devices=4` (four
data-parallel shards keep both cores busy; README, Benchmark). airbench's initialisation and
bias scaler on top (a frozen patch-whitening conv1, identity-initialised convs, batch-norm
offsets learning 16x faster) and the split held on the device: 85.84% on CIFAR-10 (JPEG copy)
in 31 min 9 s wall, on a host then ~15% slower than for the run without them (84.16% in
26 min 32 s; lr 0.08 without the scale: 83.65% in 29 min 18 s).
"""

from configs import cifar_hybrid_fast


def get_config():
  config = cifar_hybrid_fast.get_config()
  config.model.widths = (16, 32, 128, 256)
  config.model.num_heads = 1
  config.num_epochs = 6
  config.eval_every_epochs = 6  # and the last epoch, always
  config.batch_size = 256
  config.eval_batch_size = 200
  config.learning_rate = 0.16
  config.model.logit_scale = 0.125
  config.warmup_epochs = 1.0
  config.augment.crop_padding = 2
  config.model.whiten = True
  config.model.dirac = True
  config.bn_bias_lr_scale = 16.0
  config.data_on_device = True  # the same batches; no per-step host work left to compete
  config.log_every_steps = 50
  return config
