"""One rate on every device: data parallelism, sharded parameters, many models.

The root conftest.py gives the test session eight simulated CPU devices.
"""

import functools
import importlib.util
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from worked_factors import dynamic_lr  # factors 1.05 and 0.5

from optax_dynlr import current_learning_rate, find_dynamic_lr_state

NUM_DEVICES = 8
EXAMPLES_DIR = Path(__file__).resolve().parent.parent / "examples"


@pytest.fixture(scope="module")
def devices():
    cpus = jax.devices("cpu")
    if len(cpus) < NUM_DEVICES:
        pytest.skip(
            f"needs {NUM_DEVICES} CPU devices, got {len(cpus)}: XLA_FLAGS set "
            "--xla_force_host_platform_device_count to fewer before the tests ran"
        )
    return cpus[:NUM_DEVICES]


def regression_data():
    """A small two-layer regression whose batch splits evenly over 8 devices."""
    rng = np.random.default_rng(0)
    inputs = rng.normal(size=(64, 8)).astype(np.float32)
    targets = np.sin(inputs @ rng.normal(size=(8, 1))).astype(np.float32)
    params = {
        "w1": jnp.asarray(rng.normal(size=(8, 16)) / np.sqrt(8), jnp.float32),
        "w2": jnp.asarray(rng.normal(size=(16, 1)) / 4.0, jnp.float32),
    }
    return params, jnp.asarray(inputs), jnp.asarray(targets)


def mse(params, inputs, targets):
    predictions = jnp.tanh(inputs @ params["w1"]) @ params["w2"]
    return jnp.mean((predictions - targets) ** 2)


def make_train(optimizer, num_steps):
    """A whole training run in one jitted scan, returning per-step rates."""

    @jax.jit
    def train(params, opt_state, inputs, targets):
        def step(carry, _):
            params, opt_state = carry
            loss, grads = jax.value_and_grad(mse)(params, inputs, targets)
            updates, opt_state = optimizer.update(grads, opt_state, params, value=loss)
            params = optax.apply_updates(params, updates)
            return (params, opt_state), current_learning_rate(opt_state)

        (params, opt_state), rates = jax.lax.scan(
            step, (params, opt_state), length=num_steps
        )
        return params, opt_state, rates

    return train


def per_device_values(array):
    return np.stack([np.asarray(shard.data) for shard in array.addressable_shards])


# The starting rate of 2.0 overshoots on this problem, so the first steps cut
# the rate and the later ones grow it: both branches of the rule take part.
START_RATE = 2.0
NUM_STEPS = 30


@functools.cache
def single_device_run(reject_steps):
    """The reference run on one device, shared by the tests that compare to it."""
    params, inputs, targets = regression_data()
    optimizer = optax.chain(
        dynamic_lr(START_RATE, reject_steps=reject_steps), optax.sgd(1.0)
    )
    train = make_train(optimizer, NUM_STEPS)
    return train(params, optimizer.init(params), inputs, targets)


@pytest.mark.parametrize("axis_type", [AxisType.Auto, AxisType.Explicit])
def test_global_mean_loss_keeps_one_rate_with_batch_sharded(devices, axis_type):
    mesh = Mesh(np.array(devices), ("data",), axis_types=(axis_type,))
    params, inputs, targets = regression_data()
    optimizer = optax.chain(dynamic_lr(START_RATE), optax.sgd(1.0))
    replicated = NamedSharding(mesh, P())
    batch = NamedSharding(mesh, P("data"))
    params = jax.device_put(params, replicated)
    opt_state = jax.device_put(optimizer.init(params), replicated)
    inputs = jax.device_put(inputs, batch)
    targets = jax.device_put(targets, batch)

    params, opt_state, rates = make_train(optimizer, NUM_STEPS)(
        params, opt_state, inputs, targets
    )
    ref_params, ref_state, ref_rates = single_device_run(reject_steps=False)

    ref_counts = find_dynamic_lr_state(ref_state)
    assert ref_counts.num_rises > 0 and ref_counts.num_falls > 0

    rate = current_learning_rate(opt_state)
    assert rate.sharding.is_fully_replicated
    device_rates = per_device_values(rate)
    assert device_rates.shape == (NUM_DEVICES,)
    np.testing.assert_array_equal(device_rates, np.full(NUM_DEVICES, ref_rates[-1]))
    # Every step's rate, not only the last: the devices sum the loss in another
    # order than one device does, but no step is close enough to a tie to flip.
    np.testing.assert_allclose(rates, ref_rates, rtol=1e-6)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
        params,
        ref_params,
    )


