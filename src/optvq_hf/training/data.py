"""Image data for OptVQ training and evaluation, through `datasets` only.

This is the one dataset-loading path of the project: `examples/run_train.py` and `examples/run_eval.py` both load
their data with [`load_image_dataset`] (Hub id, local folder of data files, `save_to_disk` folder, single file,
`imagefolder`, streaming), find the image column with [`find_image_column`], and decode with [`ImagePreprocessor`],
which skips and counts unreadable images instead of failing.

For training, two paths share one decoding function:

* cached (default for map-style datasets): every image is decoded, converted to the model's channels and resized
  (shortest edge = resolution) once with `datasets.map`, stored as raw uint8 bytes, and, when all images have one
  shape and fit in memory, loaded into a single uint8 tensor; the training loop then only indexes, crops and flips
  tensors (no PIL work per step);
* on the fly (`--streaming`, or caching disabled for large datasets): images are decoded and resized per sample in
  the DataLoader workers.

Unreadable or corrupt images are skipped and counted, never fatal. Random crops and flips are applied per batch in
the training loop with a generator seeded by the step, so that a resumed run sees the same augmentations.
"""

from __future__ import annotations

import hashlib
import io
import os
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

__all__ = [
    "load_image_dataset",
    "find_image_column",
    "split_train_and_eval",
    "decode_images",
    "decode_image_column",
    "iter_image_batches",
    "build_image_dataset",
    "augmentation_generator",
    "decode_image",
    "ImagePreprocessor",
    "cache_preprocessed",
    "CachedImageDataset",
    "InMemoryImageDataset",
    "OnTheFlyImageDataset",
    "StreamingImageDataset",
    "collate_images",
    "augment_batch",
    "to_pixel_values",
    "build_demo_dataset",
    "DEMO_PHOTOS",
]

IMAGE_COLUMN_CANDIDATES = ("image", "img", "jpg", "jpeg", "png", "webp", "pixel_values", "picture", "photo")
# scikit-image photos bundled with the package (no download needed).
DEMO_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry", "retina",
               "colorwheel", "camera", "coins", "moon", "grass", "gravel", "brick", "clock", "page", "text")


