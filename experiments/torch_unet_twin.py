"""PyTorch eager twin of `cifarjax.models.unet.paper_unet()`: the CPU baseline for the generator's step.

Same layout and parameter count as ours (996,859 for 100 classes): a 3x3 stem; four levels of 42, 84, 84, 84
channels at 32, 16, 8, 4 pixels; per level a label encoder (embedding, GELU, linear) and a time encoder (t/T,
linear, GELU, linear) giving h = label_enc * h + time_enc, then 6 residual blocks of two (GroupNorm, GELU,
depthwise 3x3, pointwise 1x1); max-pool + 1x1 conv down; 2x2 stride-2 transposed conv, concatenation and a
1x1 conv up; GroupNorm, GELU and a 3x3 conv out. GroupNorm eps 1e-6 and tanh-GELU, as flax's defaults.

One train step is what `cifarjax bench diffusion` times: draw t and the noise, noise the batch, the U-Net's
forward and backward on the MSE to the noise, Adam (lr 3e-3), and the EMA update (0.999), channels_last.
Run with a torch venv (see ../shared/bench/README.md), e.g.

    OMP_NUM_THREADS=$(nproc) /tmp/cifarjax-torch-twin/bin/python experiments/torch_unet_twin.py 64 5

It prints one JSON line: params, median step seconds, threads. It is a benchmark, not part of the package.
"""
import copy
import json
import statistics
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

T = 1000


def num_groups(channels, max_groups=8):
  return next(g for g in range(min(max_groups, channels), 0, -1) if channels % g == 0)


def group_norm(channels):
  return nn.GroupNorm(num_groups(channels), channels, eps=1e-6)


class Encoder(nn.Module):
  """Label (embedding) or time (t/T, linear) -> GELU -> linear to `channels`."""

  def __init__(self, first, hidden, channels):
    super().__init__()
    self.first, self.out = first, nn.Linear(hidden, channels)

  def forward(self, x):
    return self.out(F.gelu(self.first(x), approximate="tanh"))


class Residual(nn.Module):
  def __init__(self, c):
    super().__init__()
    self.layers = nn.ModuleList()
    for _ in range(2):
      self.layers.append(nn.ModuleList([group_norm(c), nn.Conv2d(c, c, 3, padding=1, groups=c),
                                        nn.Conv2d(c, c, 1)]))

  def forward(self, x):
    h = x
    for norm, depthwise, pointwise in self.layers:
      h = pointwise(depthwise(F.gelu(norm(h), approximate="tanh")))
    return x + h


class Block(nn.Module):
  def __init__(self, c, classes, hidden, blocks=6):
    super().__init__()
    self.label = Encoder(nn.Embedding(classes + 1, hidden), hidden, c)
    self.time = Encoder(nn.Linear(1, hidden), hidden, c)
    self.res = nn.Sequential(*[Residual(c) for _ in range(blocks)])

  def forward(self, h, t, labels):
    scale = self.label(labels)[:, :, None, None]
    shift = self.time((t.float() / T)[:, None])[:, :, None, None]
    return self.res(scale * h + shift)


class UNet(nn.Module):
  def __init__(self, classes=100, base=42, mults=(1, 2, 2, 2), hidden=190):
    super().__init__()
    widths = [base * m for m in mults]
    self.stem = nn.Conv2d(3, widths[0], 3, padding=1)
    self.down = nn.ModuleList([nn.Conv2d(widths[i - 1], widths[i], 1) for i in range(1, len(widths))])
    self.enc = nn.ModuleList([Block(w, classes, hidden) for w in widths])
    self.up = nn.ModuleList([nn.ConvTranspose2d(widths[i + 1], widths[i], 2, stride=2)
                             for i in range(len(widths) - 1)])
    self.reduce = nn.ModuleList([nn.Conv2d(2 * widths[i], widths[i], 1) for i in range(len(widths) - 1)])
    self.dec = nn.ModuleList([Block(widths[i], classes, hidden) for i in range(len(widths) - 1)])
    self.head = nn.Sequential(group_norm(widths[0]), nn.GELU(approximate="tanh"),
                              nn.Conv2d(widths[0], 3, 3, padding=1))

  def forward(self, x, t, labels):
    h = self.stem(x)
    skips = []
    for level, block in enumerate(self.enc):
      if level:
        h = self.down[level - 1](F.max_pool2d(h, 2))
      h = block(h, t, labels)
      skips.append(h)
    for level in reversed(range(len(self.dec))):
      h = self.reduce[level](torch.cat([self.up[level](h), skips[level]], 1))
      h = self.dec[level](h, t, labels)
    return self.head(h)


def main(batch=64, steps=5):
  torch.manual_seed(0)
  model = UNet().to(memory_format=torch.channels_last)
  ema = copy.deepcopy(model)
  opt = torch.optim.Adam(model.parameters(), 3e-3)
  alphas_cumprod = torch.cumprod(1 - torch.linspace(1e-4, 0.02, T), 0)  # values do not change the timing
  images = (torch.rand(batch, 3, 32, 32) * 2 - 1).contiguous(memory_format=torch.channels_last)
  labels = torch.randint(0, 100, (batch,))

  def step():
    t = torch.randint(0, T, (batch,))
    noise = torch.randn_like(images)
    ab = alphas_cumprod[t][:, None, None, None]
    x_t = ab.sqrt() * images + (1 - ab).sqrt() * noise
    opt.zero_grad(set_to_none=True)
    loss = F.mse_loss(model(x_t, t, labels), noise)
    loss.backward()
    opt.step()
    with torch.no_grad():
      torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1 - 0.999)

  for _ in range(2):
    step()
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    step()
    times.append(time.perf_counter() - t0)
  print(json.dumps({"params": sum(p.numel() for p in model.parameters()), "batch": batch,
                    "step_s": statistics.median(times), "threads": torch.get_num_threads()}))


if __name__ == "__main__":
  main(*(int(a) for a in sys.argv[1:]))
