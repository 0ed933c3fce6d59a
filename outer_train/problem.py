"""LearnedOptProblem: a Task trained by a LearnedOptimizer, seen as an InnerProblem.

One inner step (REFERENCE.md notation, s_t = (params_t, opt_state_t)):
    loss_t, g_t = value_and_grad(task.loss)(params_t, train batch)
    updates, opt_state_{t+1} = opt_fn(theta).update(g_t, opt_state_t, params_t, loss=loss_t)
                               (+ mask=task.param_mask for a padded task, ``tasks.padded_mlp``)
    params_{t+1} = params_t + updates
    meta-loss l_t = transform(loss_t)                                   (meta_loss="train")
                  = transform(task.loss(params_{t+1}, fresh valid batch))  (meta_loss="valid")
``transform`` is ``outer_train.meta_loss.transform_loss`` (clip at the task's ``loss_clip`` by
default); a non-finite loss gives NaN so the engine counts it and resets the particle.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import flax.struct
import jax
import optax

from learned_opt.base import LearnedOptimizer, Theta
from learned_opt.errors import UserError
from outer_train.meta_loss import LOSS_TRANSFORMS, transform_loss
from tasks.base import Params, PRNGKey, Task

META_LOSSES: dict[str, str] = {
    "train": "the training-batch loss of the params before each update",
    "valid": "the loss of the updated params on a fresh validation batch",
}


class LearnedOptState(NamedTuple):
    """Inner state of one particle. params: the task's params pytree (float32 leaves);
    opt_state: the learned optimizer's optax state (never holds the params)."""

    params: Params
    opt_state: Any


@flax.struct.dataclass
class LearnedOptProblem:
    """InnerProblem for ``task`` trained by ``lopt``; see the module docstring for one step.
    Build from user input with ``create`` (validates the options).

    task: a Task pytree (its data arrays are leaves, so jit takes the problem as an argument).
    lopt: the learned optimizer (static configuration).
    meta_loss: "train" or "valid" (``META_LOSSES``).
    loss_transform: one of ``outer_train.meta_loss.LOSS_TRANSFORMS``.
    loss_clip: clip value of the transform; None -> ``task.loss_clip``.
    """

    task: Task
    lopt: LearnedOptimizer = flax.struct.field(pytree_node=False)
    meta_loss: str = flax.struct.field(pytree_node=False, default="train")
    loss_transform: str = flax.struct.field(pytree_node=False, default="clip")
    loss_clip: float | None = flax.struct.field(pytree_node=False, default=None)

    @classmethod
    def create(
        cls,
        task: Task,
        lopt: LearnedOptimizer,
        *,
        meta_loss: str = "train",
        loss_transform: str = "clip",
        loss_clip: float | None = None,
    ) -> LearnedOptProblem:
        """The problem, with its options checked (UserError naming the bad one). Direct
        construction does not check: JAX rebuilds this pytree at every jit boundary."""
        if meta_loss not in META_LOSSES:
            raise UserError(f"unknown meta_loss {meta_loss!r}; use one of {sorted(META_LOSSES)}")
        if loss_transform not in LOSS_TRANSFORMS:
            raise UserError(
                f"unknown loss_transform {loss_transform!r}; use one of {sorted(LOSS_TRANSFORMS)}"
            )
        if loss_clip is not None and not loss_clip > 0:
            raise UserError(f"loss_clip must be > 0 (or None for the task's), got {loss_clip}")
        return cls(task, lopt, meta_loss, loss_transform, loss_clip)

    @property
    def clip_value(self) -> float:
        return self.task.loss_clip if self.loss_clip is None else self.loss_clip

    def init(self, theta: Theta, key: PRNGKey) -> LearnedOptState:
        params = self.task.init(key)
        return LearnedOptState(params, self.lopt.opt_fn(theta).init(params))

    def step(
        self, theta: Theta, state: LearnedOptState, key: PRNGKey
    ) -> tuple[LearnedOptState, jax.Array]:
        if self.meta_loss == "valid":
            train_key, valid_key = jax.random.split(key)
        else:
            train_key = key
        batch = self.task.sample_batch(train_key, "train")
        loss, grads = jax.value_and_grad(self.task.loss)(state.params, batch)
        mask = getattr(self.task, "param_mask", None)
        extra = {} if mask is None else {"mask": mask}
        updates, opt_state = self.lopt.opt_fn(theta).update(
            grads, state.opt_state, state.params, loss=loss, **extra
        )
        params = optax.apply_updates(state.params, updates)
        if self.meta_loss == "valid":
            loss = self.task.loss(params, self.task.sample_batch(valid_key, "valid"))
        meta_loss = transform_loss(loss, kind=self.loss_transform, loss_clip=self.clip_value)
        return LearnedOptState(params, opt_state), meta_loss
