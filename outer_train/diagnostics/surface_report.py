"""``learned-opt surface`` as a job: the slice of a ``[surface]`` section, computed and written.

``run(job, out_dir)`` draws the directions, evaluates the slice (``surface.compute_surface``,
split over ``job.mesh``), measures each curve's roughness (``roughness.roughness_report``) and
writes into ``out_dir`` (in a group of processes, process 0 alone):

* ``surface.png``: 1-D: one panel per unroll length T, the raw slice and (with smoothing) the
  smoothed one with a +-2 standard-error band, as the paper's Fig. 3a; 2-D: one heatmap per T;
* ``surface.csv``: one row per (point, T): a, [b,] T, raw[, smoothed, smoothed_stderr,
  smoothed_num_nonfinite];
* ``surface.json``: every number (the CSV's columns as arrays, the roughness table, the cost)
  and ``outputs.provenance``;
* ``summary.md``: the command, the machine, the roughness table and the cost.

Keys: ``direction_key, episode_key = split(key(section.seed))``; direction j is drawn with
``fold_in(direction_key, j)``; ``episode_key`` is ``compute_surface``'s key (episodes and
smoothing noise). A curve with a non-finite point has no roughness (``null``): its divergence
count is reported instead.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import jax
import numpy as np

from outer_train import distributed
from outer_train.diagnostics import outputs, roughness
from outer_train.diagnostics.job import Job, direction
from outer_train.diagnostics.surface import SurfaceResult, compute_surface, grid_coords

EPISODES_PER_CALL = 64  # points_per_call = 0: about this many episodes per jitted call


def axis_values(section) -> tuple[np.ndarray, np.ndarray | None]:
    """(a [N], b [N] or None): the slice coordinates. a is centred on ``section.center``."""
    n, r = section.num_points, section.radius
    a = np.linspace(section.center - r, section.center + r, n, dtype=np.float64)
    b = np.linspace(-r, r, n, dtype=np.float64) if len(section.directions) == 2 else None
    return a.astype(np.float32), None if b is None else b.astype(np.float32)


def curve_roughness(result: SurfaceResult, a: np.ndarray) -> list[dict[str, Any]]:
    """One row per T of a 1-D result: T, the roughness metrics of the raw curve (with the
    smoothed ones when smoothed), and the number of non-finite raw points."""
    rows = []
    for h, t in enumerate(result.horizons):
        raw = result.raw[:, h]
        smooth = None if result.smoothed is None else result.smoothed[:, h]
        row: dict[str, Any] = {"horizon": int(t), "num_nonfinite": int(result.num_nonfinite[h])}
        keys = list(roughness.REPORT_KEYS) + (list(roughness.SMOOTHED_KEYS) if smooth is not None
                                              else [])
        finite = np.all(np.isfinite(raw)) and (smooth is None or np.all(np.isfinite(smooth)))
        if finite:
            row.update(roughness.roughness_report(raw, a, smooth))
        else:
            row.update({k: None for k in keys})
        if smooth is not None and np.all(np.isfinite(smooth)):
            row["smoothed_second_difference"] = roughness.second_difference(smooth, a)
        rows.append(row)
    return rows


def run(job: Job, out_dir: Path, *, progress: bool = True) -> dict[str, Any]:
    """Computes the slice of ``job.section`` and writes the files (module docstring); returns
    the JSON record. In a group of processes every process computes it, process 0 alone writes
    and prints (``distributed.is_writer``)."""
    section = job.section
    direction_key, episode_key = jax.random.split(jax.random.key(section.seed))
    directions = [direction(job, spec, jax.random.fold_in(direction_key, j))
                  for j, spec in enumerate(section.directions)]
    a, b = axis_values(section)
    coords = a if b is None else grid_coords(a, b)
    rows_per_point = section.num_smoothing + 1
    chunk_size = (section.points_per_call * rows_per_point if section.points_per_call
                  else EPISODES_PER_CALL)
    bar = outputs.progress_bar(len(coords), "surface", "point", progress)
    done = [0]

    def on_chunk(n):
        bar.update(n - done[0])
        done[0] = n

    try:
        result = compute_surface(
            job.problem, job.theta, directions, coords, horizons=section.horizons,
            mode=section.mode, key=episode_key, num_smoothing=section.num_smoothing,
            sigma=section.sigma, chunk_size=chunk_size, mesh=job.mesh, on_chunk=on_chunk,
        )
    finally:
        bar.close()
    steps_per_second = result.inner_steps / result.seconds
    writer = distributed.is_writer()
    if writer:
        print(f"surface: {len(coords)} points x {rows_per_point} episode(s) x "
              f"{max(section.horizons)} steps in {result.seconds:.1f} s "
              f"({steps_per_second:,.0f} inner steps/s, compilation included)")
    record = {
        "provenance": outputs.provenance(job),
        "kind": "1-D slice" if b is None else "2-D surface",
        "a": a, "b": b,
        "horizons": result.horizons,
        "raw": result.raw,
        "smoothed": result.smoothed,
        "smoothed_stderr": result.smoothed_stderr,
        "smoothed_num_nonfinite": result.smoothed_num_nonfinite,
        "num_nonfinite": result.num_nonfinite,
        "roughness": curve_roughness(result, a) if b is None else None,
        "cost": {"inner_steps": result.inner_steps, "seconds": result.seconds,
                 "inner_steps_per_second": steps_per_second},
    }
    if not writer:  # a group's other processes compute only
        return record
    out_dir = Path(out_dir)
    outputs.write_json(out_dir / "surface.json", record)
    _write_csv(out_dir / "surface.csv", result, a, b)
    fig = plot_slice(result, a) if b is None else plot_heatmaps(result, a, b, section.directions)
    outputs.save_figure(fig, out_dir / "surface.png")
    outputs.write_text(out_dir / "summary.md", summary(job, record))
    return record


def _write_csv(path: Path, result: SurfaceResult, a: np.ndarray, b: np.ndarray | None) -> None:
    smoothed = result.smoothed is not None
    columns = ["a", *(["b"] if b is not None else []), "horizon", "raw"]
    if smoothed:
        columns += ["smoothed", "smoothed_stderr", "smoothed_num_nonfinite"]

    def rows():
        for i, c in enumerate(result.coords):
            for h, t in enumerate(result.horizons):
                row = [float(x) for x in c] + [int(t), float(result.raw[i, h])]
                if smoothed:
                    row += [float(result.smoothed[i, h]), float(result.smoothed_stderr[i, h]),
                            int(result.smoothed_num_nonfinite[i, h])]
                yield row

    outputs.write_csv(path, columns, rows())


def plot_slice(result: SurfaceResult, a: np.ndarray):
    """One panel per T: raw slice, smoothed slice and its +-2 standard-error band."""
    plt = outputs.pyplot()
    num = len(result.horizons)
    cols = min(num, 3)
    fig, axes = plt.subplots(math.ceil(num / cols), cols, figsize=(4.2 * cols,
                             3.2 * math.ceil(num / cols)), squeeze=False)
    for h, t in enumerate(result.horizons):
        ax = axes.flat[h]
        ax.plot(a, result.raw[:, h], lw=0.8, color="C0", label="raw")
        if result.smoothed is not None:
            m, se = result.smoothed[:, h], result.smoothed_stderr[:, h]
            ax.plot(a, m, lw=1.2, color="C1", label="smoothed")
            ax.fill_between(a, m - 2 * se, m + 2 * se, color="C1", alpha=0.25, lw=0)
        ax.set_title(f"T = {int(t)}")
        ax.set_xlabel("a")
        ax.set_ylabel("meta-loss")
    for ax in axes.flat[num:]:
        ax.set_visible(False)
    axes.flat[0].legend(loc="best", fontsize=8)
    fig.tight_layout()
    return fig


def plot_heatmaps(result: SurfaceResult, a: np.ndarray, b: np.ndarray, names):
    """One heatmap of the raw meta-loss per T over the (a, b) grid."""
    plt = outputs.pyplot()
    num = len(result.horizons)
    fig, axes = plt.subplots(1, num, figsize=(4.4 * num, 3.8), squeeze=False)
    grid = result.raw.reshape(len(a), len(b), num)
    for h, t in enumerate(result.horizons):
        ax = axes[0, h]
        image = ax.imshow(grid[:, :, h].T, origin="lower", aspect="auto",
                          extent=(a[0], a[-1], b[0], b[-1]), cmap="viridis")
        fig.colorbar(image, ax=ax, shrink=0.85)
        ax.set_title(f"T = {int(t)}")
        ax.set_xlabel(f"a ({names[0]})")
        ax.set_ylabel(f"b ({names[1]})")
    fig.tight_layout()
    return fig


def summary(job: Job, record: dict[str, Any]) -> str:
    """summary.md: header, the slice, the roughness table (1-D) and the cost."""
    s, prov, cost = job.section, record["provenance"], record["cost"]
    lines = [outputs.summary_header(f"Meta-loss {record['kind']}", prov)]
    lines.append(
        f"- slice: directions {list(s.directions)}, {s.num_points} points per axis, "
        f"a in [{s.center - s.radius:g}, {s.center + s.radius:g}], mode {s.mode}, "
        f"meta-loss {job.config.problem.meta_loss} / {job.config.problem.loss_transform}"
    )
    if s.num_smoothing:
        lines.append(f"- smoothing: {s.num_smoothing} perturbations, sigma = {s.sigma:g}")
    lines.append(
        f"- cost: {cost['inner_steps']:,} inner steps in {cost['seconds']:.1f} s "
        f"({cost['inner_steps_per_second']:,.0f} inner steps/s, compilation included)"
    )
    lines.append("")
    if record["roughness"] is not None:
        lines += ["## Roughness per unroll length", "", roughness_table(record["roughness"]), ""]
        lines += [roughness_reading(record["roughness"]), ""]
    else:
        nonfinite = ", ".join(f"T = {int(t)}: {int(n)}" for t, n in
                              zip(record["horizons"], record["num_nonfinite"], strict=True))
        lines += [f"Non-finite points: {nonfinite}.", ""]
    lines += ["Metrics (outer_train.diagnostics.roughness): second difference = mean |y[i+1] - "
              "2 y[i] + y[i-1]| / range(y); total variation = sum |y[i+1] - y[i]| / range(y); "
              "smoothness ratio = raw second difference / smoothed second difference.", ""]
    return "\n".join(lines)


def roughness_table(rows: list[dict[str, Any]]) -> str:
    columns = ["T", "2nd difference", "total variation", "local minima", "max abs slope",
               "non-finite"]
    smoothed = any("smoothness_ratio" in r for r in rows)
    if smoothed:
        columns += ["smoothed 2nd diff.", "smoothness ratio", "raw-smoothed gap"]

    def cell(row, key, digits=4):
        value = row.get(key)
        return "-" if value is None else outputs.fmt(value, digits)

    body = []
    for r in rows:
        line = [r["horizon"], cell(r, "second_difference"), cell(r, "total_variation"),
                cell(r, "num_local_minima"), cell(r, "max_abs_slope"), r["num_nonfinite"]]
        if smoothed:
            line += [cell(r, "smoothed_second_difference"), cell(r, "smoothness_ratio"),
                     cell(r, "smoothed_gap")]
        body.append(line)
    return outputs.markdown_table(columns, body)


def roughness_reading(rows: list[dict[str, Any]]) -> str:
    """One sentence comparing the longest and the shortest unroll's roughness."""
    first, last = rows[0], rows[-1]
    if first["second_difference"] is None or last["second_difference"] is None:
        return "The roughness ratio is undefined: a curve has non-finite points."
    ratio = (last["second_difference"] / first["second_difference"]
             if first["second_difference"] > 0 else math.inf)
    text = (f"At T = {last['horizon']} the slice is {outputs.fmt(ratio, 3)}x as rough as at "
            f"T = {first['horizon']} (normalized second difference).")
    if last.get("smoothness_ratio") is not None:
        text += (f" Smoothing makes the T = {last['horizon']} slice "
                 f"{outputs.fmt(last['smoothness_ratio'], 3)}x smoother.")
    return text
