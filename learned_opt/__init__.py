"""learned-opt: learned optimizers in flax, as optax transformations.

    lopt = MLPLOpt()                      # static architecture
    theta = lopt.init(jax.random.key(0))  # meta-parameters (a pytree)
    tx = lopt.opt_fn(theta)               # an optax.GradientTransformationExtraArgs
    save("lopt.lopt", lopt, theta); tx, lopt, theta = load("lopt.lopt")
    tx, lopt, theta = pretrained("digits_pes_t200")   # shipped; pretrained.list(): their cards
"""

from learned_opt.base import LearnedOptimizer, Theta
from learned_opt.errors import UserError
from learned_opt.hyper import (
    LearnedAdam,
    LearnedAdamState,
    LearnedMomentum,
    LearnedMomentumState,
    LearnedSGD,
    LearnedSGDState,
)
from learned_opt.io import FORMAT_VERSION, LoadedOptimizer, load, save
from learned_opt.mlp_lopt import MLPLOpt, MLPLOptState
from learned_opt.zoo import PretrainedCard, pretrained

__all__ = [
    "FORMAT_VERSION",
    "LearnedAdam",
    "LearnedAdamState",
    "LearnedMomentum",
    "LearnedMomentumState",
    "LearnedOptimizer",
    "LearnedSGD",
    "LearnedSGDState",
    "LoadedOptimizer",
    "MLPLOpt",
    "MLPLOptState",
    "PretrainedCard",
    "Theta",
    "UserError",
    "load",
    "pretrained",
    "save",
]
