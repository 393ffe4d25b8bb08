"""Which increase and decrease factors should be the defaults?

``optax.chain(dynamic_lr(start, increase, decrease), optax.sgd(1.0))`` with
full-batch gradients, for several factor pairs, six starting rates over five
decades and three initialisations, on three tasks that ship with scikit-learn:
the digits with a 64-64-10 tanh MLP (the main one), and two cheap cross-checks,
logistic regression on the breast cancer data and linear regression on the
diabetes data. The figure is the number of updates until the full training
loss reaches a target; constant SGD over a log-spaced sweep of rates, from the
same initialisations, is the reference.

Each run is a ``jax.lax.while_loop`` that stops at the target (or, for constant
SGD, at a non-finite loss, which it cannot leave), so no run pays for the steps
after it is done. The runs go one after another rather than under ``jax.vmap``:
on CPU, XLA's batched matrix products made a vmapped run of the digits MLP two
to three times slower per run than a single one.
"""

import dataclasses
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks import _common
from optax_dynlr import dynamic_lr

# (increase, decrease): the current default; MATLAB traingda's pair; the bold
# driver's; one factor moved at a time from the default; then sharper cuts with
# faster rises, far enough to see where the gains stop.
FACTOR_PAIRS = (
    (1.05, 0.5),
    (1.05, 0.7),
    (1.1, 0.5),
    (1.02, 0.5),
    (1.2, 0.5),
    (1.05, 0.3),
    (1.05, 0.2),
    (1.1, 0.3),
    (1.1, 0.2),
    (1.2, 0.3),
    (1.3, 0.3),
)
SEEDS = (0, 1, 2)
CAP = 5_000


def _half_octaves(low_exponent, high_exponent):
    """Rates 2 ** (k / 2): steps of a factor sqrt(2) around the best rate."""
    return tuple(float(2.0 ** (k / 2)) for k in range(low_exponent, high_exponent))


@dataclasses.dataclass(frozen=True)
class Task:
    name: str
    description: str
    loss_fn: Callable  # params -> scalar full-batch loss
    init: Callable  # seed -> params
    target: float
    target_text: str
    starts: tuple[float, ...]
    constant_rates: tuple[float, ...]


def _standardise(array):
    array = np.asarray(array, dtype=np.float64)
    return (array - array.mean(0)) / array.std(0)


def _linear_init(num_features):
    def init(seed):
        weights = jax.random.normal(jax.random.PRNGKey(seed), (num_features,))
        return {"w": weights / np.sqrt(num_features), "b": jnp.zeros(())}

    return init


def digits_task(quick: bool) -> Task:
    loss_fn, init = _common.digits_mlp_problem()
    target = 0.5 if quick else 0.01
    return Task(
        name="digits",
        description=(
            "scikit-learn digits (1,797 images, inputs / 16), 64-64-10 tanh MLP, "
            "softmax cross-entropy"
        ),
        loss_fn=loss_fn,
        init=init,
        target=target,
        target_text=f"{target:g}",
        starts=(1e-2, 1.0) if quick else (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0),
        # 0.25 to 2.83: rate 1.41 is the best, 2.83 diverges.
        constant_rates=(0.5, 1.0) if quick else _half_octaves(-4, 4),
    )


def breast_cancer_task(quick: bool) -> Task:
    from sklearn.datasets import load_breast_cancer

    data = load_breast_cancer()
    inputs = jnp.asarray(_standardise(data.data), jnp.float32)
    labels = jnp.asarray(data.target, jnp.float32)

    def loss_fn(params):
        logits = inputs @ params["w"] + params["b"]
        return optax.sigmoid_binary_cross_entropy(logits, labels).mean()

    target = 0.1 if quick else 0.03
    return Task(
        name="breast cancer",
        description=(
            "scikit-learn breast cancer (569 x 30, standardised features), "
            "logistic regression"
        ),
        loss_fn=loss_fn,
        init=_linear_init(inputs.shape[1]),
        target=target,
        target_text=f"{target:g}",
        # The classes are almost separable, so the curvature falls as the fit
        # improves and the best constant rate is large: about 45.
        starts=(1.0, 100.0) if quick else (1e-2, 1e-1, 1.0, 10.0, 100.0, 1000.0),
        constant_rates=(32.0, 64.0) if quick else _half_octaves(4, 15),
    )


