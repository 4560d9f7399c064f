"""`cifarjax info` and `cifarjax bench`."""

import argparse
import json
import subprocess
import sys

BENCHMARK_NAMES = ("classifier", "diffusion", "sampler", "fid")  # cifarjax.bench.BENCHMARKS


def _benchmark_name(name):
  # argparse's `choices` rejects the empty default of nargs="*"; this checks each name.
  if name not in BENCHMARK_NAMES:
    raise argparse.ArgumentTypeError(
        f"unknown benchmark {name!r}; choose from {', '.join(BENCHMARK_NAMES)}")
  return name


def register(subparsers):
  p = subparsers.add_parser("info", help="JAX version, devices and the paper models' sizes")
  p.add_argument("--json", action="store_true")
  p.set_defaults(func=info)

  p = subparsers.add_parser(
      "bench", help="compiled step times, images/s, FLOPs and TFLOP/s, compile times, as one "
                    "table",
      description="Each benchmark named (default: all) runs in its own process, so that "
                  "peak device memory is its own. FLOPs are XLA's cost analysis of the "
                  "compiled step, summed over all devices, as is TFLOP/s: hold it against "
                  "the devices' peak (their count, kind and backend are in the row).")
  p.add_argument("what", nargs="*", type=_benchmark_name, metavar="NAME",
                 help=f"any of {', '.join(BENCHMARK_NAMES)} (default: all)")
  p.add_argument("--batch-size", type=int, help="default: 256 (models), 50 (FID)")
  p.add_argument("--steps", type=int, help="timed calls after the first (default per benchmark)")
  p.add_argument("--json", action="store_true", help="one JSON object per line")
  p.set_defaults(func=bench)

def model_sizes() -> dict:
  import jax
  import jax.numpy as jnp
  from cifarjax.models import count_params, paper_classifier, paper_unet

  def count(model, *inputs):
    variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), *inputs))
    return count_params(variables["params"])

  x, t, y = jnp.zeros((1, 32, 32, 3)), jnp.zeros((1,), jnp.int32), jnp.zeros((1,), jnp.int32)
  return {"classifier_params": count(paper_classifier(), x),
          "unet_params": count(paper_unet(), x, t, y)}


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
  from cifarjax import bench as bench_lib
  names = args.what or BENCHMARK_NAMES
  kwargs = {k: v for k, v in (("batch_size", args.batch_size), ("steps", args.steps)) if v}

  def run_one(name):
    if len(names) == 1:
      return bench_lib.BENCHMARKS[name](**kwargs)
    # A fresh process each, so that device memory peaks are each benchmark's own.
    options = [f"--{k.replace('_', '-')}={v}" for k, v in kwargs.items()]
    out = subprocess.run([sys.executable, "-m", "cifarjax", "bench", name, "--json", *options],
                         check=True, stdout=subprocess.PIPE, text=True).stdout
    return json.loads(out.splitlines()[-1])

  rows = (run_one(name) for name in names)
  lines = (json.dumps(row) for row in rows) if args.json else bench_lib.table_lines(rows)
  for line in lines:
    print(line, flush=True)
