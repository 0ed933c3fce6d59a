"""Meta-loss surfaces: the meta-loss on 1-D / 2-D slices through theta, raw and Gaussian-smoothed
(the paper's Fig. 3a; REFERENCE.md "Diagnostics: facts ...": loss-landscape slices, Gaussian
smoothing with common random numbers, the prefix trick).

Slice. For k directions d_1..d_k (pytrees like theta0) and coordinates c = (c_1..c_k),
    theta(c) = theta0 + sum_j c_j d_j,
evaluated at N points: a 1-D slice has coords [N] (values of a, k = 1), a 2-D slice an
N1 x N2 grid of (a, b) flattened row-major to [N1 * N2, 2] (``grid_coords``). All arithmetic is
on the flat vector ``ravel_pytree(theta)`` of P meta-parameters.

Directions.
  * ``random_direction(key, theta, "paper")``: d ~ N(0, I_P) rescaled so ||d||_2 = P (the
    paper's Fig. 3): a = 0.01 then moves each coordinate by 0.01 ||d|| / sqrt(P) = 0.01 sqrt(P)
    RMS (0.42 for the 1762 meta-parameters of the reference MLP optimizer).
  * ``random_direction(key, theta, "per_tensor")``: each leaf of d ~ N(0, I) rescaled to the
    Frobenius norm of the matching leaf of theta (Li et al. 2018's filter normalization, per
    tensor): ||d_leaf|| = ||theta_leaf||. A leaf with ||theta_leaf|| = 0 gets a zero direction
    (it does not move along the slice); a scalar leaf gets +-|theta_leaf|.
  * ``axis_direction(theta, name)``: the unit vector of one named scalar leaf of a dict theta
    (e.g. "log_lr" of LearnedSGD): 1 there, 0 elsewhere; a then is that hyper-parameter's shift.

Meta-loss at a point. ONE fresh episode per theta (``unroll.unroll_particles`` with
``particles=None``: the meta-training engine's own vmapped scan) of T_max = max(horizons) steps
gives per-step losses l_0..l_{T_max-1}; the meta-loss at unroll length T is
    L_T(theta) = (1/T) sum_{t<T} l_t                       (prefix trick: one unroll of T_max)
and NaN if any of l_0..l_{T-1} is non-finite (a divergence at step t makes L_T NaN for every
T > t; counted in ``num_nonfinite``, never dropped).

Randomness (``mode``; ``episode_keys``), with ``episode_key, noise_key = split(key)`` and
``keys = unroll.window_keys(episode_key, 1, T_max)``:
  * every point's episode starts from the same reset key ``keys.reset[0]`` (same init);
  * "fixed_batch": step t uses the key ``keys.step[0, 0]`` for every t and every point -- ONE
    fixed batch, the paper's setting;
  * "common": step t uses ``keys.step[0, t]``: fresh batches per step, the same key sequence at
    every point (common random numbers).
This relies on the problem drawing a step's data from the step key only (``LearnedOptProblem``
does; see ``InnerProblem``). Under JAX's default ``jax_threefry_partitionable = True``,
``split(k, n)[:T] == split(k, T)``, so in "common" mode L_T of a point is exactly
``unroll.evaluate_meta_loss(problem, episode_key, theta, horizon=T, num_tasks=1)`` and does not
depend on which other horizons were requested.

Gaussian smoothing (``num_smoothing`` = S > 0, ``sigma`` > 0):
    L_T^sigma(theta(c)) ~= (1/S) sum_s L_T(theta(c) + eps_s),   eps_s ~ N(0, sigma^2 I_P),
with the SAME S flat perturbations at every point (common random numbers; ``smoothing_noise``
draws them from ``noise_key``), so the smoothed curve is itself smooth. The perturbed episodes
use the point's episode keys (the mode's batches), so the average is over theta only. Per point
and T, non-finite draws are excluded and counted (``smoothed_num_nonfinite``); over the n
finite draws, ``smoothed`` is their mean and ``smoothed_stderr`` = std_s / sqrt(n) (sample std,
ddof = 1; NaN for n < 2).
"""

