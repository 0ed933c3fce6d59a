"""Ship a meta-trained optimizer with the package: copy its ``.lopt`` and write its card.

    python -m outer_train.pretrained_card --optimizer runs/x/learned_optimizer.lopt \\
        --config runs/x/config.toml --name digits_pes_t200 --description "..."

writes ``learned_opt/pretrained_data/<name>.lopt`` and ``<name>.json`` (read by
``learned_opt.pretrained``). The card's held-out table has one row per setting:

* the config's held-out tasks (for ``task.kind = "single"`` the trained task itself, on held-out
  seeds) at the trained horizon T and at each ``--multiples`` x T (default 1, 2, 5);
* each ``--variant`` task preset (default: the other digits presets) at T.

Every row is a ``outer_train.generalization`` row: the learned optimizer and Adam at each rate
of ``--adam-lrs`` (default 9 log-spaced values, 1e-3 .. 1e-1) from the same ``--seeds`` seeds
(``jax.random.split(jax.random.key(--seed), --seeds)``, a root key meta-training never uses:
``--seed`` must differ from the config's ``run.seed``), exactly as ``learned-opt eval`` does
(``HeldoutEvaluator``); Adam's rate chosen per row by the lowest mean train-batch loss on that
row's own runs (favouring Adam); mean ± standard error over tasks x seeds; the 2-standard-error
verdicts of ``generalization.verdict`` (``beats_adam``, ``valid_no_worse``, ``diverged``).

Each row also records reference numbers on the first seed alone: the first task trained from
``seed_keys[:1]`` with the learned optimizer and with Adam at the chosen rate, vmapped over that
one seed (what ``tests/test_pretrained.py`` recomputes).
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
from pathlib import Path
from typing import Any

from outer_train import generalization
from outer_train.generalization import default_adam_lrs, task_label, task_record

DEFAULT_SEED = 1000
DEFAULT_SEEDS = 8
DEFAULT_MULTIPLES = (1, 2, 5)
DEFAULT_CURVE_EVERY = 10


def task_from_record(record: dict[str, Any]):
    from tasks.image_mlp import ImageMLPConfig, make_task

    return make_task(ImageMLPConfig(**record["config"]))


def one_seed_numbers(result) -> dict[str, float]:
    """The reference numbers of a ``TrainResult`` with one seed ([1, ...] leaves)."""
    import jax
    import numpy as np

    r = jax.device_get(result)
    return {
        "mean_batch_loss": float(np.mean(r.batch_loss[0])),
        "final_valid_loss": float(r.curves.valid_loss[0, -1]),
        "final_valid_accuracy": float(r.curves.valid_accuracy[0, -1]),
    }


def reference_runs(task, lopt, theta, seed_keys, num_steps: int, eval_every: int,
                   adam_lr: float) -> dict[str, dict[str, float]]:
    """The learned optimizer and Adam at ``adam_lr`` on ``task`` from ``seed_keys[:1]``."""
    import jax
    import jax.numpy as jnp

    from outer_train.evaluation import train_adam_grid, train_learned

    keys = seed_keys[:1]
    learned = train_learned(task, lopt, theta, keys, num_steps, eval_every)
    adam = train_adam_grid(task, jnp.asarray([adam_lr], jnp.float32), keys, num_steps,
                           eval_every)
    adam = jax.tree.map(lambda x: x[0], adam)  # drop the learning-rate axis
    return {"learned": one_seed_numbers(learned), "adam": one_seed_numbers(adam)}


def evaluate_row(setting: str, task_configs: list, lopt, theta, *, num_steps: int,
                 seed: int, num_seeds: int, adam_lrs: tuple[float, ...],
                 curve_every: int) -> dict[str, Any]:
    """One card row: ``generalization.row`` on the card's seeds, with the one-seed reference
    runs and the ``learned-opt eval`` command that recomputes it (see the module docstring)."""
    import jax

    from tasks.image_mlp import PRESETS, make_task

    seed_keys = jax.random.split(jax.random.key(seed), num_seeds)
    ((learned, adam, eval_every),) = generalization.train_rows(
        task_configs, lopt, theta, steps=[num_steps], seed_keys=seed_keys, adam_lrs=adam_lrs,
        curve_every=curve_every)
    out = generalization.row(setting, task_configs, learned, adam, num_steps=num_steps,
                             eval_every=eval_every)
    reference = reference_runs(make_task(task_configs[0]), lopt, theta, seed_keys, num_steps,
                               eval_every, adam.learning_rate)
    reference.update(
        task=task_record(task_configs[0]), seed=seed, num_seeds=num_seeds, seed_index=0,
        num_steps=num_steps, eval_every=eval_every, adam_learning_rate=adam.learning_rate,
        keys="jax.random.split(jax.random.key(seed), num_seeds)[:1]",
        in_row={"learned": float(learned.batch_loss[0, 0].mean()),
                "adam": float(adam.curves.batch_loss[0, 0].mean())},
    )
    labels = out["task_labels"]
    eval_command = None
    if all(label in PRESETS for label in labels):
        eval_command = (
            "learned-opt eval --optimizer pretrained:{name} "
            + " ".join(f"--task {label}" for label in labels)
            + f" --steps {num_steps} --seeds {num_seeds} --seed {seed} --adam-lrs "
            + ",".join(f"{lr:g}" for lr in adam_lrs) + f" --curve-every {curve_every}"
        )
    return {**out, "reference": reference, "eval_command": eval_command}


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def make_card(args: argparse.Namespace, command: str) -> dict[str, Any]:
    import jax

    import learned_opt
    from learned_opt import zoo
    from learned_opt.errors import UserError
    from outer_train.build import make_lopt
    from outer_train.config import load_config
    from tasks.image_mlp import PRESETS

    config = load_config(args.config)
    if args.seed == config.run.seed:
        raise UserError(f"--seed {args.seed} is the config's run.seed; pick another so the "
                        "evaluation keys are apart from meta-training's")
    loaded = learned_opt.load(args.optimizer)
    expected = make_lopt(config.lopt)
    if (loaded.optimizer.name, loaded.optimizer.config()) != (expected.name, expected.config()):
        raise UserError(f"{args.optimizer} is not the [lopt] of {args.config}")
    horizon = generalization.trained_horizon(config)
    variants = (args.variant if args.variant is not None
                else generalization.default_variants(config))
    for v in variants:
        if v not in PRESETS:
            raise UserError(f"unknown --variant {v!r}; presets: {', '.join(PRESETS)}")
    common = dict(seed=args.seed, num_seeds=args.seeds, adam_lrs=tuple(args.adam_lrs),
                  curve_every=args.curve_every)
    trained = generalization.heldout_task_configs(config)
    rows = []
    plan = generalization.plan(config, args.multiples, variants)
    for setting, configs, steps in plan:
        print(f"[{len(rows) + 1}/{len(plan)}] {setting}: "
              f"{', '.join(task_label(c) for c in configs)}, {steps} steps", flush=True)
        row = evaluate_row(setting, list(configs), loaded.optimizer, loaded.theta, num_steps=steps,
                           **common)
        if row["eval_command"]:
            row["eval_command"] = row["eval_command"].format(name=args.name)
        rows.append(row)
        print(zoo.heldout_table(rows[-1:]).splitlines()[-1], flush=True)
    e = config.estimator
    task = ", ".join(task_label(c) for c in trained) if config.task.kind != "family" else (
        f"family ({config.family.num_train_tasks} training variants)")
    return {
        "format": zoo.CARD_FORMAT,
        "format_version": zoo.CARD_FORMAT_VERSION,
        "name": args.name,
        "description": args.description,
        "trained_on": {
            "task": task,
            "estimator": e.name,
            "horizon": horizon,
            "trunc_length": getattr(e, "trunc_length", None),
            "outer_steps": config.run.num_outer_steps,
            "meta_loss": config.problem.meta_loss,
        },
        "config": config.to_dict(),
        "evaluation": {
            "seed": args.seed,
            "num_seeds": args.seeds,
            "seed_keys": "jax.random.split(jax.random.key(seed), num_seeds)",
            "adam_learning_rates": list(args.adam_lrs),
            "adam_tuning": generalization.ADAM_TUNING,
            "objective": generalization.OBJECTIVE,
            "curve_every": args.curve_every,
            "divergence": generalization.DIVERGENCE,
            "command": command,
            "cpu": _cpu(),
            "jax": jax.__version__,
        },
        "heldout": rows,
    }


def _multiples(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"multiples must be >= 1, got {text!r}")
    return values


def build_parser() -> argparse.ArgumentParser:
    from outer_train.cli.evaluate import _lrs

    p = argparse.ArgumentParser(prog="python -m outer_train.pretrained_card",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--optimizer", type=Path, required=True, help="the .lopt to ship")
    p.add_argument("--config", type=Path, required=True,
                   help="the meta-training config it was trained with (its run's config.toml)")
    p.add_argument("--name", required=True, help="the name pretrained(name) will take")
    p.add_argument("--description", required=True, help="one line: what it was trained on")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED,
                   help=f"root of the evaluation keys (default {DEFAULT_SEED})")
    p.add_argument("--seeds", type=int, default=DEFAULT_SEEDS,
                   help=f"seeds per task (default {DEFAULT_SEEDS})")
    p.add_argument("--adam-lrs", type=_lrs, default=default_adam_lrs(),
                   help="comma-separated Adam grid (default 9 log-spaced, 1e-3 .. 1e-1)")
    p.add_argument("--multiples", type=_multiples, default=DEFAULT_MULTIPLES,
                   help="horizon multiples for the trained task (default 1,2,5)")
    p.add_argument("--variant", action="append", default=None,
                   help="held-out task preset evaluated at T (repeatable; default: the other "
                   "presets on the trained dataset)")
    p.add_argument("--curve-every", type=int, default=DEFAULT_CURVE_EVERY,
                   help="whole-split evaluation about every this many steps")
    p.add_argument("--dest", type=Path, default=None,
                   help="output folder (default: the package's learned_opt/pretrained_data)")
    p.add_argument("--force", action="store_true", help="overwrite an existing card")
    return p


def _valid_name(name: str) -> bool:
    return bool(name) and all(c.isalnum() or c in "_-." for c in name) and name[0].isalnum()


def main(argv: list[str] | None = None) -> int:
    from outer_train import runtime

    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    runtime.configure(split_host=False)  # as `learned-opt eval`: its rows reproduce exactly
    from learned_opt.errors import UserError

    try:
        if not _valid_name(args.name):
            raise UserError(f"--name {args.name!r}: use letters, digits, '_', '-', '.'")
        if args.seeds < 2:
            raise UserError("--seeds must be >= 2 (standard errors need two)")
        dest = args.dest or Path(__file__).resolve().parent.parent / "learned_opt" / \
            "pretrained_data"
        target = dest / f"{args.name}.lopt"
        if not args.force and (target.exists() or target.with_suffix(".json").exists()):
            raise UserError(f"{target} exists; --force to overwrite")
        command = "python -m outer_train.pretrained_card " + " ".join(
            a if a.replace("/", "").replace("_", "").replace("-", "").replace(".", "")
            .replace(",", "").replace("=", "").isalnum() else repr(a) for a in argv)
        card = make_card(args, command)
    except UserError as e:
        print(f"pretrained_card: error: {e}", file=sys.stderr)
        return 2
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(args.optimizer, target)
    target.chmod(0o644)
    target.with_suffix(".json").write_text(json.dumps(card, indent=1) + "\n")
    from learned_opt import zoo

    print(zoo.heldout_table(card["heldout"]))
    print(f"wrote {target} and {target.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
