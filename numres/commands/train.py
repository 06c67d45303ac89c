"""``numres train``: train a ResNet on the embedded digits (default) or on CIFAR-10.

    numres train                                             # resnet20 on the digits, about a minute on 2 cores
    numres train --dataset cifar10 --data-dir ~/data/cifar10 --epochs 182 --batch-size 128 \\
                 --schedule multistep --milestones 91 136      # the paper's recipe (He et al. 2015, sec. 4.2)
    numres train --out runs/digits-resnet20 --resume          # continue an interrupted run exactly
    mpiexec -n 2 numres train                                 # data-parallel over 2 processes (or --nproc 2)

Options left out take the defaults of :class:`numres.training.TrainConfig`; with
``--resume`` they come from the checkpoint instead, and only ``--epochs`` (to extend
the run), ``--backend`` and ``--data-dir`` may be given again.
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import os
import re
import shlex
import subprocess
import sys
import traceback

from .. import distributed as dist
from ..blas import blas_threads
from ..cpu_info import slow_blas_warning
from ..training import (DEFAULT_LR, OPTIMIZERS, SCHEDULES, ConfigError, NonFiniteLossError, Trainer, TrainConfig,
                        checkpoint_file, model_names)
from . import UsageError, first_free_folder, user_errors

DEFAULTS = TrainConfig()
RESUMABLE = ("epochs", "backend", "data_dir", "val_dir")
RUN_FILES = ("checkpoint.npz", "checkpoint.prev.npz", "metrics.json")     # a folder with any of them holds a run
PREVIOUS_CHECKPOINT = "checkpoint.prev.npz"


def add_arguments(parser):
    d = DEFAULTS
    run = parser.add_argument_group("run")
    run.add_argument("--model", help=f"network (default: {d.model}); one of: {', '.join(model_names())}")
    run.add_argument("--dataset", choices=["digits", "cifar10", "folder"],
                     help=f"default: {d.dataset} (embedded); folder: your own images in --data-dir")
    run.add_argument("--data-dir", help="folder with CIFAR-10's python batches (or cifar-10-python.tar.gz), or "
                                        "with --dataset folder one sub-folder of images per class")
    run.add_argument("--val-dir", help="folder dataset: validation images (default: a seeded split of --data-dir)")
    run.add_argument("--val-fraction", type=float, help=f"folder dataset: share of each class kept for "
                                                         f"validation without --val-dir (default: {d.val_fraction})")
    run.add_argument("--image-size", type=int, help=f"folder dataset: the crop the model sees (default: {d.image_size})")
    run.add_argument("--workers", type=int, help="folder dataset: processes decoding images (default: 0, in-process)")
    run.add_argument("--weights", help="start from these weights (torchvision .pth, numres .npz or a run's "
                                       "checkpoint); an fc of another size is replaced by a new one")
    run.add_argument("--freeze-backbone", action="store_const", const=True,
                     help="train only the final fc layer (the rest keeps requires_grad=False)")
    run.add_argument("--epochs", type=int, help=f"default: {d.epochs}")
    run.add_argument("--batch-size", type=int, help=f"default: {d.batch_size}")
    run.add_argument("--eval-batch-size", type=int, help=f"batch size for evaluation (default: {d.eval_batch_size})")
    run.add_argument("--subset", type=int, help="use only the first N train and test images (quick checks)")
    run.add_argument("--no-augment", dest="augment", action="store_const", const=False,
                     help="turn off random crops/flips")
    opt = parser.add_argument_group("optimisation")
    opt.add_argument("--optimizer", choices=OPTIMIZERS, help=f"default: {d.optimizer}")
    opt.add_argument("--lr", type=float, help="initial learning rate (default: "
                                              + ", ".join(f"{v:g} for {k}" for k, v in DEFAULT_LR.items()) + ")")
    opt.add_argument("--schedule", choices=SCHEDULES,
                     help="lr schedule (torch.optim.lr_scheduler's): cosine (default), multistep (--milestones, "
                          "--gamma), step (--step-size, --gamma), exponential (lr x --gamma every epoch), onecycle "
                          "(stepped every batch, peak --lr, cycles SGD's momentum / Adam's beta1), plateau (lr x "
                          "--gamma after --patience epochs without a lower test loss)")
    opt.add_argument("--milestones", type=int, nargs="+",
                     help="multistep: epochs at which lr is multiplied by --gamma (default: 50%% and 75%% of epochs)")
    opt.add_argument("--gamma", type=float, help="the factor of multistep, step and plateau (default: 0.1) and "
                                                 "of exponential (default: 0.9)")
    opt.add_argument("--step-size", type=int, help="step: epochs between cuts (default: a third of the epochs)")
    opt.add_argument("--patience", type=int, help=f"plateau: epochs without improvement before a cut "
                                                  f"(default: {d.patience})")
    opt.add_argument("--warmup-epochs", type=int, help="linear warm-up from lr/10 over this many epochs (default: 0)")
    opt.add_argument("--momentum", type=float, help=f"SGD's momentum (default: {d.momentum})")
    opt.add_argument("--weight-decay", type=float, help=f"L2 for sgd and adam, decoupled for adamw "
                                                        f"(default: {d.weight_decay})")
    opt.add_argument("--nesterov", action="store_const", const=True, help="SGD with Nesterov momentum")
    opt.add_argument("--label-smoothing", type=float, help=f"default: {d.label_smoothing}")
    where = parser.add_argument_group("where and how")
    where.add_argument("--seed", type=int, help=f"seeds initialisation, shuffling and augmentation (default: {d.seed})")
    where.add_argument("--backend", help=f"numpy (cpu) or cupy (cuda); default: {d.backend}")
    where.add_argument("--dtype", choices=["float32", "float64"], help=f"default: {d.dtype}")
    where.add_argument("--out", help="output folder: checkpoint.npz, metrics.csv/json, curves.png "
                                     "(default: runs/DATASET-MODEL)")
    where.add_argument("--resume", nargs="?", const=True, metavar="CHECKPOINT",
                       help="continue the run in --out (or the given checkpoint / run folder) exactly")
    where.add_argument("--overwrite", action="store_true",
                       help="replace the run already in --out (its checkpoint is kept as checkpoint.prev.npz until "
                            "the new run writes its first); without it such an --out is refused, and without --out "
                            "a new run goes to a new folder (runs/DATASET-MODEL, then -2, -3, ...)")
    where.add_argument("--threads", default="auto",
                       help="BLAS threads on the CPU; 'auto': 1 for images of 16x16 or less, whose GEMMs are "
                            "too small to split, else the library's default")
    where.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    where.add_argument("--nproc", type=int, metavar="N",
                       help="train data-parallel on N processes: launches mpiexec -n N itself (or start the "
                            "command under mpiexec/srun); --batch-size is the global batch, split over them")


def _config_values(args) -> dict:
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    return {name: value for name, value in vars(args).items() if name in names and value is not None}


def holds_run(folder) -> bool:
    """True when ``folder`` holds (part of) a run: a checkpoint, a kept previous checkpoint or metrics."""
    return any(os.path.exists(os.path.join(folder, name)) for name in RUN_FILES)


def _option(field: str) -> str:
    return "--" + field.replace("_", "-")


def _run_folder(args, config) -> tuple:
    """``(folder, note)`` for a new run: never a folder that holds a run, unless --overwrite says so.

    Without --out: runs/DATASET-MODEL, or the first of -2, -3, ... that holds no run.  In a job of many
    processes rank 0 decides and tells the others, so they all agree."""
    if dist.get_world_size() > 1 and dist.get_rank() != 0:
        return dist.broadcast_object(None)
    if args.out:
        out, note = args.out, None
        if holds_run(out):
            if not args.overwrite:
                raise UsageError(f"{out} already holds a run; continue it with --resume (numres train --out {out} "
                                 f"--resume) or replace it with --overwrite")
            note = (f"note: --overwrite: replacing the run in {out}; its checkpoint is kept as "
                    f"{os.path.join(out, PREVIOUS_CHECKPOINT)} until this run writes its first")
    else:
        base = os.path.join("runs", f"{config.dataset}-{config.model}")
        out = first_free_folder(base, holds_run)
        note = f"run folder: {out}" + (f" ({base} holds an earlier run; --out names the folder)" if out != base else "")
    if dist.get_world_size() > 1:
        dist.broadcast_object((out, note))
    return out, note


def _set_aside_previous_run(trainer, out):
    """--overwrite: the old checkpoint becomes checkpoint.prev.npz; the trainer removes it at its first save."""
    if not trainer.is_main:
        return
    current, previous = os.path.join(out, "checkpoint.npz"), os.path.join(out, PREVIOUS_CHECKPOINT)
    if os.path.exists(current):
        os.replace(current, previous)
    if os.path.exists(previous):
        trainer.previous_checkpoint = previous


def _where_weights_come_from(path) -> str:
    """For a missing file named as torchvision names its weights: where that file is published."""
    name = os.path.basename(path)
    if re.fullmatch(r"(resnet|resnext|wide_resnet)[\w]*-[0-9a-f]{8}\.pth", name):
        return (f" (torchvision publishes it at https://download.pytorch.org/models/{name}; see the README's "
                f"fine-tuning)")
    return ""


def _trainer(args) -> Trainer:
    try:
        return _make_trainer(args)
    except ConfigError as exc:          # name the option the user typed, not the config field
        raise UsageError(f"{_option(exc.field)} {exc.detail}") from None


def _make_trainer(args) -> Trainer:
    given = _config_values(args)
    if args.resume:
        refused = sorted(set(given) - set(RESUMABLE))
        if refused:
            raise UsageError("with --resume the run's settings come from its checkpoint; only --epochs, --backend, "
                             f"--data-dir and --val-dir can be given, not {', '.join(map(_option, refused))}")
        if args.overwrite:
            raise UsageError("--resume continues a run and --overwrite replaces one; give only one of them")
        source = args.out if args.resume is True else args.resume
        if source is None:
            raise UsageError("--resume needs a checkpoint or run folder (or --out pointing at the run)")
        path = checkpoint_file(source)
        if args.out and args.resume is not True and holds_run(args.out) \
                and os.path.abspath(os.path.dirname(path)) != os.path.abspath(args.out):
            raise UsageError(f"{args.out} already holds another run; resume {source} into a new --out folder")
        print(f"resuming {path}", flush=True)
        trainer = Trainer.resume(path, out_dir=args.out, progress=args.progress, **given)
        for change in trainer.resume_notes:
            print(f"note: {change}", flush=True)
        return trainer
    if given.get("optimizer", "sgd") != "sgd" and ("momentum" in given or "nesterov" in given):
        raise UsageError(f"--momentum and --nesterov belong to SGD; {given['optimizer']} uses its default betas")
    config = TrainConfig(**given)
    if config.weights and not os.path.exists(config.weights):
        raise UsageError(f"no such weights file: {config.weights}{_where_weights_come_from(config.weights)}")
    out, note = _run_folder(args, config)
    if note:
        print(note, flush=True)
    trainer = Trainer(config, out, progress=args.progress)
    trainer.command = shlex.join(["numres", *getattr(args, "argv", ["train"])])
    if args.overwrite:
        _set_aside_previous_run(trainer, out)
    return trainer


def _thread_count(requested: str):
    """``--threads`` as "auto" or a count >= 1 (checked before any data is loaded)."""
    if requested == "auto":
        return requested
    try:
        count = int(requested)
    except ValueError:
        raise UsageError(f"--threads must be a whole number or 'auto', got {requested!r}") from None
    if count < 1:
        raise UsageError(f"--threads must be at least 1, got {count}")
    return count


def _blas_threads(count, trainer):
    """A context setting NumPy's BLAS threads: the same with or without threadpoolctl (same numbers for a seed)."""
    if trainer.config.backend != "numpy":
        return contextlib.nullcontext()
    if count == "auto":
        images = getattr(trainer.train_loader.dataset, "images", None)       # folder datasets: none in memory
        small = images is not None and max(images.shape[2:]) <= 16
        return blas_threads(1) if small else contextlib.nullcontext()
    return blas_threads(count)


