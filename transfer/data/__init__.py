"""The data layer: user folders become labelled samples, splits, datasets and loaders.

Holds: `scan` (folder scan, bad-file reports), `splits` (train/validation), `augment` (augmentation settings),
`samples` (built-in example data: `python -m transfer.data.samples`), all torch-free; and `datasets` (torch:
datasets, the augmenting transform, the global-batch sampler, loaders).

May import: `transfer.core` and `models`. Deliberately empty: importing `transfer.data.scan` must not pull in the
torch half through this file.
"""
