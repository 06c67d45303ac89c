"""Classify image files with a trained model: the model, its preprocessing and its class names.

:func:`load_classifier` accepts the three kinds of weights people have:

* a **numres training checkpoint** (``checkpoint.npz`` written by ``numres train``, or its run
  folder).  It carries the model's name, the dataset, the normalisation and the class names,
  so nothing else is needed: images are converted to the dataset's channels and size and
  normalised with the training split's mean and std;
* a **torchvision** ``.pth`` file, or a numres ``.npz`` of a state dict.  The architecture
  is read from the file's keys and shapes (:mod:`numres.models.identify`), the images get
  torchvision's ImageNet evaluation preprocessing (:mod:`numres.imagenet`), and a
  1000-class model gets the ImageNet class names.

Decoding images needs Pillow (``pip install 'numres[image]'``).
"""
from __future__ import annotations

import os
from typing import Callable, NamedTuple

import numpy as np

from . import imagenet, models
from .backend import to_numpy
from .data import eval_resize, transforms
from .io import load, load_weights
from .models.identify import check_weights_fit, identify
from .nn import no_grad
from .training import CHECKPOINT_FORMAT, build_model, check_checkpoint, checkpoint_file

# The image each built-in dataset's models read: (channels, height, width).
DATASET_INPUTS = {"digits": (1, 8, 8), "cifar10": (3, 32, 32)}


class Classifier(NamedTuple):
    model: object                       # in eval mode
    classes: list                       # a name for every output
    preprocess: Callable                # image path -> (C, H, W) float array for the model
    description: str                    # what was loaded, for the user


def _is_training_checkpoint(path) -> bool:
    if os.path.isdir(path):
        return True
    if not path.endswith(".npz"):
        return False
    state = load(path)
    return isinstance(state, dict) and state.get("format") == CHECKPOINT_FORMAT


