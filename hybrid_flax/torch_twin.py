"""The paper's model in PyTorch, block for block `models.HybridNet`: the benchmark's baseline.

Used only by `hybrid_flax.bench --torch` (install with `pip install -e ".[bench]"`). The
parameter count equals the Flax model's for every config (the benchmark asserts it), so the two
frameworks time the same network: the conv, attention and residual blocks, NCHW as PyTorch
prefers, SGD with momentum and coupled weight decay as in the paper's setup.
"""

import json
import sys
import time

import ml_collections
import torch
import torch.nn.functional as F
from torch import nn

from hybrid_flax import models


class ConvBlock(nn.Module):

  def __init__(self, cin: int, cout: int, pool: bool):
    super().__init__()
    self.conv = nn.Conv2d(cin, cout, 3, padding=1)
    # PyTorch's defaults, which models.py mirrors (momentum 0.1 here is 0.9 there).
    self.bn = nn.BatchNorm2d(cout, eps=1e-5, momentum=0.1)
    self.pool = nn.MaxPool2d(2) if pool else nn.Identity()

  def forward(self, x):
    return self.pool(F.relu(self.bn(self.conv(x))))


class AttentionBlock(nn.Module):

  def __init__(self, c: int, num_heads: int, embed: bool, norm: str):
    super().__init__()
    self.embed_in = nn.Linear(c, c) if embed else nn.Identity()
    self.mhsa = nn.MultiheadAttention(c, num_heads, batch_first=True)
    self.embed_out = nn.Linear(c, c) if embed else nn.Identity()
    self.layer_norm = nn.LayerNorm(c, eps=1e-5) if norm == 'layer' else nn.Identity()
    self.batch_norm = (nn.BatchNorm2d(c, eps=1e-5, momentum=0.1) if norm == 'batch'
                       else nn.Identity())

  def forward(self, x):
    b, c, h, w = x.shape
    x = self.embed_in(x.flatten(2).transpose(1, 2))
    x = self.mhsa(x, x, x, need_weights=False)[0] + x
    x = self.layer_norm(self.embed_out(x))
    return self.batch_norm(x.transpose(1, 2).reshape(b, c, h, w))


class ResidualBlock(nn.Module):

  def __init__(self, c: int):
    super().__init__()
    self.body = nn.Sequential(ConvBlock(c, c, False), ConvBlock(c, c, False))

  def forward(self, x):
    return x + self.body(x)


class HybridNet(nn.Module):

  def __init__(self, model_config):
    super().__init__()
    models.validate_model_config(model_config)
    widths, pool = tuple(model_config.widths), tuple(model_config.pool)
    layers, cin = [], 3
    for stage in range(2):
      for i in (2 * stage, 2 * stage + 1):
        layers.append(ConvBlock(cin, widths[i], pool[i]))
        cin = widths[i]
      if model_config.attention:
        layers.append(AttentionBlock(cin, model_config.num_heads, model_config.embed,
                                     model_config.attention_norm))
      layers.append(ResidualBlock(cin))
    self.trunk = nn.Sequential(*layers)
    self.dropout = nn.Dropout(model_config.dropout)
    self.head = nn.Linear(cin, model_config.num_classes)
    self.logit_scale = model_config.logit_scale

  def forward(self, x):
    x = torch.amax(self.trunk(x), dim=(2, 3))  # global max-pool, as in models.py
    return self.head(self.dropout(x)) * self.logit_scale


def param_count(model: nn.Module) -> int:
  return sum(p.numel() for p in model.parameters())


def measure_train(config, steps: int = 20, warmup: int = 3) -> dict[str, float]:
  """Images/s of SGD training steps on a fixed random batch, on CUDA when PyTorch sees a GPU.

  config.model.dtype 'bfloat16' runs the step under bf16 autocast (weights stay float32, as in
  the Flax model); on a CPU the step is float32 whatever the dtype, on this host's threads.
  """
  torch.manual_seed(config.seed)
  device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
  bf16 = device.type == 'cuda' and config.model.dtype == 'bfloat16'
  model = HybridNet(config.model).train().to(device)
  optimizer = torch.optim.SGD(model.parameters(), lr=config.learning_rate,
                              momentum=config.momentum, weight_decay=config.weight_decay,
                              nesterov=config.nesterov)
  x = torch.randn(config.batch_size, 3, 32, 32, device=device)
  y = torch.randint(0, config.model.num_classes, (config.batch_size,), device=device)
  sync = torch.cuda.synchronize if device.type == 'cuda' else lambda: None
  for i in range(warmup + steps):
    if i == warmup:
      sync()
      start = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
      loss = F.cross_entropy(model(x), y)
    loss.backward()
    optimizer.step()
  sync()
  seconds = time.perf_counter() - start
  return {'batch_size': config.batch_size, 'images_per_sec': config.batch_size * steps / seconds,
          'steps_per_sec': steps / seconds, 'param_count': param_count(model),
          'threads': torch.get_num_threads(), 'version': torch.__version__,
          'device': torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu',
          'dtype': 'bfloat16 autocast' if bf16 else 'float32'}


if __name__ == '__main__':
  # python -m hybrid_flax.torch_twin CONFIG_JSON STEPS WARMUP: one JSON line of results.
  print(json.dumps(measure_train(ml_collections.ConfigDict(json.loads(sys.argv[1])),
                                 int(sys.argv[2]), int(sys.argv[3]))))
