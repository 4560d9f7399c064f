"""Sampling and interpolating with a trained generator (Part 2, section 5).

Both use the EMA weights by default (see DiffusionConfig.ema_decay; `sample_from`
picks the raw ones instead), and read the model's output as the prediction it
was trained for (DiffusionConfig.prediction). Images come back as uint8 NHWC,
the form FID, PNG writers and `.npz` files take.
"""

import functools
import pathlib
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from cifarjax import compiler, diffusion, kinds, mesh as mesh_lib
from cifarjax.augment import to_model_range, to_uint8
from cifarjax.errors import UserError, note, writing
from cifarjax.kinds import make_schedule
from cifarjax.run import Workdir


# Which weights of a generator's state to sample: the EMA ones (the default), or the raw
# ones the last step left, to see what the average buys.
SAMPLE_FROM = {"ema": lambda state: state.ema["params"], "raw": lambda state: state.params}


def open_run(workdir) -> Workdir:
  """The generator run (or exported folder) at a path, or the `run.Workdir` already read."""
  return Workdir.of(workdir, kinds.GENERATOR)


def check_sample_from(sample_from: str, workdir=None) -> str:
  """sample_from, checked to name weights that the workdir (or exported folder) holds."""
  if sample_from not in SAMPLE_FROM:
    raise UserError(f"sample_from must be one of {', '.join(SAMPLE_FROM)}, got {sample_from!r}")
  run = None if workdir is None else open_run(workdir)
  held = None if run is None else run.exported_weights
  if held is not None and held != sample_from:
    raise UserError(f"{run.path} holds exported {held} weights only, not the {sample_from} "
                    f"ones; sample with --weights-from {held}")
  return sample_from


def check_clip(clip: str) -> str:
  from cifarjax import registry
  registry.lookup(diffusion.CLIPS, "clip", clip, flag="clip")
  return clip


def _model_fn(model, params):
  return lambda x, t, labels: model.apply({"params": params}, x, t, labels)


def check_labels(labels, num_classes: int) -> np.ndarray:
  labels = np.asarray(labels)
  if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
    raise UserError(f"labels must be a 1-D integer array, got {labels.dtype} {labels.shape}")
  bad = labels[(labels < 0) | (labels >= num_classes)]
  if bad.size:
    raise UserError(f"label {int(bad[0])} is outside the model's {num_classes} classes "
                    f"[0, {num_classes - 1}]")
  return labels.astype(np.int32)


def check_sampler(config, sampler: str, steps: int | None, eta: float = 0.0,
                  sampler_kwargs: dict | None = None) -> dict:
  """The sampler's settings completed with its defaults, once `diffusion.check_sampler`
  traced it on the run's schedule (milliseconds; a UserError for what it refuses)."""
  return diffusion.check_sampler(sampler, make_schedule(config), steps, eta, sampler_kwargs)


def _hashable(value):
  return tuple(map(_hashable, value)) if isinstance(value, (list, tuple)) else value


def _check_guidance(guidance: float, config):
  from cifarjax.errors import Notice
  if not guidance >= 0:  # NaN too
    raise UserError(f"guidance must be a non-negative number, got {guidance}")
  if guidance and not config.label_dropout:
    warnings.warn(Notice("guidance needs a model trained with label dropout (--label-dropout > 0); "
                  "this one never saw the null label, so guided samples are unreliable"))


# The progress bar that compiled samplers advance by a step at each call of the model
# (`_step_done`): set while `generate` runs, None otherwise.
_STEP_BAR = [None]


def _step_done():
  if _STEP_BAR[0] is not None:
    _STEP_BAR[0].update()


def _counting_steps(model_fn):
  """model_fn that tells the host (`_step_done`) of each call: one per step of a chain,
  and under `sample`'s vmap one per step of the whole batch (the callback takes no
  batched input, so vmap leaves it single)."""
  def counted(x, t, labels):
    jax.debug.callback(_step_done)
    return model_fn(x, t, labels)
  return counted


