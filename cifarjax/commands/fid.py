"""`cifarjax fid-stats` and `cifarjax fid`, shaped like `python -m pytorch_fid`, and
`cifarjax fid-weights install`."""

import json

from cifarjax.commands import positive

SOURCE_HELP = ("a dataset name (cifar100, cifar10, synthetic), a folder or .zip of images "
               "(searched recursively), an .npz with a uint8 'images' array, or a stats .npz "
               "(mu, sigma)")
WEIGHTS_HELP = ("FID Inception weights: pytorch-fid's pt_inception-2015-12-05-6726825d.pth or an "
                ".npz with its state-dict keys (default: $CIFARJAX_FID_WEIGHTS, else the copy "
                "`cifarjax fid-weights install` made, else downloaded once into $CIFARJAX_CACHE "
                "or ~/.cache/cifarjax)")


def _common(p):
  p.add_argument("--weights", help=WEIGHTS_HELP)
  p.add_argument("--batch-size", type=int, default=50,
                 help="images per step (rounded up to a multiple of the device count)")
  p.add_argument("--split", default="train", help="split of a dataset source")
  p.add_argument("--no-progress", action="store_true", help="no progress bar")


def register(subparsers):
  p = subparsers.add_parser("fid-stats", help="write FID statistics (mu, sigma) of an image source")
  p.add_argument("source", metavar="SOURCE", help=SOURCE_HELP)
  p.add_argument("--out", required=True, metavar="STATS.npz", help="where to write mu and sigma")
  _common(p)
  p.set_defaults(func=fid_stats)

  p = subparsers.add_parser("fid", help="FID between two sources (images or stats)")
  p.add_argument("source_a", metavar="A", help=SOURCE_HELP)
  p.add_argument("source_b", metavar="B", help="the same kinds as A")
  _common(p)
  p.add_argument("--json", action="store_true", help="print one JSON line with key 'fid'")
  p.set_defaults(func=fid)

  p = subparsers.add_parser("fid-weights", help="install the FID Inception weights once, where "
                            "every command finds them")
  actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
  p = actions.add_parser("install", help="check a weights file and copy it into the cache",
                         description="Checks a weights file's sha256 and contents, and copies "
                         "it into the cache folder ($CIFARJAX_CACHE or ~/.cache/cifarjax), "
                         "where fid, fid-stats and eval-diffusion find it when neither "
                         "--weights nor $CIFARJAX_FID_WEIGHTS names one.")
  p.add_argument("path", metavar="PATH", help="pytorch-fid's pt_inception-2015-12-05-6726825d.pth, "
                 "or an .npz with its state-dict keys")
  p.add_argument("--sha256", help="the file's sha256 (8 or more hex digits of it), as its source "
                 "gives it (default: pytorch-fid's release file's, 6726825d)")
  p.set_defaults(func=install_weights)


def fid_stats(args):
  from cifarjax import mesh as mesh_lib
  from cifarjax.fid import save_stats, stats_from_source
  positive("--batch-size", args.batch_size)
  mesh_lib.initialize_distributed()
  mu, sigma = stats_from_source(args.source, args.split, weights=args.weights,
                                batch_size=args.batch_size, progress=not args.no_progress)
  save_stats(args.out, mu, sigma)
  print(f"wrote {args.out}: mu {mu.shape}, sigma {sigma.shape}")


def install_weights(args):
  from cifarjax.fid import weights
  installed = weights.install_weights(args.path, args.sha256)
  print(f"installed {installed} (sha256 {weights.file_sha256(installed)}): fid, fid-stats and "
        f"eval-diffusion use it where neither --weights nor ${weights.WEIGHTS_ENV} names another")


def fid(args):
  from cifarjax import mesh as mesh_lib
  from cifarjax.fid import fid_from_sources
  positive("--batch-size", args.batch_size)
  mesh_lib.initialize_distributed()
  value = fid_from_sources(args.source_a, args.source_b, args.split, weights=args.weights,
                           batch_size=args.batch_size, progress=not args.no_progress)
  if args.json:
    print(json.dumps({"fid": value, "a": args.source_a, "b": args.source_b}))
  else:
    print(f"FID: {value}")
