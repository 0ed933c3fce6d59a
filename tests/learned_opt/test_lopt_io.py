"""save/load: bitwise round trip, atomic writes, and clear errors for every kind of bad file."""

from __future__ import annotations

import functools
import io
import json
import os
import subprocess
import sys
import zipfile

import jax
import numpy as np
import pytest

from learned_opt import (
    FORMAT_VERSION,
    LearnedAdam,
    LearnedMomentum,
    LearnedSGD,
    MLPLOpt,
    UserError,
    load,
    save,
)

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LOPTS = {
    "mlp_lopt": MLPLOpt(),
    "mlp_lopt_variant": MLPLOpt(hidden_sizes=(16,), decays=(0.9, 0.99), use_params=False),
    "learned_sgd": LearnedSGD(init_lr=0.05),
    "learned_momentum": LearnedMomentum(),
    "learned_adam": LearnedAdam(init_b2=0.99),
}
SHAPES = {"w": (6, 4), "b": (4,)}


def _trained_theta(lopt, seed=0):
    """A theta unlike init (as after meta-training), so the round trip is not vacuous."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda x: (np.asarray(x) + 0.1 * rng.standard_normal(x.shape)).astype(np.float32),
        lopt.init(jax.random.key(seed)),
    )


def _data(seed):
    rng = np.random.default_rng(seed)
    return {k: rng.standard_normal(s).astype(np.float32) for k, s in SHAPES.items()}


@functools.cache
def _runner(lopt):
    """Three update steps, jitted with theta as an ARGUMENT: one program for both thetas."""

    @jax.jit
    def run(theta, params, grads_seq):
        tx = lopt.opt_fn(theta)
        state, out = tx.init(params), []
        for grads in grads_seq:
            updates, state = tx.update(grads, state, params, loss=1.0)
            params = jax.tree.map(lambda p, u: p + u, params, updates)
            out.append(updates)
        return out, state

    return run


def _updates(lopt, theta):
    return _runner(lopt)(theta, _data(1), [_data(2 + t) for t in range(3)])


@pytest.fixture
def saved(tmp_path):
    lopt = MLPLOpt()
    path = tmp_path / "opt.lopt"
    save(path, lopt, _trained_theta(lopt))
    return path


@pytest.mark.parametrize("name", list(LOPTS))
def test_round_trip_is_bitwise(tmp_path, name):
    lopt = LOPTS[name]
    theta = _trained_theta(lopt)
    path = tmp_path / f"{name}.lopt"
    save(path, lopt, theta)
    tx, loaded_lopt, loaded_theta = load(path)
    assert loaded_lopt == lopt and type(loaded_lopt) is type(lopt)
    assert jax.tree.structure(loaded_theta) == jax.tree.structure(theta)
    jax.tree.map(np.testing.assert_array_equal, loaded_theta, theta)
    before, after = _updates(lopt, theta), _updates(loaded_lopt, loaded_theta)
    jax.tree.map(np.testing.assert_array_equal, after, before)  # bitwise equal
    # the returned transformation is opt_fn(loaded theta): its first update is the same
    params = _data(1)
    u_tx, _ = jax.jit(tx.update)(_data(2), tx.init(params), params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), u_tx, before[0][0])


def test_file_is_a_plain_zip_of_json_and_npy(saved):
    with zipfile.ZipFile(saved) as archive:
        header = json.loads(archive.read("header.json"))
        kernel = np.load(io.BytesIO(archive.read("theta/hidden_0/kernel.npy")))
    assert header["format_version"] == FORMAT_VERSION
    assert header["optimizer"] == "mlp_lopt"
    assert header["config"]["hidden_sizes"] == [32, 32]
    assert kernel.shape == (19, 32) and kernel.dtype == np.float32


def test_save_is_atomic(tmp_path, saved, monkeypatch):
    original = saved.read_bytes()
    lopt = MLPLOpt()
    # a failure in the middle of writing leaves the old file intact and no temp file behind
    real_write = np.lib.format.write_array
    calls = []

    def failing_write(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise OSError("disk full (simulated)")
        return real_write(*args, **kwargs)

    monkeypatch.setattr(np.lib.format, "write_array", failing_write)
    with pytest.raises(OSError, match="simulated"):
        save(saved, lopt, _trained_theta(lopt, seed=5))
    monkeypatch.undo()
    assert saved.read_bytes() == original
    assert os.listdir(tmp_path) == [saved.name]
    # a successful save replaces the file
    save(saved, lopt, _trained_theta(lopt, seed=6))
    assert saved.read_bytes() != original
    assert os.listdir(tmp_path) == [saved.name]


def _rewrite_header(src, dst, edit):
    with zipfile.ZipFile(src) as a, zipfile.ZipFile(dst, "w") as b:
        for item in a.infolist():
            data = a.read(item)
            if item.filename == "header.json":
                header = json.loads(data)
                edit(header)
                data = json.dumps(header).encode()
            b.writestr(item.filename, data)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda h: h.update(format_version=FORMAT_VERSION + 1), "newer"),
        (lambda h: h.update(format_version="1"), "format_version"),
        (lambda h: h.update(format="something-else"), "not a learned-optimizer file"),
        (lambda h: h.update(optimizer="transformer_lopt"), "unknown optimizer"),
        (lambda h: h["config"].update(num_layers=3), "num_layers"),
        (lambda h: h["config"].update(hidden_sizes=[16, 16]), "architecture"),
        (lambda h: h["config"].update(decays=[0.9, 2.0]), "decays"),
        (lambda h: h["config"].update(step_mult="big"), "config"),
    ],
    ids=["newer", "bad-version", "format", "optimizer", "config-key", "shapes", "config-value",
         "config-type"],
)
def test_bad_header_is_a_user_error(tmp_path, saved, edit, message):
    bad = tmp_path / "bad.lopt"
    _rewrite_header(saved, bad, edit)
    with pytest.raises(UserError, match=message):
        load(bad)


def test_truncated_or_corrupt_files_are_user_errors(tmp_path, saved):
    data = saved.read_bytes()
    bad = tmp_path / "bad.lopt"
    for cut in (0, 10, 100, len(data) // 2, len(data) - 30, len(data) - 1):
        bad.write_bytes(data[:cut])
        with pytest.raises(UserError, match=r"bad\.lopt"):
            load(bad)
    # one flipped byte inside the weights: the zip CRC catches it
    with zipfile.ZipFile(saved) as archive:
        offset = archive.getinfo("theta/hidden_1/kernel.npy").header_offset + 200
    flipped = bytearray(data)
    flipped[offset] ^= 0xFF
    bad.write_bytes(bytes(flipped))
    with pytest.raises(UserError):
        load(bad)


@pytest.mark.parametrize(
    "content",
    [b"", b"not a zip at all", b"PK\x03\x04garbage", json.dumps({"format": 1}).encode()],
    ids=["empty", "text", "zip-magic", "json"],
)
def test_wrong_files_are_user_errors(tmp_path, content):
    bad = tmp_path / "bad.lopt"
    bad.write_bytes(content)
    with pytest.raises(UserError):
        load(bad)
    with pytest.raises(UserError, match="no such file"):
        load(tmp_path / "missing.lopt")


def test_archive_without_header_or_with_bad_weights(tmp_path, saved):
    no_header = tmp_path / "no_header.lopt"
    with zipfile.ZipFile(no_header, "w") as z:
        z.writestr("theta/x.npy", b"")
    with pytest.raises(UserError, match="header"):
        load(no_header)
    nan_theta = tmp_path / "nan.lopt"
    with zipfile.ZipFile(saved) as a, zipfile.ZipFile(nan_theta, "w") as b:
        for item in a.infolist():
            data = a.read(item)
            if item.filename == "theta/output/bias.npy":
                buffer = io.BytesIO()
                np.save(buffer, np.array([np.nan, 0.0], np.float32))
                data = buffer.getvalue()
            b.writestr(item.filename, data)
    with pytest.raises(UserError, match="NaN"):
        load(nan_theta)


def test_save_rejects_bad_inputs(tmp_path):
    lopt = MLPLOpt()
    theta = _trained_theta(lopt)
    with pytest.raises(UserError, match="architecture"):
        save(tmp_path / "x.lopt", MLPLOpt(hidden_sizes=(8,)), theta)
    with pytest.raises(UserError, match="directory"):
        save(tmp_path / "missing" / "x.lopt", lopt, theta)
    with pytest.raises(UserError, match="registered"):
        save(tmp_path / "x.lopt", object(), theta)
    assert os.listdir(tmp_path) == []


def test_load_needs_no_training_code(saved):
    """A fresh interpreter loads and applies the file importing nothing but learned_opt."""
    script = (
        "import sys, jax, numpy as np, learned_opt\n"
        f"tx, lopt, theta = learned_opt.load({str(saved)!r})\n"
        "p = {'w': np.ones((3, 2), np.float32)}\n"
        "u, _ = tx.update(p, tx.init(p), p)\n"
        "assert np.all(np.isfinite(u['w'])) and np.any(u['w'] != 0)\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('tasks', 'outer_train'))\n"
        "assert not bad, bad\n"
    )
    env = {**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu"}
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=os.path.dirname(saved), env=env,
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
