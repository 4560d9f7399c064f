"""The layers of the `xla_cpu` layer set: each equals a flax layer up to float rounding, and
XLA:CPU compiles it into a faster train step.

Same parameters, same results; only the way XLA:CPU computes them differs.
Each replaces a pattern that dominated the classifier's or the generator's
CPU train step in XLA's per-op profile (docs/benchmarks.md has the numbers):

- `shifted_depthwise_conv`: a depthwise convolution as k*k shifted
  multiply-adds instead of XLA:CPU's slow grouped convolution.
- `pointwise_conv`: a 1x1 convolution whose gradients are matmuls, not
  convolutions over transposed activations, and whose forward under
  differentiation shares its input rows with the kernel's gradient.
- `BatchNorm`, `GroupNorm`, `channel_sums`, `image_channel_sums`: statistics
  and their gradients summed in two stages, which XLA:CPU fuses with the
  products being summed, all sums of one layer in one pass; GroupNorm's
  incoming gradient computed once (`written_out`), not in each reader.
- `ConvTranspose2x2`: a 2x2 stride-2 transposed convolution as one matmul.
- `max_pool_2x2`, `spatial_mean`: a pool and a global average written as
  fused elementwise maxima and short sums.
- `Chunks`: a training batch as interleaved chunks that run layer by layer as
  independent ops, which XLA:CPU spreads over its cores (one op at a time uses
  them poorly); `BatchNorm` takes its statistics over all chunks together, and
  `chunkwise` applies any other layer to each chunk.

Off the CPU, the plain flax layers (`layer_sets.FLAX`) are the faster ones.
"""


import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax


def _shifted_products(x, kernel):
  """The k*k terms of x (N, H, W, C) * kernel (k, k, 1, C), SAME zero padding (odd k)."""
  k = kernel.shape[0]
  p = k // 2
  h, w = x.shape[1:3]
  padded = jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
  return [padded[:, i:i + h, j:j + w, :] * kernel[i, j, 0] for i in range(k) for j in range(k)]


@jax.custom_vjp
def shifted_depthwise_conv(x, kernel, bias=None):
  """x (N, H, W, C) * kernel (k, k, 1, C) (+ bias (C,)), zero-padded SAME (odd k), as k*k shifted products."""
  y = sum(_shifted_products(x, kernel))
  return y if bias is None else y + bias


def _shifted_depthwise_fwd(x, kernel, bias):
  return shifted_depthwise_conv(x, kernel, bias), (x, kernel, bias is None)


def _shifted_depthwise_bwd(residuals, g):
  # The input gradient is the same kind of sum with the kernel flipped; the
  # kernel gradient's k*k reductions and the bias gradient are one `channel_sums`
  # pass (autodiff's bias gradient would be a reduction XLA:CPU runs slowly).
  x, kernel, no_bias = residuals
  k = kernel.shape[0]
  p = k // 2
  h, w = x.shape[1:3]
  dx = sum(_shifted_products(g, kernel[::-1, ::-1]))
  padded = jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
  products = [padded[:, i:i + h, j:j + w, :] * g for i in range(k) for j in range(k)]
  sums = channel_sums(*products, *(() if no_bias else (g,)))
  dbias = None if no_bias else sums[-1]
  return dx, jnp.stack(sums[:k * k]).reshape(kernel.shape), dbias


shifted_depthwise_conv.defvjp(_shifted_depthwise_fwd, _shifted_depthwise_bwd)


@jax.custom_vjp
def pointwise(x, kernel, bias=None):
  """A 1x1 convolution, stride 1: x (N, H, W, Cin), kernel (1, 1, Cin, Cout) (+ bias (Cout,)).

  Its gradients are matmuls over (N*H*W, C) rows: as convolutions, XLA:CPU
  computes the kernel's gradient by transposing the activations to (C, H, W, N)
  first, which dominated the classifier's CPU train step.
  """
  y = lax.conv_general_dilated(x, kernel, (1, 1), "VALID",
                               dimension_numbers=("NHWC", "HWIO", "NHWC"))
  return y if bias is None else y + bias


