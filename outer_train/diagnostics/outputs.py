"""Writing a diagnostic's results: JSON, CSV, summary.md, PNG, and a progress bar.

Every file is written atomically (a temporary file in the same directory, then
``os.replace``), so an interrupted run never leaves a half-written result. ``provenance(job)``
is what every JSON and summary records: the command line, the date, the machine
(``runtime.machine``: results are bitwise reproducible on one machine, equal to float rounding
across CPUs; timings differ ~2.5x between the CPUs this project meets), the JAX version,
devices (and the processes holding them), where theta came from and the full config.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime
import io
import json
import math
import shlex
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from outer_train.run_dir import write_bytes, write_text
from outer_train.runtime.machine import describe, machine


def jsonable(value: Any) -> Any:
    """Plain JSON data: NumPy/JAX arrays and scalars become lists and numbers, non-finite
    floats ``null`` (strict JSON has no NaN), tuples lists, dataclasses dicts."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if hasattr(value, "__array__") and not isinstance(value, (str, bytes)):
        array = np.asarray(value)
        return jsonable(array.tolist()) if array.ndim else jsonable(array.item())
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, (bool, int, str)) or value is None:
        return value
    if isinstance(value, np.generic):
        return jsonable(value.item())
    return str(value)


def write_json(path: str | Path, data: Any) -> Path:
    return write_text(path, json.dumps(jsonable(data), indent=1) + "\n")


def read_json(path: str | Path) -> dict[str, Any]:
    """A JSON object written by ``write_json``; {} for a missing or unreadable file (the
    writes are atomic, so a partial file only comes from outside)."""
    try:
        data = json.loads(Path(path).read_text())
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def write_csv(path: str | Path, columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> Path:
    """A CSV with a header row; floats written with repr precision, NaN as "nan"."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow([_csv_cell(v) for v in row])
    return write_text(path, buffer.getvalue())


def _csv_cell(value: Any) -> Any:
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float):
        return repr(value)
    return value


def command_line(argv: Sequence[str] | None = None) -> str:
    """The command as a user would retype it: ``learned-opt`` + this process's arguments."""
    argv = sys.argv[1:] if argv is None else argv
    return shlex.join(["learned-opt", *argv])


def provenance(job, *, argv: Sequence[str] | None = None) -> dict[str, Any]:
    """What produced a result (see the module docstring)."""
    import jax

    return {
        "command": job.command or command_line(argv),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "jax": jax.__version__,
        "devices": job.num_devices,
        "processes": jax.process_count(),  # the devices' processes (outer_train.distributed)
        "theta_source": job.theta_source,
        "num_meta_parameters": job.num_meta_parameters,
        "config": {**job.config.to_dict(), job.name: job.section_dict()},
    }


def summary_header(title: str, prov: dict[str, Any]) -> str:
    """The first lines of a summary.md: title, command, machine, theta."""
    n = prov.get("processes", 1)  # absent from provenance written before it was recorded
    processes = f" of {n} processes" if n > 1 else ""
    return "\n".join([
        f"# {title}",
        "",
        f"- command: `{prov['command']}`",
        f"- machine: {describe(prov['machine'])}; {prov['devices']} device(s){processes}; "
        f"jax {prov['jax']}; {prov['date']}",
        f"- theta: {prov['theta_source']} ({prov['num_meta_parameters']} meta-parameters)",
        "",
    ])


def markdown_table(columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def fmt(x: float, digits: int = 4) -> str:
    """A number for a table: 4 significant digits, "nan"/"inf" spelled out."""
    if x is None or not math.isfinite(x):
        return "nan" if x is None or math.isnan(x) else ("inf" if x > 0 else "-inf")
    return f"{x:.{digits}g}"


class _NoBar:
    def update(self, n: int = 1) -> None: ...
    def set_postfix_str(self, s: str) -> None: ...
    def write(self, s: str) -> None:
        print(s)
    def close(self) -> None: ...


def progress_bar(total: int, desc: str, unit: str, enabled: bool):
    """A tqdm bar (or a no-op with the same methods when ``enabled`` is false)."""
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True)


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | Path) -> Path:
    """Saves a matplotlib figure atomically as PNG and closes it."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
    pyplot().close(fig)
    return write_bytes(path, buffer.getvalue())