def _plural(count, word):
    return f"{count} {word}{'' if count == 1 else 's'}"


def _missing_extras(progress: bool) -> list:
    """One line for each optional package the run would use but cannot import."""
    missing = []
    if progress and importlib.util.find_spec("tqdm") is None:
        missing.append("tqdm (a progress bar)")
    if importlib.util.find_spec("matplotlib") is None:
        missing.append("matplotlib (curves.png)")
    if not missing:
        return []
    return [f"note: without {' and '.join(missing)}; pip install 'numres[train]' adds "
            f"{'them' if len(missing) > 1 else 'it'}"]


def _listing(names) -> str:
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def run(args) -> int:
    """One process, or one rank of ``mpiexec -n N``: a raising rank aborts the whole job with its message."""
    nproc = getattr(args, "nproc", None)
    if nproc is not None and nproc < 1:
        raise UsageError(f"--nproc must be at least 1, got {nproc}")
    if nproc is not None and nproc > 1 and dist.launched_world_size() == 1:
        return _launch(nproc)
    if dist.launched_world_size() == 1:
        return _run(args)
    dist.init()
    if dist.get_rank() == 0:
        print(f"data-parallel over {dist.get_world_size()} processes; rank 0 prints and writes", flush=True)
    try:
        with contextlib.redirect_stdout(sys.stdout if dist.get_rank() == 0 else open(os.devnull, "w")):
            return _run(args)
    except BaseException as exc:        # any failure on any rank must end every rank, never leave them waiting
        if isinstance(exc, SystemExit) and not exc.code:
            raise
        if os.environ.get("NUMRES_DEBUG"):
            traceback.print_exc()
        what = "" if isinstance(exc, user_errors()) else f"{type(exc).__name__}: "
        dist.abort(f"numres train: error: {what}{exc}")