def diabetes_task(quick: bool) -> Task:
    from sklearn.datasets import load_diabetes

    data = load_diabetes()
    inputs = _standardise(data.data)
    targets = _standardise(data.target)

    # The least-squares optimum, in float64, fixes a target just above it.
    design = np.c_[inputs, np.ones(len(inputs))]
    solution, *_ = np.linalg.lstsq(design, targets, rcond=None)
    optimum = float(np.mean((design @ solution - targets) ** 2))
    inputs = jnp.asarray(inputs, jnp.float32)
    targets = jnp.asarray(targets, jnp.float32)

    def loss_fn(params):
        return jnp.mean((inputs @ params["w"] + params["b"] - targets) ** 2)

    excess = 0.05 if quick else 0.001
    return Task(
        name="diabetes",
        description=(
            "scikit-learn diabetes (442 x 10, standardised features and target), "
            "linear regression, mean squared error"
        ),
        loss_fn=loss_fn,
        init=_linear_init(inputs.shape[1]),
        target=optimum * (1 + excess),
        target_text=f"{optimum:.4g} x {1 + excess:g} (least squares + {excess:.1%})",
        # The largest curvature is about 8, so rates above 2 / 8 diverge.
        starts=(1e-2, 1.0) if quick else (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0),
        constant_rates=(0.125, 0.25) if quick else _half_octaves(-8, 0),
    )


def _make_runners(loss_fn):
    """Jitted runs returning (updates made, loss there) at the stop.

    Both take every hyperparameter as a traced argument, so each compiles once
    for the whole grid of a task.
    """
    value_and_grad = jax.value_and_grad(loss_fn)

    def run(params, opt, opt_state, target, cap, stop_when_nonfinite):
        def keep_going(carry):
            steps, _, _, loss, _ = carry
            # Written as "not reached" so that a nan loss keeps a dynamic run
            # going: the rule cuts the rate and recovers from it.
            going = ~(loss <= target) & (steps < cap)
            if stop_when_nonfinite:
                going &= jnp.isfinite(loss)
            return going

        def step(carry):
            steps, params, opt_state, loss, grads = carry
            updates, opt_state = opt.update(grads, opt_state, params, value=loss)
            params = optax.apply_updates(params, updates)
            loss, grads = value_and_grad(params)
            return steps + 1, params, opt_state, loss, grads

        loss, grads = value_and_grad(params)
        carry = (jnp.zeros((), jnp.int32), params, opt_state, loss, grads)
        steps, _, _, loss, _ = jax.lax.while_loop(keep_going, step, carry)
        return steps, loss

    @jax.jit
    def dynamic(params, start, increase, decrease, target, cap):
        opt = optax.chain(dynamic_lr(start, increase, decrease), optax.sgd(1.0))
        return run(params, opt, opt.init(params), target, cap, False)

    @jax.jit
    def constant(params, rate, target, cap):
        opt = optax.sgd(rate)
        return run(params, opt, opt.init(params), target, cap, True)

    return dynamic, constant


def _steps(result, target):
    steps, loss = (np.asarray(x) for x in result)
    return int(steps) if loss <= target else None


def _summary(steps_list):
    """(median, lowest, highest) of step counts, None meaning never.

    A never ranks above every count; the median of an even number of runs is
    the mean of the middle two, or never if either is.
    """
    ranked = sorted(steps_list, key=lambda steps: np.inf if steps is None else steps)
    middle = len(ranked) // 2
    if len(ranked) % 2:
        median = ranked[middle]
    elif ranked[middle] is None:
        median = None
    else:
        median = round((ranked[middle - 1] + ranked[middle]) / 2)
    return median, ranked[0], ranked[-1]


def _rank(steps):
    return np.inf if steps is None else steps