def _pointwise_fwd(x, kernel, bias):
  # Under differentiation the forward is a matmul over the same (N*H*W, C) rows
  # that the kernel's gradient reads: as a convolution, XLA computed the input
  # twice, once for each reader. Without gradients (inference), the convolution
  # is faster: XLA fuses it with its neighbours.
  rows = x.reshape(-1, x.shape[-1])
  y = (rows @ kernel.reshape(kernel.shape[-2:])).reshape(*x.shape[:-1], kernel.shape[-1])
  return (y if bias is None else y + bias), (rows, kernel, bias is None)


def _pointwise_bwd(residuals, g):
  rows, kernel, no_bias = residuals
  matrix = kernel.reshape(kernel.shape[-2:])
  if not no_bias:  # g is read by the matmuls and the bias's sums: computed once for all three
    g = written_out(g)
  g_rows = g.reshape(-1, g.shape[-1])
  dx = (g_rows @ matrix.T).reshape(*g.shape[:-1], rows.shape[-1])
  dkernel = (rows.T @ g_rows).reshape(kernel.shape)
  # autodiff's bias gradient, a sum over N*H*W, would be a reduction XLA:CPU runs slowly
  dbias = None if no_bias else channel_sums(g)[0]
  return dx, dkernel, dbias


pointwise.defvjp(_pointwise_fwd, _pointwise_bwd)


class Conv(nn.Module):
  """`nn.Conv(features, (1, 1), use_bias=use_bias)`: same parameters, same results, computed
  through `pointwise`.

  Named Conv because flax names a layer after its class: its instances are
  Conv_0, Conv_1, ... where the nn.Conv layers it replaces were, beside any
  nn.Conv of the same parent, so parameter paths and checkpoints are unchanged.
  """
  features: int
  use_bias: bool = True

  @nn.compact
  def __call__(self, x):
    kernel = self.param("kernel", nn.initializers.lecun_normal(),
                        (1, 1, x.shape[-1], self.features))
    bias = self.param("bias", nn.initializers.zeros, (self.features,)) if self.use_bias else None
    return pointwise(x, kernel, bias)




class ConvTranspose2x2(nn.Module):
  """`nn.ConvTranspose(features, (2, 2), strides=(2, 2))`: same parameters, same results.

  A 2x2 kernel at stride 2 never overlaps itself, so each input pixel's four
  output pixels are one matmul row: (N*H*W, C) @ (C, 2*2*features), then each
  row's four pixels moved into place. As a dilated convolution, XLA:CPU takes
  its kernel gradient at a fraction of the matmul's speed (the generator's
  largest op). The kernel is flipped: flax's transposed convolution puts
  kernel[1 - a, 1 - b] at output offset (a, b).
  """
  features: int
  use_bias: bool = True

  @nn.compact
  def __call__(self, x):
    if x.ndim != 4:
      raise ValueError(f"ConvTranspose2x2 takes NHWC maps, got shape {x.shape}")
    n, h, w, c = x.shape
    kernel = self.param("kernel", nn.initializers.lecun_normal(), (2, 2, c, self.features))
    matrix = kernel[::-1, ::-1].transpose(2, 0, 1, 3).reshape(c, 4 * self.features)
    y = (x.reshape(-1, c) @ matrix).reshape(n, h, w, 2, 2, self.features)
    y = y.transpose(0, 1, 3, 2, 4, 5).reshape(n, 2 * h, 2 * w, self.features)
    if self.use_bias:
      y = y + self.param("bias", nn.initializers.zeros, (self.features,))
    return y


def max_pool_2x2(x):
  """2x2 max-pool with stride 2 of NHWC maps with even H and W (`nn.max_pool(x, (2, 2), (2, 2))`)."""
  return jnp.maximum(jnp.maximum(x[:, 0::2, 0::2], x[:, 0::2, 1::2]),
                     jnp.maximum(x[:, 1::2, 0::2], x[:, 1::2, 1::2]))


