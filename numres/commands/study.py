"""``numres study gradflow | degradation``: the experiments of :mod:`numres.study` from the command line."""
from __future__ import annotations

import os
import sys

from ..study import DEPTHS, Budget, run_degradation, run_gradflow
from . import UsageError, first_free_folder

DEFAULT_OUT = {"gradflow": os.path.join("runs", "study-gradflow"),
               "degradation": os.path.join("runs", "study-degradation")}
RESULT_FILES = {"gradflow": ("gradflow.csv", "gradflow_blocks.csv", "gradflow.json", "gradflow.png"),
                "degradation": ("degradation.csv", "degradation.json", "degradation.png")}


def add_arguments(parser):
    experiments = parser.add_subparsers(dest="experiment", metavar="EXPERIMENT")
    flow = experiments.add_parser("gradflow", help="per-layer gradient norms at initialisation, plain vs ResNet",
                                  description="Per-layer gradient norms at initialisation for plainD and resnetD "
                                              "on a batch of the embedded digits (CSV + PNG).")
    flow.add_argument("--depth", type=int, default=56, choices=DEPTHS, help="network depth (default: 56)")
    flow.add_argument("--batch-size", type=int, default=128, help="digits images in the batch (default: 128)")
    flow.add_argument("--out", default=DEFAULT_OUT["gradflow"],
                      help="output directory (default: runs/study-gradflow, or -2, -3, ... if that holds results)")
    _overwrite_argument(flow)
    flow.add_argument("--seed", type=int, default=0,
                      help="seeds the weights; the batch is always the first images (default: 0)")
    _backend_argument(flow)

    degrade = experiments.add_parser("degradation", help="train plain and residual nets of two depths, same budget",
                                     description="Train plain and ResNet CIFAR nets of each depth with the same "
                                                 "budget on the digits; training and test error per epoch "
                                                 "(CSV + JSON + PNG).")
    defaults = Budget()
    degrade.add_argument("--depths", type=int, nargs="+", default=[20, 56], choices=DEPTHS,
                         help="depths to compare (default: 20 56)")
    degrade.add_argument("--epochs", type=int, default=defaults.epochs,
                         help=f"default: {defaults.epochs} (for depths 20 and 56: about 4 minutes of training "
                              f"measured on 2 CPU cores)")
    degrade.add_argument("--batch-size", type=int, default=defaults.batch_size,
                         help=f"default: {defaults.batch_size}")
    degrade.add_argument("--lr", type=float, default=defaults.lr,
                         help=f"initial learning rate, /10 at 50%% and 75%% of the epochs (default: {defaults.lr})")
    degrade.add_argument("--warmup-epochs", type=int, default=None,
                         help=f"epochs at lr/10 before the full rate (default: {defaults.warmup_epochs}, "
                              f"at most epochs - 1)")
    degrade.add_argument("--weight-decay", type=float, default=defaults.weight_decay,
                         help=f"default: {defaults.weight_decay}")
    degrade.add_argument("--no-augment", action="store_true", help="no random 1-pixel shifts")
    degrade.add_argument("--subset", type=int, default=None, help="use only the first N train and test images")
    degrade.add_argument("--out", default=DEFAULT_OUT["degradation"],
                         help="output directory (default: runs/study-degradation, or -2, -3, ... if that holds "
                              "results)")
    _overwrite_argument(degrade)
    degrade.add_argument("--seed", type=int, default=0,
                         help="seeds the weights, batches and augmentation (default: 0)")
    _backend_argument(degrade)


def _overwrite_argument(parser):
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the results an --out folder already holds (without it, such a folder is "
                             "refused)")


def _results_folder(args, experiment) -> str:
    """Where this study writes: never over earlier results unless --overwrite says so.  The default folder
    moves on to -2, -3, ...; an --out of the user's that holds results is refused in one line."""
    def holds_results(folder):
        return any(os.path.exists(os.path.join(folder, name)) for name in RESULT_FILES[experiment])

    if args.out != DEFAULT_OUT[experiment]:
        if holds_results(args.out) and not args.overwrite:
            raise UsageError(f"{args.out} already holds {experiment} results; choose another --out, or replace "
                             f"them with --overwrite")
        return args.out
    out = first_free_folder(args.out, holds_results)
    print(f"results folder: {out}")
    return out


def _backend_argument(parser):
    parser.add_argument("--backend", default="numpy", help="numpy (cpu) or cupy (cuda); default: numpy")


def run(args) -> int:
    experiment = getattr(args, "experiment", None)
    if experiment == "gradflow":
        if args.batch_size < 1:
            raise UsageError(f"--batch-size must be at least 1, got {args.batch_size}")
        run_gradflow(args.depth, args.batch_size, args.seed, args.backend, _results_folder(args, experiment))
        return 0
    if experiment == "degradation":
        try:
            budget = Budget(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                            warmup_epochs=(min(Budget.warmup_epochs, max(args.epochs - 1, 0))
                                           if args.warmup_epochs is None else args.warmup_epochs),
                            weight_decay=args.weight_decay, augment=not args.no_augment, subset=args.subset,
                            seed=args.seed, backend=args.backend)
        except ValueError as exc:       # Budget names its field ("warmup_epochs must ..."): name the option
            field, _, rest = str(exc).partition(" ")
            raise UsageError(f"--{field.replace('_', '-')} {rest}") from None
        run_degradation(tuple(dict.fromkeys(args.depths)), budget, _results_folder(args, experiment))
        return 0
    print("choose an experiment: numres study gradflow | numres study degradation (see --help)", file=sys.stderr)
    return 2