@pytest.mark.parametrize("reject_steps", [False, True])
def test_global_mean_loss_keeps_one_rate_with_parameters_sharded(devices, reject_steps):
    mesh = Mesh(np.array(devices).reshape(4, 2), ("data", "model"))
    params, inputs, targets = regression_data()
    optimizer = optax.chain(
        dynamic_lr(START_RATE, reject_steps=reject_steps), optax.sgd(1.0)
    )
    # The hidden layer is split over the "model" axis, the batch over "data".
    param_shardings = {
        "w1": NamedSharding(mesh, P(None, "model")),
        "w2": NamedSharding(mesh, P("model", None)),
    }
    params = jax.device_put(params, param_shardings)
    opt_state = optimizer.init(params)
    inputs = jax.device_put(inputs, NamedSharding(mesh, P("data")))
    targets = jax.device_put(targets, NamedSharding(mesh, P("data")))

    params, opt_state, rates = make_train(optimizer, NUM_STEPS)(
        params, opt_state, inputs, targets
    )
    ref_params, ref_state, ref_rates = single_device_run(reject_steps)

    if reject_steps:
        assert find_dynamic_lr_state(ref_state).num_rejections > 0
        direction = find_dynamic_lr_state(opt_state).accepted_direction
        for name, sharding in param_shardings.items():
            assert direction[name].sharding.is_equivalent_to(sharding, 2)
    device_rates = per_device_values(current_learning_rate(opt_state))
    np.testing.assert_array_equal(device_rates, np.full(NUM_DEVICES, ref_rates[-1]))
    np.testing.assert_allclose(rates, ref_rates, rtol=1e-6)
    for name, sharding in param_shardings.items():
        assert params[name].sharding.is_equivalent_to(sharding, 2)
        # Rates of 2 and more amplify the rounding differences of the sharded
        # sums, hence the looser tolerance than for the rates.
        np.testing.assert_allclose(params[name], ref_params[name], rtol=1e-3, atol=1e-4)


def test_axis_name_averages_local_losses_under_shard_map(devices):
    mesh = Mesh(np.array(devices), ("data",))
    params, inputs, targets = regression_data()
    optimizer = optax.chain(dynamic_lr(START_RATE, axis_name="data"), optax.sgd(1.0))

    def local_run(params, opt_state, inputs, targets):
        def step(carry, _):
            params, opt_state = carry
            local_loss, grads = jax.value_and_grad(mse)(params, inputs, targets)
            # With replicated parameters shard_map already sums the devices'
            # gradients; dividing makes it the gradient of the mean loss.
            grads = jax.tree.map(lambda g: g / jax.lax.axis_size("data"), grads)
            updates, opt_state = optimizer.update(
                grads, opt_state, params, value=local_loss
            )
            params = optax.apply_updates(params, updates)
            return (params, opt_state), current_learning_rate(opt_state)

        (params, opt_state), rates = jax.lax.scan(
            step, (params, opt_state), length=NUM_STEPS
        )
        # A leading axis of one per device shows each device's own rates.
        return params, opt_state, rates[None]

    train = jax.jit(
        jax.shard_map(
            local_run,
            mesh=mesh,
            in_specs=(P(), P(), P("data"), P("data")),
            out_specs=(P(), P(), P("data")),
        )
    )
    params, opt_state, device_rates = train(
        params, optimizer.init(params), inputs, targets
    )
    # The rates of the run on the averaged loss: with equal shards the mean of
    # the local mean losses is the mean loss of the whole batch.
    ref_params, ref_state, ref_rates = single_device_run(reject_steps=False)

    assert device_rates.shape == (NUM_DEVICES, NUM_STEPS)
    for rates in device_rates[1:]:
        np.testing.assert_array_equal(rates, device_rates[0])
    np.testing.assert_allclose(device_rates[0], ref_rates, rtol=1e-6)
    assert find_dynamic_lr_state(ref_state).num_rises > 0
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
        params,
        ref_params,
    )


