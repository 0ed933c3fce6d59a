"""Pretrained learned optimizers shipped inside the package.

    tx, lopt, theta = learned_opt.pretrained("digits_pes_t200")   # a LoadedOptimizer
    for card in learned_opt.pretrained.list():                      # PretrainedCard records
        print(card.name, card.trained_on["horizon"]); print(card.heldout_table())

Each optimizer is two package-data files in ``learned_opt/pretrained_data/``: ``<name>.lopt``
(``learned_opt.save``'s format) and ``<name>.json``, its card: what it was meta-trained on (task,
estimator, horizon T, outer steps, the whole meta-training config) and its held-out table, one
row per setting (the trained task at T, 2T and 5T inner steps; held-out task variants at T),
each with mean ± standard error over seeds for the learned optimizer and for Adam tuned on that
row's own runs, the 2-standard-error verdicts, and one-seed reference numbers with the settings
that reproduce them. Cards are written by ``python -m outer_train.pretrained_card`` (this
package only reads them). Reading needs neither the training code nor a config.
"""

from __future__ import annotations

import dataclasses
import json
import math
from importlib import resources
from typing import Any

from learned_opt.errors import UserError
from learned_opt.io import LoadedOptimizer, load

DATA_PACKAGE = "learned_opt"
DATA_DIR = "pretrained_data"
CARD_FORMAT = "learned-opt/pretrained-card"
CARD_FORMAT_VERSION = 1


def _data_dir():
    return resources.files(DATA_PACKAGE) / DATA_DIR


@dataclasses.dataclass(frozen=True)
class PretrainedCard:
    """One shipped optimizer's record (its ``<name>.json``).

    name: what ``pretrained(name)`` takes. description: one line, what it was trained on.
    trained_on: ``{"task", "estimator", "horizon", "trunc_length", "outer_steps", "meta_loss"}``.
    config: the meta-training config (``MetaTrainConfig.to_dict()``).
    evaluation: how the table was made (seed, number of seeds, Adam grid, command, CPU).
    heldout: one dict per table row (see ``outer_train.pretrained_card`` for the fields).
    """

    name: str
    description: str
    trained_on: dict[str, Any]
    config: dict[str, Any]
    evaluation: dict[str, Any]
    heldout: tuple[dict[str, Any], ...]

    @property
    def horizon(self) -> int:
        return int(self.trained_on["horizon"])

    def heldout_table(self) -> str:
        """The held-out table as GitHub markdown (mean ± s.e. over seeds)."""
        return heldout_table(self.heldout)


def _fmt(pair: Any, digits: int = 4) -> str:
    if pair is None:
        return "n/a"
    mean, sem = pair
    if mean is None or not math.isfinite(mean):
        return "non-finite"
    if sem is None or not math.isfinite(sem):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {sem:.{digits}f}"


def heldout_table(rows: tuple[dict[str, Any], ...] | list[dict[str, Any]]) -> str:
    """Markdown table of card rows: meta-objective, final valid loss and accuracy, verdicts."""
    lines = [
        "| setting | tasks | inner steps | learned: mean train-batch loss | Adam (tuned lr): "
        "mean train-batch loss | learned: final valid loss | Adam: final valid loss | "
        "learned: final valid acc. | Adam: final valid acc. | verdict |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        lo, ad = r["learned"], r["adam"]
        lines.append(
            f"| {r['setting']} | {', '.join(r['task_labels'])} | {r['num_steps']} | "
            f"{_fmt(lo['mean_batch_loss'])} | {_fmt(ad['mean_batch_loss'])} "
            f"(lr {ad['learning_rate']:g}) | {_fmt(lo['final_valid_loss'])} | "
            f"{_fmt(ad['final_valid_loss'])} | {_fmt(lo['final_valid_accuracy'], 3)} | "
            f"{_fmt(ad['final_valid_accuracy'], 3)} | {r['verdict']} |"
        )
    return "\n".join(lines)


def _read_card(name: str) -> PretrainedCard:
    where = f"pretrained card {name!r}"
    try:
        data = json.loads((_data_dir() / f"{name}.json").read_text("utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{where}: unreadable ({e}); the installed package is damaged") from None
    if data.get("format") != CARD_FORMAT or data.get("format_version") != CARD_FORMAT_VERSION:
        raise UserError(f"{where}: not a {CARD_FORMAT} v{CARD_FORMAT_VERSION} file")
    fields = [f.name for f in dataclasses.fields(PretrainedCard)]
    missing = [f for f in fields if f not in data]
    if missing:
        raise UserError(f"{where}: missing {', '.join(missing)}")
    values = {f: data[f] for f in fields}
    values["heldout"] = tuple(values["heldout"])
    return PretrainedCard(**values)


class Pretrained:
    """``pretrained(name)`` loads a shipped optimizer; ``pretrained.list()`` gives the cards.

    Stateless: every call reads the package data, so a card added to the folder shows at once.
    """

    def names(self) -> tuple[str, ...]:
        """Shipped optimizer names (sorted): those with both a ``.lopt`` and a ``.json``."""
        entries = {p.name for p in _data_dir().iterdir()}
        return tuple(sorted(
            n[: -len(".lopt")] for n in entries
            if n.endswith(".lopt") and n[: -len(".lopt")] + ".json" in entries
        ))

    def _check(self, name: str) -> None:
        names = self.names()
        if name not in names:
            raise UserError(
                f"no pretrained optimizer named {name!r}; available: "
                f"{', '.join(names) or '(none shipped)'}"
            )

    def card(self, name: str) -> PretrainedCard:
        """The record of ``name``; UserError naming the available ones if it is unknown."""
        self._check(name)
        return _read_card(name)

    def list(self) -> list[PretrainedCard]:
        """Every shipped optimizer's record, sorted by name."""
        return [_read_card(n) for n in self.names()]

    def __call__(self, name: str) -> LoadedOptimizer:
        """``learned_opt.load`` of the shipped ``<name>.lopt``: (tx, optimizer, theta)."""
        self._check(name)
        with resources.as_file(_data_dir() / f"{name}.lopt") as path:  # a real file if zipped
            return load(path)


pretrained = Pretrained()
