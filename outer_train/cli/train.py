"""``learned-opt train``: train a preset task with a standard optax optimizer over several seeds.

Prints a summary table (final train / valid / test loss and accuracy per seed), writes
``curves.json``, ``curves.csv`` and ``curves.png`` to ``--out``, and shows a tqdm progress bar
(on a terminal). Training runs in a few equal jitted segments so the bar moves
(``tasks.train.SegmentedTrainer``); the result equals one unsegmented ``tasks.train.train`` call.
``--out`` is checked and claimed (``outer_train.run_dir``: one process at a time) before any
compute.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import time
from pathlib import Path

import jax
import numpy as np
import optax

from learned_opt.errors import UserError
from outer_train import run_dir
from tasks.image_mlp import PRESETS, STANDARD_PRESET, preset
from tasks.train import SegmentedTrainer, check_schedule

HELP = "train a task with a standard optax optimizer (baseline curves)"
EXAMPLE = (
    "learned-opt train --task digits_mlp --optimizer adam --lr 3e-3 --steps 2000 "
    "--seeds 8 --out runs/train_adam"
)

# name -> (factory(learning_rate), default learning rate)
OPTIMIZERS = {
    "adam": (optax.adam, 1e-3),
    "adamw": (optax.adamw, 1e-3),
    "rmsprop": (optax.rmsprop, 1e-3),
    "sgd": (optax.sgd, 0.1),
    "momentum": (lambda lr: optax.sgd(lr, momentum=0.9), 0.03),
}
_CURVES = ("train_loss", "train_accuracy", "valid_loss", "valid_accuracy")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--task", default=STANDARD_PRESET, help=f"task preset: {', '.join(PRESETS)}")
    p.add_argument("--optimizer", default="adam", choices=sorted(OPTIMIZERS))
    p.add_argument("--lr", type=float, default=None,
                   help="learning rate (default per optimizer: "
                   + ", ".join(f"{k} {v[1]:g}" for k, v in OPTIMIZERS.items()) + ")")
    p.add_argument("--steps", type=int, default=1000, help="inner training steps")
    p.add_argument("--seeds", type=int, default=8, help="number of seeds, trained in one vmap")
    p.add_argument("--seed", type=int, default=0, help="base seed; seed i uses split(key(seed))[i]")
    p.add_argument("--eval-every", type=int, default=None,
                   help="evaluate every this many steps (must divide --steps; default ~steps/10)")
    p.add_argument("--out", type=Path, default=None,
                   help="output folder (default runs/train_<task>)")
    p.add_argument("--data-dir", default=None,
                   help="TFDS data dir (default $TFDS_DATA_DIR, else ~/tensorflow_datasets)")
    p.add_argument("--manual-dir", default=None,
                   help="folder with the IDX files of mnist / fashion_mnist "
                   "(default <data-dir>/downloads/manual/<dataset>)")
    p.add_argument("--download", action="store_true",
                   help="let TFDS download a catalog dataset that is not prepared")


def default_eval_every(num_steps: int) -> int:
    """The largest divisor of ``num_steps`` that still gives >= 10 evaluations (or every step)."""
    want = min(10, num_steps)
    return max(d for d in range(1, num_steps + 1) if num_steps % d == 0 and num_steps // d >= want)


def run(args: argparse.Namespace) -> int:
    if args.steps < 1 or args.seeds < 1:
        raise UserError("--steps and --seeds must be positive")
    eval_every = args.eval_every or default_eval_every(args.steps)
    check_schedule(args.steps, eval_every)
    out = args.out or Path("runs") / f"train_{args.task}"
    with run_dir.claim(out):  # before any compute: a bad --out must not cost the results
        return _train(args, eval_every, out)


def _train(args: argparse.Namespace, eval_every: int, out: Path) -> int:
    from tqdm import tqdm

    factory, default_lr = OPTIMIZERS[args.optimizer]
    lr = default_lr if args.lr is None else args.lr
    optimizer = factory(lr)
    task = preset(args.task, data_dir=args.data_dir, manual_dir=args.manual_dir,
                  download=args.download)

    keys = jax.random.split(jax.random.key(args.seed), args.seeds)
    trainer = SegmentedTrainer(optimizer, args.steps, eval_every=eval_every)
    test_eval = jax.jit(jax.vmap(lambda t, p: t.evaluate(p, "test"), in_axes=(None, 0)))

    start = time.perf_counter()
    with tqdm(total=args.steps, unit="step", desc=task.name, disable=None) as bar:
        result = trainer(task, keys, on_segment=lambda done: bar.update(done - bar.n))
    curves = jax.tree.map(np.asarray, result.curves)
    batch_loss = np.asarray(result.batch_loss)
    test = jax.tree.map(np.asarray, test_eval(task, result.params))
    seconds = time.perf_counter() - start

    record = {
        "task": args.task,
        "task_name": task.name,
        "optimizer": args.optimizer,
        "learning_rate": lr,
        "steps": args.steps,
        "eval_every": eval_every,
        "seed": args.seed,
        "num_seeds": args.seeds,
        "seconds": seconds,
        "step": curves.step[0].tolist(),
        **{name: getattr(curves, name).tolist() for name in _CURVES},
        "batch_loss": batch_loss.tolist(),
        "test_loss": test["loss"].tolist(),
        "test_accuracy": test["accuracy"].tolist(),
    }
    (out / "curves.json").write_text(json.dumps(record, indent=1, allow_nan=True))
    _write_csv(out / "curves.csv", curves)
    _plot(out / "curves.png", curves, title=f"{task.name}, {args.optimizer} lr={lr:g}")
    _print_summary(curves, test, seconds, args, eval_every, out)
    return 0


def _write_csv(path: Path, curves) -> None:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["seed", "step", *_CURVES])
        num_seeds, num_points = curves.step.shape
        for s in range(num_seeds):
            for i in range(num_points):
                w.writerow([s, int(curves.step[s, i]),
                            *(repr(float(getattr(curves, c)[s, i])) for c in _CURVES)])


def _plot(path: Path, curves, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    step = curves.step[0]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, metric in zip(axes, ("loss", "accuracy"), strict=True):
        for split, color in (("train", "C0"), ("valid", "C1")):
            values = getattr(curves, f"{split}_{metric}")
            ax.plot(step, np.median(values, axis=0), color=color, label=f"{split} (median)")
            ax.fill_between(step, values.min(0), values.max(0), color=color, alpha=0.2,
                            label=f"{split} (min-max over {len(values)} seeds)")
        ax.set_xlabel("inner step")
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    axes[0].set_yscale("log")
    axes[1].legend(loc="lower right", fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _print_summary(curves, test, seconds, args, eval_every, out: Path) -> None:
    cols = {
        "train_loss": curves.train_loss[:, -1],
        "train_acc": curves.train_accuracy[:, -1],
        "valid_loss": curves.valid_loss[:, -1],
        "valid_acc": curves.valid_accuracy[:, -1],
        "test_loss": test["loss"],
        "test_acc": test["accuracy"],
    }
    print(f"{'seed':>6} " + " ".join(f"{c:>11}" for c in cols))
    for s in range(args.seeds):
        print(f"{s:>6} " + " ".join(f"{v[s]:>11.4f}" for v in cols.values()))
    print(f"{'mean':>6} " + " ".join(f"{v.mean():>11.4f}" for v in cols.values()))
    print(f"{'std':>6} " + " ".join(f"{v.std():>11.4f}" for v in cols.values()))
    bad = [s for s in range(args.seeds) if not math.isfinite(cols["train_loss"][s])]
    if bad:
        print(f"warning: seeds {bad} diverged (non-finite loss); their rows show nan/inf")
    print(f"{args.steps} steps x {args.seeds} seeds, eval every {eval_every}: "
          f"{seconds:.1f} s including compilation; wrote {out}/curves.{{json,csv,png}}")
