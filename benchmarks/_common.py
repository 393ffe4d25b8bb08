"""Shared pieces of the benchmarks: data that ships offline, models, reporting."""

import datetime
import itertools
import platform
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optax_dynlr

BENCHMARKS_DIR = Path(__file__).resolve().parent
SECTIONS_DIR = BENCHMARKS_DIR / "results"


def machine_description() -> str:
    """One line naming the machine, the software versions and the date."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            models = [
                line.split(":", 1)[1].strip()
                for line in cpuinfo
                if line.startswith("model name")
            ]
        cpu = f"{models[0]}, {len(models)} logical cores" if models else "unknown CPU"
    except OSError:
        cpu = platform.processor() or "unknown CPU"
    devices = ", ".join(sorted({d.device_kind for d in jax.devices()}))
    return (
        f"{cpu}; JAX devices: {devices}; Python {platform.python_version()}, "
        f"jax {jax.__version__}, optax {optax.__version__}, numpy {np.__version__}, "
        f"optax_dynlr {optax_dynlr.__version__}; "
        f"{datetime.date.today().isoformat()}"
    )


def digits_classification():
    """scikit-learn's handwritten digits: inputs scaled to [0, 1], one-hot labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    inputs = jnp.asarray(digits.data / 16.0, dtype=jnp.float32)
    labels = jax.nn.one_hot(digits.target, 10, dtype=jnp.float32)
    return inputs, labels


def init_mlp(key, sizes):
    """Parameters of a tanh MLP with the given layer sizes (LeCun normal)."""
    params = []
    for fan_in, fan_out in itertools.pairwise(sizes):
        key, subkey = jax.random.split(key)
        weights = jax.random.normal(subkey, (fan_in, fan_out)) / np.sqrt(fan_in)
        params.append({"w": weights, "b": jnp.zeros(fan_out)})
    return params


def mlp_logits(params, inputs):
    hidden = inputs
    for layer in params[:-1]:
        hidden = jnp.tanh(hidden @ layer["w"] + layer["b"])
    return hidden @ params[-1]["w"] + params[-1]["b"]


def softmax_cross_entropy(params, inputs, labels):
    logits = mlp_logits(params, inputs)
    return optax.softmax_cross_entropy(logits, labels).mean()


def digits_mlp_problem():
    """The full-batch digits loss of a 64-64-10 tanh MLP, and its initialiser."""
    inputs, labels = digits_classification()

    def loss_fn(params):
        return softmax_cross_entropy(params, inputs, labels)

    def init(seed):
        return init_mlp(jax.random.PRNGKey(seed), [64, 64, 10])

    return loss_fn, init


def steps_to_target(losses, target) -> int | None:
    """The first step (1-based count of updates) whose loss is at or below target.

    ``losses[i]`` is the loss after ``i`` updates (``losses[0]`` at the start).
    """
    losses = np.asarray(losses)
    hits = np.nonzero(losses <= target)[0]
    return int(hits[0]) if hits.size else None


def format_steps(steps) -> str:
    return "never" if steps is None else f"{steps:,}"


def write_section(name: str, markdown: str) -> Path:
    """Stores one benchmark's section of RESULTS.md."""
    SECTIONS_DIR.mkdir(exist_ok=True)
    path = SECTIONS_DIR / f"{name}.md"
    path.write_text(markdown.rstrip() + "\n")
    return path
