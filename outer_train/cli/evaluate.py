"""``learned-opt eval``: train tasks with a saved learned optimizer against tuned Adam.

    learned-opt eval --optimizer runs/x/learned_optimizer.lopt --task digits_mlp --steps 200
    learned-opt eval --optimizer runs/x/learned_optimizer.lopt --config runs/x/config.toml
    learned-opt eval --optimizer pretrained:digits_pes_t200 --task digits_mlp_tanh

``--optimizer pretrained:NAME`` takes a shipped optimizer (``learned_opt.pretrained``).

Tasks: ``--task`` presets (repeatable; ``tasks.image_mlp.PRESETS``), or the held-out tasks of a
meta-training config (``--config``: its task, or its family's held-out variants; ``--steps``
and ``--seeds`` then default to its evaluation settings). Each task is trained from ``--seeds``
seeds with the learned optimizer and with Adam at every learning rate of ``--adam-lrs``; Adam's
rate is chosen by the mean training-batch loss over the run on these same tasks and seeds
(favouring Adam). Writes heldout_curves.png/.json and summary.md to ``--out``, which is checked
and claimed (``outer_train.run_dir``: one process at a time) before any compute.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from learned_opt.errors import UserError

HELP = "evaluate a saved learned optimizer against tuned Adam (curves and table)"
EXAMPLE = (
    "learned-opt eval --optimizer runs/quickstart/learned_optimizer.lopt "
    "--task digits_mlp --steps 200"
)
DEFAULT_ADAM_LRS = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1)
DEFAULT_STEPS = 200
DEFAULT_SEEDS = 8


def _lrs(text: str) -> tuple[float, ...]:
    try:
        lrs = tuple(float(x) for x in text.split(","))
    except ValueError:
        msg = f"expected comma-separated numbers, got {text!r}"
        raise argparse.ArgumentTypeError(msg) from None
    if not lrs or any(not lr > 0 for lr in lrs):
        raise argparse.ArgumentTypeError(f"learning rates must be > 0, got {text!r}")
    return lrs


def add_arguments(p: argparse.ArgumentParser) -> None:
    from tasks.image_mlp import PRESETS, STANDARD_PRESET

    p.add_argument("--optimizer", required=True,
                   help="a learned optimizer file (learned_opt.save), e.g. from meta-train, or "
                   "pretrained:NAME for a shipped one (learned_opt.pretrained.names())")
    p.add_argument("--task", action="append", default=None,
                   help=f"task preset, repeatable: {', '.join(PRESETS)} "
                   f"(default {STANDARD_PRESET})")
    p.add_argument("--config", type=Path, default=None,
                   help="evaluate on the held-out tasks of this meta-train config instead")
    p.add_argument("--steps", type=int, default=None,
                   help=f"inner training steps per run (default {DEFAULT_STEPS}, or the "
                   "config's evaluation steps)")
    p.add_argument("--seeds", type=int, default=None,
                   help=f"seeds per task (default {DEFAULT_SEEDS}, or the config's)")
    p.add_argument("--seed", type=int, default=1000,
                   help="base seed of the evaluation keys (pick one not used for meta-training)")
    p.add_argument("--adam-lrs", type=_lrs, default=DEFAULT_ADAM_LRS,
                   help="comma-separated Adam learning-rate grid")
    p.add_argument("--curve-every", type=int, default=10,
                   help="evaluate on the whole splits about every this many steps")
    p.add_argument("--out", type=Path, default=None,
                   help="output directory (default runs/eval_<optimizer file stem>)")


def _tasks(args: argparse.Namespace):
    """(tasks, default steps, default seeds) from --task presets or --config."""
    if args.config is not None:
        if args.task:
            raise UserError("give --task or --config, not both")
        from outer_train.build import make_tasks, run_keys
        from outer_train.config import load_config

        config = load_config(args.config)
        _, heldout = make_tasks(config, run_keys(config.run.seed))
        return heldout, config.eval_inner_steps, config.eval.num_seeds
    from tasks.image_mlp import STANDARD_PRESET, preset

    return tuple(preset(n) for n in (args.task or [STANDARD_PRESET])), DEFAULT_STEPS, DEFAULT_SEEDS


PRETRAINED_PREFIX = "pretrained:"


def _load_optimizer(spec: str):
    """``learned_opt.load`` of a file, or ``learned_opt.pretrained`` of ``pretrained:NAME``."""
    import learned_opt

    if spec.startswith(PRETRAINED_PREFIX):
        return learned_opt.pretrained(spec[len(PRETRAINED_PREFIX):])
    return learned_opt.load(spec)


def run(args: argparse.Namespace) -> int:
    from outer_train import run_dir

    if args.optimizer.startswith(PRETRAINED_PREFIX):
        from learned_opt import pretrained

        pretrained.card(args.optimizer[len(PRETRAINED_PREFIX):])  # unknown: names the known
        stem = args.optimizer[len(PRETRAINED_PREFIX):]
    else:
        path = Path(args.optimizer)
        if not path.is_file():
            what = "is a folder" if path.is_dir() else "not found"
            raise UserError(f"optimizer file {args.optimizer!r} {what}")
        stem = path.stem
    out = args.out or Path("runs") / f"eval_{stem}"
    with run_dir.claim(out):  # before any compute: a bad --out must not cost the results
        return _evaluate(args, out)


def _evaluate(args: argparse.Namespace, out: Path) -> int:
    tasks, default_steps, default_seeds = _tasks(args)
    steps = args.steps or default_steps
    seeds = args.seeds or default_seeds
    if steps < 1 or seeds < 1 or args.curve_every < 1:
        raise UserError("--steps, --seeds and --curve-every must be positive")

    import jax

    from outer_train import report
    from outer_train.evaluation import HeldoutEvaluator, eval_every_for

    loaded = _load_optimizer(args.optimizer)
    evaluator = HeldoutEvaluator(
        tasks=tuple(tasks),
        lopt=loaded.optimizer,
        seed_keys=jax.random.split(jax.random.key(args.seed), seeds),
        num_steps=steps,
        eval_every=eval_every_for(steps, args.curve_every),
        adam_learning_rates=tuple(args.adam_lrs),
    )
    summary = evaluator.evaluate(loaded.theta, outer_step=-1)
    results = evaluator.final_results()
    path = report.write_eval_report(
        out, results, optimizer_file=str(args.optimizer), objective="mean train-batch loss",
    )
    print(report.results_table(results))
    print(f"tuned Adam lr {summary['adam_learning_rate']:g}; summary: {path}")
    return 0
