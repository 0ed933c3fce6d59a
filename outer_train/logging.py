"""Host-side metric logging: one JSON object per line, mirrored to TensorBoard event files.

Metrics are return values of the jitted functions (dicts of scalars), converted to Python floats
here. Each record is ``{"outer_step": n, "kind": "<train|eval|...>", "<name>": value, ...}``;
TensorBoard gets the same scalars as ``<kind>/<name>`` at step ``outer_step`` (readable by
``tensorboard --logdir <out>/tb``). Non-finite values are written as JSON ``NaN``/``Infinity``
(Python's json accepts and produces them) rather than dropped, so a divergence stays visible;
tensorboardX's warning for each of them is silenced (the run reports skipped steps itself).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from outer_train import run_dir


def _not_a_nan_warning(record: logging.LogRecord) -> bool:
    return "NaN or Inf" not in record.getMessage()


def _to_python(value: Any) -> Any:
    if isinstance(value, str | bool | int) or value is None:
        return value
    arr = np.asarray(value)
    if arr.ndim == 0:
        return arr.item()
    return arr.tolist()


class MetricsLogger:
    """Appends metric records to ``<directory>/metrics.jsonl`` and to ``<directory>/tb``.

    Appending (not truncating) lets a resumed run continue the same file; ``truncate_after``
    drops records past the step a run resumes from (and ``purge_step`` does the same for
    TensorBoard), so both hold one history.
    """

    def __init__(self, directory: str | Path, *, tensorboard: bool = True,
                 purge_step: int | None = None):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.path = self.directory / "metrics.jsonl"
        self._file = self.path.open("a")
        self._tb = None
        if tensorboard:
            from tensorboardX import SummaryWriter

            nan_logger = logging.getLogger("tensorboardX.x2num")
            if _not_a_nan_warning not in nan_logger.filters:
                nan_logger.addFilter(_not_a_nan_warning)
            # purge_step: TensorBoard hides events at or after it from an earlier, killed run.
            self._tb = SummaryWriter(logdir=str(self.directory / "tb"), purge_step=purge_step,
                                     flush_secs=10)  # the JSONL file is flushed every record

    def log(self, outer_step: int, kind: str, metrics: Mapping[str, Any]) -> dict[str, Any]:
        """Writes one record; returns it (as Python values)."""
        record = {"outer_step": int(outer_step), "kind": kind}
        record.update({k: _to_python(v) for k, v in metrics.items()})
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            for name, value in record.items():
                if name in ("outer_step", "kind"):
                    continue
                if isinstance(value, int | float) and not isinstance(value, bool):
                    self._tb.add_scalar(f"{kind}/{name}", float(value), int(outer_step))
        return record

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class NullLogger:
    """A ``MetricsLogger`` that writes nothing: for the processes of a group other than the
    writer (``outer_train.distributed.is_writer``)."""

    def log(self, outer_step: int, kind: str, metrics: Mapping[str, Any]) -> dict[str, Any]:
        return {"outer_step": int(outer_step), "kind": kind,
                **{k: _to_python(v) for k, v in metrics.items()}}

    def close(self) -> None:
        pass


def truncate_after(path: str | Path, outer_step: int) -> None:
    """Drops records with ``outer_step`` > the given step (used when a run resumes)."""
    path = Path(path)
    if not path.exists():
        return
    kept = [r for r in read_records(path) if r["outer_step"] <= outer_step]
    run_dir.write_text(path, "".join(json.dumps(r) + "\n" for r in kept))  # atomic


def read_records(path: str | Path, kind: str | None = None) -> Iterator[dict[str, Any]]:
    """Yields the records of a metrics.jsonl file (optionally only one ``kind``).

    A torn last line (a run killed mid-write) is skipped.
    """
    with Path(path).open() as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if kind is None or record.get("kind") == kind:
                yield record
