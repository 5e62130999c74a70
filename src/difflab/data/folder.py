"""Images from a folder (class sub-folders optional, caption side-car .txt files) and Hugging Face
datasets loaded from local files."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

EXTENSIONS = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}


def to_tensor(image: Image.Image, resolution: int | None, channels: int = 3) -> torch.Tensor:
    """PIL image -> (C, H, W) in [-1, 1] with 1 (grey), 3 (RGB) or 4 (RGBA) channels, center-cropped
    and resized to ``resolution``."""
    modes = {1: "L", 3: "RGB", 4: "RGBA"}
    if channels not in modes:
        raise ValueError(f"images are read with 1, 3 or 4 channels, not {channels}")
    image = image.convert(modes[channels])
    if resolution is not None:
        w, h = image.size
        side = min(w, h)
        image = image.crop(((w - side) // 2, (h - side) // 2, (w + side) // 2, (h + side) // 2))
        image = image.resize((resolution, resolution), Image.BICUBIC)
    arr = np.asarray(image, dtype=np.float32) / 127.5 - 1
    return torch.from_numpy(arr if arr.ndim == 3 else arr[..., None]).permute(2, 0, 1).contiguous()


def read_images(paths: list[str], channels: int, what: str = "image") -> torch.Tensor:
    """Image files as one (N, channels, H, W) batch in [-1, 1] at their own size (all one size)."""
    tensors = []
    for path in paths:
        if not Path(path).is_file():
            raise FileNotFoundError(f"no {what} file at {path}")
        with Image.open(path) as im:
            tensors.append(to_tensor(im, None, channels))
    sizes = {tuple(t.shape) for t in tensors}
    if len(sizes) > 1:
        raise ValueError(f"the {what}s have different sizes {sorted(sizes)}; give images of one size")
    return torch.stack(tensors)


def read_masks(paths: list[str]) -> torch.Tensor:
    """Mask files as (N, 1, H, W) in [0, 1]: white (1) repaints, black (0) keeps."""
    return (read_images(paths, 1, "mask") + 1) / 2


class ImageFolder(Dataset):
    """All images under ``root``. Images in sub-folders get the sub-folder as class label (sorted
    names); ``name.txt`` beside ``name.png`` is its caption."""

    def __init__(self, root: str | os.PathLike, resolution: int | None = 32, channels: int = 3):
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder {self.root} does not exist")
        self.files = sorted(p for p in self.root.rglob("*") if p.suffix.lower() in EXTENSIONS)
        if not self.files:
            raise ValueError(f"no images ({', '.join(sorted(EXTENSIONS))}) found under {self.root}")
        classes = sorted({p.parent.name for p in self.files if p.parent != self.root})
        self.classes = classes
        self.num_classes = len(classes) or None
        self.resolution, self.channels = resolution, channels

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> dict:
        path = self.files[i]
        try:
            with Image.open(path) as im:
                x = to_tensor(im, self.resolution, self.channels)
        except OSError as err:
            raise ValueError(f"cannot read image {path}: {err}") from err
        item: dict = {"x": x}
        if path.parent != self.root and self.classes:
            item["label"] = self.classes.index(path.parent.name)
        caption_file = path.with_suffix(".txt")
        if caption_file.is_file():
            item["caption"] = caption_file.read_text().strip()
        return item


def hf_dataset(path: str | os.PathLike, split: str = "train", image_column: str = "image",
               caption_column: str | None = None, resolution: int | None = 32) -> Dataset:
    """A Hugging Face dataset saved on disk (``save_to_disk``) or an ``imagefolder`` directory, as
    difflab items. Needs the optional ``datasets`` package; never touches the network."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    try:
        import datasets
    except ImportError as err:
        raise ImportError("loading Hugging Face datasets needs the 'datasets' package: "
                          "pip install 'difflab[hf]'") from err
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no dataset at {path}")
    if (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists():
        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            ds = ds[split]
    else:
        ds = datasets.load_dataset("imagefolder", data_dir=str(path), split=split)

    missing = [c for c in (image_column, caption_column) if c and c not in ds.column_names]
    if missing:
        raise ValueError(f"the dataset at {path} has no column(s) {', '.join(missing)}; its columns: "
                         f"{', '.join(ds.column_names)}")
    label_feature = ds.features.get("label")

    class _Wrapped(Dataset):
        num_classes = getattr(label_feature, "num_classes", None)

        def __len__(self) -> int:
            return len(ds)

        def __getitem__(self, i: int) -> dict:
            row = ds[i]
            item = {"x": to_tensor(row[image_column], resolution)}
            if caption_column:
                item["caption"] = row[caption_column]
            if "label" in row:
                item["label"] = int(row["label"])
            return item

    return _Wrapped()
