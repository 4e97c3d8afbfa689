"""Torch side of the data layer: datasets, the augmenting training transform, the global-batch sampler, loaders.

The evaluation transform is `transfer.core.preprocess.eval_array` (torch-free, shared with the ONNX runtime); this
module only wraps it in a tensor.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate

from transfer.core.cpus import usable_cpus
from transfer.core.images import BadImageError, open_image
from transfer.core.preprocess import (
    INTERPOLATIONS,
    Preprocessing,
    corner_crop,
    decode_size,
    eval_array,
    normalize,
)
from transfer.core.world import World
from transfer.data.augment import Augment
from transfer.data.scan import Sample

Transform = Callable[[Image.Image], torch.Tensor]


def eval_transform(prep: Preprocessing) -> Transform:
    """The project's evaluation transform as a tensor (the same numbers as the ONNX runtime's input)."""
    return lambda image: torch.from_numpy(eval_array(image, prep))


def train_transform(prep: Preprocessing, augment: Augment | None) -> Transform:
    """Random resized crop (zoom), rotation, shifts, horizontal flip and colour jitter; then normalization."""
    if augment is None:
        return eval_transform(prep)
    from torchvision.transforms import v2

    fill = tuple(int(round(255 * m)) for m in prep.mean)  # out-of-image pixels become 0 after normalization
    interpolation = v2.InterpolationMode(prep.interpolation if prep.interpolation in INTERPOLATIONS else "bilinear")
    steps: list = [v2.RandomResizedCrop(prep.input_size, scale=((1 - augment.zoom) ** 2, 1.0),
                                        interpolation=interpolation, antialias=True)]
    if augment.rotation or augment.shift:
        steps.append(v2.RandomAffine(degrees=augment.rotation, translate=(augment.shift, augment.shift), fill=fill))
    if augment.hflip:
        steps.append(v2.RandomHorizontalFlip())
    if augment.color_jitter:
        jitter = augment.color_jitter
        steps.append(v2.ColorJitter(brightness=jitter, contrast=jitter, saturation=jitter))
    pipeline = v2.Compose(steps)
    return lambda image: torch.from_numpy(normalize(np.asarray(pipeline(image), dtype=np.uint8), prep))


class ImageDataset(Dataset):
    """Samples -> (tensor, target): the class index (-1 for unlabelled images), or with `multilabel_classes` a
    multi-hot float row of that width (several labels per image). With `bad_shape` (a tensor's shape) an image
    that fails to decode does not raise: the item is (zeros of that shape, target, reason, index), and a good one's
    reason is "" (for work that scanned headers only and skips, with its reason, an image whose body is broken; the
    index names the sample even when a shuffled sampler chose it)."""

    def __init__(self, samples: Sequence[Sample], transform: Transform, draft_size: tuple[int, int] | None = None,
                 multilabel_classes: int | None = None, bad_shape: tuple[int, ...] | None = None):
        self.samples, self.transform, self.draft_size = list(samples), transform, draft_size
        self.multilabel_classes, self.bad_shape = multilabel_classes, bad_shape

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple:
        sample = self.samples[index]
        if self.multilabel_classes is not None:
            target = multi_hot(sample.label_set, self.multilabel_classes)
        else:
            target = -1 if sample.label is None else sample.label
        if self.bad_shape is None:
            return self.transform(open_image(sample.path, draft_size=self.draft_size)), target
        try:
            return self.transform(open_image(sample.path, draft_size=self.draft_size)), target, "", index
        except BadImageError as exc:
            return torch.zeros(self.bad_shape), target, exc.reason, index


def multi_hot(labels: Sequence[int], classes: int) -> torch.Tensor:
    """A float row of `classes` zeros with ones at `labels`."""
    row = torch.zeros(classes)
    row[list(labels)] = 1.0
    return row


def eval_dataset(samples: Sequence[Sample], prep: Preprocessing, corner: str | None = None,
                 multilabel_classes: int | None = None, report_bad: bool = False) -> ImageDataset:
    """THE evaluation input pipeline (reduced-scale JPEG decode, resize, centre crop, normalize): training's
    validation, `evaluate` and `extract` use it, and the ONNX runtime decodes the same way. `corner`: a
    test-time-augmentation view, that corner of the decoded image (`corner_crop`) before the rest. `report_bad`:
    items carry the reason an image failed to decode instead of raising (see `ImageDataset`)."""
    plain = eval_transform(prep)

    def cornered(image: Image.Image) -> torch.Tensor:
        return plain(corner_crop(image, corner))

    return ImageDataset(samples, plain if corner is None else cornered, draft_size=decode_size(prep),
                        multilabel_classes=multilabel_classes,
                        bad_shape=(3, prep.input_size, prep.input_size) if report_bad else None)


def default_workers() -> int:
    return min(4, usable_cpus())


class GlobalBatchSampler(Sampler[list[int]]):
    """The one-process batches (a `seed`-ed permutation cut into `batch_size` runs), each cut into `world.size`
    contiguous blocks; yields this rank's block. Every rank sees the same number of steps, and together the ranks
    see exactly the batches one process would: `--batch-size` is the global batch."""

    def __init__(self, count: int, batch_size: int, shuffle: bool, seed: int, world: World,
                 weights: torch.Tensor | None = None):
        self.count, self.batch_size, self.shuffle, self.seed, self.world = count, batch_size, shuffle, seed, world
        self.weights = weights  # per-image sampling weights (`--sampler balanced`); None: a plain permutation

    def __len__(self) -> int:
        return -(-self.count // self.batch_size)

    def __iter__(self):
        order = epoch_order(self.count, self.seed, self.weights) if self.shuffle else torch.arange(self.count)
        for batch in order.split(self.batch_size):
            span = self.world.block(len(batch))
            yield batch[span.start:span.stop].tolist()


def epoch_order(count: int, seed: int, weights: torch.Tensor | None = None) -> torch.Tensor:
    """The epoch's image order: a seeded permutation, or with `weights` `count` seeded draws with replacement in
    proportion to them (torch's WeightedRandomSampler rule, drawn once so every rank sees the same order)."""
    generator = torch.Generator().manual_seed(seed)
    if weights is None:
        return torch.randperm(count, generator=generator)
    return torch.multinomial(weights, count, replacement=True, generator=generator)


def _collate_allowing_empty(shape: tuple[int, ...], target_width: int | None = None, reports: bool = False):
    """default_collate, except that a rank's empty share of a tiny last batch becomes empty tensors (and, for a
    dataset that `reports` failed decodes, no reasons and no indices)."""
    def collate(batch):
        if not batch:
            targets = (torch.empty(0, dtype=torch.long) if target_width is None
                       else torch.empty((0, target_width)))
            empty = (torch.empty((0, *shape)), targets)
            return (*empty, [], torch.empty(0, dtype=torch.long)) if reports else empty
        return default_collate(batch)
    return collate


def make_loader(
    dataset: Dataset,
    batch_size: int,
    shuffle: bool = False,
    workers: int | None = None,
    device: str = "cpu",
    seed: int = 0,
    world: World | None = None,
    image_shape: tuple[int, ...] = (),
    weights: torch.Tensor | None = None,
) -> DataLoader:
    """A DataLoader that decodes in worker processes, pins memory on CUDA and shuffles reproducibly by `seed`.

    With `world` (training), batches come from `GlobalBatchSampler`: this rank's share of each global batch, drawn
    in proportion to `weights` when given."""
    workers = default_workers() if workers is None else workers
    workers = min(workers, max(0, len(dataset) // max(1, batch_size)))  # tiny sets: no process start-up cost
    common = {"num_workers": workers, "pin_memory": device.startswith("cuda"), "persistent_workers": workers > 0,
              "prefetch_factor": 2 if workers > 0 else None}
    if world is not None:
        sampler = GlobalBatchSampler(len(dataset), batch_size, shuffle, seed, world, weights)
        width = getattr(dataset, "multilabel_classes", None)
        reports = getattr(dataset, "bad_shape", None) is not None
        return DataLoader(dataset, batch_sampler=sampler,
                          collate_fn=_collate_allowing_empty(image_shape, width, reports), **common)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle,
                      generator=torch.Generator().manual_seed(seed), **common)
