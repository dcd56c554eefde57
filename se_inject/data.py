"""Datasets for fine-tuning and inspection: an image folder, or the built-in ``digits``.

``digits`` is scikit-learn's bundled handwritten-digits set (1,797 8x8 images, 10 classes), upscaled
and repeated to 3 channels: real data that needs no download. An image folder is ``DATA/train`` and
``DATA/val``, each holding one folder per class; it is checked completely (every image opened)
before training starts, so a bad file stops the run at once, with its path.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset, TensorDataset

from se_inject.errors import DataError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp"}
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@dataclass
class DataSplits:
    """Training and validation sets with their class names."""

    train: Dataset
    val: Dataset
    classes: list[str]
    image_size: int

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def digits(image_size: int = 32, val_fraction: float = 0.2, seed: int = 0) -> DataSplits:
    """scikit-learn's handwritten digits, upscaled to ``image_size``, split with a fixed seed."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:  # pragma: no cover - scikit-learn is a dependency
        raise DataError("the digits dataset needs scikit-learn: pip install scikit-learn") from None
    bunch = load_digits()
    images = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    images = torch.nn.functional.interpolate(images, size=(image_size, image_size), mode="bilinear", align_corners=False)
    images = (images.repeat(1, 3, 1, 1) - 0.5) / 0.5
    labels = torch.tensor(bunch.target, dtype=torch.long)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    n_val = int(len(labels) * val_fraction)
    val, train = order[:n_val], order[n_val:]
    return DataSplits(
        TensorDataset(images[train], labels[train]),
        TensorDataset(images[val], labels[val]),
        [str(c) for c in range(10)],
        image_size,
    )


def _check_split(root: Path, split: str) -> list[str]:
    folder = root / split
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir())
    if not classes:
        raise DataError(f"{folder}: no class folders; put the images of each class in {folder}/CLASS_NAME/")
    from PIL import Image

    for name in classes:
        files = [p for p in (folder / name).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES]
        if not files:
            raise DataError(f"{folder / name}: no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
        for path in files:
            try:
                with Image.open(path) as image:
                    image.verify()
            except Exception as err:
                raise DataError(f"{path}: unreadable image ({type(err).__name__}: {err})") from None
    return classes


def image_folder(root: str | Path, image_size: int = 224) -> DataSplits:
    """``root/train`` and ``root/val`` as torchvision ImageFolders, checked before use."""
    from torchvision import datasets, transforms

    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: no such data directory (give an image folder with train/ and val/, or 'digits')")
    for split in ("train", "val"):
        if not (root / split).is_dir():
            raise DataError(f"{root / split}: missing; an image-folder dataset needs {root}/train and {root}/val")
    train_classes, val_classes = _check_split(root, "train"), _check_split(root, "val")
    if train_classes != val_classes:
        raise DataError(f"{root}: train/ and val/ hold different class folders ({train_classes} vs {val_classes})")
    normalize = transforms.Normalize(MEAN, STD)
    train_tf = transforms.Compose([
        transforms.RandomResizedCrop(image_size, scale=(0.5, 1.0)), transforms.RandomHorizontalFlip(),
        transforms.ToTensor(), normalize,
    ])
    val_tf = transforms.Compose([
        transforms.Resize(int(image_size * 1.14)), transforms.CenterCrop(image_size), transforms.ToTensor(), normalize,
    ])
    rgb = lambda path: _open_rgb(path)  # noqa: E731 - grayscale and RGBA files become RGB
    return DataSplits(
        datasets.ImageFolder(root / "train", train_tf, loader=rgb),
        datasets.ImageFolder(root / "val", val_tf, loader=rgb),
        train_classes,
        image_size,
    )


def _open_rgb(path: str):
    from PIL import Image

    with Image.open(path) as image:
        return image.convert("RGB")


def load_data(spec: str | Path, image_size: int | None = None) -> DataSplits:
    """``"digits"`` (default size 32) or an image-folder path (default size 224)."""
    if str(spec) == "digits":
        return digits(image_size or 32)
    return image_folder(spec, image_size or 224)