# ----------------------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------------------
def load_image_dataset(dataset_name: str | None = None, dataset_config_name: str | None = None,
                       train_data_dir: str | None = None, streaming: bool = False, cache_dir: str | None = None,
                       trust_remote_code: bool | None = None, token: str | None = None, split: str | None = None):
    """Load a `datasets.DatasetDict` (or `IterableDatasetDict` when streaming), or one of its splits.

    Args:
        dataset_name (`str`, *optional*): a Hub id (`"ILSVRC/imagenet-1k"`, `"ylecun/mnist"`), a local folder of
            data files (parquet, arrow, images, ...), a folder written by `Dataset.save_to_disk`, or a single file.
        dataset_config_name (`str`, *optional*): the dataset's configuration.
        train_data_dir (`str`, *optional*): a folder of images (the `imagefolder` builder); used when
            `dataset_name` is not given.
        streaming (`bool`, defaults to `False`): stream instead of downloading / preparing.
        cache_dir (`str`, *optional*): `datasets` cache folder.
        trust_remote_code (`bool`, *optional*): unused by `datasets` >= 4 (kept for older scripts).
        token (`str`, *optional*): Hub token.
        split (`str`, *optional*): return this split only (a `ValueError` lists the splits when it is missing); a
            single file is this split.
    """
    import datasets

    loaded = _load(dataset_name, dataset_config_name, train_data_dir, streaming, cache_dir, token, split)
    if split is None or not isinstance(loaded, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        return loaded
    if split not in loaded:
        raise ValueError(f"No {split!r} split in {dataset_name or train_data_dir!r}; found {sorted(loaded)}.")
    return loaded[split]


def _load(dataset_name, dataset_config_name, train_data_dir, streaming, cache_dir, token, split):
    """A dataset dict, or the split `split` when `datasets` can load one split by itself."""
    import datasets

    if dataset_name is None and train_data_dir is None:
        raise ValueError("Pass `dataset_name` (Hub id, local folder or file) or `train_data_dir` (image folder).")
    if dataset_name is not None:
        if os.path.isdir(dataset_name) and (
            os.path.isfile(os.path.join(dataset_name, "dataset_dict.json"))
            or os.path.isfile(os.path.join(dataset_name, "dataset_info.json"))
            and os.path.isfile(os.path.join(dataset_name, "state.json"))
        ):
            loaded = datasets.load_from_disk(dataset_name)
            if isinstance(loaded, datasets.Dataset):
                loaded = datasets.DatasetDict({"train": loaded})
            return loaded.to_iterable_dataset() if streaming and hasattr(loaded, "to_iterable_dataset") else loaded
        if os.path.isfile(dataset_name):
            extension = os.path.splitext(dataset_name)[1].lstrip(".").lower()
            builder = {"parquet": "parquet", "arrow": "arrow", "csv": "csv", "json": "json", "jsonl": "json"}.get(
                extension)
            if builder is None:
                raise ValueError(f"Cannot load {dataset_name!r}: unsupported file type {extension!r}.")
            return datasets.load_dataset(builder, data_files={split or "train": dataset_name}, split=split,
                                         streaming=streaming, cache_dir=cache_dir)
        return datasets.load_dataset(dataset_name, dataset_config_name, split=split, streaming=streaming,
                                     cache_dir=cache_dir, token=token)
    return datasets.load_dataset("imagefolder", data_dir=train_data_dir, split=split, streaming=streaming,
                                 cache_dir=cache_dir)


def find_image_column(features, image_column: str | None = None) -> str:
    """The column holding images: `image_column` if given (checked), else the first `datasets.Image` feature, else a
    conventional name (`image`, `img`, `jpg`, ...)."""
    import datasets

    names = list(features) if features is not None else []
    if image_column is not None:
        if names and image_column not in names:
            raise ValueError(f"`--image_column` {image_column!r} is not a column of the dataset; columns: {names}.")
        return image_column
    for name in names:
        if isinstance(features[name], datasets.Image):
            return name
    for name in IMAGE_COLUMN_CANDIDATES:
        if name in names:
            return name
    raise ValueError(f"Could not find an image column among {names}; pass `--image_column`.")


def split_train_and_eval(dataset_dict, train_split: str = "train", eval_split: str | None = None,
                         eval_percentage: float = 1.0, max_eval_samples: int | None = None, seed: int = 0):
    """The training split and a (small) evaluation set of a dataset.

    The evaluation set is `eval_split` if given (checked), else the dataset's `validation` / `valid` / `val` / `test`
    split, else `eval_percentage` percent of the training split held out (map-style; seeded) or its first
    `max_eval_samples` rows (streaming, which the training split then skips). It is cut to `max_eval_samples`.

    Returns `(train, eval_set)`.
    """
    import datasets

    splits = list(dataset_dict.keys())
    if train_split not in splits:
        raise ValueError(f"`--train_split` {train_split!r} not in the dataset's splits {splits}.")
    if eval_split is not None and eval_split not in splits:
        raise ValueError(f"`--validation_split` {eval_split!r} not in the dataset's splits {splits}.")
    if eval_split is None:
        eval_split = next((name for name in ("validation", "valid", "val", "test")
                           if name in splits and name != train_split), None)
    train = dataset_dict[train_split]
    streaming = isinstance(train, datasets.IterableDataset)
    if eval_split is not None:
        eval_set = dataset_dict[eval_split]
    elif streaming:
        if max_eval_samples is None:
            raise ValueError("A streamed dataset without an evaluation split needs `max_eval_samples`.")
        eval_set, train = train.take(max_eval_samples), train.skip(max_eval_samples)
    else:
        held = max(1, int(round(len(train) * eval_percentage / 100)))
        parts = train.train_test_split(test_size=held, seed=seed, shuffle=True)
        train, eval_set = parts["train"], parts["test"]
    if max_eval_samples is not None:
        eval_set = eval_set.take(max_eval_samples) if streaming else eval_set.select(
            range(min(max_eval_samples, len(eval_set))))
    return train, eval_set


# ----------------------------------------------------------------------------------------------------------------
# Decoding and resizing
# ----------------------------------------------------------------------------------------------------------------
def decode_image(value) -> Image.Image:
    """Turn what a dataset stores (a `PIL.Image`, `{"bytes", "path"}`, raw bytes, a path, an array) into a loaded PIL
    image. Raises on unreadable data."""
    if isinstance(value, Image.Image):
        image = value
    elif isinstance(value, dict):
        if value.get("bytes") is not None:
            image = Image.open(io.BytesIO(value["bytes"]))
        elif value.get("path"):
            image = Image.open(value["path"])
        else:
            raise ValueError("empty image record")
    elif isinstance(value, (bytes, bytearray)):
        image = Image.open(io.BytesIO(value))
    elif isinstance(value, str):
        image = Image.open(value)
    elif isinstance(value, (np.ndarray, torch.Tensor)):
        array = np.asarray(value)
        if array.dtype != np.uint8:
            array = np.clip(array * (255 if array.max() <= 1.0 else 1), 0, 255).astype(np.uint8)
        if array.ndim == 3 and array.shape[0] in (1, 3) and array.shape[-1] not in (1, 3):
            array = array.transpose(1, 2, 0)
        image = Image.fromarray(array.squeeze(-1) if array.ndim == 3 and array.shape[-1] == 1 else array)
    else:
        raise ValueError(f"unsupported image value of type {type(value).__name__}")
    image.load()
    return image


@dataclass
class ImagePreprocessor:
    """Decode one image and resize it with [`OptVQImageProcessor`] so that its shortest edge is `resolution`, in the
    model's channels (grayscale converted with ITU-R 601 luma, RGBA/P/CMYK converted to RGB), as uint8 `(C, H, W)`.

    With `center_crop=True` the result is also center-cropped to `resolution x resolution` (for evaluation or when
    random crops are off). With `resolution=None` the processor's own resize and crop settings are used (what
    `processor(images)` does, before scaling to [-1, 1]).

    Args:
        processor (`OptVQImageProcessor`): the model's processor (its resampling filter is used).
        resolution (`int`, *optional*): target shortest edge / crop size; `None` keeps the processor's settings.
        center_crop (`bool`, defaults to `False`): center-crop to a square (ignored when `resolution` is `None`).
    """

    processor: object
    resolution: int | None = None
    center_crop: bool = False

    def __call__(self, value) -> np.ndarray | None:
        """uint8 `(C, H, W)` array, or `None` if the image cannot be read."""
        geometry = {} if self.resolution is None else dict(
            size={"shortest_edge": self.resolution},
            crop_size={"height": self.resolution, "width": self.resolution},
            do_center_crop=self.center_crop,
        )
        try:
            image = decode_image(value)
            if image.mode not in ("RGB", "L"):
                image = image.convert("RGB")
            out = self.processor(image, do_rescale=False, do_normalize=False, **geometry)["pixel_values"][0]
            array = np.ascontiguousarray(np.asarray(out), dtype=np.uint8)
            if array.ndim != 3 or (self.resolution is not None and min(array.shape[1:]) < self.resolution):
                return None
            return array
        except Exception:  # noqa: BLE001 - any unreadable image is skipped and counted
            return None

    def fingerprint(self) -> str:
        """A string identifying this preprocessing (for `datasets` caching)."""
        processor = self.processor
        return (f"optvq-pre-v1-{self.resolution}-{self.center_crop}-{getattr(processor, 'num_channels', 3)}-"
                f"{getattr(processor, 'resample', '')}")


def decode_images(values, preprocessor: ImagePreprocessor) -> tuple[torch.Tensor | None, list[int]]:
    """Decode a list of stored images (as [`decode_image`] reads them) into one uint8 batch `(N, C, H, W)`.

    Returns `(images, skipped)`: `images` is `None` when no image could be read; `skipped` lists the positions of
    the unreadable ones (skipped, never fatal).
    """
    arrays, skipped = [], []
    for index, value in enumerate(values):
        array = preprocessor(value)
        if array is None:
            skipped.append(index)
        else:
            arrays.append(array)
    return (torch.from_numpy(np.stack(arrays)) if arrays else None), skipped


def iter_image_batches(dataset, image_column: str, preprocessor: ImagePreprocessor, batch_size: int,
                       rank: int = 0, world_size: int = 1):
    """Decode this process's share of a map-style or streamed dataset in batches (for evaluation or tokenization).

    Process `rank` of `world_size` reads images `rank, rank + world_size, ...` of a map-style dataset, and its
    `datasets.distributed.split_dataset_by_node` share of a streamed one. Yields `(images, num_skipped)` per batch:
    uint8 `(B, C, H, W)` (or `None` when no image of the batch could be read) and how many were unreadable.
    """
    import datasets

    if batch_size < 1:
        raise ValueError(f"`batch_size` must be >= 1, got {batch_size}.")
    features = getattr(dataset, "features", None)
    if features is not None and isinstance(features.get(image_column), datasets.Image):
        dataset = dataset.cast_column(image_column, datasets.Image(decode=False))
    if isinstance(dataset, datasets.IterableDataset):
        if world_size > 1:
            from datasets.distributed import split_dataset_by_node

            dataset = split_dataset_by_node(dataset, rank=rank, world_size=world_size)
        batches = (batch[image_column] for batch in dataset.iter(batch_size))
    else:
        indices = list(range(rank, len(dataset), world_size))
        batches = (dataset[indices[start:start + batch_size]][image_column]
                   for start in range(0, len(indices), batch_size))
    for values in batches:
        images, skipped = decode_images(values, preprocessor)
        yield images, len(skipped)


def decode_image_column(dataset, image_column: str, preprocessor: ImagePreprocessor,
                        batch_size: int = 256) -> tuple[torch.Tensor | None, int]:
    """Every image of a (small) map-style or streamed dataset, decoded into one uint8 batch `(N, C, H, W)` with
    [`iter_image_batches`] (so the preprocessor must give one shape, e.g. center crops).

    Returns `(images, num_skipped)`; `images` is `None` when no image could be read.
    """
    parts, skipped = [], 0
    for images, num_skipped in iter_image_batches(dataset, image_column, preprocessor, batch_size):
        skipped += num_skipped
        if images is not None:
            parts.append(images)
    return (torch.cat(parts) if parts else None), skipped


def cache_preprocessed(dataset, image_column: str, preprocessor: ImagePreprocessor, num_proc: int | None = None,
                       desc: str = "Decoding and resizing images once"):
    """Decode and resize every image of a map-style dataset once (`datasets.map`, cached on disk).

    Returns `(dataset, num_skipped)`: the new dataset has columns `pixels` (raw uint8 bytes), `channels`, `height`,
    `width`; unreadable images are dropped and counted.
    """
    import datasets

    features = datasets.Features({"pixels": datasets.Value("binary"), "channels": datasets.Value("int32"),
                                  "height": datasets.Value("int32"), "width": datasets.Value("int32")})
    if isinstance(dataset.features.get(image_column), datasets.Image):
        # Decode ourselves so that a corrupt file is counted instead of raising inside `datasets`.
        dataset = dataset.cast_column(image_column, datasets.Image(decode=False))

    def process(batch):
        out = {"pixels": [], "channels": [], "height": [], "width": []}
        for value in batch[image_column]:
            array = preprocessor(value)
            if array is None:
                continue
            out["pixels"].append(array.tobytes())
            out["channels"].append(array.shape[0])
            out["height"].append(array.shape[1])
            out["width"].append(array.shape[2])
        return out

    fingerprint = hashlib.sha256(f"{dataset._fingerprint}-{image_column}-{preprocessor.fingerprint()}".encode()).hexdigest()[:32]
    processed = dataset.map(process, batched=True, batch_size=256, remove_columns=dataset.column_names,
                            features=features, num_proc=num_proc, new_fingerprint=fingerprint, desc=desc)
    return processed, len(dataset) - len(processed)


def _array_from_row(row) -> np.ndarray:
    return np.frombuffer(row["pixels"], dtype=np.uint8).reshape(row["channels"], row["height"], row["width"])


class InMemoryImageDataset(torch.utils.data.Dataset):
    """All images of one shape in a single uint8 tensor `(N, C, H, W)`; `__getitems__` returns whole batches."""

    def __init__(self, images: torch.Tensor):
        self.images = images

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index):
        return self.images[index]

    def __getitems__(self, indices):
        return self.images[torch.as_tensor(indices, dtype=torch.long)]