from __future__ import annotations

import contextlib
import functools
import math
import time
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from outer_train import placement, unroll
from outer_train.base import InnerProblem, PRNGKey, Theta
from outer_train.chunked import map_chunks

MODES: dict[str, str] = {
    "fixed_batch": "one fixed init and one fixed batch for every step and every point (paper)",
    "common": "fresh batches per step from one fixed key sequence, the same at every point",
}
NORMALIZATIONS: dict[str, str] = {
    "paper": "N(0, I) rescaled to ||d||_2 = number of meta-parameters",
    "per_tensor": "each leaf rescaled to the norm of theta's matching leaf (filter normalization)",
}


class SurfaceResult(NamedTuple):
    """A computed slice (host NumPy arrays; N points, k directions, H horizons).

    coords: float32 [N, k]: the slice coordinates c of each point.
    horizons: int64 [H]: the unroll lengths T, in the order requested.
    raw: float32 [N, H]: L_T(theta(c)); NaN where the episode diverged before step T.
    smoothed: float64 [N, H]: mean of the finite L_T(theta(c) + eps_s); None when S = 0.
    smoothed_stderr: float64 [N, H]: std_s / sqrt(n) over the n finite draws; None when S = 0.
    smoothed_num_nonfinite: int64 [N, H]: draws excluded as non-finite; None when S = 0.
    num_nonfinite: int64 [H]: points whose raw L_T is non-finite.
    inner_steps: particle inner steps run (padding of the last chunk included).
    seconds: wall time of ``compute_surface`` (compilation included).
    """

    coords: np.ndarray
    horizons: np.ndarray
    raw: np.ndarray
    smoothed: np.ndarray | None
    smoothed_stderr: np.ndarray | None
    smoothed_num_nonfinite: np.ndarray | None
    num_nonfinite: np.ndarray
    inner_steps: int
    seconds: float


# ---------------------------------------------------------------------------------------------
# Directions and coordinates


def _path_name(path) -> str:
    parts = []
    for entry in path:
        for attr in ("key", "idx", "name"):  # DictKey, SequenceKey, GetAttrKey
            if hasattr(entry, attr):
                parts.append(str(getattr(entry, attr)))
                break
        else:
            parts.append(str(entry))
    return "/".join(parts)


def leaf_names(theta: Theta) -> list[str]:
    """The leaves of theta by path, keys joined with "/" (e.g. "log_lr", "hidden_0/kernel")."""
    return [_path_name(p) for p, _ in jax.tree_util.tree_flatten_with_path(theta)[0]]


def random_direction(key: PRNGKey, theta: Theta, normalization: str = "paper") -> Theta:
    """A random direction like ``theta`` (float32 leaves); see the module docstring.

    "paper": d ~ N(0, I_P), ||d||_2 = P. "per_tensor": ||d_leaf|| = ||theta_leaf|| per leaf, a
    zero leaf where theta's leaf is all zeros.
    """
    if normalization not in NORMALIZATIONS:
        raise ValueError(
            f"unknown direction normalization {normalization!r}; use one of "
            f"{sorted(NORMALIZATIONS)}"
        )
    flat, unravel = ravel_pytree(theta)
    d = np.asarray(jax.random.normal(key, flat.shape), np.float64)
    if normalization == "paper":
        return unravel(jnp.asarray(d * (d.size / np.linalg.norm(d)), flat.dtype))

    def rescale(d_leaf, theta_leaf):
        d_leaf = np.asarray(d_leaf, np.float64)
        theta_norm = float(np.linalg.norm(np.asarray(theta_leaf, np.float64)))
        d_norm = float(np.linalg.norm(d_leaf))
        scale = theta_norm / d_norm if theta_norm > 0 and d_norm > 0 else 0.0
        return jnp.asarray(d_leaf * scale, jnp.result_type(theta_leaf))

    return jax.tree.map(rescale, unravel(jnp.asarray(d, flat.dtype)), theta)