def spatial_mean(x):
  """Mean over H and W of NHWC maps, summed one axis at a time, which XLA:CPU
  vectorises better than one reduction over both axes."""
  return lax.optimization_barrier(x.sum(axis=1)).sum(axis=1) / (x.shape[1] * x.shape[2])


def channel_sums(*arrays):
  """Per-channel sums over all leading axes of NHWC arrays of one shape (one (C,) sum per array).

  On CPUs XLA rewrites a reduction over the batch axis into a `reduce-window`
  that cannot absorb its elementwise producer, so `sum(x * y)` first writes
  x * y out in full. Summing over W first (a short reduction that fuses with
  its producer), then over the small rest, avoids that; the barrier keeps XLA
  from merging the two stages back into one. The first stage is one variadic
  reduction, so arrays computed from the same inputs (x and x * x; the nine
  products of a 3x3 kernel's gradient) are summed in a single pass over them
  rather than one pass each.
  """
  if arrays[0].ndim != 4:
    return tuple(jnp.sum(a, axis=tuple(range(a.ndim - 1))) for a in arrays)
  return tuple(p.sum(axis=(0, 1)) for p in _sums_over_w(arrays))


def image_channel_sums(*arrays):
  """Per-image, per-channel sums over H and W of NHWC arrays (one (N, C) sum per
  array), in two stages as `channel_sums`."""
  return tuple(p.sum(axis=1) for p in _sums_over_w(arrays))


def _sums_over_w(arrays):
  zeros = tuple(jnp.zeros((), a.dtype) for a in arrays)
  return lax.optimization_barrier(lax.reduce(tuple(arrays), zeros, _add_each, (2,)))


def _add_each(a, b):
  return tuple(x + y for x, y in zip(a, b))


def written_out(x):
  """x itself, computed once and written to memory, where XLA:CPU would recompute it in each reader.

  XLA:CPU fuses a cheap elementwise producer into every consumer, so that each
  recomputes it; in the generator's GroupNorm backward, the sums and the
  elementwise pass both recomputed the incoming gradient (the depthwise input
  gradient's nine products and GELU's derivative), and its reduction loops run
  a fused body about half as fast as its elementwise loops. XLA:CPU does not fuse
  a reduction into its consumers, so x as the sum of x and zeros over a stacked
  axis is computed once. Exact as any XLA:CPU arithmetic: x + 0 is x (a -0 becomes
  +0; a subnormal becomes 0, as in every XLA:CPU op).
  """
  return lax.reduce(jnp.stack([x, jnp.zeros_like(x)]), jnp.zeros((), x.dtype), lax.add, (0,))


