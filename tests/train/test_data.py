import pytest
import torch
from PIL import Image

import se_inject
from se_inject.errors import DataError
from se_inject.train.data import digits, load_data


def test_digits_is_real_data_without_a_download():
    splits = digits(image_size=32)
    assert splits.classes == [str(i) for i in range(10)] and splits.num_classes == 10
    assert len(splits.train) + len(splits.val) == 1797 and len(splits.val) == 359
    image, label = splits.train[0]
    assert image.shape == (3, 32, 32) and 0 <= label < 10
    # normalised with ImageNet's mean and std by default: pixel values 0..1 map to (0 - mean) / std .. (1 - mean) / std
    low, high = (0 - 0.485) / 0.229, (1 - 0.406) / 0.225
    assert low - 1e-5 <= image.min() and image.max() <= high + 1e-5
    again = digits(image_size=32)
    assert torch.equal(splits.val.tensors[1], again.val.tensors[1])  # the split is fixed by the seed


def test_normalisation_and_size_come_from_the_models_data_config():
    from se_inject.train.data import model_data_config

    model = se_inject.load_model("inception_v3", device="meta")  # timm records 299, bicubic, mean/std 0.5
    config = model_data_config(model)
    assert config.input_size == 299 and config.mean == (0.5, 0.5, 0.5) and config.interpolation == "bicubic"
    splits = digits(image_size=16, config=config)
    assert splits.normalization == ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    assert splits.train[0][0].min() >= -1.0 - 1e-6 and splits.train[0][0].max() <= 1.0 + 1e-6


def _folder(root, classes=("cat", "dog"), per_class=2, size=40):
    for split in ("train", "val"):
        for name in classes:
            (root / split / name).mkdir(parents=True)
            for i in range(per_class):
                Image.new("RGB" if i % 2 == 0 else "L", (size, size), color=40 * i).save(
                    root / split / name / f"{i}.png"
                )
    return root


def test_image_folder(tmp_path):
    splits = load_data(_folder(tmp_path / "data"), image_size=32)
    assert splits.classes == ["cat", "dog"]
    image, label = splits.val[1]
    assert image.shape == (3, 32, 32) and label == 0  # grayscale files become RGB


@pytest.mark.parametrize(
    "breakage, message",
    [
        (lambda root: None, "no such data directory"),
        (lambda root: (root / "train").mkdir(parents=True), "val: missing"),
        (lambda root: [(root / s).mkdir(parents=True) for s in ("train", "val")], "train: no class folders"),
        (lambda root: [(root / s / "cat").mkdir(parents=True) for s in ("train", "val")], "train/cat: no images"),
    ],
)
def test_bad_data_directories(tmp_path, breakage, message):
    root = tmp_path / "data"
    breakage(root)
    with pytest.raises(DataError, match=message):
        load_data(root)


def test_unreadable_images_and_mismatched_classes(tmp_path):
    root = _folder(tmp_path / "a")
    (root / "train" / "cat" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match=r"train/cat/broken.png: unreadable image"):
        load_data(root)
    other = _folder(tmp_path / "b")
    (other / "val" / "dog").rename(other / "val" / "bird")
    with pytest.raises(DataError, match="train/ and val/ hold different class folders"):
        load_data(other)


def test_splits_need_sized_datasets_and_read_labels_either_way():
    from torch.utils.data import Dataset, IterableDataset, TensorDataset

    from se_inject.train.data import DataSplits

    class Stream(IterableDataset):
        def __iter__(self):
            yield torch.zeros(1, 4, 4), 0

    class NoTargets(Dataset):  # labels only through __getitem__
        def __len__(self):
            return 3

        def __getitem__(self, i):
            return torch.zeros(1, 4, 4), i % 2

    data = TensorDataset(torch.zeros(4, 1, 4, 4), torch.tensor([0, 1, 1, 0]))
    splits = DataSplits(data, NoTargets(), ["a", "b"], 4)
    assert (splits.train_size, splits.val_size, splits.val_labels()) == (4, 3, [0, 1, 0])
    with pytest.raises(DataError, match=r"data.train: Stream has no len\(\)"):
        _ = DataSplits(Stream(), data, ["a", "b"], 4).train_size


def test_textures_are_generated_and_the_useful_channel_changes_per_image():
    """The same seed gives the same images; each image's class grating is in one channel (the one whose
    grating is strongest), and that channel is not the same for every image of a class."""
    from se_inject.train.data import DataConfig, data_classes, textures

    plain = DataConfig(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    splits = textures(image_size=32, train=64, val=16, config=plain)
    again = textures(image_size=32, train=64, val=16, config=plain)
    assert torch.equal(splits.train.tensors[0], again.train.tensors[0])
    assert not torch.equal(splits.train.tensors[0], textures(32, 64, 16, seed=1, config=plain).train.tensors[0])
    assert splits.num_classes == 8 and data_classes("textures") == splits.classes
    images, labels = splits.train.tensors
    assert images.shape == (64, 3, 32, 32) and 0 <= images.min() and images.max() <= 1
    # the channel with the most contrast carries the class: per image, and it differs between images
    strongest = images.flatten(2).std(dim=2).argmax(dim=1)
    assert len(set(strongest.tolist())) == 3
    for label in range(8):
        assert len(set(strongest[labels == label].tolist())) > 1
    assert load_data("textures", image_size=16).image_size == 16


@pytest.mark.parametrize(
    "kwargs, field", [({"train": 0}, "train"), ({"val": 10**6}, "val"), ({"image_size": 0}, "image_size")]
)
def test_textures_refuse_bad_sizes_naming_the_field(kwargs, field):
    from se_inject.errors import ConfigError
    from se_inject.train.data import textures

    with pytest.raises(ConfigError, match=f"^{field}:"):
        textures(**kwargs)