def axis_direction(theta: Theta, name: str) -> Theta:
    """The unit direction of the scalar leaf ``name`` (a ``leaf_names`` entry, e.g. "log_lr"):
    1 on that leaf, 0 on every other. ValueError for an unknown or non-scalar leaf."""
    leaves = dict(
        (_path_name(p), x) for p, x in jax.tree_util.tree_flatten_with_path(theta)[0]
    )
    scalars = [n for n, x in leaves.items() if np.size(x) == 1]
    if name not in leaves:
        raise ValueError(
            f"unknown axis {name!r}; theta's scalar leaves are {scalars} "
            f"(all leaves: {list(leaves)})"
        )
    if np.size(leaves[name]) != 1:
        raise ValueError(
            f"axis {name!r} has shape {np.shape(leaves[name])}: an axis direction needs a scalar "
            f"leaf ({scalars}); use random_direction for tensors"
        )
    return jax.tree_util.tree_map_with_path(
        lambda p, x: (jnp.ones_like if _path_name(p) == name else jnp.zeros_like)(x), theta
    )


def grid_coords(a, b) -> np.ndarray:
    """float32 [N1 * N2, 2]: the grid of (a_i, b_j), row-major (row i * N2 + j), so a 2-D
    result's ``raw.reshape(N1, N2, H)[i, j]`` is the point (a[i], b[j])."""
    grid = np.meshgrid(np.asarray(a, np.float32), np.asarray(b, np.float32), indexing="ij")
    return np.stack(grid, axis=-1).reshape(-1, 2)


def smoothing_noise(key: PRNGKey, num_smoothing: int, dim: int, sigma: float) -> jax.Array:
    """float32 [S, P]: the flat perturbations eps_s = sigma * N(0, I), the same at every point."""
    return sigma * jax.random.normal(key, (num_smoothing, dim), jnp.float32)


# ---------------------------------------------------------------------------------------------
# The per-point computation (traced inside jit)


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"unknown surface mode {mode!r}; use one of {sorted(MODES)}")


def episode_keys(key: PRNGKey, max_horizon: int, mode: str) -> tuple[jax.Array, jax.Array]:
    """(reset key [], step keys [max_horizon]) shared by every point (module docstring)."""
    _check_mode(mode)
    keys = unroll.window_keys(key, 1, max_horizon)
    step = keys.step[0]
    if mode == "fixed_batch":
        step = jnp.repeat(step[:1], max_horizon, axis=0)
    return keys.reset[0], step


def episode_step_losses(
    problem: InnerProblem,
    thetas_flat: jax.Array,
    unravel: Callable[[jax.Array], Theta],
    reset_key: PRNGKey,
    step_keys: jax.Array,
) -> jax.Array:
    """Per-step losses float [C, T] of one fresh episode per row of ``thetas_flat`` [C, P]
    (``unravel`` maps a row to theta), every episode started from ``reset_key`` [] and stepped
    with ``step_keys`` [T].

    The particle engine's ``unroll_particles`` (vmapped scan, no resets). Inside
    ``jax.set_mesh`` with a "particles" axis the C episodes are split over it.
    """
    num = thetas_flat.shape[0]
    thetas = jax.vmap(unravel)(thetas_flat)
    reset_keys = jnp.repeat(reset_key[None], num, axis=0)
    step_keys = jnp.repeat(step_keys[None], num, axis=0)
    thetas, reset_keys, step_keys = placement.constrain_particles((thetas, reset_keys, step_keys))
    _, trace = unroll.unroll_particles(
        problem, thetas, None, reset_keys, step_keys, horizon=step_keys.shape[1], theta_axis=0
    )
    return trace.losses


