"""Minibatch losses: the noise-aware rule against the plain rule and constant SGD.

Three tasks on data that ships with scikit-learn, each trained with batches
drawn with replacement and the batch loss passed as ``value``:

* digits MLP: 64-128-10 tanh network, batch 64, target full training loss 0.01;
* logistic regression on the standardised breast-cancer data, batch 32;
* a small convolutional network on the 8x8 digit images, batch 64.

For each starting rate in 1e-3 ... 10 it counts the steps until the *full*
training loss (evaluated every 10 or 20 steps) reaches the task's target,
for ``dynamic_lr(noise_aware=True)``, the plain rule, constant SGD at that rate
and the best constant rate of a log-spaced sweep; medians over three seeds.
Seeds and starting rates run side by side under ``jax.vmap``, the steps under
``jax.lax.scan``; every method sees the same initialisation and batches.

It also reports the full-batch digits MLP (the deterministic case), gradient
accumulation with ``optax.MultiSteps``, and the noise-aware form as a scale
after Adam.
"""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks import _common
from optax_dynlr import current_learning_rate, dynamic_lr

STARTS = (1e-3, 1e-2, 1e-1, 1.0, 10.0)
SWEEP = tuple(float(x) for x in np.logspace(-3, 1, 9))  # half-decade steps
SEEDS = (0, 1, 2)


# ---------------------------------------------------------------- tasks


def _digits_mlp():
    inputs, labels = _common.digits_classification()

    def init(key):
        return _common.init_mlp(key, (64, 128, 10))

    return dict(
        name="digits MLP",
        inputs=inputs,
        labels=labels,
        init=init,
        loss=_common.softmax_cross_entropy,
        batch=64,
        target=0.01,
        eval_every=10,
    )


def _breast_cancer_logistic():
    from sklearn.datasets import load_breast_cancer

    data = load_breast_cancer()
    x = (data.data - data.data.mean(0)) / data.data.std(0)
    inputs = jnp.asarray(x, jnp.float32)
    labels = jnp.asarray(data.target, jnp.float32)

    def init(key):
        del key
        return {"w": jnp.zeros(inputs.shape[1]), "b": jnp.zeros(())}

    def loss(params, x, y):
        logits = x @ params["w"] + params["b"]
        return optax.sigmoid_binary_cross_entropy(logits, y).mean()

    return dict(
        name="breast-cancer logistic",
        inputs=inputs,
        labels=labels,
        init=init,
        loss=loss,
        batch=32,
        target=0.05,
        eval_every=10,
    )


def _digits_cnn():
    inputs, labels = _common.digits_classification()
    images = inputs.reshape(-1, 8, 8, 1)

    def init(key):
        k1, k2, k3 = jax.random.split(key, 3)
        return {
            "c1": jax.random.normal(k1, (3, 3, 1, 4)) / 3.0,
            "b1": jnp.zeros(4),
            "c2": jax.random.normal(k2, (3, 3, 4, 8)) / np.sqrt(36.0),
            "b2": jnp.zeros(8),
            "w": jax.random.normal(k3, (4 * 4 * 8, 10)) / np.sqrt(128.0),
            "b": jnp.zeros(10),
        }

    def conv3x3(x, kernel, stride):
        # As a matmul over 3x3 patches: XLA's CPU convolutions are slow once
        # vmapped over seeds and rates.
        padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
        size = x.shape[1]
        patches = jnp.concatenate(
            [
                padded[:, i : i + size : stride, j : j + size : stride, :]
                for i in range(3)
                for j in range(3)
            ],
            axis=-1,
        )
        return patches @ kernel.reshape(-1, kernel.shape[-1])

    def logits(params, x):
        h = jnp.tanh(conv3x3(x, params["c1"], 1) + params["b1"])
        h = jnp.tanh(conv3x3(h, params["c2"], 2) + params["b2"])
        return h.reshape(h.shape[0], -1) @ params["w"] + params["b"]

    def loss(params, x, y):
        return optax.softmax_cross_entropy(logits(params, x), y).mean()

    return dict(
        name="digits CNN",
        inputs=images,
        labels=labels,
        init=init,
        loss=loss,
        batch=64,
        target=0.01,
        # The full loss costs as much as 28 steps; read it less often.
        eval_every=20,
    )


