"""Checks that one train step computed two ways (1 vs 8 devices, 1 vs 2 processes) agrees,
with tolerances derived from float32 summation error rather than fitted to one machine.

Both ways run the same program on the same inputs; only the order of the sums differs
(per-device partial sums, then a cross-device reduction). The bound:

* One sum of n float32 terms, reordered, moves by at most (n - 1) eps sum|x| in the worst
  case (Higham, Accuracy and Stability of Numerical Algorithms, 2nd ed., sec. 4.2); rounding
  errors of random sign make it ~sqrt(n) eps sum|x| typically, which is what we bound.
  eps = 2**-23. The longest sums are over the batch and the pixels: n = B * H * W
  (BatchNorm statistics, weight gradients).
* The forward pass runs through L normalisation layers in series. Each recentres and
  rescales, so a relative error entering it leaves it about the same size, and each adds
  its own: FORWARD RTOL = L * sqrt(n) * eps for the loss, the BatchNorm statistics and the
  activations (errors add, none are assumed to cancel). Paper classifier, batch 16:
  L = 28, n = 16,384: 4.3e-4. Tiny U-Net: L = 7: 1.1e-4.
* A weight's gradient is again a sum over the n positions, of products whose factors carry
  the forward error and the backward pass's own (as large again): relative error
  2 * FORWARD RTOL per term, i.e. an absolute error of 2 * FORWARD RTOL * sum|terms|.
  Behind a normalisation layer the terms cancel (BatchNorm's backward pass subtracts the
  batch means of the upstream gradient), so the gradient is a small remainder of its terms:
  for terms of random sign, sum|terms| ~ sqrt(n) * |gradient|. Hence, per parameter
  tensor, normwise: |g_a - g_b| <= GRADIENT RTOL * |g_a| with
  GRADIENT RTOL = 2 * FORWARD RTOL * sqrt(n) = 2 L n eps (paper classifier: 0.11).
  A gradient that is zero analytically (a bias before a per-channel normalisation)
  is left with rounding noise of at most FORWARD RTOL * G, G the model's largest gradient
  entry; such tensors are only checked to be that small on both sides.

What was seen (AVX-512 EPYC, XLA CPU, at LLVM optimisation levels 2 and 0, which round
differently): loss 1.2e-6 relative (classifier) and 1.3e-6 to 3.9e-6 (U-Net), under 1% of
the bound; classifier gradients up to 2.8e-2 normwise per tensor (a quarter of the bound:
BatchNorm networks' gradients are this sensitive; a 1-ulp change of the input images alone
moves them 0.5%), U-Net's 3e-5 (0.1%); BatchNorm statistics 4% of the bound. Two processes
against one: 5% of the bound or less. Sharding mistakes are far outside these bounds: BatchNorm
statistics per device (over 2 of 16 examples), a dropout mask or batch per device, or
gradients summed instead of averaged over devices would move the loss, the statistics and
the gradients by 10-800% (factor 8).

After the step, Adam's first update is lr * g / (|g| + 1e-8) per weight (bias-corrected
moments g and g**2): a weight whose gradient is rounding noise may move +lr on one side and
-lr on the other, so weights agree to rounding only where both gradients have one sign
and are not tiny; elsewhere they stay within 2 lr.
"""

import numpy as np

EPS = float(np.finfo(np.float32).eps)
ADAM_EPS = 1e-8  # optax.scale_by_adam's


def forward_rtol(num_norm_layers: int, n: int) -> float:
  return num_norm_layers * np.sqrt(n) * EPS


def gradient_rtol(num_norm_layers: int, n: int) -> float:
  return 2 * forward_rtol(num_norm_layers, n) * np.sqrt(n)


def _group(d, prefix):
  return {k[len(prefix):]: d[k].astype(np.float64) for k in d if k.startswith(prefix)}


def num_norm_layers(a) -> int:
  """Normalisation layers in the saved model (all lie in series in both models)."""
  bn = [k for k in a if k.startswith("batch_stats/") and k.endswith("/mean")]
  gn = [k for k in a if k.startswith("params/") and "GroupNorm" in k and k.endswith("/scale")]
  return len(bn) + len(gn)


