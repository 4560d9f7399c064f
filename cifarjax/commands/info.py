"""`cifarjax info` and `cifarjax bench`."""

import json


def register(subparsers):
  p = subparsers.add_parser("info", help="JAX version, devices and the paper models' sizes")
  p.add_argument("--json", action="store_true")
  p.set_defaults(func=info)

  p = subparsers.add_parser("bench", help="compiled step time and images/s after warm-up")
  p.add_argument("what", choices=("classifier", "diffusion", "fid"))
  p.add_argument("--batch-size", type=int)
  p.add_argument("--steps", type=int, default=20)
  p.add_argument("--json", action="store_true")
  p.set_defaults(func=bench)


def model_sizes() -> dict:
  import jax
  import jax.numpy as jnp
  from cifarjax.models import count_params, paper_classifier

  def count(model, *inputs):
    variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), *inputs))
    return count_params(variables["params"])

  sizes = {"classifier_params": count(paper_classifier(), jnp.zeros((1, 32, 32, 3)))}
  try:
    from cifarjax.models.unet import paper_unet
  except ImportError:
    return sizes
  x, t, y = jnp.zeros((1, 32, 32, 3)), jnp.zeros((1,), jnp.int32), jnp.zeros((1,), jnp.int32)
  sizes["unet_params"] = count(paper_unet(), x, t, y)
  return sizes


def info(args):
  import jax
  result = {
      "jax_version": jax.__version__, "backend": jax.default_backend(),
      "process_count": jax.process_count(), "device_count": jax.device_count(),
      "devices": [str(d) for d in jax.devices()], **model_sizes(),
  }
  if args.json:
    print(json.dumps(result))
  else:
    for k, v in result.items():
      print(f"{k:>18}: {v}")


def bench(args):
  if args.what == "classifier":
    from cifarjax.bench import benchmark_classifier as run
  elif args.what == "diffusion":
    from cifarjax.bench import benchmark_diffusion as run
  else:
    from cifarjax.fid.bench import benchmark as run
  kwargs = {"steps": args.steps}
  if args.batch_size:
    kwargs["batch_size"] = args.batch_size
  result = run(**kwargs)
  if args.json:
    print(json.dumps(result))
  else:
    for k, v in result.items():
      print(f"{k:>22}: {v:.4g}" if isinstance(v, float) else f"{k:>22}: {v}")