def prefix_meta_losses(losses: jax.Array, horizons: Sequence[int]) -> jax.Array:
    """[C, H]: L_T = mean(losses[:, :T]) for each T in ``horizons``; NaN if any of the first T
    per-step losses is non-finite. losses: [C, T_max] with T_max >= max(horizons)."""
    columns = []
    for t in horizons:
        head = losses[:, :t]
        finite = jnp.all(jnp.isfinite(head), axis=1)
        columns.append(jnp.where(finite, jnp.mean(head, axis=1), jnp.nan))
    return jnp.stack(columns, axis=1)


@functools.partial(jax.jit, static_argnames=("horizons",))
def _chunk_meta_losses(
    problem, theta0, directions, perturbations, reset_key, step_keys, coords, *, horizons
):
    """[p, R, H]: L_T at theta(c) + perturbation r for p points (coords [p, k]) and the R rows
    of ``perturbations`` [R, P] (row 0 zero: the raw point); every episode starts from
    ``reset_key`` [] and is stepped with ``step_keys`` [T_max]. Rows are point-major, so a chunk
    of points split over devices keeps each point's perturbations on one device."""
    flat0, unravel = ravel_pytree(theta0)
    # elementwise, not a matmul: exact float32 on every backend (no reduced-precision dot)
    points = flat0 + jnp.sum(coords[:, :, None] * directions[None], axis=1)  # [p, P]
    thetas = points[:, None, :] + perturbations[None]  # [p, R, P]
    p, r = thetas.shape[:2]
    losses = episode_step_losses(problem, thetas.reshape(p * r, -1), unravel, reset_key,
                                 step_keys)
    return prefix_meta_losses(losses, horizons).reshape(p, r, len(horizons))


# ---------------------------------------------------------------------------------------------
# The surface


def _smoothing_stats(draws: np.ndarray):
    """draws [N, S, H] -> (mean, stderr, num_nonfinite), each [N, H], NaN-aware (float64)."""
    draws = draws.astype(np.float64)
    finite = np.isfinite(draws)
    n = finite.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(finite, draws, 0.0).sum(axis=1) / n
        sq = np.where(finite, (draws - mean[:, None]) ** 2, 0.0).sum(axis=1)
        stderr = np.where(n >= 2, np.sqrt(sq / np.maximum(n - 1, 1) / n), np.nan)
    mean = np.where(n > 0, mean, np.nan)
    return mean, stderr, draws.shape[1] - n


