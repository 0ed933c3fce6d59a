"""``learned-opt dynamics`` as a job: the trajectory of a ``[dynamics]`` section, its
Jacobians and gradients (``diagnostics.dynamics.compute_dynamics``), written.

The trajectory is the ``[task]`` trained by the learned optimizer at theta = theta0 + shift d,
theta0 its init from ``run.seed`` or the ``--optimizer`` file, d the ``dynamics.direction``
drawn from ``dynamics.seed``'s key, or by an optax optimizer (``dynamics.optimizer``). Keys as
``learned-opt surface`` draws them: ``direction_key, key = split(key(dynamics.seed))``, d from
``fold_in(direction_key, 0)``, and ``key`` goes to ``compute_dynamics``; so with
``dynamics.seed = surface.seed``, the same direction spec and mode, seed 0's trajectory is the
one behind the surface's first slice at a = shift. Everything runs on one device
(``run.devices`` is not used: one trajectory per seed).

Writes into the output directory:
  * ``dynamics.json``: every number (per seed and summarized), the verdict, timings and
    ``outputs.provenance``;
  * ``dynamics.png``: lambda_t vs t with its 2-SE band and the tail estimates; sigma_max and the
    spectral radius at the chosen steps; ||dL_T/dtheta|| vs T (log axes) with the e^(lambda T)
    line through the first point; the per-step meta-loss;
  * ``summary.md``: the header, the verdict, the tables and the command.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax.flatten_util import ravel_pytree

from outer_train.diagnostics import outputs
from outer_train.diagnostics.dynamics import (
    OPTAX_OPTIMIZERS,
    VERDICT_Z,
    OptaxBaseline,
    compute_dynamics,
    exponent_stats,
    summarize,
)
from outer_train.diagnostics.job import Job, direction, shifted
from outer_train.diagnostics.outputs import fmt, markdown_table, summary_header


def trajectory(job, key):
    """(problem, theta, a description in words) of the section's trajectory."""
    sec = job.section
    if sec.optimizer != "lopt":
        baseline = OptaxBaseline(sec.optimizer, sec.learning_rate)
        what = f"{OPTAX_OPTIMIZERS[sec.optimizer]} with learning_rate = {sec.learning_rate:g}"
        return job.problem.replace(lopt=baseline), {}, what
    d = direction(job, sec.direction, key)  # always: a bad direction is rejected even at 0
    theta = shifted(job.theta, d, sec.shift) if sec.shift != 0 else job.theta
    norm = float(jax.numpy.linalg.norm(ravel_pytree(d)[0]))
    rms = abs(sec.shift) * norm / math.sqrt(max(job.num_meta_parameters, 1))
    sign = "-" if sec.shift < 0 else "+"
    what = (f"{type(job.lopt).__name__} at theta0 {sign} {abs(sec.shift):g} d (direction "
            f"{sec.direction!r}, ||d|| = {norm:.4g}: RMS shift {rms:.3g} per meta-parameter)")
    return job.problem, theta, what


def _band(values):
    """(mean [T], stderr [T]) over the seeds x vectors of values [S, V, T]."""
    stats = [exponent_stats(values[:, :, t]) for t in range(values.shape[-1])]
    return np.array([s.mean for s in stats]), np.array([s.stderr for s in stats])


