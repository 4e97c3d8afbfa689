"""ImageNet-1k label names (from timm's bundled class info), for the pretrained classifiers' metadata and output."""

from __future__ import annotations

from functools import lru_cache


@lru_cache(maxsize=1)
def imagenet_labels() -> tuple[str, ...]:
    """The 1,000 ImageNet class names in index order, e.g. 285 -> 'Egyptian cat'."""
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    return tuple(info.index_to_description(i) for i in range(1000))


def classifier_labels(has_pretrained: bool, num_classes: int) -> list[str]:
    """The class names of a registry backbone's own classifier: ImageNet's for its 1,000 pretrained classes, else
    the indices as text."""
    if has_pretrained and num_classes == 1000:
        return list(imagenet_labels())
    return [str(i) for i in range(num_classes)]