# ---------------------------------------------------------------- training


def train(
    task,
    make_optimizer,
    rates,
    seeds,
    steps,
    batch=None,
    accumulate=1,
    average=True,
    eval_every=None,
):
    """Full training losses and rates every ``eval_every`` steps.

    Returns two arrays of shape (len(rates), len(seeds), steps // eval_every + 1):
    the full training loss after 0, eval_every, ... steps, and the rate then
    (nan for optimizers without a dynamic rate). ``eval_every`` defaults to the
    task's.
    """
    eval_every = eval_every or task["eval_every"]
    inputs, labels, loss_fn = task["inputs"], task["labels"], task["loss"]
    batch = batch or task["batch"]
    num_examples = inputs.shape[0]
    full_batch = batch >= num_examples

    def run_one(rate, seed):
        init_key, data_key = jax.random.split(jax.random.PRNGKey(seed))
        params = task["init"](init_key)
        optimizer = make_optimizer(rate)
        opt_state = optimizer.init(params)

        def step(carry, index):
            params, opt_state, accumulated = carry
            if full_batch:
                x, y = inputs, labels
            else:
                key = jax.random.fold_in(data_key, index)
                rows = jax.random.randint(key, (batch,), 0, num_examples)
                x, y = inputs[rows], labels[rows]
            loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
            # With accumulation, pass the mean loss of the micro-batches so far:
            # on the step that emits, it is the loss of the whole batch.
            within = index % accumulate
            accumulated = jnp.where(within == 0, loss, accumulated + loss)
            value = accumulated / (within + 1) if average else loss
            updates, opt_state = optimizer.update(grads, opt_state, params, value=value)
            params = optax.apply_updates(params, updates)
            return (params, opt_state, accumulated), None

        def evaluate(params, opt_state):
            full = loss_fn(params, inputs, labels)
            try:
                rate = current_learning_rate(opt_state)
            except ValueError:
                rate = jnp.float32(jnp.nan)
            return full, rate

        def block(carry, start):
            indices = start + jnp.arange(eval_every)
            carry, _ = jax.lax.scan(step, carry, indices)
            return carry, evaluate(carry[0], carry[1])

        starts = jnp.arange(steps // eval_every) * eval_every
        carry = (params, opt_state, jnp.zeros((), jnp.float32))
        first = evaluate(params, opt_state)
        _, (losses, rates) = jax.lax.scan(block, carry, starts)
        losses = jnp.concatenate([first[0][None], losses])
        rates = jnp.concatenate([first[1][None], rates])
        return losses, rates

    runner = jax.jit(jax.vmap(jax.vmap(run_one, (None, 0)), (0, None)))
    losses, rates = runner(
        jnp.asarray(rates, jnp.float32), jnp.asarray(seeds, jnp.int32)
    )
    return np.asarray(losses), np.asarray(rates)


def steps_to_target(losses, target, eval_every):
    """Steps to target of each run, inf where never; over the last axis."""
    hit = np.nan_to_num(losses, nan=np.inf) <= target
    first = np.argmax(hit, axis=-1).astype(float) * eval_every
    return np.where(hit.any(axis=-1), first, np.inf)


def noise_aware(rate):
    return optax.chain(dynamic_lr(rate, noise_aware=True), optax.sgd(1.0))


def plain(rate):
    # The factors the noise-aware form also uses, so that the two differ only
    # in how they read the losses.
    rule = dynamic_lr(rate, increase_factor=1.05, decrease_factor=0.5)
    return optax.chain(rule, optax.sgd(1.0))


def constant(rate):
    return optax.sgd(rate)


METHODS = {"noise-aware": noise_aware, "plain rule": plain, "constant": constant}


# ---------------------------------------------------------------- report


def _fmt(value):
    return "never" if not np.isfinite(value) else f"{value:,.0f}"


def _spread(steps):
    finite = steps[np.isfinite(steps)]
    never = int(np.sum(~np.isfinite(steps)))
    text = f"{_fmt(steps.min())}-{_fmt(steps.max())}"
    return text if never == 0 or finite.size == 0 else f"{text} ({never} never)"


def _compare_task(task, steps, collapse_steps, out_dir):
    """Runs every method from every start; returns Markdown rows and plot data."""
    target, every = task["target"], task["eval_every"]
    sweep_losses, _ = train(task, constant, SWEEP, SEEDS, steps)
    sweep_steps = steps_to_target(sweep_losses, target, every)
    sweep_medians = np.median(sweep_steps, axis=1)
    best = int(np.argmin(sweep_medians))
    best_rate, best_steps = SWEEP[best], sweep_medians[best]

    results = {}
    rate_paths = None
    for name, make in METHODS.items():
        if name == "constant":
            rows = [int(np.argmin(np.abs(np.log(SWEEP) - np.log(s)))) for s in STARTS]
            results[name] = np.stack([sweep_steps[i] for i in rows])
            continue
        budget = collapse_steps if name == "noise-aware" else steps
        losses, rates = train(task, make, STARTS, SEEDS, budget)
        within = losses[..., : steps // every + 1]
        results[name] = steps_to_target(within, target, every)
        if name == "noise-aware":
            rate_paths = rates
    lines = [
        f"**{task['name']}** (batch {task['batch']}, target full training loss "
        f"{target}): best constant of the sweep {best_rate:.3g}, "
        f"{_fmt(best_steps)} steps (seeds {_spread(sweep_steps[best])}).",
        "",
        "| start | noise-aware | ratio to best | spread | plain rule "
        "| constant at start |",
        "|---|---|---|---|---|---|",
    ]
    for i, start in enumerate(STARTS):
        ours = np.median(results["noise-aware"][i])
        lines.append(
            f"| {start:g} | {_fmt(ours)} | {ours / best_steps:.2f} "
            f"| {_spread(results['noise-aware'][i])} "
            f"| {_fmt(np.median(results['plain rule'][i]))} "
            f"| {_fmt(np.median(results['constant'][i]))} |"
        )
    after = rate_paths[:, :, steps // (2 * every) :]
    lines += [
        "",
        f"Noise-aware rate over {collapse_steps:,} steps, all starts and seeds, "
        f"after step {steps // 2:,}: {np.nanmin(after):.3g} to "
        f"{np.nanmax(after):.3g}; at the end {np.nanmin(rate_paths[..., -1]):.3g} "
        f"to {np.nanmax(rate_paths[..., -1]):.3g}.",
        "",
    ]
    return lines, results, best_steps, rate_paths


def _full_batch(steps):
    task = dict(_digits_mlp(), name="digits MLP, full batch", batch=10**9)
    lines = [
        f"**{task['name']}** (target training loss {task['target']}; "
        "deterministic losses):",
        "",
        "| start | noise-aware | plain rule |",
        "|---|---|---|",
    ]
    found = {}
    for name in ("noise-aware", "plain rule"):
        losses, _ = train(task, METHODS[name], STARTS, SEEDS, steps)
        found[name] = steps_to_target(losses, task["target"], task["eval_every"])
    for i, start in enumerate(STARTS):
        lines.append(
            f"| {start:g} | {_fmt(np.median(found['noise-aware'][i]))} "
            f"| {_fmt(np.median(found['plain rule'][i]))} |"
        )
    return lines + [""]


def _accumulation(steps):
    """MultiSteps(every 4) of batch-16 micro-batches: which loss to pass."""
    task = _digits_mlp()
    starts = (1e-2, 1.0, 10.0)
    lines = [
        "**Gradient accumulation** (digits MLP, `optax.MultiSteps(every_k_schedule"
        "=4)` around the chain, micro-batches of 16, so 64 per update; steps are "
        "updates, i.e. micro-steps / 4):",
        "",
        "| start | mean loss of the accumulated micro-batches "
        "| loss of the last micro-batch only |",
        "|---|---|---|",
    ]
    found = {}
    for label, average in (("mean", True), ("last", False)):

        def make(rate, average=average):
            inner = optax.chain(dynamic_lr(rate, noise_aware=True), optax.sgd(1.0))
            return optax.MultiSteps(inner, every_k_schedule=4)

        losses, _ = train(
            task,
            make,
            starts,
            SEEDS,
            4 * steps,
            batch=16,
            accumulate=4,
            average=average,
            eval_every=40,
        )
        found[label] = steps_to_target(losses, task["target"], 40) / 4
    for i, start in enumerate(starts):
        lines.append(
            f"| {start:g} | {_fmt(np.median(found['mean'][i]))} "
            f"| {_fmt(np.median(found['last'][i]))} |"
        )
    return lines + [""]


def _after_adam(steps):
    """The noise-aware form as a scale after Adam, where its climb is idle."""
    task = _digits_mlp()
    starts = (1e-4, 1e-3, 1e-2, 1e-1)
    adam_rates = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1)

    def scaled(rate):
        return optax.chain(optax.adam(1.0), dynamic_lr(rate, noise_aware=True))

    every = task["eval_every"]
    ours = steps_to_target(
        train(task, scaled, starts, SEEDS, steps)[0], task["target"], every
    )
    sweep = steps_to_target(
        train(task, optax.adam, adam_rates, SEEDS, steps)[0], task["target"], every
    )
    lines = [
        "**After Adam** (digits MLP, `chain(adam(1), dynamic_lr(start, "
        "noise_aware=True))`; the Polyak step of Adam's directions is far too "
        "small to climb, so only the trend test moves the rate):",
        "",
        "| start | steps |",
        "|---|---|",
    ]
    lines += [
        f"| {start:g} | {_fmt(np.median(ours[i]))} |" for i, start in enumerate(starts)
    ]
    lines += [
        "",
        "Constant Adam: "
        + ", ".join(
            f"{rate:g}: {_fmt(np.median(sweep[i]))}"
            for i, rate in enumerate(adam_rates)
        )
        + ".",
        "",
    ]
    return lines


def _plot(all_results, out_dir):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(
        2, len(all_results), figsize=(5 * len(all_results), 8), squeeze=False
    )
    for column, (task, results, best, rates) in enumerate(all_results):
        ax = axes[0, column]
        for name, steps in results.items():
            medians = np.median(steps, axis=1)
            ax.plot(
                STARTS,
                np.where(np.isfinite(medians), medians, np.nan),
                "o-",
                label=name,
            )
        ax.axhline(best, color="gray", ls="--", label="best constant")
        ax.set(
            xscale="log",
            yscale="log",
            xlabel="starting rate",
            ylabel="steps to target (median of 3)",
            title=task["name"],
        )
        if np.isfinite(best):
            ax.set_yscale("log")
        ax.legend(fontsize=8)
        ax = axes[1, column]
        grid = np.arange(rates.shape[-1]) * task["eval_every"]
        for i, start in enumerate(STARTS):
            ax.plot(grid, rates[i, 0], lw=0.8, label=f"start {start:g}")
        ax.set(yscale="log", xlabel="step", ylabel="noise-aware rate (seed 0)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(out_dir) / "minibatch.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def run(quick: bool, out_dir) -> str:
    tasks = [
        (_digits_mlp(), 20_000),
        (_breast_cancer_logistic(), 20_000),
        (_digits_cnn(), 20_000),
    ]
    if quick:
        tasks = tasks[:1]
    lines = [
        "## Minibatch losses: noise_aware=True",
        "",
        "Steps until the full training loss (checked every 10 steps, 20 for the "
        "CNN) reaches the target, medians of seeds "
        f"{', '.join(map(str, SEEDS))}; 'never' = not within the budget. "
        "Constant SGD swept over rates "
        f"{', '.join(f'{r:.3g}' for r in SWEEP)}. The noise-aware form keeps "
        "its defaults (factors 1.05 and 0.5, bounds 1e-10 and 1e10); the plain "
        "rule runs with the same factors 1.05 and 0.5.",
        "",
    ]
    all_results = []
    for task, budget in tasks:
        steps = 5_000 if not quick else 200
        steps = min(steps, budget)
        collapse = budget if not quick else 200
        print(f"--- {task['name']}", flush=True)
        rows, results, best, rates = _compare_task(task, steps, collapse, out_dir)
        print("\n".join(rows), flush=True)
        lines += rows
        all_results.append((task, results, best, rates))
    extra = _full_batch(2_000 if not quick else 100)
    extra += _accumulation(5_000 if not quick else 100)
    extra += _after_adam(3_000 if not quick else 100)
    print("\n".join(extra), flush=True)
    lines += extra
    path = _plot(all_results, out_dir)
    lines += [
        f"![steps to target and rates]({path.name})",
        "",
        f"Machine: {_common.machine_description()}",
        "",
    ]
    return "\n".join(lines)
