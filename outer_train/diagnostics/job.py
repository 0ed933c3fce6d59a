"""What every diagnostic command starts from: the inner problem, theta and the devices.

``prepare(name, config, section, optimizer_path)`` builds, from a validated meta-training
config and the diagnostic's section (``outer_train.config.diagnostics``):
  * the task of ``[task]`` (a single task: a diagnostic looks at ONE inner problem) and the
    ``LearnedOptProblem`` of ``[problem]`` (its per-step meta-loss);
  * theta: the learned optimizer's init from ``run.seed``'s theta key (exactly meta-training's
    outer step 0), or the learned optimizer AND theta of a saved ``.lopt`` file (``[lopt]`` is
    then not used), so a user can look at the optimizer they trained;
  * the particle mesh of ``run.devices`` (``placement.particle_mesh``; in a group of
    processes it spans every process's devices).
``make_job`` builds the same from a learned optimizer and theta at hand.
``direction(job, spec, key)`` turns a direction spec ("paper", "per_tensor" or a scalar leaf
name) into a pytree like theta, and ``shifted(theta, d, a)`` is theta + a d.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from learned_opt.base import LearnedOptimizer, Theta
from learned_opt.errors import UserError
from outer_train import placement
from outer_train.config import MetaTrainConfig
from outer_train.diagnostics import surface
from outer_train.problem import LearnedOptProblem
from tasks.base import Task


@dataclasses.dataclass(frozen=True)
class Job:
    """A diagnostic's inputs. name: the command ("surface", "dynamics", "variance");
    section: its config section; theta_source: where theta came from, in words (for outputs);
    command: the command line that asked for it ("" = this process's, ``sys.argv``)."""

    name: str
    config: MetaTrainConfig
    section: Any
    lopt: LearnedOptimizer
    theta: Theta
    theta_source: str
    task: Task
    problem: LearnedOptProblem
    mesh: jax.sharding.Mesh | None
    command: str = ""

    @property
    def num_devices(self) -> int:
        return 1 if self.mesh is None else self.mesh.size

    @property
    def num_meta_parameters(self) -> int:
        return sum(x.size for x in jax.tree.leaves(self.theta))

    def section_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self.section)


def prepare(name: str, config: MetaTrainConfig, section: Any,
            optimizer_path: str | Path | None = None, *, command: str = "") -> Job:
    """The job of ``learned-opt <name>``; ``UserError`` for a family task or a bad file."""
    from outer_train.build import make_lopt, run_keys

    if config.task.kind != "single":
        raise UserError(
            f"`learned-opt {name}` looks at one inner problem: set task.kind = 'single' (and "
            "the architecture in [task]); a family's variants can be looked at one at a time"
        )
    if optimizer_path is not None:
        from learned_opt import io

        loaded = io.load(optimizer_path)
        lopt, theta = loaded.optimizer, loaded.theta
        source = f"file {optimizer_path} ({type(lopt).__name__}; [lopt] not used)"
    else:
        lopt = make_lopt(config.lopt)
        theta = lopt.init(run_keys(config.run.seed).theta)
        source = f"init of {config.lopt.name} from run.seed = {config.run.seed}"
    return make_job(name, config, section, lopt, theta, source, command=command)


def make_job(name: str, config: MetaTrainConfig, section: Any, lopt: LearnedOptimizer,
             theta: Theta, source: str, *, command: str = "") -> Job:
    """The job of a learned optimizer and theta at hand (``prepare`` reads or builds them; in
    a group of processes, process 0 may read them and hand them to the others), on the single
    task of ``config`` (``task.kind = "single"``)."""
    from tasks.image_mlp import make_task

    p = config.problem
    problem = LearnedOptProblem.create(
        make_task(config.task_config()), lopt, meta_loss=p.meta_loss,
        loss_transform=p.loss_transform, loss_clip=p.loss_clip or None,
    )
    mesh = placement.particle_mesh(config.run.devices)
    return Job(name, config, section, lopt, theta, source, problem.task, problem, mesh, command)


def direction(job: Job, spec: str, key: jax.Array, theta: Theta | None = None) -> Theta:
    """The direction ``spec`` at ``theta`` (default ``job.theta``): a random one
    ("paper" / "per_tensor", drawn with ``key``) or a named scalar leaf's axis."""
    theta = job.theta if theta is None else theta
    if spec in surface.NORMALIZATIONS:
        return surface.random_direction(key, theta, spec)
    try:
        return surface.axis_direction(theta, spec)
    except ValueError as e:
        raise UserError(
            f"[{job.name}] direction {spec!r}: {e}; or use a random direction: "
            f"{sorted(surface.NORMALIZATIONS)}"
        ) from None


def shifted(theta: Theta, d: Theta, a: float) -> Theta:
    """theta + a d (leafwise, in theta's dtypes)."""
    return jax.tree.map(lambda t, x: (t + a * x).astype(jnp.result_type(t)), theta, d)