def load_model(path, backend: str = "numpy", dtype: str | None = None):
    """The model of a numres run folder or training checkpoint, a numres ``.npz`` state dict or a torchvision
    ``.pth``, rebuilt with its weights and in eval mode.

    A training checkpoint names its architecture, classes and input channels; for a bare state dict they
    are recognised from its keys and shapes (:func:`numres.models.identify.identify`).  ``dtype``: the
    run's (float32 for a state dict) unless given.

        model = nr.load_model("runs/digits-resnet20")          # resnet20, 10 classes, 1 input channel
        model = nr.load_model("resnet50-0676ba61.pth")         # torchvision's ResNet-50
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no such run folder or weights file: {path}")
    if _is_training_checkpoint(path):
        path = checkpoint_file(path)
        state = load(path)
        check_checkpoint(state, path)
        config = state["config"]
        channels = int(np.shape(state["model"]["conv1.weight"])[1])
        model, _ = build_model(config["model"], len(state["classes"]), channels, backend, dtype or config["dtype"])
        model.load_state_dict(state["model"])
        return model.eval()
    state = load_weights(path)
    found = identify(state)
    if found.name is None:
        raise ValueError(f"{path} holds {found.description}, which no numres builder makes")
    return getattr(models, found.name)(weights=path, backend=backend, dtype=dtype or "float32").eval()


def load_classifier(weights, model_name: str | None = None, backend: str = "numpy") -> Classifier:
    """A :class:`Classifier` for ``weights`` (see the module docstring); ``model_name`` is optional and checked."""
    weights = os.fspath(weights)
    if not os.path.exists(weights):
        raise FileNotFoundError(f"no such weights file: {weights}")
    if _is_training_checkpoint(weights):
        return _from_training_checkpoint(weights, model_name, backend)
    return _from_state_dict(weights, model_name, backend)


def _from_training_checkpoint(path, model_name, backend) -> Classifier:
    path = checkpoint_file(path)
    state = load(path)
    check_checkpoint(state, path)
    config = state["config"]
    if model_name is not None and model_name != config["model"]:
        raise ValueError(f"{path} holds a {config['model']} trained on {config['dataset']}; "
                         f"leave out --model (a numres checkpoint names its model) or use --model {config['model']}")
    shape = tuple(state["input_shape"]) if "input_shape" in state else DATASET_INPUTS.get(config["dataset"])
    if shape is None:
        raise ValueError(f"{path}: cannot tell the input size of dataset {config['dataset']!r}")
    classes = [str(c) for c in state["classes"]]
    model, channels = build_model(config["model"], len(classes), shape[0], backend, config["dtype"])
    model.load_state_dict(state["model"])
    model.eval()
    mean, std = np.asarray(state["mean"], np.float64), np.asarray(state["std"], np.float64)
    if config["dataset"] == "folder":       # the run's own evaluation transform: resize, central crop, normalise
        transform = transforms.eval_transform(eval_resize(shape[2]), shape[2], mean, std)
    else:                                   # the whole image at the dataset's size, normalised in float64
        transform = transforms.Compose([transforms.Resize((shape[1], shape[2]), draft=False),
                                        transforms.ToArray("float64"), transforms.Normalize(mean, std)])
    mode = "L" if shape[0] == 1 else "RGB"

    def preprocess(image_path):
        with _open_image(image_path) as image:
            x = transform(image.convert(mode))
        if channels != x.shape[0]:
            x = np.broadcast_to(x, (channels,) + x.shape[1:])
        return np.ascontiguousarray(x, dtype=model.dtype)

    described = (f"{config['model']} trained on {config['dataset']} for {_epochs(int(state['epoch']))} "
                 f"({path}); images resized to {shape[2]}x{shape[1]}"
                 f"{', grey' if shape[0] == 1 else ''}")
    if config["dataset"] == "folder":
        described = described.replace("resized to", f"resized (shorter side {eval_resize(shape[2])}) and "
                                                    f"centre-cropped to")
    return Classifier(model, classes, preprocess, described)


def _from_state_dict(path, model_name, backend) -> Classifier:
    state = load_weights(path)
    found = identify(state)
    if model_name is None:
        if found.name is None:
            raise ValueError(f"{path} holds {found.description}, which no numres builder makes")
        model_name = found.name
    builder = getattr(models, model_name, None) if model_name[:1].islower() else None
    if builder is None or model_name in models.CIFAR_MODELS:
        known = ", ".join(n for n in models.__all__ if n[:1].islower() and n not in models.CIFAR_MODELS)
        if builder is None:
            raise ValueError(f"unknown model {model_name!r}; choose one of {known}")
        check_weights_fit(state, model_name)
        raise ValueError(f"{path} is a bare state dict of a CIFAR net, which carries no preprocessing or class "
                         f"names; predict with the checkpoint.npz (or run folder) that `numres train` wrote")
    check_weights_fit(state, model_name)
    model = builder(weights=path, backend=backend).eval()
    num_classes = found.num_classes
    classes = list(imagenet.class_names()) if num_classes == 1000 else [f"class {i}" for i in range(num_classes)]
    described = f"{model_name} ({found.parameters:,} parameters) from {path}; ImageNet preprocessing (resize 256, centre crop 224)"
    return Classifier(model, classes, lambda image_path: imagenet.load_image(image_path), described)


def _epochs(count: int) -> str:
    return f"{count} epoch{'' if count == 1 else 's'}"


def _open_image(path):
    """The Pillow image at ``path``, opened (FileNotFoundError, or ValueError when Pillow cannot read it)."""
    Image = imagenet._pillow()
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no such image: {path}")
    try:
        return Image.open(path)
    except Image.UnidentifiedImageError as exc:
        raise ValueError(f"{path} is not an image Pillow can read") from exc


def classify(classifier: Classifier, image_paths, top: int = 5) -> list:
    """For each image: ``[(class_name, class_index, probability), ...]``, the ``top`` most likely first."""
    model = classifier.model
    results = []
    with no_grad():
        for path in image_paths:
            x = model.xp.asarray(classifier.preprocess(path)[None], dtype=model.dtype)
            (ranking,) = imagenet.top_k(to_numpy(model(x)), top)
            results.append([(classifier.classes[index], index, probability) for index, probability in ranking])
    return results
