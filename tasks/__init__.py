"""Inner problems: image-classification data through TFDS, the image-MLP task and its family,
and inner training with any optax optimizer."""

from tasks.base import ImageBatch, Task
from tasks.datasets import IMAGE_SIZES, ImageData, clear_dataset_cache, load_dataset
from tasks.family import ImageMLPFamily
from tasks.image_mlp import (
    PRESETS,
    STANDARD_PRESET,
    ImageMLPConfig,
    ImageMLPTask,
    make_task,
    preset,
)
from tasks.train import (
    EvalCurves,
    TrainResult,
    TrainState,
    init_train_state,
    train,
    train_seeds,
    train_segment,
)

__all__ = [
    "IMAGE_SIZES",
    "PRESETS",
    "STANDARD_PRESET",
    "EvalCurves",
    "ImageBatch",
    "ImageData",
    "ImageMLPConfig",
    "ImageMLPFamily",
    "ImageMLPTask",
    "Task",
    "TrainResult",
    "TrainState",
    "clear_dataset_cache",
    "init_train_state",
    "load_dataset",
    "make_task",
    "preset",
    "train",
    "train_seeds",
    "train_segment",
]