def _launch(nproc) -> int:
    """``--nproc N`` from the command line: run this same command under ``mpiexec -n N``."""
    rest, skip, found = [], False, False
    for arg in sys.argv[1:]:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = found = True
        elif arg.startswith("--nproc="):
            found = True
        else:
            rest.append(arg)
    if not found or "train" not in rest:
        raise UsageError("--nproc works from the command line; from Python, start the job with mpiexec -n N")
    command = dist.mpiexec_command(nproc, rest)
    print(f"launching: {' '.join(command)}", flush=True)
    return subprocess.call(command)


def _run(args) -> int:
    count = _thread_count(args.threads)
    trainer = _trainer(args)
    threads = _blas_threads(count, trainer)
    c = trainer.config
    if trainer.epoch >= c.epochs:
        print(f"the run in {trainer.out_dir} has already finished its {_plural(c.epochs, 'epoch')}; nothing to do "
              f"(give --epochs N with N > {c.epochs} to train it longer)")
        return 0
    if c.backend == "numpy":
        warning = slow_blas_warning()
        if warning:
            print(warning, flush=True)
    count = sum(p.size for p in trainer.model.parameters())
    print(f"{c.model} ({count:,} parameters) on {c.dataset}: {len(trainer.train_loader.dataset)} train / "
          f"{len(trainer.test_loader.dataset)} test images, {_plural(c.epochs, 'epoch')} of {len(trainer.train_loader)} "
          f"batches of {c.batch_size}, {c.optimizer} lr {c.lr} ({c.schedule}"
          f"{f', warm-up {c.warmup_epochs}' if c.warmup_epochs else ''}), backend {c.backend}, {c.dtype}",
          flush=True)
    if trainer.start_note:
        print(trainer.start_note, flush=True)
    unreached = c.unreached_milestones()
    if unreached:
        why = ("they only apply to --schedule multistep" if c.schedule != "multistep" else
               f"the last epoch is {c.epochs}; they take effect only if the run is extended (--resume --epochs N)")
        print(f"note: milestone{'s' if len(unreached) > 1 else ''} {', '.join(map(str, unreached))} will not be "
              f"reached: {why}", flush=True)
    for line in _missing_extras(args.progress):
        print(line, flush=True)
    created = not os.path.exists(trainer.out_dir)
    try:
        with threads:
            status = trainer.fit()
    except NonFiniteLossError as exc:
        print(f"numres train: stopped: {exc}", file=sys.stderr)
        if created and os.path.isdir(trainer.out_dir) and not os.listdir(trainer.out_dir):
            os.rmdir(trainer.out_dir)          # leave nothing behind when nothing was written
        return 1
    except KeyboardInterrupt:
        print(f"\nnumres train: stopped at once; {trainer.checkpoint_path} holds the last completed epoch",
              file=sys.stderr)
        return 130
    if status == "interrupted":
        return 130
    final = trainer.history[-1] if trainer.history else None
    if final:
        total = sum(r["epoch_seconds"] for r in trainer.history)
        print(f"done: test accuracy {final['test_acc']:.4f} after {_plural(final['epoch'], 'epoch')} "
              f"({total:.0f}s training); {_listing(trainer.written_files())} in {trainer.out_dir}")
    return 0
