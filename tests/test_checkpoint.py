"""Saving the whole optimizer state with orbax and resuming exactly."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from optax_dynlr import DynamicLRState, dynamic_lr, find_dynamic_lr_state

# A starting rate of 1.5 overshoots on this problem, so the steps before the
# checkpoint include rises, rejected steps and falls, and the saved state is
# far from its initial values.
START_RATE = 1.5
STEPS_BEFORE = 8
STEPS_AFTER = 8


@functools.cache
def optimizer_for(kind):
    if kind == "plain":
        return optax.chain(dynamic_lr(START_RATE), optax.sgd(1.0))
    if kind == "reject_steps":
        return optax.chain(dynamic_lr(START_RATE, reject_steps=True), optax.sgd(1.0))
    if kind == "multi_steps":
        return optax.MultiSteps(
            optax.chain(dynamic_lr(START_RATE, reject_steps=True), optax.sgd(1.0)),
            every_k_schedule=2,
        )
    if kind == "noise_aware":
        return optax.chain(
            dynamic_lr(START_RATE, noise_aware=True, reject_steps=True),
            optax.sgd(1.0),
        )
    raise ValueError(kind)


def initial_params():
    # A bfloat16 leaf checks that the checkpoint keeps each leaf's own dtype.
    return {
        "w": jnp.asarray(np.array([0.5, -0.3, 0.2, 0.1], np.float32)),
        "b": jnp.asarray(np.zeros((), jnp.bfloat16)),
    }


def loss_fn(params):
    inputs = jnp.linspace(-1.0, 1.0, 32 * 4, dtype=jnp.float32).reshape(32, 4)
    targets = jnp.sin(3.0 * inputs.sum(axis=1))
    predictions = inputs @ params["w"] + params["b"].astype(jnp.float32)
    return jnp.mean((predictions - targets) ** 2)


@functools.cache
def make_step(kind):
    """The jitted step of one optimizer, shared by the tests to save compiling."""
    optimizer = optimizer_for(kind)
    num_traces = [0]

    @jax.jit
    def step(params, opt_state):
        num_traces[0] += 1
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params, value=loss)
        return optax.apply_updates(params, updates), opt_state, loss

    return step, num_traces


def run(step, params, opt_state, num_steps):
    losses = []
    for _ in range(num_steps):
        params, opt_state, loss = step(params, opt_state)
        losses.append(loss)
    return params, opt_state, np.array(losses)


def leaf_dtypes(tree):
    return jax.tree.map(lambda leaf: leaf.dtype, tree)


def assert_trees_equal(actual, expected):
    assert jax.tree.structure(actual) == jax.tree.structure(expected)
    assert leaf_dtypes(actual) == leaf_dtypes(expected)
    jax.tree.map(np.testing.assert_array_equal, actual, expected)


@pytest.mark.parametrize("template", ["concrete", "abstract"])
@pytest.mark.parametrize(
    "kind", ["plain", "reject_steps", "multi_steps", "noise_aware"]
)
def test_resumed_run_continues_exactly(tmp_path, kind, template):
    optimizer = optimizer_for(kind)
    step, num_traces = make_step(kind)
    params = initial_params()

    # The uninterrupted run.
    full_params, full_state, full_losses = run(
        step, params, optimizer.init(params), STEPS_BEFORE + STEPS_AFTER
    )

    # The same run, saved after STEPS_BEFORE steps...
    saved_params, saved_state, losses_before = run(
        step, params, optimizer.init(params), STEPS_BEFORE
    )
    saved = {"params": saved_params, "opt_state": saved_state}
    counts = find_dynamic_lr_state(saved_state)
    assert counts.num_rises > 0
    if kind != "noise_aware":
        assert counts.num_falls > 0
    if kind in ("reject_steps", "multi_steps"):
        assert counts.num_rejections > 0
    if kind == "noise_aware":
        # The statistics of recent losses have moved away from their start.
        fresh_trend = find_dynamic_lr_state(optimizer.init(params)).trend
        assert any(
            np.any(saved != start)
            for saved, start in zip(
                jax.tree.leaves(counts.trend),
                jax.tree.leaves(fresh_trend),
                strict=True,
            )
        )
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(tmp_path / "checkpoint", saved)
        checkpointer.wait_until_finished()

        # ... and restored, as a new process would, into the structure of a
        # fresh start.
        fresh = {"params": initial_params(), "opt_state": optimizer.init(params)}
        if template == "abstract":
            fresh = jax.tree.map(
                lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype), fresh
            )
        restored = checkpointer.restore(tmp_path / "checkpoint", fresh)

    assert_trees_equal(restored, saved)
    assert type(restored["opt_state"]) is type(saved_state)
    restored_counts = find_dynamic_lr_state(restored["opt_state"])
    assert isinstance(restored_counts, DynamicLRState)
    if kind == "plain":
        assert restored_counts.accepted_direction is None
    else:
        assert leaf_dtypes(restored_counts.accepted_direction) == {
            "b": jnp.bfloat16,
            "w": jnp.float32,
        }

    traces_before_resuming = num_traces[0]
    resumed_params, resumed_state, losses_after = run(
        step, restored["params"], restored["opt_state"], STEPS_AFTER
    )
    # Same shapes, dtypes and weak types as the state the step was traced
    # with, so resuming reuses the compiled step.
    assert num_traces[0] == traces_before_resuming == 1

    np.testing.assert_array_equal(
        np.concatenate([losses_before, losses_after]), full_losses
    )
    assert_trees_equal(resumed_params, full_params)
    assert_trees_equal(resumed_state, full_state)
