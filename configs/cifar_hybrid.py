"""The paper's hybrid model and its stated training setup.

Paper: SGD, cross-entropy, lr 0.008, weight decay 1e-4, 12 epochs. Everything else is our choice
(the paper is silent) and is documented in README.md: momentum 0.9, batch 128, constant learning
rate, no augmentation, PyTorch-style coupled weight decay on every parameter.

Variants of this experiment import `get_config` from here and change fields; they never copy it.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()

  # Data: a TFDS dataset prepared in `data_dir` (see `python -m hybrid_flax.import_data`).
  # 'cifar10' is the official data set; 'cifar10_folder' is a copy imported from images.
  config.dataset = 'cifar10'
  config.data_dir = ''  # '' means TFDS's default: $TFDS_DATA_DIR or ~/tensorflow_datasets.
  config.train_split = 'train'
  config.eval_split = 'test'

  config.model = ml_collections.ConfigDict()
  config.model.widths = (64, 128, 256, 512)  # conv1..conv4; two conv blocks per stage
  config.model.pool = (False, True, True, True)  # 32x32 -> 16x16 (attention 1) -> 4x4 (attention 2)
  config.model.attention = True
  config.model.embed = True  # the Dense layers around attention (81.6% vs 60% in the paper)
  config.model.num_heads = 8
  config.model.num_classes = 10
  config.model.dropout = 0.0

  config.num_epochs = 12
  config.batch_size = 128  # global, split over all devices
  config.eval_batch_size = 500
  config.learning_rate = 0.008
  config.schedule = 'constant'  # 'constant' | 'cosine' (cosine decay to 0 over all steps)
  config.warmup_epochs = 0.0
  config.momentum = 0.9
  config.nesterov = False
  config.weight_decay = 1e-4
  # The paper saw gradient explosions with attention; > 0 clips the global gradient norm.
  config.grad_clip_norm = 0.0

  config.seed = 0
  config.log_every_steps = 50
  config.eval_every_epochs = 1
  config.checkpoint_every_steps = 200  # plus one at every epoch end and at the end of training
  config.keep_checkpoints = 3
  config.progress_bar = True
  return config
