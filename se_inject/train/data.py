"""Datasets for fine-tuning and inspection: an image folder, or the built-in ``digits``.

``digits`` is scikit-learn's bundled handwritten-digits set (1,797 8x8 images, 10 classes), upscaled
and repeated to 3 channels: real data that needs no download. An image folder is ``DATA/train`` and
``DATA/val``, each holding one folder per class; it is checked completely (every image decoded)
before training starts, so a bad file stops the run at once, with its path.

Images are normalised as the model expects: mean, standard deviation, input size, interpolation
and crop come from the model's own data config (timm's ``resolve_data_config``, which falls back
to ImageNet's values for a model that records none), see :func:`model_data_config`.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sized
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from se_inject.errors import ConfigError, DataError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp"}
DIGITS_SIZE = 32  # digits are 8x8: upscaled to a size small CNNs take, not to the model's 224
MAX_IMAGE_SIZE = 4096
BUILT_IN = ("digits", "textures")  # data that ships with se_inject, by name


@dataclass(frozen=True)
class DataConfig:
    """How images are prepared for a model (timm's data config fields that matter here)."""

    input_size: int = 224
    mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    std: tuple[float, ...] = (0.229, 0.224, 0.225)
    interpolation: str = "bilinear"
    crop_pct: float = 0.875


def model_data_config(model: nn.Module | None) -> DataConfig:
    """The model's own data config, through timm's ``resolve_data_config`` (ImageNet's for a plain model)."""
    if model is None:
        return DataConfig()
    from timm.data import resolve_data_config

    cfg: dict[str, Any] = resolve_data_config(model=model)
    size = cfg.get("input_size", (3, 224, 224))
    return DataConfig(
        input_size=int(size[-1]),
        mean=tuple(float(v) for v in cfg.get("mean", DataConfig.mean)),
        std=tuple(float(v) for v in cfg.get("std", DataConfig.std)),
        interpolation=str(cfg.get("interpolation", "bilinear")),
        crop_pct=float(cfg.get("crop_pct", 0.875) or 0.875),
    )


@dataclass
class DataSplits:
    """Training and validation sets with their class names."""

    train: Dataset
    val: Dataset
    classes: list[str]
    image_size: int
    normalization: tuple[tuple[float, ...], tuple[float, ...]] = field(default=((0.5,), (0.5,)))  # (mean, std)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def train_size(self) -> int:
        return _size(self.train, "train")

    @property
    def val_size(self) -> int:
        return _size(self.val, "val")

    def val_labels(self) -> list[int]:
        """The validation labels (from ``targets`` where the dataset keeps them, else read sample by sample)."""
        targets = getattr(self.val, "targets", None)
        if targets is not None:
            return [int(t) for t in targets]
        return [int(self.val[i][1]) for i in range(self.val_size)]


def _size(dataset: Dataset, split: str) -> int:
    if not isinstance(dataset, Sized):  # samplers and the progress bar need it
        raise DataError(f"data.{split}: {type(dataset).__name__} has no len(); give a map-style dataset")
    return len(dataset)


def check_image_size(image_size: object) -> int:
    if isinstance(image_size, bool) or not isinstance(image_size, int) or not 1 <= image_size <= MAX_IMAGE_SIZE:
        raise ConfigError(
            f"image_size: expected a whole number of pixels from 1 to {MAX_IMAGE_SIZE}, got {image_size!r}"
        )
    return image_size


def digits(
    image_size: int = DIGITS_SIZE, val_fraction: float = 0.2, seed: int = 0, config: DataConfig | None = None
) -> DataSplits:
    """scikit-learn's handwritten digits, upscaled to ``image_size``, split with a fixed seed and
    normalised with ``config``'s mean and std (a model's data config; default ImageNet's)."""
    check_image_size(image_size)
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise DataError("the digits dataset needs scikit-learn: pip install 'se-inject[digits]'") from None
    config = config or DataConfig()
    bunch = load_digits()
    images = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    images = torch.nn.functional.interpolate(
        images, size=(image_size, image_size), mode="bilinear", align_corners=False
    )
    images = images.repeat(1, len(config.mean), 1, 1)
    mean, std = torch.tensor(config.mean).view(1, -1, 1, 1), torch.tensor(config.std).view(1, -1, 1, 1)
    images = (images - mean) / std
    labels = torch.tensor(bunch.target, dtype=torch.long)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    n_val = int(len(labels) * val_fraction)
    val, train = order[:n_val], order[n_val:]
    return DataSplits(
        TensorDataset(images[train], labels[train]),
        TensorDataset(images[val], labels[val]),
        [str(c) for c in range(10)],
        image_size,
        (config.mean, config.std),
    )


TEXTURES_SIZE = 64  # large enough that the last stage of a ResNet still sees a 2x2 map
TEXTURE_CLASSES = tuple(f"{angle}deg-{period}px" for period in (4, 8) for angle in (0, 45, 90, 135))


def textures(
    image_size: int = TEXTURES_SIZE,
    train: int = 2000,
    val: int = 500,
    seed: int = 0,
    config: DataConfig | None = None,
) -> DataSplits:
    """A generated colour-texture task where the useful channel changes from image to image.

    Each image holds a grating in each colour channel: the class's (one of 4 orientations x 2 periods)
    at full contrast in one channel drawn per image, gratings of other classes at 80% contrast in the
    other two, and noise over all. Telling the class needs to know which channel carries the strongest
    grating: a decision across channels, made per image, which is what channel attention adds. Generated
    from ``seed`` (no download), normalised with ``config``'s mean and std.

    Examples:
        >>> splits = textures(image_size=16, train=8, val=4)
        >>> splits.num_classes, tuple(splits.train[0][0].shape)
        (8, (3, 16, 16))
    """
    check_image_size(image_size)
    for name, count in (("train", train), ("val", val)):
        if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= 100_000:
            raise ConfigError(f"{name}: expected a number of images from 1 to 100000, got {count!r}")
    config = config or DataConfig()
    if len(config.mean) != 3:
        raise ConfigError(
            f"textures are colour images: they need a model that takes 3 channels, not {len(config.mean)}"
        )
    generator = torch.Generator().manual_seed(seed)
    total, classes = train + val, len(TEXTURE_CLASSES)
    labels = torch.arange(total) % classes
    labels = labels[torch.randperm(total, generator=generator)]
    # per channel: a class (the label's in the signal channel, another class elsewhere) and a contrast
    signal = torch.randint(0, 3, (total,), generator=generator)
    other = (labels.view(-1, 1) + torch.randint(1, classes, (total, 3), generator=generator)) % classes
    channel_class = torch.where(torch.arange(3).view(1, 3) == signal.view(-1, 1), labels.view(-1, 1), other)
    contrast = torch.where(torch.arange(3).view(1, 3) == signal.view(-1, 1), 1.0, 0.8)
    angle = (channel_class % 4).float() * math.pi / 4
    period = torch.where(channel_class < 4, 4.0, 8.0)
    phase = torch.rand(total, 3, generator=generator) * 2 * math.pi
    coords = torch.arange(image_size, dtype=torch.float32)
    y, x = coords.view(1, 1, -1, 1), coords.view(1, 1, 1, -1)
    along = x * torch.cos(angle)[..., None, None] + y * torch.sin(angle)[..., None, None]
    wave = torch.sin(2 * math.pi * along / period[..., None, None] + phase[..., None, None])
    noise = 0.5 * torch.randn(total, 3, image_size, image_size, generator=generator)
    images = (0.5 + 0.25 * (contrast[..., None, None] * wave + noise)).clamp(0, 1)
    mean, std = torch.tensor(config.mean).view(1, -1, 1, 1), torch.tensor(config.std).view(1, -1, 1, 1)
    images = (images - mean) / std
    return DataSplits(
        TensorDataset(images[:train], labels[:train]),
        TensorDataset(images[train:], labels[train:]),
        list(TEXTURE_CLASSES),
        image_size,
        (config.mean, config.std),
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
                    image.load()  # decodes every pixel: a truncated file fails here, not mid-training
            except Exception as err:
                raise DataError(f"{path}: unreadable image ({type(err).__name__}: {err})") from None
    return classes


def check_image_folder(root: str | Path) -> list[str]:
    """Check ``root/train`` and ``root/val`` completely (every image decoded); their class names."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: no such data directory (give an image folder with train/ and val/, or 'digits')")
    for split in ("train", "val"):
        if not (root / split).is_dir():
            raise DataError(f"{root / split}: missing; an image-folder dataset needs {root}/train and {root}/val")
    train_classes, val_classes = _check_split(root, "train"), _check_split(root, "val")
    if train_classes != val_classes:
        raise DataError(f"{root}: train/ and val/ hold different class folders ({train_classes} vs {val_classes})")
    return train_classes


def image_folder(
    root: str | Path, image_size: int | None = None, config: DataConfig | None = None, *, check: bool = True
) -> DataSplits:
    """``root/train`` and ``root/val`` as torchvision ImageFolders, checked before use (``check``),
    prepared as ``config`` says (size, interpolation, crop, mean, std)."""
    from torchvision import datasets, transforms
    from torchvision.transforms import InterpolationMode

    config = config or DataConfig()
    size = check_image_size(image_size or config.input_size)
    root = Path(root)
    classes = check_image_folder(root) if check else sorted(p.name for p in (root / "train").iterdir() if p.is_dir())
    try:
        interpolation = InterpolationMode(config.interpolation)
    except ValueError:
        interpolation = InterpolationMode.BILINEAR
    normalize = transforms.Normalize(config.mean, config.std)
    train_tf = transforms.Compose(
        [
            transforms.RandomResizedCrop(size, scale=(0.5, 1.0), interpolation=interpolation),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            normalize,
        ]
    )
    val_tf = transforms.Compose(
        [
            transforms.Resize(int(size / config.crop_pct), interpolation=interpolation),
            transforms.CenterCrop(size),
            transforms.ToTensor(),
            normalize,
        ]
    )
    rgb = lambda path: _open_rgb(path)  # noqa: E731 - grayscale and RGBA files become RGB
    return DataSplits(
        datasets.ImageFolder(root / "train", train_tf, loader=rgb),
        datasets.ImageFolder(root / "val", val_tf, loader=rgb),
        classes,
        size,
        (config.mean, config.std),
    )


def _open_rgb(path: str):
    from PIL import Image

    with Image.open(path) as image:
        return image.convert("RGB")


def data_classes(spec: str | Path) -> list[str]:
    """The class names of a dataset, after checking it completely (nothing is loaded for training)."""
    if str(spec) in BUILT_IN:
        return [str(c) for c in range(10)] if str(spec) == "digits" else list(TEXTURE_CLASSES)
    return check_image_folder(spec)


def load_data(
    spec: str | Path, image_size: int | None = None, config: DataConfig | None = None, *, check: bool = True
) -> DataSplits:
    """``"digits"`` (default size 32), ``"textures"`` (default size 64) or an image-folder path (default
    size: ``config``'s, else 224).

    ``config`` is the model's data config (:func:`model_data_config`); without one, ImageNet's.
    """
    if image_size is not None:
        check_image_size(image_size)
    if str(spec) == "digits":
        return digits(image_size or DIGITS_SIZE, config=config)
    if str(spec) == "textures":
        return textures(image_size or TEXTURES_SIZE, config=config)
    return image_folder(spec, image_size, config, check=check)


class SeededSamples(Dataset):
    """``dataset`` with sample ``i`` of ``epoch`` drawn under torch's and Python's RNGs seeded from
    ``(seed, epoch, i)``: a random augmentation then depends on nothing else, not on what a model drew
    from the RNGs before (dropout, a unit's initialisation) nor on which worker process loads it, so
    every arm of an experiment sees the same augmented images for a seed. The RNG states around the
    call are restored."""

    def __init__(self, dataset: Dataset, seed: int, epoch: int) -> None:
        self.dataset, self.seed, self.epoch = dataset, seed, epoch

    def __len__(self) -> int:
        return _size(self.dataset, "train")

    def __getitem__(self, index: int) -> Any:
        sample_seed = ((self.seed * 1_000_003 + self.epoch) * 1_000_003 + index) % 2**63
        python_state = random.getstate()
        with torch.random.fork_rng(devices=[]):
            # the CPU generator alone, the one fork_rng restores: torch.manual_seed would also queue a seed
            # for every lazily initialised accelerator with the Python stack formatted (about 0.5 ms a sample)
            torch.default_generator.manual_seed(sample_seed)
            random.seed(sample_seed)
            try:
                return self.dataset[index]
            finally:
                random.setstate(python_state)
