"""Data-parallel training of a digits classifier with one rate on every device.

The batch is split over all devices and the parameters are copied to each. Two
ways to write it:

- ``--mode jit`` (default): ``jax.jit`` over sharded arrays. The loss is the mean
  over the whole batch, so every device feeds the same loss to the rule.
- ``--mode shard_map``: each device computes the loss of its own slice, and
  ``dynamic_lr(..., axis_name="data")`` averages it over the devices before the
  rule, so the devices cannot drift apart.

Either way the script ends by printing the rate held by each device. On a
machine without accelerators it simulates 8 CPU devices.

    python examples/data_parallel.py --steps 600 --mode shard_map

Needs ``pip install optax_dynlr[examples]`` (scikit-learn for the data, tqdm).
"""

import os

# Must be set before jax starts its CPU backend; an existing setting wins.
if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    ).strip()

import argparse  # noqa: E402
import itertools  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402
from tqdm import tqdm  # noqa: E402

from optax_dynlr import current_learning_rate, dynamic_lr  # noqa: E402

STEPS_PER_CALL = 20


def load_digits(num_devices):
    """Digits scaled to [0, 1], trimmed so the batch splits evenly."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    size = len(digits.target) // num_devices * num_devices
    inputs = jnp.asarray(digits.data[:size] / 16.0, jnp.float32)
    labels = jax.nn.one_hot(digits.target[:size], 10, dtype=jnp.float32)
    return inputs, labels


def init_mlp(seed, sizes=(64, 64, 10)):
    """A tanh MLP's parameters, LeCun-normal weights drawn on the host."""
    rng = np.random.default_rng(seed)
    params = []
    for fan_in, fan_out in itertools.pairwise(sizes):
        weights = rng.normal(size=(fan_in, fan_out)) / np.sqrt(fan_in)
        params.append(
            {"w": weights.astype(np.float32), "b": np.zeros(fan_out, np.float32)}
        )
    return params


def loss_fn(params, inputs, labels):
    hidden = inputs
    for layer in params[:-1]:
        hidden = jnp.tanh(hidden @ layer["w"] + layer["b"])
    logits = hidden @ params[-1]["w"] + params[-1]["b"]
    return optax.softmax_cross_entropy(logits, labels).mean()


def make_steps(optimizer, compute_grads):
    """``STEPS_PER_CALL`` training steps in one scan; returns losses and rates.

    Logging from the scan's outputs costs one transfer per call instead of one
    per step.
    """

    def run_steps(params, opt_state, inputs, labels):
        def step(carry, _):
            params, opt_state = carry
            loss, grads = compute_grads(params, inputs, labels)
            updates, opt_state = optimizer.update(grads, opt_state, params, value=loss)
            params = optax.apply_updates(params, updates)
            return (params, opt_state), (loss, current_learning_rate(opt_state))

        (params, opt_state), (losses, rates) = jax.lax.scan(
            step, (params, opt_state), length=STEPS_PER_CALL
        )
        return params, opt_state, losses, rates

    return run_steps


def build(mode, mesh, learning_rate):
    """The optimizer and the jitted multi-step function for one mode."""
    if mode == "jit":
        optimizer = optax.chain(dynamic_lr(learning_rate), optax.sgd(1.0))
        # The mean over the sharded batch is a global mean: jax inserts the
        # cross-device sum, and every device sees the same loss.
        run_steps = jax.jit(make_steps(optimizer, jax.value_and_grad(loss_fn)))
        return optimizer, run_steps

    if mode == "shard_map":
        optimizer = optax.chain(
            dynamic_lr(learning_rate, axis_name="data"), optax.sgd(1.0)
        )

        def local_grads(params, inputs, labels):
            local_loss, grads = jax.value_and_grad(loss_fn)(params, inputs, labels)
            # With replicated parameters shard_map sums the devices' gradients;
            # dividing by the device count gives the gradient of the mean loss.
            num_devices = jax.lax.axis_size("data")
            return local_loss, jax.tree.map(lambda g: g / num_devices, grads)

        def run_steps(params, opt_state, inputs, labels):
            params, opt_state, local_losses, rates = make_steps(optimizer, local_grads)(
                params, opt_state, inputs, labels
            )
            # The log's loss is the mean, as the rule saw it.
            return params, opt_state, jax.lax.pmean(local_losses, "data"), rates

        run_steps = jax.jit(
            jax.shard_map(
                run_steps,
                mesh=mesh,
                in_specs=(P(), P(), P("data"), P("data")),
                out_specs=(P(), P(), P(), P()),
            )
        )
        return optimizer, run_steps

    raise ValueError(f"mode must be 'jit' or 'shard_map', got {mode!r}")


def train(num_steps=600, mode="jit", learning_rate=0.1, seed=0, progress=True):
    """Trains on all devices and returns the log and each device's final rate.

    Returns:
      A dict with ``losses`` and ``rates`` (one per step, NumPy),
      ``device_rates`` (the final rate as held by each device), and the final
      ``params`` and ``opt_state``.
    """
    devices = jax.devices()
    mesh = Mesh(np.array(devices), ("data",))
    replicated = NamedSharding(mesh, P())
    batch = NamedSharding(mesh, P("data"))

    inputs, labels = load_digits(len(devices))
    inputs, labels = jax.device_put((inputs, labels), batch)
    optimizer, run_steps = build(mode, mesh, learning_rate)
    params = jax.device_put(init_mlp(seed), replicated)
    opt_state = jax.device_put(optimizer.init(params), replicated)

    losses, rates = [], []
    num_calls = -(-num_steps // STEPS_PER_CALL)
    with tqdm(total=num_calls * STEPS_PER_CALL, disable=not progress) as bar:
        for _ in range(num_calls):
            params, opt_state, chunk_losses, chunk_rates = run_steps(
                params, opt_state, inputs, labels
            )
            losses.append(np.asarray(chunk_losses))
            rates.append(np.asarray(chunk_rates))
            bar.update(STEPS_PER_CALL)
            bar.set_postfix(loss=f"{losses[-1][-1]:.4f}", rate=f"{rates[-1][-1]:.4g}")

    rate = current_learning_rate(opt_state)
    device_rates = np.array(
        [np.asarray(shard.data) for shard in rate.addressable_shards]
    )
    return {
        "losses": np.concatenate(losses),
        "rates": np.concatenate(rates),
        "device_rates": device_rates,
        "params": params,
        "opt_state": opt_state,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--mode", choices=["jit", "shard_map"], default="jit")
    parser.add_argument("--learning-rate", type=float, default=0.1)
    args = parser.parse_args()

    result = train(args.steps, args.mode, args.learning_rate)
    print(f"{len(jax.devices())} devices, mode {args.mode}")
    print(
        f"loss {result['losses'][0]:.4f} -> {result['losses'][-1]:.4f} "
        f"after {len(result['losses'])} steps"
    )
    rate = current_learning_rate(result["opt_state"])
    for shard in rate.addressable_shards:
        print(f"  rate on {shard.device}: {float(shard.data):.6g}")


if __name__ == "__main__":
    main()
