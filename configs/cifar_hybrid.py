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
  # TFDS split strings, slices included: train_split='train[:45000]' with
  # eval_split='train[45000:]' holds out a validation set and keeps the test set for the end.
  config.train_split = 'train'
  config.eval_split = 'test'
  # Keep the whole training split on every device and gather each batch there, so a step needs
  # no host work (for GPUs, where the host's per-step gather and copy is the bottleneck). Every
  # process then reads the whole split; batches and results are the same either way.
  config.data_on_device = False
  # Which kernels XLA's CPU backend runs convolutions with (hybrid_flax/xla_cpu_flags.py): 'xla'
  # (its own; the paper-width step 5-11% faster on a 2-core CPU) or 'default' (jaxlib's choice,
  # YNNPACK in jaxlib 0.10). Only the kernels change, and only on CPUs; the process's first
  # backend fixes it, so entry points apply it before JAX starts.
  config.xla_cpu_convolutions = 'xla'

  config.model = ml_collections.ConfigDict()
  config.model.widths = (64, 128, 256, 512)  # conv1..conv4; two conv blocks per stage
  config.model.pool = (False, True, True, True)  # 32x32 -> 16x16 (attention 1) -> 4x4 (attention 2)
  config.model.attention = True
  config.model.embed = True  # the Dense layers around attention (81.6% vs 60% in the paper)
  config.model.num_heads = 8
  # Not in the paper (switches of the strong recipe): normalise each attention block's output
  # ('none' | 'batch' | 'layer'), and scale the logits (ResNet-9 uses 0.125).
  config.model.attention_norm = 'none'
  # The attention core: 'deferred' (models.SelfAttention, faster on CPUs) or Flax's own
  # nn.MultiHeadDotProductAttention ('flax'); the same parameters and function.
  config.model.attention_impl = 'deferred'
  # CPUs only, 'deferred' core: the backward pass recomputes the attention scores in chunks of at
  # most this many KiB, looping over each device's (example, head) pairs, so they stay in cache
  # (models.SelfAttention); 0 keeps autodiff's backward, which stores all of them. The same
  # gradients up to rounding.
  config.model.attention_grad_chunk_kib = 1024
  # CPUs only: each conv's backward reads its input and output gradient as stored tensors, where
  # XLA would recompute batch norm and ReLU inside the weight gradient's strided copies
  # (models.conv_with_grad_barrier; the paper-width step 3-10% faster on a 2-core Intel Xeon,
  # docs/benchmark.md). The same gradients.
  config.model.conv_grad_barrier = True
  # The 3x3 convs on 8x8 maps and larger: 'onednn' through oneDNN, PyTorch's CPU convolutions
  # (hybrid_flax/onednn_conv.py; needs `pip install -e ".[onednn]"` and a C++ compiler), 'xla'
  # XLA's own, 'auto' oneDNN where it can run (CPU, float32, installed) and XLA's elsewhere.
  # The same convolutions up to float32 rounding.
  config.model.conv_impl = 'auto'
  # Where oneDNN runs them (conv_impl), the convs' forward and both gradients by Winograd's
  # F(2x2, 3x3) (hybrid_flax/csrc/winograd.cc): 16 multiply-adds per 4 outputs where the direct
  # convolution does 36. The same convolution up to float32 rounding (~3e-7 of the largest
  # output, against ~1e-7 direct), ~1.2x faster training steps on the paper-width model
  # (docs/benchmark.md); False: oneDNN's direct convolutions.
  config.model.conv_winograd = True
  # The attention blocks ('deferred' core): 'onednn' runs the core as a C++ kernel
  # (hybrid_flax/onednn_attention.py: per (example, head) the scores stay in cache, oneDNN's
  # sgemm for the products; then attention_grad_chunk_kib is unused) and the dense layers through
  # oneDNN's sgemm (onednn_dense.py), 'xla' XLA's, 'auto' the kernels where they can run (CPU,
  # float32, built as for conv_impl). The same function up to float32 rounding.
  config.model.attention_kernel = 'auto'
  # The conv blocks' batch norm (whole-batch statistics), ReLU and 2x2 max-pool: 'onednn' as one
  # C++ kernel, a pass each for the statistics and the output and two backward
  # (hybrid_flax/fused_batch_norm.py; built as for conv_impl), 'xla' XLA's, 'auto' the kernel
  # where it can run (CPU, float32, built). The same function up to float32 rounding.
  config.model.bn_kernel = 'auto'
  config.model.logit_scale = 1.0
  config.model.num_classes = 10
  config.model.dropout = 0.0
  config.model.bn_momentum = 0.9  # PyTorch's BatchNorm2d default (its momentum=0.1)
  # > 0: ghost batch norm, statistics over groups of this many examples; groups inside one
  # device's share of the batch need no cross-device all-reduce (0: the whole batch)
  config.model.bn_group_size = 0
  # Initialisation switches of the fast trainers (airbench), off in the paper's setup: `whiten`
  # starts conv1 as a frozen patch-whitening filter bank computed from training images (54
  # channels at most; a wider conv1 learns the rest); `dirac` starts the other convs as
  # identities where their widths allow.
  config.model.whiten = False
  config.model.dirac = False
  config.model.dtype = 'float32'  # compute dtype: 'float32' | 'bfloat16' (for GPUs/TPUs)

  config.num_epochs = 12
  config.batch_size = 128  # global, split over all devices
  config.eval_batch_size = 500
  config.learning_rate = 0.008
  # 'constant' | 'cosine' (to 0 over all steps) | 'linear' (to 0; with warmup, one-cycle)
  config.schedule = 'constant'
  config.warmup_epochs = 0.0
  config.momentum = 0.9
  # 'sgd' (the paper's), or 'muon' (a strong-recipe switch): the conv kernels then follow
  # optax.contrib's Muon (orthogonalised Nesterov momentum, airbench94_muon's settings below)
  # at their own peak learning rate on the same schedule, and everything else stays on SGD.
  config.optimizer = 'sgd'
  config.muon_learning_rate = 0.24
  config.muon_momentum = 0.6
  config.muon_ns_steps = 3
  config.muon_normalize = True  # keep each conv kernel at norm sqrt(out channels)
  config.nesterov = False
  config.weight_decay = 1e-4
  config.weight_decay_norm_and_bias = True  # False: decay conv/dense kernels only
  config.bn_bias_lr_scale = 1.0  # batch-norm offsets' learning rate multiplier (airbench: 64)
  # The paper saw gradient explosions with attention; > 0 clips the global gradient norm.
  config.grad_clip_norm = 0.0

  # The strong recipe's switches (configs/cifar_hybrid_fast.py); all off in the paper's setup.
  config.augment = ml_collections.ConfigDict()
  config.augment.crop_padding = 0  # > 0: random crops of the image padded by this many pixels
  config.augment.flip = False  # random horizontal flips
  config.augment.alternate_flip = False  # airbench's: each image mirrored every other epoch
  config.augment.early_crop_size = 0  # > 0: the first early_crop_epochs epochs train on
  config.augment.early_crop_epochs = 0  # crops this size (cheaper steps)
  config.label_smoothing = 0.0
  config.ema_decay = 0.0  # > 0: keep a moving average of the weights and evaluate that
  config.lookahead_every = 0  # > 0: Lookahead (airbench's), syncing every this many steps;
  config.lookahead_decay = 0.95  # evaluates the slow weights (so not with ema_decay)
  config.eval_flip = False  # test-time augmentation: average the logits with the mirror image's
  config.eval_translate = 0  # > 0: also average in views shifted by this many pixels

  config.seed = 0
  config.log_every_steps = 50
  config.eval_every_epochs = 1  # the last epoch is always evaluated too
  config.checkpoint_every_steps = 200  # plus one at every epoch end and at the end of training
  config.keep_checkpoints = 3
  config.progress_bar = True
  # > 0: a JAX profiler trace of this many steps after the launch's first, into WORKDIR/profile
  # (TensorBoard's profile plugin, or Perfetto for its trace.json.gz).
  config.profile_steps = 0
  return config