@functools.lru_cache(maxsize=32)
def make_sampler(model, mesh, batch_size: int, *, sampler: str, steps: int | None,
                 guidance: float, prediction: str = "eps", clip: str = "static",
                 eta: float = 0.0, sampler_kwargs: tuple = (), progress: bool = False):
  """sample_batch(params, schedule, rng, labels (batch_size,)) -> float images, jitted and
  split over the mesh's devices (each image's chain runs where its label lies).
  prediction: what the model outputs (its DiffusionConfig.prediction); clip: what the
  predicted clean images go through (`diffusion.CLIPS`); eta and sampler_kwargs go to the
  sampler (the settings as (name, value) pairs, lists as tuples: the cache's key).
  progress: each step advances the bar `generate` shows (a host callback per step).

  Cached: the same settings give the same jitted function, so sampling other weights
  or another schedule of the same length (raw against EMA weights, a later
  checkpoint, another seed) compiles nothing new.
  """
  mesh_lib.check_batch_size(batch_size, mesh)
  replicated, sharded = mesh_lib.replicated(mesh), mesh_lib.batch_sharded(mesh)
  guidance = float(guidance)

  def sample_batch(params, schedule, rng, labels):
    model_fn = _model_fn(model, params)
    model_fn = _counting_steps(model_fn) if progress else model_fn
    return diffusion.sample(model_fn, schedule, rng, labels, sampler=sampler,
                            num_steps=steps, guidance=guidance, null_label=model.num_classes,
                            prediction=prediction, clip=clip, eta=eta,
                            sampler_kwargs=dict(sampler_kwargs))

  return jax.jit(sample_batch, in_shardings=(replicated, replicated, replicated, sharded),
                 out_shardings=sharded, compiler_options=compiler.options())


