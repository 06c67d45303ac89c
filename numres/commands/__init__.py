"""The ``numres`` command (also ``python -m numres``): argument parsing and printing, nothing else.

Each sub-command lives in a module of this package that provides ``add_arguments(parser)``
and ``run(args) -> int``; the work itself is done by numres's library modules
(:mod:`numres.training`, :mod:`numres.inference`, :mod:`numres.summary`, :mod:`numres.study`).
A module is imported only when its command is used, so ``numres --help`` stays fast.

A user error (a missing file, an unknown model, a bad value, a GPU backend without a GPU)
ends in one line on stderr, ``numres COMMAND: error: ...``, and exit status 2, as argparse's
own errors do.  ``NUMRES_DEBUG=1`` shows the traceback instead.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

COMMANDS = {
    "train": "train a ResNet on the embedded digits, CIFAR-10 or a folder of images",
    "evaluate": "accuracy and confusion matrix of a checkpoint on a dataset split",
    "predict": "top-5 classes of images, with a numres checkpoint or torchvision weights",
    "summary": "per-layer table of output shapes, parameters and multiply-accumulates",
    "study": "experiments on gradient flow and degradation (gradflow, degradation)",
    "demo": "forward and backward of a ResNet, plus a finite-difference gradient check",
}


class UsageError(Exception):
    """A mistake in what the user asked for: reported in one line, exit status 2."""


def first_free_folder(base: str, occupied) -> str:
    """``base``, or the first of ``base-2``, ``base-3``, ... for which ``occupied(folder)`` is False: where a
    new run or study goes when the user named no folder, so that nothing earlier is replaced."""
    folder, number = base, 2
    while occupied(folder):
        folder, number = f"{base}-{number}", number + 1
    return folder


def user_errors() -> tuple:
    """The exception types that mean "the user asked for something that cannot be done here".

    ImportError is among them because numres raises it only for a missing optional package,
    with the command that installs it.
    """
    from ..backend import BackendUnavailableError
    from ..nn import StateDictError
    return (UsageError, ValueError, ImportError, FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError,
            BackendUnavailableError, StateDictError)


def version() -> str:
    from .. import __version__
    return __version__


class OneLineParser(argparse.ArgumentParser):
    """argparse, except that a mistyped option ends in one line naming it (and where the help is),
    not in the whole usage text first: ``numres train: error: argument --epochs: invalid int value: 'abc'
    (numres train --help lists the options)``."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} ({self.prog} --help lists the options)\n")


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = OneLineParser(prog="numres", description="ResNets from scratch on NumPy/CuPy.")
    parser.add_argument("--version", action="version", version=f"numres {version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=OneLineParser)
    chosen = next((arg for arg in argv if not arg.startswith("-")), None)
    for name, help_text in COMMANDS.items():
        command = sub.add_parser(name, help=help_text, description=help_text)
        if name == chosen:
            importlib.import_module(f"{__name__}.{name}").add_arguments(command)
    args = parser.parse_args(argv)
    args.argv = argv            # the command line, stored with a training run
    if args.command is None:
        parser.print_help()
        return 2
    from ..allocator import retain_freed_memory
    retain_freed_memory()       # a command owns its process: reuse freed activation memory
    module = importlib.import_module(f"{__name__}.{args.command}")
    try:
        _check_backend(args)
        return int(module.run(args) or 0)
    except BrokenPipeError:             # the reader went away (`numres evaluate ... | head -1`): stop quietly
        _silence_stdout()
        return 141                      # 128 + SIGPIPE, the status a shell reports for other tools
    except user_errors() as exc:
        if os.environ.get("NUMRES_DEBUG"):
            raise
        print(f"numres {args.command}: error: {exc}", file=sys.stderr)
        return 2


def _silence_stdout():
    """Point stdout at /dev/null, so the interpreter's final flush into the closed pipe cannot complain."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):      # stdout is not a real file (captured by a test)
        pass


def _check_backend(args):
    """``--backend`` checked before any work, the error naming the option."""
    value = getattr(args, "backend", None)
    if value is None:
        return
    from ..backend import normalize_backend
    try:
        normalize_backend(value)
    except ValueError as exc:
        raise UsageError(f"--backend {value}: {exc}") from None