@jax.tree_util.register_pytree_node_class
class Chunks:
  """A batch held as interleaved chunks: chunk j holds examples j, j + n, j + 2n, ...

  Layers apply to each chunk on its own (`chunkwise`), as separate ops that
  XLA:CPU runs side by side; `BatchNorm` takes its statistics over all of them.
  Interleaved, a batch split over devices in contiguous blocks is split within
  each device, so no chunk moves between devices as long as a chunk's size is a
  multiple of the number of devices. `shape` is the whole batch's; `+` adds
  chunk by chunk (residual connections).
  """

  def __init__(self, chunks):
    self.chunks = tuple(chunks)

  @classmethod
  def split(cls, x, num_chunks: int) -> "Chunks":
    if num_chunks < 1 or x.shape[0] % num_chunks:
      raise ValueError(f"cannot split a batch of {x.shape[0]} into {num_chunks} equal chunks")
    x = x.reshape(x.shape[0] // num_chunks, num_chunks, *x.shape[1:])
    return cls(x[:, j] for j in range(num_chunks))

  def merge(self):
    """The batch these chunks were split from."""
    if len(self.chunks) == 1:
      return self.chunks[0]
    stacked = jnp.stack(self.chunks, axis=1)
    return stacked.reshape(-1, *stacked.shape[2:])

  @property
  def shape(self):
    first = self.chunks[0].shape
    return (first[0] * len(self.chunks), *first[1:])

  def __add__(self, other):
    return Chunks(a + b for a, b in zip(self.chunks, other.chunks))

  def tree_flatten(self):
    return self.chunks, None

  @classmethod
  def tree_unflatten(cls, _, chunks):
    return cls(chunks)


def chunkwise(fn):
  """fn applied to each chunk of `Chunks`, or to a plain array as it is. fn may be a flax
  module: every chunk then goes through the same parameters."""
  def apply(x):
    return Chunks(fn(c) for c in x.chunks) if isinstance(x, Chunks) else fn(x)
  return apply


def _chunks_of(x):
  return x.chunks if isinstance(x, Chunks) else (x,)


def _like(x, chunks):
  """chunks in x's form: Chunks where x is, else its one array."""
  return Chunks(chunks) if isinstance(x, Chunks) else chunks[0]


def _summed_over_chunks(sums_per_chunk):
  return tuple(functools.reduce(jnp.add, sums) for sums in zip(*sums_per_chunk))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def batch_norm_train(x, scale, bias, epsilon):
  """BatchNorm with batch statistics: (y, mean, var), var = E[x^2] - E[x]^2 as flax computes it.

  x: NHWC maps, or `Chunks` of them, whose statistics are taken over all chunks
  together; y is then `Chunks` too.
  """
  return _batch_norm_fwd(x, scale, bias, epsilon)[0]


def _batch_norm_fwd(x, scale, bias, epsilon):
  chunks = _chunks_of(x)
  n = sum(c.size // c.shape[-1] for c in chunks)
  s1, s2 = _summed_over_chunks(channel_sums(c, c * c) for c in chunks)
  mean = s1 / n
  var = jnp.maximum(0.0, s2 / n - mean * mean)
  inv = lax.rsqrt(var + epsilon)
  y = tuple((c - mean) * (inv * scale) + bias for c in chunks)
  return (_like(x, y), mean, var), (x, mean, inv, scale)


def _batch_norm_bwd(epsilon, residuals, cotangents):
  # The gradient written out with its two reductions as `channel_sums`; autodiff
  # of the forward would leave them as batch-axis reductions (slow on CPU).
  del epsilon  # inside inv already
  x, mean, inv, scale = residuals
  g, g_mean, g_var = cotangents
  chunks, g_chunks = _chunks_of(x), _chunks_of(g)
  n = sum(c.size // c.shape[-1] for c in chunks)
  sum_g, sum_g_centred = _summed_over_chunks(
      channel_sums(gc, gc * (c - mean)) for c, gc in zip(chunks, g_chunks))
  a = inv * scale
  shift = (g_mean - a * sum_g) / n
  slope = (2 * g_var - a * inv * inv * sum_g_centred) / n
  dx = tuple(a * gc + shift + (c - mean) * slope for c, gc in zip(chunks, g_chunks))
  return _like(x, dx), sum_g_centred * inv, sum_g


batch_norm_train.defvjp(_batch_norm_fwd, _batch_norm_bwd)


class BatchNorm(nn.Module):
  """`nn.BatchNorm` over the last axis (same parameters, statistics and update rule).

  In training its reductions go through `channel_sums`, forward and backward.
  Running statistics: `ra = momentum * ra + (1 - momentum) * batch`, with the
  batch variance biased (divided by n), as flax's. Takes NHWC maps, or `Chunks`
  of them (statistics over all chunks; returns `Chunks`).
  """
  use_running_average: bool = False
  momentum: float = 0.99
  epsilon: float = 1e-5

  @nn.compact
  def __call__(self, x):
    features = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (features,))
    bias = self.param("bias", nn.initializers.zeros, (features,))
    ra_mean = self.variable("batch_stats", "mean", jnp.zeros, (features,))
    ra_var = self.variable("batch_stats", "var", jnp.ones, (features,))
    if self.use_running_average:
      a = lax.rsqrt(ra_var.value + self.epsilon) * scale
      return chunkwise(lambda c: (c - ra_mean.value) * a + bias)(x)
    y, mean, var = batch_norm_train(x, scale, bias, self.epsilon)
    if not self.is_initializing():
      m = self.momentum
      ra_mean.value = m * ra_mean.value + (1 - m) * lax.stop_gradient(mean)
      ra_var.value = m * ra_var.value + (1 - m) * lax.stop_gradient(var)
    return y


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def group_norm_nhwc(x, scale, bias, num_groups, epsilon):
  """GroupNorm of NHWC x over H, W and each group of C // num_groups channels, as
  `nn.GroupNorm` computes it: var = E[x^2] - E[x]^2, whose float32 rounding error,
  like flax's, grows with E[x^2] / var where a group's mean is large next to its spread."""
  return _group_norm_fwd(x, scale, bias, num_groups, epsilon)[0]


def _group_means(sums, num_groups, count):
  """(N, C) per-channel sums -> each channel's group's mean over `count` terms, (N, C)."""
  n, c = sums.shape
  totals = sums.reshape(n, num_groups, c // num_groups).sum(-1)
  return jnp.repeat(totals, c // num_groups, axis=1) / count


def _group_stats(x, num_groups, epsilon):
  """Per-image, per-channel mean and 1/std of x's group: two (N, C) arrays."""
  n, h, w, c = x.shape
  count = h * w * (c // num_groups)
  mean, mean_sq = (_group_means(s, num_groups, count) for s in image_channel_sums(x, x * x))
  return mean, lax.rsqrt(jnp.maximum(0.0, mean_sq - mean * mean) + epsilon)


def _group_norm_fwd(x, scale, bias, num_groups, epsilon):
  mean, inv = _group_stats(x, num_groups, epsilon)
  y = (x - mean[:, None, None]) * (inv * scale)[:, None, None] + bias
  return y, (x, scale, mean, inv)


def _group_norm_bwd(num_groups, epsilon, residuals, g):
  # Written out so that its two full-size reductions run as one pass of
  # `image_channel_sums`: with xhat = (x - mean) * inv and gh = g * scale,
  # dx = inv * (gh - mean_group(gh) - xhat * mean_group(gh * xhat)), and the
  # per-image, per-channel sums of g and g * (x - mean) give every term.
  del epsilon  # inside inv already
  x, scale, mean, inv = residuals
  g = written_out(g)
  _, h, w, c = x.shape
  count = h * w * (c // num_groups)
  centred = x - mean[:, None, None]
  sum_g, sum_g_centred = image_channel_sums(g, g * centred)
  mean_gh = _group_means(sum_g * scale, num_groups, count)
  mean_gh_xhat = _group_means(sum_g_centred * scale, num_groups, count) * inv
  dx = inv[:, None, None] * (g * scale - mean_gh[:, None, None]
                             - centred * (inv * mean_gh_xhat)[:, None, None])
  return dx, (sum_g_centred * inv).sum(0), sum_g.sum(0)


group_norm_nhwc.defvjp(_group_norm_fwd, _group_norm_bwd)


class GroupNorm(nn.Module):
  """`nn.GroupNorm(num_groups, epsilon=1e-6)` over the last axis of NHWC maps: same
  parameters, same results up to float rounding.

  flax's statistics and their autodiff gradients are reductions over H, W and a
  group's channels, each a separate pass that XLA:CPU runs slowly; here the
  forward's two sums are one pass and the backward's two another.
  """
  num_groups: int = 32
  epsilon: float = 1e-6

  @nn.compact
  def __call__(self, x):
    if x.ndim != 4:
      raise ValueError(f"GroupNorm takes NHWC maps, got shape {x.shape}")
    channels = x.shape[-1]
    if channels % self.num_groups:
      raise ValueError(f"GroupNorm: {channels} channels do not split into {self.num_groups} groups")
    scale = self.param("scale", nn.initializers.ones, (channels,))
    bias = self.param("bias", nn.initializers.zeros, (channels,))
    return group_norm_nhwc(x, scale, bias, self.num_groups, self.epsilon)
