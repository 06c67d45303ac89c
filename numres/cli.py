"""The ``numres`` command (also ``python -m numres``).

Each sub-command lives in its own module, which provides ``add_arguments(parser)``
and ``run(args) -> int``; this file only maps names to modules, importing a module
when its command is used (so ``numres --help`` stays fast).
"""
from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = {
    "demo": ("numres.demo", "forward and backward of a ResNet, plus a finite-difference gradient check"),
    "train": ("numres.train", "train a ResNet on the embedded digits or on CIFAR-10"),
    "evaluate": ("numres.evaluate", "accuracy and confusion matrix of a checkpoint on a dataset split"),
    "predict": ("numres.predict", "top-5 ImageNet classes of images, with torchvision weights"),
    "summary": ("numres.summary", "per-layer table of output shapes, parameters and multiply-accumulates"),
    "study": ("numres.study", "experiments on gradient flow and degradation (gradflow, degradation)"),
}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="numres", description="ResNets from scratch on NumPy/CuPy.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    chosen = argv[0] if argv else None
    for name, (module_name, help_text) in COMMANDS.items():
        command = sub.add_parser(name, help=help_text, description=help_text)
        command.set_defaults(_module=module_name)
        if name == chosen:
            importlib.import_module(module_name).add_arguments(command)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    from .allocator import retain_freed_memory
    retain_freed_memory()       # a command owns its process: reuse freed activation memory
    return int(importlib.import_module(args._module).run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
