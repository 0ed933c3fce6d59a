"""Checkpoints: bit-exact round trip of any state pytree (PRNG keys, optax NamedTuples), atomic
writes, rotation, and clear errors for corrupt or incompatible files with fallback to older."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
import pytest
from helpers import bitwise_equal

from outer_train import checkpoint
from outer_train.checkpoint import CheckpointError


class _Particles(NamedTuple):
    params: dict
    key: jax.Array
    step: jax.Array


def _state(seed: int):
    k = jax.random.key(seed)
    k1, k2, k3 = jax.random.split(k, 3)
    theta = {"w": jax.random.normal(k1, (5, 3)), "b": jnp.zeros(3)}
    opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-3))
    opt_state = opt.init(theta)
    # A non-trivial optimizer state: one real update.
    _, opt_state = opt.update(jax.tree.map(jnp.ones_like, theta), opt_state, theta)
    particles = _Particles(
        {"dense": jax.random.normal(k2, (4, 7), jnp.float32)},
        jax.random.split(k3, 4),
        jnp.arange(4, dtype=jnp.int32),
    )
    return {"theta": theta, "opt_state": opt_state, "particles": (particles,),
            "outer_step": jnp.int32(seed)}


def test_round_trip_is_bit_exact(tmp_path):
    state = _state(3)
    path = checkpoint.save(tmp_path, 3, state, config_hash="h", keep=2)
    assert path.name == "ckpt_000000003.ckpt"
    restored = checkpoint.load(path, _state(0), config_hash="h")  # template: other values
    assert restored.outer_step == 3
    assert bitwise_equal(restored.state, state)
    keys = restored.state["particles"][0].key
    assert jax.dtypes.issubdtype(keys.dtype, jax.dtypes.prng_key)  # re-wrapped, usable
    jax.random.normal(keys[0], ())


def test_keeps_the_newest_and_leaves_no_temporary_files(tmp_path):
    for step in range(1, 6):
        checkpoint.save(tmp_path, step, _state(step), config_hash="h", keep=2)
    assert [s for s, _ in checkpoint.list_checkpoints(tmp_path)] == [4, 5]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "ckpt_000000004.ckpt", "ckpt_000000005.ckpt"
    ]


@pytest.mark.parametrize("damage", ["flip_payload_byte", "truncate", "garbage_header", "empty"])
def test_corrupt_checkpoint_is_detected_and_older_one_used(tmp_path, damage):
    for step in (1, 2):
        checkpoint.save(tmp_path, step, _state(step), config_hash="h", keep=3)
    newest = checkpoint.checkpoint_path(tmp_path, 2)
    raw = bytearray(newest.read_bytes())
    if damage == "flip_payload_byte":
        raw[-10] ^= 0xFF
    elif damage == "truncate":
        raw = raw[: len(raw) // 2]
    elif damage == "garbage_header":
        raw[:5] = b"\x00\x01{{{"
    else:
        raw = bytearray()
    newest.write_bytes(bytes(raw))

    with pytest.raises(CheckpointError):
        checkpoint.load(newest, _state(0), config_hash="h")
    messages = []
    restored = checkpoint.restore_latest(tmp_path, _state(0), config_hash="h",
                                         warn=messages.append)
    assert restored.outer_step == 1
    assert bitwise_equal(restored.state, _state(1))
    assert "skipping checkpoint ckpt_000000002.ckpt" in messages[0]
    assert "resuming from older checkpoint ckpt_000000001.ckpt" in messages[1]


def test_incompatible_checkpoints_are_refused(tmp_path):
    checkpoint.save(tmp_path, 1, _state(1), config_hash="h", keep=3)
    with pytest.raises(CheckpointError, match="different config"):
        checkpoint.restore_latest(tmp_path, _state(0), config_hash="other", warn=lambda m: None)
    other_shape = _state(0)
    other_shape["theta"]["w"] = jnp.zeros((6, 3))
    with pytest.raises(CheckpointError, match=r"\['theta'\]\['w'\] has shape \(5, 3\)"):
        checkpoint.load(checkpoint.checkpoint_path(tmp_path, 1), other_shape, config_hash="h")
    other_structure = {**_state(0), "extra": jnp.zeros(2)}
    with pytest.raises(CheckpointError, match="does not match this run's state structure"):
        checkpoint.load(checkpoint.checkpoint_path(tmp_path, 1), other_structure,
                        config_hash="h")


def test_newer_format_version_is_refused(tmp_path):
    path = checkpoint.save(tmp_path, 1, _state(1), config_hash="h", keep=3)
    raw = path.read_bytes().replace(b'"format_version": 1', b'"format_version": 99', 1)
    path.write_bytes(raw)
    with pytest.raises(CheckpointError, match="format version 99"):
        checkpoint.load(path, _state(0), config_hash="h")


def test_no_checkpoint_gives_none(tmp_path):
    assert checkpoint.restore_latest(tmp_path / "missing", _state(0), config_hash="h") is None
