"""The Task protocol: what an inner problem must provide to be trained and meta-trained.

A task is a frozen pytree (``flax.struct.dataclass``): its data arrays are pytree leaves and
its configuration (architecture, batch size) is static. Jitted functions therefore take the
task as an *argument* (``jax.jit(fn)(task, ...)``) so device-resident data is passed in, never
baked into the compiled program as a constant.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Protocol, runtime_checkable

import jax

PRNGKey = jax.Array
Params = Any  # a pytree of float arrays: the inner model's weights
Batch = Any  # a pytree of arrays; ImageBatch for image classification


class ImageBatch(NamedTuple):
    """A batch of images. ``image``: float32 [B, H, W, C] in [0, 1]; ``label``: int32 [B]."""

    image: jax.Array
    label: jax.Array


@runtime_checkable
class Task(Protocol):
    """An inner optimization problem.

    Contract:
      * ``init(key)`` returns fresh inner parameters (a pytree of float32 arrays).
      * ``sample_batch(key, split)`` draws a batch *inside jit* from device-resident data;
        the same key gives the same batch, bit for bit.
      * ``loss(params, batch)`` is the scalar mean training objective on that batch.
      * ``evaluate(params, split)`` returns ``{"loss": ..., "accuracy": ...}`` over a whole
        split (accuracy is NaN for tasks without classes).
      * ``loss_clip`` is the value at which the meta-loss is clipped (1.5 log(num_classes)
        for classification, per REFERENCE.md).
    """

    name: str

    def init(self, key: PRNGKey) -> Params: ...

    def sample_batch(self, key: PRNGKey, split: str = "train") -> Batch: ...

    def loss(self, params: Params, batch: Batch) -> jax.Array: ...

    def evaluate(self, params: Params, split: str = "valid") -> dict[str, jax.Array]: ...

    @property
    def loss_clip(self) -> float: ...
