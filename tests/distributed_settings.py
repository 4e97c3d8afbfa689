"""The fine-tuning settings the distributed tests share: small, deterministic, both stages, uneven last batch."""

from transfer.training import FinetuneConfig

CONFIG = FinetuneConfig(backbone="efficientnet_lite0", input_size=32, epochs_head=2, epochs_finetune=2,
                        unfreeze="1", batch_size=7, augment=False, dropout=0.0, workers=0, seed=3)