def assert_steps_agree(a, b, *, n, lr, bn_momentum=None, ema_decay=None, report=None):
  """a, b: the two sides' saved step (see _sharded_step.py); n: the longest sum, B * H * W;
  lr: the step's learning rate. Fills `report` (a dict) with what was seen against the bounds."""
  report = {} if report is None else report
  assert a.keys() == b.keys()
  np.testing.assert_array_equal(a["batch"], b["batch"])  # drawn on the device: bitwise equal
  if "labels" in a:
    np.testing.assert_array_equal(a["labels"], b["labels"])
  layers = num_norm_layers(a)
  assert layers > 0
  fwd, grad_rtol = forward_rtol(layers, n), gradient_rtol(layers, n)
  report.update(layers=layers, forward_rtol=fwd, gradient_rtol=grad_rtol)

  # The loss.
  loss_a, loss_b = float(a["loss"][0]), float(b["loss"][0])
  report["loss"] = abs(loss_a - loss_b) / abs(loss_a)
  assert abs(loss_a - loss_b) <= fwd * abs(loss_a), (loss_a, loss_b, fwd)

  # BatchNorm statistics of the batch, from the running ones (initialised to mean 0, var 1):
  # running = m * init + (1 - m) * batch. Bound: a mean's error is relative to mean|x| <=
  # sqrt(mean^2 + var), a variance's (E[x^2] - mean^2) to E[x^2] = mean^2 + var; the running
  # average's own rounding adds eps / (1 - m) of its size.
  stats_a, stats_b = _group(a, "batch_stats/"), _group(b, "batch_stats/")
  worst = 0.0
  for key in stats_a:
    if not key.endswith("/mean"):
      continue
    var_key = key[:-len("mean")] + "var"
    m = bn_momentum
    mean_a, mean_b = stats_a[key] / (1 - m), stats_b[key] / (1 - m)
    var_a, var_b = (stats_a[var_key] - m) / (1 - m), (stats_b[var_key] - m) / (1 - m)
    second = mean_a**2 + var_a
    rounding = 2 * EPS / (1 - m)
    mean_tol = fwd * np.sqrt(second) + rounding
    var_tol = fwd * second + rounding
    worst = max(worst, (np.abs(mean_a - mean_b) / mean_tol).max(),
                (np.abs(var_a - var_b) / var_tol).max())
    np.testing.assert_array_less(np.abs(mean_a - mean_b), mean_tol, err_msg=key)
    np.testing.assert_array_less(np.abs(var_a - var_b), var_tol, err_msg=var_key)
  report["batch_stats_of_bound"] = worst

  # Gradients, tensor by tensor.
  grads_a, grads_b = _group(a, "grad/"), _group(b, "grad/")
  big = max(np.abs(g).max() for g in grads_a.values())
  noise = fwd * big
  zero, worst = [], 0.0
  for key, ga in grads_a.items():
    gb = grads_b[key]
    if max(np.abs(ga).max(), np.abs(gb).max()) <= noise:
      zero.append(key)
      continue
    err = np.linalg.norm(ga - gb) / np.linalg.norm(ga)
    worst = max(worst, err / grad_rtol)
    assert err <= grad_rtol, f"{key}: gradients differ by {err:.2e} of their norm (bound {grad_rtol:.2e})"
  report.update(gradients_of_bound=worst, zero_gradients=zero)
  size = sum(g.size for g in grads_a.values())
  assert sum(grads_a[k].size for k in zero) < 0.1 * size, zero  # most gradients are real

  # Parameters after Adam's first step.
  params_a, params_b = _group(a, "params/"), _group(b, "params/")
  flips = 0
  for key, pa in params_a.items():
    pb, ga, gb = params_b[key], grads_a[key], grads_b[key]
    diff = np.abs(pa - pb)
    rounding = 4 * EPS * np.maximum(np.abs(pa), lr)  # p - lr u on each side
    assert (diff <= 2 * lr + rounding).all(), key
    # Where both gradients have one sign and |g| >= 1e-4, the step is -lr sign(g) (1 - d)
    # with d <= 1e-8 / 1e-4 on both sides.
    settled = (np.sign(ga) == np.sign(gb)) & (np.minimum(np.abs(ga), np.abs(gb)) >= 1e-4)
    np.testing.assert_array_less(diff[settled], (lr * ADAM_EPS / 1e-4 + rounding)[settled],
                                 err_msg=key)
    flips += int((np.sign(ga) != np.sign(gb)).sum())  # (within the gradient bound above)
  report["sign_flips"] = flips

  # The EMA moves (1 - d) of the step, d the first step's decay, min(ema_decay, 1/10) by
  # optim.ema_update's ramp: ema = d * p0 + (1 - d) * p1 on both sides.
  if ema_decay is not None:
    first_decay = min(ema_decay, 1 / 10)
    for key, ea in _group(a, "ema_params/").items():
      eb = b["ema_params/" + key].astype(np.float64)
      step = (1 - first_decay) * np.abs(params_a[key] - params_b[key])
      assert (np.abs(ea - eb) <= step + 4 * EPS * np.maximum(np.abs(ea), lr)).all(), key
  return report
