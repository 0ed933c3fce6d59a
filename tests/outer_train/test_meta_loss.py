"""Meta-loss hygiene: transforms, non-finite flagging, and dropping (not zeroing) invalid rows."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from outer_train.meta_loss import LOSS_TRANSFORMS, all_finite, masked_mean, transform_loss

CLIP = 1.5 * math.log(10)


def test_transform_values():
    loss = jnp.array([0.5, 2.0, 10.0])
    np.testing.assert_allclose(transform_loss(loss, kind="none", loss_clip=CLIP), loss)
    np.testing.assert_allclose(
        transform_loss(loss, kind="clip", loss_clip=CLIP), [0.5, 2.0, CLIP], rtol=1e-6
    )
    np.testing.assert_allclose(
        transform_loss(loss, kind="log", loss_clip=CLIP),
        np.log([0.5, 2.0, CLIP]), rtol=1e-6,
    )
    np.testing.assert_allclose(
        transform_loss(loss, kind="normalized", loss_clip=CLIP), [0.5 / CLIP, 2.0 / CLIP, 1.0],
        rtol=1e-6,
    )


@pytest.mark.parametrize("kind", sorted(LOSS_TRANSFORMS))
def test_nonfinite_becomes_nan_never_clipped(kind):
    out = transform_loss(jnp.array([jnp.inf, -jnp.inf, jnp.nan, 1.0]), kind=kind, loss_clip=CLIP)
    assert np.isnan(np.asarray(out[:3])).all()  # +inf must not turn into loss_clip
    assert np.isfinite(float(out[3]))


def test_clip_has_zero_gradient_above_clip():
    g = jax.grad(lambda x: transform_loss(x, kind="clip", loss_clip=CLIP))
    assert float(g(jnp.float32(CLIP + 1))) == 0.0
    assert float(g(jnp.float32(1.0))) == 1.0


def test_log_of_zero_loss_is_finite():
    assert np.isfinite(float(transform_loss(jnp.float32(0.0), kind="log", loss_clip=CLIP)))


def test_masked_mean_drops_rows_instead_of_zeroing():
    x = jnp.array([[1.0, 2.0], [jnp.nan, jnp.inf], [3.0, 6.0]])
    valid = jnp.array([True, False, True])
    np.testing.assert_allclose(masked_mean(x, valid), [2.0, 4.0])  # zeroing would give 4/3, 8/3


def test_masked_mean_of_nothing_is_nan():
    assert np.isnan(np.asarray(masked_mean(jnp.ones((3, 2)), jnp.zeros(3, bool)))).all()


def test_all_finite():
    assert bool(all_finite({"a": jnp.ones(3), "b": jnp.zeros((2, 2))}))
    assert not bool(all_finite({"a": jnp.ones(3), "b": jnp.array([0.0, jnp.inf])}))
    assert bool(all_finite({}))
