"""Fine-tuning (torch): settings, the staged schedule, the loop, checkpoints and run directories, the learning-rate
range test, batch-size search, regularisers and torchrun's collectives.

Modules: `config` (FinetuneConfig, resume rules), `stages` (the schedule on one screen), `schedules` (optimizers
and rate curves), `loop` (Trainer), `report` (report.json and plots), `checkpoints`, `runs` (load_run and the run
directory's files), `device`, `model` (backbone + head), `regularize`, `lr_find`, `batch_size`, `collectives`,
`tracking` (TensorBoard and MLflow logs), `decode_failures` (images whose body fails to decode mid-run: left out
and reported), `tune` (a budgeted Optuna search over the recipe; `recipes` reads its recipe.json back), and
`finetune`, the entry point that wires them. The loop never imports its hooks (lr_find); `finetune` hands them in.

May import: `transfer.data`, `models`, `transfer.core`; never `transfer.serving`, `transfer.apps` or `exporters`.
"""

from transfer.training.config import FinetuneConfig, split_epochs
from transfer.training.finetune import finetune
from transfer.training.lr_find import lr_find
from transfer.training.report import FinetuneResult
from transfer.training.runs import load_run, load_run_config

__all__ = ["FinetuneConfig", "FinetuneResult", "finetune", "load_run", "load_run_config", "lr_find", "split_epochs"]