def figure(result, summary, title: str):
    """The 4-panel dynamics.png (module docstring)."""
    plt = outputs.pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(12, 8.5))
    horizons = result.horizons
    t = np.arange(1, result.log_growth.shape[-1] + 1)
    mean, se = _band(result.log_growth / t)

    ax = axes[0, 0]
    ax.plot(t, mean, label="lambda_t = log ||J_{t-1}..J_0 v|| / t")
    ax.fill_between(t, mean - VERDICT_Z * se, mean + VERDICT_Z * se, alpha=0.3,
                    label=f"+-{VERDICT_Z:g} SE")
    tails = summary["per_horizon"]
    ax.errorbar(horizons, [h["tail"]["mean"] for h in tails],
                yerr=[VERDICT_Z * (h["tail"]["stderr"] if math.isfinite(h["tail"]["stderr"])
                                   else 0.0) for h in tails],
                fmt="o", color="C3", capsize=3, label="tail estimate at T")
    ax.axhline(0.0, color="k", lw=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("inner step t")
    ax.set_ylabel("Lyapunov exponent (per step)")
    ax.set_title("finite-time maximal Lyapunov exponent")
    ax.legend(fontsize=8)

    ax = axes[0, 1]
    if result.jacobian_steps.size:
        where = np.arange(result.jacobian_steps.size)  # evenly spaced: the steps as labels
        for i in range(result.sigma_max.shape[0]):
            label = i == 0
            ax.plot(where, result.sigma_max[i], "o-", color="C0", alpha=0.7,
                    label="sigma_max(J_t)" if label else None)
            ax.plot(where, result.spectral_radius[i], "s--", color="C1",
                    alpha=0.7, label="spectral radius estimate" if label else None)
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_yscale("log")
        ax.set_xticks(where, [str(int(s)) for s in result.jacobian_steps])
        ax.legend(fontsize=8)
    ax.set_xlabel("inner step t")
    ax.set_title("one-step Jacobian J_t = ds_{t+1}/ds_t (one line per seed)")

    ax = axes[1, 0]
    if result.grad_norm is not None:
        norms = result.grad_norm.astype(np.float64)
        for i in range(norms.shape[0]):
            ax.plot(horizons, norms[i], "o", color="C0", alpha=0.5,
                    label="per seed" if i == 0 else None)
        logs = np.log(np.where(norms > 0, norms, np.nan))  # non-finite -> nan, no warning
        finite = np.isfinite(logs)
        geo = np.exp(np.where(finite, logs, 0).sum(0) / np.maximum(finite.sum(0), 1))
        geo = np.where(finite.any(0), geo, np.nan)
        ax.plot(horizons, geo, "-", color="C0", label="geometric mean")
        lam = summary["per_horizon"][-1]["tail"]["mean"]
        if math.isfinite(lam) and np.isfinite(geo[0]):
            ts = np.linspace(horizons[0], horizons[-1], 200)
            ref = geo[0] * np.exp(lam * (ts - horizons[0]))
            keep = ref <= 1e3 * np.nanmax(geo)  # do not let the line squash the data
            ax.plot(ts[keep], ref[keep], ":", color="C3",
                    label=f"~ e^(lambda T), lambda = {lam:+.3g} (tail at T_max)")
        overflow = (np.isfinite(result.grad_meta_loss) & ~np.isfinite(norms)).any(axis=0)
        for j, t_over in enumerate(horizons[overflow]):
            ax.axvline(t_over, color="C7", ls="--", lw=0.8,
                       label="gradient overflowed float32" if j == 0 else None)
        ax.set_yscale("log")
        ax.set_xscale("log")
        ax.legend(fontsize=8)
        ax.set_title("full-backprop meta-gradient norm ||dL_T/dtheta||")
    else:
        ax.set_title("meta-gradient norms: not computed")
    ax.set_xlabel("unroll length T")

    ax = axes[1, 1]
    for i in range(result.losses.shape[0]):
        ax.plot(np.arange(result.losses.shape[1]), result.losses[i], lw=0.8)
    ax.set_xlabel("inner step t")
    ax.set_ylabel("per-step meta-loss l_t")
    ax.set_title("the trajectory (one line per seed)")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def _pm(stats) -> str:

    return f"{fmt(stats['mean'])} +- {fmt(stats['stderr'], 2)}"


def summary_md(prov, what, sec, result, summary, rates) -> str:
    """summary.md: the header, the verdict, the tables and the cost lines ``rates``."""
    verdict = summary["verdict"]
    rows = []
    for h, row in enumerate(summary["per_horizon"]):
        grad = "-"
        if result.grad_norm is not None:
            norms = result.grad_norm[:, h].astype(np.float64)
            finite = norms[np.isfinite(norms) & (norms > 0)]
            grad = fmt(float(np.exp(np.mean(np.log(finite))))) if finite.size else "nan"
        rows.append([row["horizon"], _pm(row["lyapunov"]), _pm(row["tail"]),
                     fmt(row["meta_loss"]), grad])
    over = summary["per_horizon"][-1]["tail"]["stderr_over"]
    lines = [
        summary_header("learned-opt dynamics", prov),
        f"- trajectory: {what}; mode {sec.mode}; {sec.num_seeds} seed(s) x "
        f"{sec.num_vectors} tangent(s), {int(result.horizons[-1])} inner steps",
        "",
        f"**Verdict:** {verdict['line']}",
        "",
        "## Lyapunov exponent and meta-gradient vs unroll length",
        "",
        "lambda_T = log ||J_{T-1}..J_0 v|| / T; tail = the growth rate over steps T/2..T "
        "(drops the O(1/T) transient; the verdict uses it at the longest T). mean +- standard "
        f"error over {over}. L_T: mean of the first T per-step meta-losses (mean over seeds); "
        "||dL_T/dtheta||: full backprop, geometric mean over seeds.",
        "",
        markdown_table(["T", "lambda_T", "tail", "L_T", "norm of dL_T/dtheta"], rows),
        "",
    ]
    if result.grad_norm is not None:
        lam = summary["per_horizon"][-1]["tail"]["mean"]
        lines += [
            f"Gradient growth: fitted log-slope of ||dL_T/dtheta|| vs T = "
            f"{fmt(summary['grad_log_slope'])} per step; of T ||dL_T/dtheta|| (the summed "
            f"loss's gradient, the one to compare) = {fmt(summary['sum_grad_log_slope'])}; "
            f"lambda (tail, T = {int(result.horizons[-1])}) = {fmt(lam)}. The gradient also "
            "grows through the meta-loss's own sensitivity (log of a falling loss: "
            "d log l = dl / l) and the sum over steps; only growth beyond those is the "
            "Jacobian products'.",
            "",
        ]
        overflow = [int(t) for h, t in enumerate(result.horizons)
                    if (np.isfinite(result.grad_meta_loss[:, h])
                        & ~np.isfinite(result.grad_norm[:, h])).any()]
        if overflow:
            lines += [
                f"At T = {overflow} some seed's L_T is finite but its backprop gradient is not: "
                "the gradient overflowed float32 (> 3e38).",
                "",
            ]
    if result.jacobian_steps.size:
        jrows = [[int(s), fmt(float(np.mean(result.sigma_max[:, j]))),
                  fmt(float(np.mean(result.spectral_radius[:, j])))]
                 for j, s in enumerate(result.jacobian_steps)]
        lines += [
            "## One-step Jacobian ds_{t+1}/ds_t",
            "",
            f"Power iteration ({sec.power_iterations} products; sigma_max is a lower bound), "
            "mean over seeds.",
            "",
            markdown_table(["step t", "sigma_max", "spectral radius"], jrows),
            "",
        ]
    lines += ["## Cost", "", *[f"- {r}" for r in rates], ""]
    return "\n".join(lines)


def rates(result) -> list[str]:
    """The cost lines: inner steps and steps/s of the trajectory and gradient phases."""
    lines = []
    steps = result.trajectory_steps
    line = (f"trajectory + Jacobians: {steps} inner steps ({result.log_growth.shape[1]} "
            f"tangent(s) each) in {result.trajectory_seconds:.1f} s, compilation included: "
            f"{steps / result.trajectory_seconds:.1f} inner steps/s")
    if result.seed_seconds.size >= 2:
        after = result.losses.shape[1] / float(min(result.seed_seconds[1:]))
        line += f" ({after:.1f} inner steps/s after compilation)"
    lines.append(line)
    if result.gradient_steps:
        lines.append(
            f"meta-gradients: {result.gradient_steps} forward inner steps (backward for "
            f"{result.horizons.size} horizon(s)) in {result.gradient_seconds:.1f} s, "
            f"compilation included: {result.gradient_steps / result.gradient_seconds:.1f} "
            "inner steps/s")
    return lines


def run(job: Job, out: Path, *, progress: bool = True) -> dict[str, Any]:
    """Computes the section's dynamics and writes the files (module docstring); returns the
    summary (with its "verdict")."""
    sec = job.section
    direction_key, key = jax.random.split(jax.random.key(sec.seed))
    problem, theta, what = trajectory(job, jax.random.fold_in(direction_key, 0))
    max_horizon = sec.horizons[-1]
    gradients = sec.gradient_norms and sec.optimizer == "lopt"
    total = sec.num_seeds * max_horizon * (2 if gradients else 1)
    bar = outputs.progress_bar(total, "dynamics", "step", enabled=progress)
    progress = {"done": 0}

    def on_progress(done: int) -> None:
        bar.update(min(done, total) - progress["done"])
        progress["done"] = min(done, total)

    print(f"learned-opt dynamics: {what}; {sec.num_seeds} seed(s), {sec.num_vectors} "
          f"tangent(s), T up to {max_horizon} ({sec.mode})", flush=True)
    try:
        result = compute_dynamics(
            problem, theta, horizons=sec.horizons, mode=sec.mode, key=key,
            num_seeds=sec.num_seeds, num_vectors=sec.num_vectors,
            jacobian_steps=sec.jacobian_steps, power_iterations=sec.power_iterations,
            renorm_every=sec.renorm_every, gradients=gradients, on_progress=on_progress,
        )
    finally:
        bar.close()
    summary = summarize(result)
    lines = rates(result)
    prov = outputs.provenance(job)
    if sec.gradient_norms and not gradients:
        summary["gradient_norms_note"] = (
            f"not computed: dynamics.optimizer = {sec.optimizer!r} has no theta")
    outputs.write_json(out / "dynamics.json", {
        "provenance": prov,
        "trajectory": what,
        "horizons": result.horizons,
        "jacobian_steps": result.jacobian_steps,
        "summary": summary,
        "per_seed": {
            "lyapunov": result.lyapunov,
            "tail": result.tail,
            "sigma_max": result.sigma_max,
            "spectral_radius": result.spectral_radius,
            "grad_norm": result.grad_norm,
            "grad_meta_loss": result.grad_meta_loss,
            "losses": result.losses,
            "log_growth": result.log_growth,
        },
        "timing": {
            "trajectory_steps": result.trajectory_steps,
            "trajectory_seconds": result.trajectory_seconds,
            "seed_seconds": result.seed_seconds,
            "gradient_steps": result.gradient_steps,
            "gradient_seconds": result.gradient_seconds,
            "lines": lines,
        },
    })
    outputs.save_figure(figure(result, summary, f"learned-opt dynamics: {what}"),
                        out / "dynamics.png")
    outputs.write_text(out / "summary.md", summary_md(prov, what, sec, result, summary, lines))
    for line in lines:
        print(line)
    return summary