@dataclasses.dataclass
class TaskResult:
    task: Task
    dynamic: dict  # (pair, start) -> steps per seed
    constant: dict  # rate -> steps per seed
    seconds: float

    def pooled_median(self, pair):
        return _summary([x for s in self.task.starts for x in self.dynamic[pair, s]])[0]

    def worst_start(self, pair):
        medians = [_summary(self.dynamic[pair, s])[0] for s in self.task.starts]
        return max(medians, key=_rank)

    def best_constant(self):
        medians = {rate: _summary(s)[0] for rate, s in self.constant.items()}
        rate = min(medians, key=lambda r: _rank(medians[r]))
        return rate, medians[rate]


def _measure(task: Task, pairs, seeds, cap) -> TaskResult:
    started = time.perf_counter()
    dynamic, constant = _make_runners(task.loss_fn)
    params = {seed: task.init(seed) for seed in seeds}
    target, cap_array = jnp.float32(task.target), jnp.int32(cap)

    dynamic_steps = {}
    for pair in pairs:
        increase, decrease = (jnp.float32(x) for x in pair)
        for start in task.starts:
            dynamic_steps[pair, start] = [
                _steps(
                    dynamic(params[seed], jnp.float32(start), increase, decrease,
                            target, cap_array),
                    task.target,
                )
                for seed in seeds
            ]  # fmt: skip

    constant_steps = {
        rate: [
            _steps(constant(params[seed], jnp.float32(rate), target, cap_array),
                   task.target)
            for seed in seeds
        ]
        for rate in task.constant_rates
    }  # fmt: skip
    seconds = time.perf_counter() - started
    print(f"  {task.name}: {seconds:.0f} s", flush=True)
    return TaskResult(task, dynamic_steps, constant_steps, seconds)


def _pair_label(pair):
    return f"{pair[0]:g} / {pair[1]:g}"


def _cell(steps_list):
    median, lowest, highest = _summary(steps_list)
    fmt = _common.format_steps
    if lowest == highest:
        return fmt(median)
    return f"{fmt(median)} ({fmt(lowest)}–{fmt(highest)})"


def _task_markdown(result: TaskResult, pairs, cap):
    task = result.task
    lines = [
        f"### {task.name}: {task.description}",
        "",
        f"Target: full training loss <= {task.target_text}.",
        "",
        "| increase / decrease | "
        + " | ".join(f"start {s:g}" for s in task.starts)
        + " | median of all | worst start |",
        "|---" + "|---:" * (len(task.starts) + 2) + "|",
    ]
    for pair in pairs:
        cells = [_cell(result.dynamic[pair, s]) for s in task.starts]
        lines.append(
            f"| {_pair_label(pair)} | "
            + " | ".join(cells)
            + f" | {_common.format_steps(result.pooled_median(pair))}"
            + f" | {_common.format_steps(result.worst_start(pair))} |"
        )
    best_rate, best = result.best_constant()
    lines += [
        "",
        "Constant SGD from the same initialisations:",
        "",
        "| rate | " + " | ".join(f"{r:.3g}" for r in result.constant) + " |",
        "|---" + "|---:" * len(result.constant) + "|",
        "| updates | " + " | ".join(_cell(s) for s in result.constant.values()) + " |",
        "",
        f"Best constant rate {best_rate:.3g}: median "
        f"{_common.format_steps(best)} updates.",
        "",
    ]
    return lines


def _summary_markdown(results, pairs):
    header = " | ".join(
        f"{r.task.name} median | {r.task.name} worst start" for r in results
    )
    lines = [
        "### All tasks: median of all runs and worst per-start median",
        "",
        f"| increase / decrease | {header} |",
        "|---" + "|---:" * (2 * len(results)) + "|",
    ]
    for pair in pairs:
        cells = " | ".join(
            f"{_common.format_steps(r.pooled_median(pair))} | "
            f"{_common.format_steps(r.worst_start(pair))}"
            for r in results
        )
        lines.append(f"| {_pair_label(pair)} | {cells} |")
    cells = " | ".join(
        f"{_common.format_steps(r.best_constant()[1])} | –" for r in results
    )
    lines += [f"| best constant SGD | {cells} |", ""]
    return lines