def compute_surface(
    problem: InnerProblem,
    theta0: Theta,
    directions: Sequence[Theta],
    coords,
    *,
    horizons: Sequence[int],
    mode: str,
    key: PRNGKey,
    num_smoothing: int = 0,
    sigma: float = 0.0,
    chunk_size: int = 64,
    mesh: jax.sharding.Mesh | None = None,
    on_chunk: Callable[[int], None] | None = None,
) -> SurfaceResult:
    """The raw (and with ``num_smoothing`` > 0, Gaussian-smoothed) meta-loss on a slice.

    problem: an InnerProblem pytree (passed to jit as an argument, with its data arrays).
    theta0: the slice's centre. directions: a list of k pytrees like theta0.
    coords: [N] (k = 1) or [N, k] slice coordinates (``grid_coords`` for a 2-D grid).
    horizons: unroll lengths T >= 1; one unroll of max(horizons) steps per episode.
    mode: "fixed_batch" or "common" (``MODES``); key: ``episode_key, noise_key = split(key)``
      (module docstring).
    num_smoothing, sigma: S perturbations of scale sigma (> 0 when S > 0) per point.
    chunk_size: episodes per jitted call (each point runs S + 1: the raw one and S perturbed):
      max(1, chunk_size // (S + 1)) points per call, rounded UP to a multiple of the mesh's
      device count so every call splits evenly; the last chunk is padded (its padding runs).
    mesh: a Mesh with a "particles" axis (``placement.particle_mesh``): each chunk's points
      are split over it, the problem and theta0 replicated; in a group of processes it spans
      their devices and every process gets the whole result. None: the default device.
    on_chunk: ``on_chunk(num_points_done)`` after each chunk (``chunked.map_chunks``).

    Calls are bounded in flight by ``chunked.map_chunks`` (multi-device CPU all-reduce queues
    deadlock otherwise). Returns a ``SurfaceResult``; see the module docstring for the formulas.
    """
    t_start = time.perf_counter()
    _check_mode(mode)
    horizons = tuple(int(t) for t in horizons)
    if not horizons or min(horizons) < 1:
        raise ValueError(f"horizons must be a non-empty list of ints >= 1, got {horizons}")
    if num_smoothing < 0 or (num_smoothing > 0 and not sigma > 0):
        raise ValueError(
            f"smoothing needs num_smoothing >= 0 and sigma > 0 when num_smoothing > 0; got "
            f"num_smoothing = {num_smoothing}, sigma = {sigma}"
        )
    if not isinstance(directions, (list, tuple)) or not directions:
        raise ValueError("directions must be a non-empty list of pytrees like theta0")
    flat0, _ = ravel_pytree(theta0)
    structure = jax.tree.structure(theta0)
    for j, d in enumerate(directions):
        if jax.tree.structure(d) != structure or ravel_pytree(d)[0].shape != flat0.shape:
            raise ValueError(f"direction {j} does not have theta0's structure and shapes")
    directions_flat = jnp.stack([ravel_pytree(d)[0].astype(flat0.dtype) for d in directions])
    coords = np.asarray(coords, np.float32)
    if coords.ndim == 1:
        coords = coords[:, None]
    if coords.ndim != 2 or coords.shape[1] != len(directions) or coords.shape[0] == 0:
        raise ValueError(
            f"coords must be [N] or [N, k] with k = {len(directions)} directions and N >= 1; "
            f"got shape {coords.shape}"
        )

    episode_key, noise_key = jax.random.split(key)
    eps = smoothing_noise(noise_key, num_smoothing, flat0.size, sigma)
    perturbations = jnp.concatenate([jnp.zeros((1, flat0.size), jnp.float32), eps])
    rows_per_point = num_smoothing + 1
    points_per_chunk = max(1, chunk_size // rows_per_point)
    # the keys are drawn once here (not in every chunk's program): threefry is slow to compile
    args = (problem, theta0, directions_flat, perturbations,
            *episode_keys(episode_key, max(horizons), mode))
    place = lambda chunk: chunk
    context = contextlib.nullcontext()
    if mesh is not None:
        if "particles" not in mesh.axis_names:
            raise ValueError(f"mesh needs a 'particles' axis; it has {mesh.axis_names}")
        num_devices = mesh.shape["particles"]
        points_per_chunk = math.ceil(points_per_chunk / num_devices) * num_devices
        replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        split = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("particles"))
        args = placement.put(args, replicated)  # also across processes (distributed)
        place = lambda chunk: placement.put(chunk, split)
        context = jax.set_mesh(mesh)

    def fn(chunk):
        return _chunk_meta_losses(*args, place(chunk), horizons=horizons)

    with context:
        meta = map_chunks(fn, coords, chunk_size=points_per_chunk, on_chunk=on_chunk)
    raw = meta[:, 0]  # [N, H]
    smoothed = stderr = smoothed_nonfinite = None
    if num_smoothing > 0:
        smoothed, stderr, smoothed_nonfinite = _smoothing_stats(meta[:, 1:])
    num_calls = math.ceil(coords.shape[0] / points_per_chunk)
    return SurfaceResult(
        coords=coords,
        horizons=np.asarray(horizons, np.int64),
        raw=raw,
        smoothed=smoothed,
        smoothed_stderr=stderr,
        smoothed_num_nonfinite=smoothed_nonfinite,
        num_nonfinite=np.sum(~np.isfinite(raw), axis=0).astype(np.int64),
        inner_steps=num_calls * points_per_chunk * rows_per_point * max(horizons),
        seconds=time.perf_counter() - t_start,
    )