# Two replicas see the local losses 1.0, 0.9 and 1.0, 1.1 with gradients of
# ones. On their own, the first grows its rate once (0.1 * 1.05 = 0.105) and
# the second cuts it once (0.1 * 0.5 = 0.05). Averaged over the replicas the
# losses are 1.0, 1.0 (in float32 0.9 + 1.1 is exactly 2), so both keep 0.1.
LOCAL_LOSSES = np.array([[1.0, 0.9], [1.0, 1.1]], np.float32)
RATES_ALONE = np.array([0.105, 0.05], np.float32)
RATES_AVERAGED = np.array([0.1, 0.1], np.float32)


def rate_after_local_losses(local_losses, axis_name):
    optimizer = optax.chain(dynamic_lr(0.1, axis_name=axis_name), optax.sgd(1.0))
    params = jnp.zeros(3)
    opt_state = optimizer.init(params)
    for loss in local_losses:
        _, opt_state = optimizer.update(jnp.ones(3), opt_state, params, value=loss)
    return current_learning_rate(opt_state)


@pytest.mark.parametrize(
    ("axis_name", "expected"), [(None, RATES_ALONE), ("replica", RATES_AVERAGED)]
)
def test_replica_rates_under_shard_map(devices, axis_name, expected):
    mesh = Mesh(np.array(devices[:2]), ("replica",))

    def per_replica(local_losses):
        return rate_after_local_losses(local_losses[0], axis_name)[None]

    rates = jax.jit(
        jax.shard_map(
            per_replica, mesh=mesh, in_specs=P("replica"), out_specs=P("replica")
        )
    )(LOCAL_LOSSES)
    np.testing.assert_allclose(rates, expected, rtol=1e-7)


@pytest.mark.parametrize(
    ("axis_name", "expected"), [(None, RATES_ALONE), ("replica", RATES_AVERAGED)]
)
def test_replica_rates_under_pmap(devices, axis_name, expected):
    rates = jax.pmap(
        lambda local_losses: rate_after_local_losses(local_losses, axis_name),
        axis_name="replica",
        devices=devices[:2],
    )(LOCAL_LOSSES)
    np.testing.assert_allclose(rates, expected, rtol=1e-7)


def test_vmap_over_models_matches_separate_runs():
    # Three models from their own initial weights and starting rates; 1.0
    # overshoots, so that model's rate falls while the others' grow.
    start_rates = np.array([1.0, 0.1, 0.01], np.float32)
    params, inputs, targets = regression_data()
    rng = np.random.default_rng(1)
    stacked_params = {
        name: np.asarray(p) + 0.1 * rng.normal(size=(3, *p.shape)).astype(np.float32)
        for name, p in params.items()
    }
    num_steps = 20

    @jax.jit
    def run(params, start_rate):
        optimizer = optax.chain(dynamic_lr(start_rate), optax.sgd(1.0))
        train = make_train(optimizer, num_steps)
        return train(params, optimizer.init(params), inputs, targets)

    batched_params, batched_state, batched_rates = jax.vmap(run)(
        stacked_params, start_rates
    )

    batched_params, batched_state = jax.device_get((batched_params, batched_state))
    counts = find_dynamic_lr_state(batched_state)
    assert counts.learning_rate.shape == (3,)
    assert counts.num_rises[0] > 0
    assert counts.num_falls[1] > 0
    for model in range(3):
        model_params = {name: p[model] for name, p in stacked_params.items()}
        params_alone, state_alone, rates_alone = run(model_params, start_rates[model])
        np.testing.assert_allclose(batched_rates[model], rates_alone, rtol=1e-6)
        for field in ("num_falls", "num_rises"):
            assert getattr(counts, field)[model] == getattr(
                find_dynamic_lr_state(state_alone), field
            )
        jax.tree.map(
            lambda a, b, m=model: np.testing.assert_allclose(
                a[m], b, rtol=1e-4, atol=1e-6
            ),
            batched_params,
            params_alone,
        )


def load_example(name):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES_DIR / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("mode", ["jit", "shard_map"])
def test_data_parallel_example_keeps_one_rate(devices, mode):
    example = load_example("data_parallel")
    result = example.train(num_steps=60, mode=mode, progress=False)

    device_rates = result["device_rates"]
    assert device_rates.shape == (NUM_DEVICES,)
    np.testing.assert_array_equal(device_rates, np.full(NUM_DEVICES, device_rates[0]))
    assert device_rates[0] == result["rates"][-1]
    assert result["losses"][-1] < 0.5 * result["losses"][0]