class CachedImageDataset(torch.utils.data.Dataset):
    """Rows of a [`cache_preprocessed`] dataset as uint8 tensors `(C, H, W)` (shapes may differ)."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index):
        return torch.from_numpy(_array_from_row(self.dataset[int(index)]).copy())

    @classmethod
    def maybe_in_memory(cls, dataset, max_bytes: int = 4 << 30):
        """An [`InMemoryImageDataset`] when every image has one shape and they fit in `max_bytes`, else `cls`."""
        if len(dataset) == 0:
            raise ValueError("The dataset has no readable image.")
        if dataset._indices is not None:
            dataset = dataset.flatten_indices()
        table = dataset.data.table if hasattr(dataset.data, "table") else dataset.data
        shape_columns = [table.column(name).to_numpy() for name in ("channels", "height", "width")]
        shapes = {(int(c), int(h), int(w)) for c, h, w in np.unique(np.stack(shape_columns, 1), axis=0)}
        if len(shapes) == 1:
            channels, height, width = shapes.pop()
            if len(dataset) * channels * height * width <= max_bytes:
                pieces = []
                for chunk in table.column("pixels").chunks:  # raw value buffers of the binary column, no copies per row
                    offset_type = np.int64 if str(chunk.type) == "large_binary" else np.int32
                    offsets = np.frombuffer(chunk.buffers()[1], dtype=offset_type)[chunk.offset:chunk.offset + len(chunk) + 1]
                    values = np.frombuffer(chunk.buffers()[2], dtype=np.uint8)
                    pieces.append(values[offsets[0]:offsets[-1]])
                images = np.concatenate(pieces).reshape(len(dataset), channels, height, width)
                return InMemoryImageDataset(torch.from_numpy(images.copy()))
        return cls(dataset)


class OnTheFlyImageDataset(torch.utils.data.Dataset):
    """A map-style dataset decoded per sample (in DataLoader workers); unreadable images give `None`."""

    def __init__(self, dataset, image_column: str, preprocessor: ImagePreprocessor):
        import datasets

        if isinstance(dataset.features.get(image_column), datasets.Image):
            dataset = dataset.cast_column(image_column, datasets.Image(decode=False))
        self.dataset = dataset.select_columns([image_column])
        self.image_column = image_column
        self.preprocessor = preprocessor

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index):
        array = self.preprocessor(self.dataset[int(index)][self.image_column])
        return None if array is None else torch.from_numpy(array)


class StreamingImageDataset(torch.utils.data.IterableDataset):
    """A `datasets.IterableDataset` (e.g. ImageNet streamed from the Hub) decoded on the fly.

    Shards across DataLoader workers through `datasets` itself; split it across ranks with
    `datasets.distributed.split_dataset_by_node` before wrapping. Unreadable images give `None`.
    """

    def __init__(self, dataset, image_column: str, preprocessor: ImagePreprocessor):
        import datasets

        features = getattr(dataset, "features", None)
        if features is not None and isinstance(features.get(image_column), datasets.Image):
            dataset = dataset.cast_column(image_column, datasets.Image(decode=False))
        self.dataset = dataset
        self.image_column = image_column
        self.preprocessor = preprocessor

    def set_epoch(self, epoch: int):
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)

    def __iter__(self):
        for row in self.dataset:
            array = self.preprocessor(row[self.image_column])
            yield None if array is None else torch.from_numpy(array)


def build_image_dataset(dataset, image_column: str, preprocessor: ImagePreprocessor, cache: str = "auto",
                        num_proc: int | None = None, max_cache_bytes: float = 64e9):
    """The torch dataset of uint8 images that a training DataLoader reads (with [`collate_images`]).

    A streamed dataset is decoded on the fly ([`StreamingImageDataset`]). A map-style one is decoded and resized
    once ([`cache_preprocessed`], then [`CachedImageDataset.maybe_in_memory`]) when `cache` is `"always"`, or
    `"auto"` and its resized images take less than `max_cache_bytes`; else per sample ([`OnTheFlyImageDataset`]).

    Returns `(torch_dataset, num_skipped)` (images found unreadable while caching; the other paths count them as
    they meet them, in each batch's `num_skipped`).
    """
    import datasets

    if cache not in ("auto", "always", "never"):
        raise ValueError(f"`cache` must be 'auto', 'always' or 'never', got {cache!r}.")
    if isinstance(dataset, datasets.IterableDataset):
        return StreamingImageDataset(dataset, image_column, preprocessor), 0
    if cache == "auto":
        side = preprocessor.resolution or max(getattr(preprocessor.processor, "crop_size", {}).values() or [256])
        channels = getattr(preprocessor.processor, "num_channels", 3)
        cache = "always" if len(dataset) * channels * side * side * 1.5 < max_cache_bytes else "never"
    if cache == "never":
        return OnTheFlyImageDataset(dataset, image_column, preprocessor), 0
    processed, skipped = cache_preprocessed(dataset, image_column, preprocessor, num_proc=num_proc)
    return CachedImageDataset.maybe_in_memory(processed), skipped


def collate_images(items) -> dict:
    """Collate images: drop `None` (unreadable) and count them; stack when shapes agree, else keep a list.

    Returns `{"images": uint8 tensor (B, C, H, W) or list of (C, H, W), "num_skipped": int}`.
    """
    if isinstance(items, torch.Tensor):  # InMemoryImageDataset.__getitems__ already batched
        return {"images": items, "num_skipped": 0}
    kept = [item for item in items if item is not None]
    skipped = len(items) - len(kept)
    if kept and all(item.shape == kept[0].shape for item in kept):
        return {"images": torch.stack(kept), "num_skipped": skipped}
    return {"images": kept, "num_skipped": skipped}


# ----------------------------------------------------------------------------------------------------------------
# Augmentation (in the training loop, deterministic given the generator)
# ----------------------------------------------------------------------------------------------------------------
def augmentation_generator(seed: int, step: int, micro_step: int = 0, rank: int = 0) -> torch.Generator:
    """The CPU generator of one batch's random crops and flips. It depends on the seed, the optimizer step, the
    micro-batch within the step and the process only, so a resumed run draws the same augmentations."""
    generator = torch.Generator()
    generator.manual_seed((seed * 1_000_003 + step * 1009 + micro_step * 101 + rank) % (2**63))
    return generator


def to_pixel_values(images: torch.Tensor) -> torch.Tensor:
    """uint8 `(B, C, H, W)` in [0, 255] -> float32 in [-1, 1] (the processor's `(x / 255 - 0.5) / 0.5`)."""
    return images.float().div_(127.5).sub_(1.0)


def augment_batch(images, resolution: int, random_crop: bool = True, random_flip: bool = False,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """Crop (random or center) every image to `resolution x resolution`, optionally flip horizontally, and map to
    float `pixel_values` in [-1, 1].

    Args:
        images (uint8 `torch.Tensor` `(B, C, H, W)` or a list of `(C, H, W)`): images with both sides >= resolution.
        resolution (`int`): output size.
        random_crop (`bool`, defaults to `True`): random crops (else center crops).
        random_flip (`bool`, defaults to `False`): flip each image with probability 1/2.
        generator (`torch.Generator`, *optional*): CPU generator for the crops and flips.
    """
    items = list(images) if not isinstance(images, torch.Tensor) else images
    count = len(items)
    if count == 0:
        raise ValueError("Empty batch: every image of this batch was unreadable.")
    heights = [int(item.shape[-2]) for item in items]
    widths = [int(item.shape[-1]) for item in items]
    if min(heights) < resolution or min(widths) < resolution:
        raise ValueError(f"Images must be at least {resolution}x{resolution}, got {min(heights)}x{min(widths)}.")
    uniform = isinstance(items, torch.Tensor)
    if uniform and heights[0] == resolution and widths[0] == resolution:
        batch = items
    else:
        if random_crop:
            tops = [int(torch.randint(0, h - resolution + 1, (1,), generator=generator)) for h in heights]
            lefts = [int(torch.randint(0, w - resolution + 1, (1,), generator=generator)) for w in widths]
        else:
            tops = [(h - resolution) // 2 for h in heights]
            lefts = [(w - resolution) // 2 for w in widths]
        batch = torch.stack([item[..., t:t + resolution, l:l + resolution]
                             for item, t, l in zip(items, tops, lefts)])
    pixel_values = to_pixel_values(batch)
    if random_flip:
        flips = torch.rand(count, generator=generator) < 0.5
        if flips.any():
            pixel_values[flips] = pixel_values[flips].flip(-1)
    return pixel_values


# ----------------------------------------------------------------------------------------------------------------
# The bundled demo dataset
# ----------------------------------------------------------------------------------------------------------------
def build_demo_dataset(num_train: int = 2000, num_test: int = 200, resolution: int = 32, seed: int = 0,
                       photos: tuple[str, ...] = DEMO_PHOTOS):
    """A small RGB dataset needing no network: random crops of the photos bundled with scikit-image.

    Each example is a square crop of random size (between `resolution` and a quarter of the photo's shorter side),
    resized to `resolution x resolution` (bicubic), randomly flipped. Test crops come from a different random stream.
    Returns a `datasets.DatasetDict` with `train` and `test` splits and an `image` column (plus `photo`, the source).
    """
    import datasets
    import skimage.data

    sources = []
    for name in photos:
        try:
            array = np.asarray(getattr(skimage.data, name)())
        except Exception:  # noqa: BLE001 - a photo that needs a download is simply left out
            continue
        if array.dtype == bool:
            array = array.astype(np.uint8) * 255
        if array.ndim == 2:
            array = np.stack([array] * 3, axis=-1)
        sources.append((name, Image.fromarray(array[..., :3].astype(np.uint8))))
    if not sources:
        raise RuntimeError("No scikit-image photo could be loaded for the demo dataset.")

    def make(count: int, rng: np.random.Generator):
        images, names = [], []
        for _ in range(count):
            name, photo = sources[int(rng.integers(len(sources)))]
            width, height = photo.size
            largest = max(resolution, min(width, height) // 4)
            size = int(rng.integers(resolution, largest + 1))
            left = int(rng.integers(0, width - size + 1))
            top = int(rng.integers(0, height - size + 1))
            crop = photo.crop((left, top, left + size, top + size)).resize((resolution, resolution), Image.BICUBIC)
            if rng.random() < 0.5:
                crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
            images.append(crop)
            names.append(name)
        features = datasets.Features({"image": datasets.Image(), "photo": datasets.Value("string")})
        return datasets.Dataset.from_dict({"image": images, "photo": names}, features=features)

    return datasets.DatasetDict({
        "train": make(num_train, np.random.default_rng(seed)),
        "test": make(num_test, np.random.default_rng(seed + 1_000_003)),
    })
