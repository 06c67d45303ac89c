"""Datasets and the data loader.

* ``load_dataset("digits", split)`` - the UCI handwritten digits embedded in numres
  (1,437 train / 360 test grey 8x8 images; see :mod:`numres.data.digits`).
* ``load_dataset("cifar10", split, data_dir)`` - CIFAR-10 from its python batch files
  (see :mod:`numres.data.cifar`).
* :class:`TensorDataset` - arrays sharing their first axis, indexed together (PyTorch's).
* :class:`DataLoader` - seeded shuffling, batching, augmentation and normalisation on
  the model's backend.
* :class:`ImageFolder` - a folder of images, one sub-folder per class (torchvision's layout),
  with torchvision's transforms in :mod:`numres.data.transforms`, and :class:`ImageLoader`,
  which decodes and augments them in worker processes (:mod:`numres.data.workers`).

``AUGMENTATION[name]`` is each dataset's default training augmentation: CIFAR-10 uses the
paper's random 32x32 crop from the image padded by 4 zero pixels, and random horizontal
flips.  The digits use a crop with 1 pixel of padding (shifts of at most one pixel, an
eighth of the image) and **no** flip: a mirrored 2, 3, 4, 5, 6, 7 or 9 is not that digit.
"""
from .cifar import CifarFormatError, load_cifar10
from .digits import load_digits
from . import transforms
from .imagefolder import IMG_EXTENSIONS, BadImageError, ImageFolder, make_shapes_folder
from .loader import DataLoader, ImageDataset
from .tensor_dataset import TensorDataset
from .workers import ImageLoader, LoaderWorkerError, WorkerDiedError
from .sampler import DistributedEvalSampler, DistributedSampler, RankBatches, local_part, shard

DATASETS = ("digits", "cifar10")
AUGMENTATION = {"digits": dict(crop_padding=1, flip=False), "cifar10": dict(crop_padding=4, flip=True)}


def load_dataset(name: str, split: str = "train", data_dir=None) -> ImageDataset:
    """One split of a named dataset as an :class:`ImageDataset` (uint8 images, int64 labels)."""
    if name == "digits":
        from .digits import CLASSES, MAX_VALUE
        images, labels = load_digits(split)
        return ImageDataset(images, labels, CLASSES, MAX_VALUE, "digits")
    if name == "cifar10":
        if data_dir is None:
            raise ValueError("CIFAR-10 needs a data directory holding its python batch files (--data-dir)")
        from .cifar import CLASSES, MAX_VALUE
        images, labels = load_cifar10(data_dir, split)
        return ImageDataset(images, labels, CLASSES, MAX_VALUE, "cifar10")
    raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")


def eval_resize(image_size: int) -> int:
    """The shorter side before the central crop: torchvision's 256 for a 224 crop, in proportion otherwise."""
    return int(round(image_size * 256 / 224))


def folder_datasets(data_dir, val_dir=None, val_fraction=0.2, seed=0, image_size=224, augment=True):
    """``(train, validation)`` :class:`ImageFolder` s of ``numres train --dataset folder``.

    The validation images come from ``val_dir`` (its classes must be the same), or else
    from a seeded split of ``data_dir`` keeping ``val_fraction`` of every class apart
    (:meth:`ImageFolder.split`).  The train images get the reference recipe's training
    transform at ``image_size`` (only resize + centre crop with ``augment=False``), the
    validation images its evaluation transform; both normalise with ImageNet's statistics.
    """
    if data_dir is None:
        raise ValueError("--dataset folder needs --data-dir: a folder with one sub-folder of images per class")
    train_transform = (transforms.train_transform(image_size) if augment else
                       transforms.eval_transform(eval_resize(image_size), image_size))
    eval_transform = transforms.eval_transform(eval_resize(image_size), image_size)
    everything = ImageFolder(data_dir)
    if val_dir is not None:
        validation = ImageFolder(val_dir, transform=eval_transform)
        if validation.classes != everything.classes:
            raise ValueError(f"the classes of {val_dir} ({', '.join(validation.classes)}) differ from those of "
                             f"{data_dir} ({', '.join(everything.classes)})")
        return everything.subset(range(len(everything)), train_transform), validation
    train_indices, val_indices = everything.split(val_fraction, seed)
    return everything.subset(train_indices, train_transform), everything.subset(val_indices, eval_transform)


__all__ = ["DATASETS", "AUGMENTATION", "load_dataset", "load_digits", "load_cifar10", "CifarFormatError",
           "DataLoader", "ImageDataset", "TensorDataset", "DistributedSampler",
           "DistributedEvalSampler", "shard", "RankBatches", "local_part",
           "transforms", "ImageFolder", "BadImageError", "IMG_EXTENSIONS", "make_shapes_folder", "folder_datasets",
           "eval_resize", "ImageLoader", "WorkerDiedError", "LoaderWorkerError"]