def generate(workdir, labels, sampler: str = "ddim", steps: int | None = 50,
             guidance: float = 0.0, seed: int = 0, batch_size: int = 256, mesh=None,
             progress: bool = True, trained=None, sample_from: str = "ema",
             clip: str = "static", eta: float = 0.0,
             sampler_kwargs: dict | None = None) -> np.ndarray:
  """uint8 (N, 32, 32, 3) samples of the workdir's latest checkpoint (a path or a
  `run.Workdir`), one per label.

  Batches of batch_size (rounded up to a multiple of the device count; the last
  one padded) go through one compiled sampler; batch i uses the key
  fold_in(PRNGKey(seed), i), so the same (seed, batch_size) gives the same
  images. sampler: a name in `diffusion.SAMPLERS`: 'ddpm' runs all T steps (steps
  must be None or T); 'ddim' and 'dpm++2m' run `steps` steps; eta and sampler_kwargs
  (its settings) go to the sampler, which is traced without a model first, so that
  what it refuses comes before the load. sample_from: 'ema' (the EMA weights) or
  'raw' (SAMPLE_FROM). clip: 'static' (the predicted clean images clipped to the data
  range, as DDPM's official sampler), 'dynamic' or 'off' (`diffusion.CLIPS`). trained:
  (model, state, config, class_names) to sample instead of the workdir's (as
  `run.load_trained` gives them).
  """
  mesh = mesh or mesh_lib.make_mesh()
  run = open_run(workdir)
  config, class_names = (trained[2], trained[3]) if trained else (run.config, run.class_names)
  labels = check_labels(labels, len(class_names))
  check_sample_from(sample_from, run)  # before a model load that takes seconds
  check_clip(clip)
  if sampler == "ddpm" and steps == config.num_timesteps:
    steps = None
  settings = check_sampler(config, sampler, steps, eta, sampler_kwargs)
  _check_guidance(guidance, config)
  if not trained:
    note(f"loading the generator in {run.path}")
  model, state = trained[:2] if trained else run.trained(mesh)
  params = SAMPLE_FROM[sample_from](state)
  batch_size = -(-min(batch_size, max(len(labels), 1)) // mesh.size) * mesh.size
  schedule = jax.device_put(make_schedule(config), mesh_lib.replicated(mesh))  # once, not per batch
  progress = progress and jax.process_index() == 0
  sample_batch = make_sampler(model, mesh, batch_size, sampler=sampler, steps=steps,
                              guidance=guidance, prediction=config.prediction, clip=clip,
                              eta=float(eta), sampler_kwargs=_hashable(sorted(settings.items())),
                              progress=progress)
  key, out = jax.random.PRNGKey(seed), []
  starts = range(0, len(labels), batch_size)
  steps_per_batch = config.num_timesteps if steps is None else steps
  if starts:
    note(f"sampling {len(labels):,} images in {len(starts)} batch(es) of {steps_per_batch} "
         f"{sampler} steps; the first batch compiles the sampler")
  with tqdm(total=len(starts) * steps_per_batch, desc=f"sample ({sampler})", unit="step",
            disable=not progress) as bar:
    _STEP_BAR[0] = bar
    try:
      for i, start in enumerate(starts):
        chunk = labels[start:start + batch_size]
        padded = np.concatenate([chunk, np.zeros(batch_size - len(chunk), np.int32)])
        images = sample_batch(params, schedule, jax.random.fold_in(key, i), padded)
        out.append(to_uint8(jax.device_get(images))[:len(chunk)])
    finally:
      _STEP_BAR[0] = None
  return np.concatenate(out) if out else np.zeros((0, 32, 32, 3), np.uint8)


def frame_alphas(frames: int) -> np.ndarray:
  if frames < 2:
    raise UserError(f"an interpolation needs at least 2 frames, got {frames}")
  return np.linspace(0.0, 1.0, frames, dtype=np.float32)


def frame_labels(alphas, label_a: int, label_b: int) -> np.ndarray:
  """Each frame is conditioned on the label of the closer endpoint (the paper's rule)."""
  return np.where(np.asarray(alphas) < 0.5, label_a, label_b).astype(np.int32)


def interpolate(workdir, image_a, label_a: int, image_b, label_b: int, frames: int = 8,
                steps: int = 50, mesh=None, clip: str = "static"):
  """(uint8 frames (frames, 32, 32, 3), their labels) between two uint8 images.

  Both images are encoded to DDIM latents x_T (`diffusion.ddim_invert`, with
  their own labels), the latents slerped at `frames` evenly spaced alphas in
  [0, 1], and each decoded by `steps` DDIM steps (eta 0) conditioned on the
  closer endpoint's label. The end frames are the DDIM reconstructions of the
  inputs (close to them where inversion is accurate). clip: as `generate`'s, for the
  decoding (the inversion reads the model's predictions as they are).
  """
  alphas = frame_alphas(frames)
  check_clip(clip)
  run = open_run(workdir)
  ends = check_labels([label_a, label_b], len(run.class_names))
  mesh = mesh or mesh_lib.make_mesh()
  note(f"loading the generator in {run.path}")
  model, state = run.trained(mesh)
  config = run.config
  labels = frame_labels(alphas, *ends)
  schedule = make_schedule(config)

  @functools.partial(jax.jit, compiler_options=compiler.options())
  def invert_and_decode(params, x0, ends, alphas, labels):
    model_fn = _model_fn(model, params)
    z = diffusion.ddim_invert(model_fn, schedule, x0, ends, num_steps=steps,
                              prediction=config.prediction)
    x_T = jax.vmap(diffusion.slerp, in_axes=(None, None, 0))(z[0], z[1], alphas)
    return diffusion.sample(model_fn, schedule, jax.random.PRNGKey(0), labels, sampler="ddim",
                            num_steps=steps, x_T=x_T, prediction=config.prediction, clip=clip)

  x0 = to_model_range(jnp.asarray(np.stack([image_a, image_b])))
  note(f"compiling and running the interpolation: {steps} DDIM steps to invert the two "
       f"images, then {steps} to decode each of {frames} frames (a minute or more on a CPU)")
  t0 = time.perf_counter()
  images = invert_and_decode(state.ema["params"], x0, jnp.asarray(ends), jnp.asarray(alphas),
                             jnp.asarray(labels))
  images = to_uint8(jax.device_get(images))
  note(f"interpolated in {time.perf_counter() - t0:.0f} s")
  return images, labels


def save_npz(path, images, labels):
  path = pathlib.Path(path)
  with writing(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, images=np.asarray(images, np.uint8), labels=np.asarray(labels, np.int64))


def default_labels(num: int, num_classes: int) -> np.ndarray:
  """num labels cycling through every class: 0, 1, ..., C - 1, 0, 1, ..."""
  return np.arange(num, dtype=np.int32) % num_classes


def evaluate_fid(workdir, num: int, *, weights=None, reference=None, sampler: str = "ddpm",
                 steps: int | None = None, guidance: float = 0.0, seed: int = 0,
                 batch_size: int = 256, mesh=None, progress: bool = True,
                 sample_from: str = "ema", clip: str = "static", eta: float = 0.0,
                 sampler_kwargs: dict | None = None) -> dict:
  """FID of `num` samples (labels cycling through the classes) against the statistics of
  the images the generator trained on (`fid.training_reference_stats`: the train split
  without its held-out slice, cached), or against `reference` where given (a stats .npz
  used as it is, or any FID source, cached).

  The reference is the train split even for a run trained on train+test
  (DiffusionConfig.train_on): the usual CIFAR FID reference, comparable across runs.
  guidance, sample_from, clip, eta, sampler_kwargs: as `generate`'s.

  Says which reference it uses before computing anything. Merges {fid, fid_num,
  fid_sampler, fid_steps, fid_eta, fid_sampler_kwargs (completed with the sampler's
  defaults), fid_sampler_source_sha256 (`registry.fingerprint`), fid_guidance, fid_weights_from,
  fid_clip, fid_reference, fid_step} into the workdir's summary.json (prefixed: `steps`
  there counts training steps) and returns them.
  """
  from cifarjax import fid, registry, runlog
  if num < 2:
    raise UserError(f"FID needs at least 2 samples, got {num}")
  run = open_run(workdir)
  config, class_names = run.config, run.class_names
  check_sample_from(sample_from, run)
  check_clip(clip)
  sampler_kwargs = check_sampler(config, sampler, steps, eta, sampler_kwargs)
  _check_guidance(guidance, config)  # before the reference statistics, which can take an hour
  weights = fid.resolve_weights_path(weights)  # found (or refused) before the model loads
  mesh = mesh or mesh_lib.make_mesh()
  note(f"loading the generator in {run.path}")
  model, state = run.trained(mesh)
  if reference is None:
    source = f"{config.data} (train split)"
    ref = fid.training_reference_stats(config.data, config.holdout, weights, mesh=mesh,
                                       progress=progress)
  else:
    source = str(reference)
    ref = fid.reference_stats(reference, "train", weights, mesh=mesh, progress=progress)
  note(f"sampling {num:,} images ({sampler}); then their FID features")
  images = generate(run, default_labels(num, len(class_names)), sampler, steps, guidance,
                    seed, batch_size, mesh, progress, trained=(model, state, config, class_names),
                    sample_from=sample_from,
                    clip=clip, eta=eta, sampler_kwargs=sampler_kwargs)
  value = fid.compute_fid(images, ref, weights, mesh=mesh, progress=progress)
  result = {"fid": float(value), "fid_num": num, "fid_sampler": sampler,
            "fid_steps": config.num_timesteps if steps is None else steps,
            "fid_eta": float(eta), "fid_sampler_kwargs": sampler_kwargs,
            "fid_sampler_source_sha256": registry.fingerprint(diffusion.SAMPLERS[sampler]),
            "fid_guidance": float(guidance), "fid_weights_from": sample_from, "fid_clip": clip,
            "fid_reference": source, "fid_step": int(jax.device_get(state.step))}
  path = run.path / "summary.json"
  if jax.process_index() == 0:
    runlog.write_json(path, {**(runlog.read_json(path) if path.exists() else {}), **result})
  return result