def _markdown(results, pairs, seeds, cap):
    seconds = sum(r.seconds for r in results)
    lines = [
        "## Default factors: steps to a full-batch target",
        "",
        f"Machine: {_common.machine_description()}",
        "",
        "Full-batch gradient descent, "
        "`optax.chain(dynamic_lr(start, increase, decrease), optax.sgd(1.0))`, "
        "the loss at the current parameters passed as `value` every step. Cells: "
        "updates until the full training loss is at or below the target, median "
        f"over {len(seeds)} initialisation(s) (seeds "
        + ", ".join(str(seed) for seed in seeds)
        + ") with the lowest–highest in brackets; 'never' if not within "
        f"{cap:,} updates, and a 'never' ranks above every count. 'Median of all' "
        "pools every start and initialisation; 'worst start' is the largest of "
        "the per-start medians. All runs in one process, from the same "
        f"initialisations; measured in {seconds:.0f} s. Plot: `factors.png`.",
        "",
    ]
    lines += _summary_markdown(results, pairs)
    for result in results:
        lines += _task_markdown(result, pairs, cap)
    lines += [
        "![steps to target against starting rate, one line per factor pair]"
        "(factors.png)",
        "",
    ]
    return "\n".join(lines)


def _plot(results, pairs, cap, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    never = cap * 1.25
    figure, all_axes = plt.subplots(
        1, len(results), figsize=(6 * len(results), 5.5), constrained_layout=True
    )
    # More pairs than the default colour cycle has colours: tab20's dark
    # shades, then its light ones.
    colours = plt.get_cmap("tab20")(np.r_[np.arange(0, 20, 2), np.arange(1, 20, 2)])
    for axes, result in zip(np.atleast_1d(all_axes), results, strict=True):
        starts = np.array(result.task.starts)
        for index, pair in enumerate(pairs):
            summaries = [_summary(result.dynamic[pair, s]) for s in result.task.starts]
            median, low, high = np.array(
                [[never if x is None else x for x in row] for row in summaries],
                dtype=float,
            ).T
            # Spread the lines a little sideways so that equal values stay
            # visible; dashed lines for the pairs that keep the 0.5 cut.
            shifted = starts * 1.05 ** (index - len(pairs) / 2)
            axes.errorbar(
                shifted,
                median,
                yerr=[median - low, high - median],
                marker="o",
                markersize=4,
                capsize=2,
                linestyle="-" if pair[1] < 0.5 else "--",
                color=colours[index],
                label=_pair_label(pair),
            )
        best_rate, best = result.best_constant()
        if best is not None:
            axes.axhline(
                best,
                color="black",
                linestyle="-.",
                label="best constant SGD",
            )
        axes.axhline(never, color="grey", linestyle=":", label=f"never ({cap:,})")
        axes.set(
            xscale="log",
            yscale="log",
            xlabel="starting rate",
            ylabel=f"updates to training loss {result.task.target:.4g}",
            title=f"{result.task.name} (best constant rate {best_rate:.3g})",
        )
    axes.legend(fontsize="small", ncol=2)
    figure.suptitle("dynamic_lr factor pairs (increase / decrease), full batch")
    figure.savefig(path, dpi=110)
    plt.close(figure)


def run(quick: bool, out_dir: Path) -> str:
    pairs = FACTOR_PAIRS[:2] if quick else FACTOR_PAIRS
    seeds = SEEDS[:1] if quick else SEEDS
    cap = 300 if quick else CAP
    tasks = [make(quick) for make in (digits_task, breast_cancer_task, diabetes_task)]
    results = [_measure(task, pairs, seeds, cap) for task in tasks]
    markdown = _markdown(results, pairs, seeds, cap)
    print(markdown)
    out_dir.mkdir(parents=True, exist_ok=True)
    _plot(results, pairs, cap, out_dir / "factors.png")
    return markdown
