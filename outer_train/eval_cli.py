"""``learned-opt eval``: train tasks with a saved learned optimizer against tuned Adam.

    learned-opt eval --optimizer runs/x/learned_optimizer.lopt --task digits_mlp --steps 200

Each task (``--task``, repeatable; presets of ``tasks.image_mlp.PRESETS``) is trained from
``--seeds`` seeds with the learned optimizer and with Adam at every learning rate of
``--adam-lrs``; Adam's rate is chosen by the mean training-batch loss over the run on these same
tasks and seeds (favouring Adam). Writes heldout_curves.png/.json and summary.md to ``--out``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from learned_opt.errors import UserError

HELP = "evaluate a saved learned optimizer against tuned Adam (curves and table)"
DEFAULT_ADAM_LRS = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1)


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
    from tasks.image_mlp import STANDARD_PRESET

    p.add_argument("--optimizer", type=Path, required=True,
                   help="a learned optimizer file (learned_opt.save), e.g. from meta-train")
    p.add_argument("--task", action="append", default=None,
                   help=f"task preset, repeatable (default {STANDARD_PRESET})")
    p.add_argument("--steps", type=int, default=200, help="inner training steps per run")
    p.add_argument("--seeds", type=int, default=8, help="seeds per task")
    p.add_argument("--seed", type=int, default=1000,
                   help="base seed of the evaluation keys (use one never used for meta-training)")
    p.add_argument("--adam-lrs", type=_lrs, default=DEFAULT_ADAM_LRS,
                   help="comma-separated Adam learning-rate grid")
    p.add_argument("--curve-every", type=int, default=10,
                   help="evaluate on the whole splits about every this many steps")
    p.add_argument("--out", type=Path, default=None,
                   help="output directory (default runs/eval_<optimizer file stem>)")


def run(args: argparse.Namespace) -> int:
    if args.steps < 1 or args.seeds < 1 or args.curve_every < 1:
        raise UserError("--steps, --seeds and --curve-every must be positive")
    if not args.optimizer.exists():
        raise UserError(f"optimizer file {str(args.optimizer)!r} not found")

    import jax

    import learned_opt
    from outer_train import report
    from outer_train.evaluation import HeldoutEvaluator, eval_every_for
    from tasks.image_mlp import STANDARD_PRESET, preset

    loaded = learned_opt.load(args.optimizer)
    tasks = tuple(preset(name) for name in (args.task or [STANDARD_PRESET]))
    evaluator = HeldoutEvaluator(
        tasks=tasks,
        lopt=loaded.optimizer,
        seed_keys=jax.random.split(jax.random.key(args.seed), args.seeds),
        num_steps=args.steps,
        eval_every=eval_every_for(args.steps, args.curve_every),
        adam_learning_rates=tuple(args.adam_lrs),
    )
    summary = evaluator.evaluate(loaded.theta, outer_step=-1)
    results = evaluator.final_results()
    out = args.out or Path("runs") / f"eval_{args.optimizer.stem}"
    path = report.write_eval_report(
        out, results, optimizer_file=str(args.optimizer), objective="mean train-batch loss",
    )
    print(report.results_table(results))
    print(f"tuned Adam lr {summary['adam_learning_rate']:g}; summary: {path}")
    return 0
