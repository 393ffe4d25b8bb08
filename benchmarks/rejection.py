"""Step rejection: steps to a full-batch target from starting rates 1e-4 to 1e4.

Two full-batch tasks, each from nine starting rates and three initialisations:
``dynamic_lr`` with and without ``reject_steps``, constant SGD at the same
starting rate, and the best constant rate of a log-spaced sweep. Then the
digits task again with bfloat16 parameters, measuring how far each rejection
lands from the exact point ``accepted point + new rate * direction``.
"""

import dataclasses
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from benchmarks import _common
from optax_dynlr import current_learning_rate, dynamic_lr

STARTS = tuple(10.0**k for k in range(-4, 5))
SEEDS = (0, 1, 2)
QUICK_STARTS = (1e-2, 1.0, 1e4)
QUICK_SEEDS = (0,)
# dynamic_lr's default min_learning_rate.
FLOOR = 1e-10

# Targets reported besides the main one on the breast cancer task, read from the
# same trajectories: the comparison with the best constant rate depends on them.
BREAST_CANCER_EXTRA_TARGETS = (0.04, 0.035)


@dataclasses.dataclass(frozen=True)
class Task:
    name: str
    description: str
    loss_fn: Callable
    init: Callable[[int], object]
    target: float
    cap: int
    sweep: tuple[float, ...]


def digits_task(quick: bool) -> Task:
    loss_fn, init = _common.digits_mlp_problem()
    # Half-octave steps around the best rate, 1: rate 2 already fails for some
    # initialisations and 2.8 diverges, so the sweep brackets the optimum.
    sweep = tuple(2.0 ** (k / 2) for k in range(-6, 4))
    return Task(
        name="digits",
        description=(
            "scikit-learn digits (1,797 images, inputs / 16), 64-64-10 tanh MLP, "
            "softmax cross-entropy, full batch"
        ),
        loss_fn=loss_fn,
        init=init,
        target=0.01,
        cap=60 if quick else 3000,
        sweep=(0.5, 1.0, 1.41) if quick else sweep,
    )


def breast_cancer_task(quick: bool) -> Task:
    from sklearn.datasets import load_breast_cancer

    data = load_breast_cancer()
    features = (data.data - data.data.mean(0)) / data.data.std(0)
    inputs = jnp.asarray(features, jnp.float32)
    labels = jnp.asarray(data.target, jnp.float32)

    def loss_fn(params):
        logits = inputs @ params["w"] + params["b"]
        return optax.sigmoid_binary_cross_entropy(logits, labels).mean()

    def init(seed):
        weights = jax.random.normal(jax.random.PRNGKey(seed), (inputs.shape[1],))
        return {"w": weights / np.sqrt(inputs.shape[1]), "b": jnp.zeros(())}

    # The classes are almost separable, so the curvature falls as the fit
    # improves and the best constant rate is large (about 45); the sweep runs
    # from 1 to 256 to bracket it.
    sweep = tuple(2.0 ** (k / 2) for k in range(0, 17))
    return Task(
        name="breast cancer",
        description=(
            "scikit-learn breast cancer (569 x 30, standardised features), "
            "logistic regression, full batch"
        ),
        loss_fn=loss_fn,
        init=init,
        target=0.03,
        cap=100 if quick else 5000,
        sweep=(16.0, 45.3, 128.0) if quick else sweep,
    )


def _stack(trees):
    return jax.tree.map(lambda *leaves: jnp.stack(leaves), *trees)


def _grid(task: Task, seeds, rates, dtype=jnp.float32):
    """Parameters and rates for every (seed, rate) pair, seeds outermost."""
    params = [
        jax.tree.map(lambda leaf: leaf.astype(dtype), task.init(seed)) for seed in seeds
    ]
    stacked = _stack(params)
    repeated = jax.tree.map(lambda leaf: jnp.repeat(leaf, len(rates), 0), stacked)
    tiled = jnp.tile(jnp.asarray(rates, jnp.float32), len(seeds))
    return repeated, tiled


def _ulp(x, dtype):
    """The spacing of ``dtype`` numbers at ``x`` (x in float64)."""
    info = jnp.finfo(dtype)
    _, exponent = jnp.frexp(x)
    exponent = jnp.maximum(exponent - 1, info.minexp) - info.nmant
    return jnp.ldexp(jnp.ones_like(x), exponent)


def _dynamic_run(task: Task, params, start, steps: int, reject: bool):
    """One run of ``chain(dynamic_lr(start), sgd(1.0))`` for ``steps`` updates.

    With ``reject`` it must be traced with 64-bit types enabled: each rejection
    is compared in float64 with the exact point it should land on.
    """
    opt = optax.chain(dynamic_lr(start, reject_steps=reject), optax.sgd(1.0))
    dtype = jax.tree.leaves(params)[0].dtype

    def undo_errors(accepted, direction, before, after, rate):
        """Largest error of the parameters after a rejection.

        In ulps of the exact point, in ulps of the larger of the exact point and
        the rejected point (the magnitude the undo is computed at), and absolute.
        """
        largest = jnp.zeros(3, jnp.float64)
        for a, d, b, p in zip(
            *(jax.tree.leaves(t) for t in (accepted, direction, before, after)),
            strict=True,
        ):
            a, d, b, p = (leaf.astype(jnp.float64) for leaf in (a, d, b, p))
            # sgd(1.0) negates the scaled direction.
            exact = a - rate.astype(jnp.float64) * d
            error = jnp.abs(p - exact)
            scale = jnp.maximum(jnp.abs(exact), jnp.abs(b))
            leaf_largest = jnp.stack(
                [
                    jnp.max(error / _ulp(exact, dtype)),
                    jnp.max(error / _ulp(scale, dtype)),
                    jnp.max(error),
                ]
            )
            largest = jnp.maximum(largest, leaf_largest)
        return largest

    def step(carry, _):
        params, state, accepted = carry
        loss, grads = jax.value_and_grad(task.loss_fn)(params)
        updates, new_state = opt.update(grads, state, params, value=loss)
        new_params = optax.apply_updates(params, updates)
        old, new = state[0], new_state[0]
        # A call is accepted when it is neither rejected nor non-finite (a rise
        # is accepted too where the rate cannot fall further).
        rejected = new.num_rejections > old.num_rejections
        is_accepted = jnp.isfinite(loss) & ~rejected
        record = {
            "loss": loss,
            "rate": new.learning_rate,
            "accepted": is_accepted,
            "rejected": rejected,
        }
        if reject:
            accepted = jax.tree.map(
                lambda a, p: jnp.where(is_accepted, p, a), accepted, params
            )
            errors = undo_errors(
                accepted, new.accepted_direction, params, new_params, new.learning_rate
            )
            record["ulps"] = jnp.where(rejected, errors, 0.0)
        return (new_params, new_state, accepted), record

    state = opt.init(params)
    (params, state, _), record = lax.scan(
        step, (params, state, params), None, length=steps
    )
    record["loss"] = jnp.append(record["loss"], task.loss_fn(params))
    record["finite"] = jnp.all(
        jnp.stack([jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree.leaves(params)])
    )
    return record


def default_factors() -> tuple[float, float]:
    """The increase and decrease factors dynamic_lr uses by default.

    Read off three calls (losses 1, 0.5, 1: hold, fall, rise), so that the
    reference below follows the transform's defaults.
    """
    opt = dynamic_lr(1.0)
    rates = []
    # Concrete even when called while a run is being traced.
    with jax.ensure_compile_time_eval():
        state = opt.init(jnp.zeros(()))
        for loss in (1.0, 0.5, 1.0):
            _, state = opt.update(jnp.zeros(()), state, value=loss)
            rates.append(float(current_learning_rate(state)))
    return round(rates[1] / rates[0], 6), round(rates[2] / rates[1], 6)


def _ideal_rejection_run(task: Task, params, start, steps: int):
    """The same rule as ``dynamic_lr(start, reject_steps=True)`` before
    ``sgd(1.0)``, but a rejection puts the parameters at the accepted point plus
    the new rate times the direction, rounded once as an accepted step from that
    point would be, instead of undoing the step with a second update.
    """
    increase, decrease = default_factors()

    def step(carry, _):
        params, accepted, direction, previous, has_previous, rate = carry
        loss, grads = jax.value_and_grad(task.loss_fn)(params)
        finite = jnp.isfinite(loss)
        # As in the transform: an unchanged loss grows the rate. Retries here
        # land on the accepted point rounded once, so as the rate shrinks they
        # reach the accepted loss and need no test for a lost retry.
        fell = finite & has_previous & (loss <= previous)
        rose = ~finite | (has_previous & (loss > previous))
        old_rate = rate
        rate = jnp.where(
            rose,
            jnp.maximum(rate * decrease, FLOOR),
            jnp.where(fell, jnp.minimum(rate * increase, 1e10), rate),
        )
        # As in the transform: at the floor a finite rise is accepted.
        accept = ~rose | (finite & (rate >= old_rate))
        accepted = jax.tree.map(lambda a, p: jnp.where(accept, p, a), accepted, params)
        direction = jax.tree.map(lambda d, g: jnp.where(accept, g, d), direction, grads)
        params = jax.tree.map(
            lambda a, d: a - (d.astype(jnp.float32) * rate).astype(a.dtype),
            accepted,
            direction,
        )
        previous = jnp.where(accept, loss, previous)
        carry = (params, accepted, direction, previous, has_previous | accept, rate)
        return carry, {"loss": loss, "rate": rate, "accepted": accept}

    zeros = jax.tree.map(jnp.zeros_like, params)
    carry = (params, params, zeros, jnp.float32(0), jnp.bool_(False), start)
    carry, record = lax.scan(step, carry, None, length=steps)
    record["loss"] = jnp.append(record["loss"], task.loss_fn(carry[0]))
    return record


def _constant_run(task: Task, params, rate, steps: int):
    opt = optax.sgd(rate)

    def step(carry, _):
        params, state = carry
        loss, grads = jax.value_and_grad(task.loss_fn)(params)
        updates, state = opt.update(grads, state, params)
        return (optax.apply_updates(params, updates), state), loss

    (params, _), losses = lax.scan(step, (params, opt.init(params)), None, length=steps)
    return {"loss": jnp.append(losses, task.loss_fn(params))}


def _run_batch(run_fn, params, rates, x64: bool = False):
    """Runs ``run_fn`` for every (parameters, rate) pair at once, as NumPy."""
    batched = jax.jit(jax.vmap(run_fn))
    if x64:
        with jax.enable_x64(True):
            record = batched(params, rates)
    else:
        record = batched(params, rates)
    return {key: np.asarray(value) for key, value in record.items()}


def _steps(losses, target):
    """Steps to target for each run (rows of ``losses``); None where never."""
    return [_common.steps_to_target(row, target) for row in losses]


def _median(steps):
    """Median of steps with None (never) as infinity; None if it is never."""
    value = np.median([np.inf if s is None else s for s in steps])
    return None if np.isinf(value) else int(value)


def _summary(steps) -> str:
    """'median [min-max]' over seeds."""
    if len(steps) == 1:
        return _common.format_steps(steps[0])
    keys = sorted(steps, key=lambda s: np.inf if s is None else s)
    lowest, highest = _common.format_steps(keys[0]), _common.format_steps(keys[-1])
    return f"{_common.format_steps(_median(steps))} [{lowest}-{highest}]"


def _outcome(record, index, target) -> str:
    """What a run that missed the target did instead."""
    losses = record["loss"][index]
    if _common.steps_to_target(losses, target) is not None:
        return "reached"
    if not np.all(np.isfinite(losses)):
        first = int(np.nonzero(~np.isfinite(losses))[0][0])
        return f"non-finite loss from step {first}"
    final, initial = losses[-1], losses[0]
    rate = record["rate"][index][-1]
    if final > initial:
        return (
            f"loss at the cap {final:.3g}, above its start {initial:.3g}; "
            f"rate {rate:.2g}"
        )
    late = losses[-1001] if losses.size > 1001 else losses[0]
    return (
        f"loss at the cap {final:.3g} (best {losses.min():.3g}, "
        f"{late:.3g} 1,000 steps earlier); rate {rate:.2g}"
    )


def _compare_task(task: Task, starts, seeds):
    """Every method on one task; returns the steps and the records by method."""
    n_starts = len(starts)

    params, rates = _grid(task, seeds, starts)
    results = {}
    for reject in (True, False):

        def run_fn(p, r, reject=reject):
            return _dynamic_run(task, p, r, task.cap, reject)

        results[reject] = _run_batch(run_fn, params, rates, x64=reject)

    constant_rates = list(starts) + [r for r in task.sweep if r not in starts]
    params, rates = _grid(task, seeds, constant_rates)
    constant = _run_batch(
        lambda p, r: _constant_run(task, p, r, task.cap), params, rates
    )
    n_constant = len(constant_rates)
    constant_losses = constant["loss"].reshape(len(seeds), n_constant, -1)

    def by_start(record, target):
        steps = np.array(_steps(record["loss"], target), dtype=object)
        return steps.reshape(len(seeds), n_starts)

    sweep_columns = [constant_rates.index(r) for r in task.sweep]

    def best_constant(target):
        per_rate = {
            task.sweep[k]: [
                _common.steps_to_target(constant_losses[s, column], target)
                for s in range(len(seeds))
            ]
            for k, column in enumerate(sweep_columns)
        }
        best = min(
            per_rate,
            key=lambda r: (
                np.inf if _median(per_rate[r]) is None else _median(per_rate[r])
            ),
        )
        return best, per_rate[best], per_rate

    same_start = np.array(
        [
            [
                _common.steps_to_target(constant_losses[s, j], task.target)
                for j in range(n_starts)
            ]
            for s in range(len(seeds))
        ],
        dtype=object,
    )

    def rises_on_the_way(rate, target):
        """For each seed: steps whose loss rose, and steps, up to the target."""
        column = constant_rates.index(rate)
        counts = []
        for s in range(len(seeds)):
            losses = constant_losses[s, column]
            reached = _common.steps_to_target(losses, target)
            end = len(losses) - 1 if reached is None else reached
            counts.append((int(np.sum(np.diff(losses[: end + 1]) > 0)), end))
        return counts

    return {
        "rises_on_the_way": rises_on_the_way,
        "rejection": results[True],
        "plain": results[False],
        "steps_rejection": by_start(results[True], task.target),
        "steps_plain": by_start(results[False], task.target),
        "steps_constant": same_start,
        "best_constant": best_constant,
        "by_start": by_start,
    }


def _task_section(task: Task, starts, seeds, result) -> tuple[str, dict]:
    best_rate, best_steps, per_rate = result["best_constant"](task.target)
    rejection, plain = result["steps_rejection"], result["steps_plain"]
    n_starts = len(starts)

    lines = [
        f"### {task.name}: {task.description}",
        "",
        f"Target: full training loss <= {task.target}; cap {task.cap:,} steps; "
        f"seeds {', '.join(map(str, seeds))} (initialisations). Cells: median "
        "[min-max] over seeds of the steps to the target; never = not within "
        "the cap.",
        "",
        "Constant-rate sweep (median steps): "
        + ", ".join(
            f"{rate:.3g}: {_common.format_steps(_median(steps))}"
            for rate, steps in per_rate.items()
        )
        + f". Best: {best_rate:.3g}, {_summary(best_steps)} steps.",
        "",
        "| start | with rejection | without rejection | constant at start "
        "| without rejection, if it missed |",
        "|---:|---:|---:|---:|---|",
    ]
    for j, start in enumerate(starts):
        outcomes = sorted(
            {
                _outcome(result["plain"], s * n_starts + j, task.target)
                for s in range(len(seeds))
            }
        )
        missed = "; ".join(o for o in outcomes if o != "reached") or "-"
        lines.append(
            f"| {start:g} | {_summary(list(rejection[:, j]))} "
            f"| {_summary(list(plain[:, j]))} "
            f"| {_summary(list(result['steps_constant'][:, j]))} | {missed} |"
        )

    worst = [
        (np.inf if steps is None else steps, s, starts[j])
        for (s, j), steps in np.ndenumerate(rejection)
    ]
    within = sum(
        1
        for (s, j), steps in np.ndenumerate(rejection)
        if steps is not None and best_steps[s] is not None and steps <= best_steps[s]
    )
    rises = result["rises_on_the_way"](best_rate, task.target)
    slowest = max(worst)
    slowest_steps = None if np.isinf(slowest[0]) else int(slowest[0])
    best_list = ", ".join(_common.format_steps(s) for s in best_steps)
    lines += [
        "",
        f"With rejection, {within} of {rejection.size} runs reached the target in "
        "at most the steps the best constant rate needed from the same "
        f"initialisation ({best_list}); "
        f"the slowest run took {_common.format_steps(slowest_steps)} "
        f"steps (seed {slowest[1]}, start {slowest[2]:g}). Rejected calls per run: "
        f"{int(result['rejection']['rejected'].sum(1).min())} to "
        f"{int(result['rejection']['rejected'].sum(1).max())}; final rates "
        f"{result['rejection']['rate'][:, -1].min():.3g} to "
        f"{result['rejection']['rate'][:, -1].max():.3g}.",
        "",
        f"The best constant rate ({best_rate:.3g}) raised the loss on "
        + ", ".join(f"{r:,} of {n:,}" for r, n in rises)
        + " of its steps to the target (seeds "
        + ", ".join(map(str, seeds))
        + "). Step rejection accepts no rise beyond the tolerance, so where "
        "the best constant only gets there by letting the loss rise and fall "
        "(training at the edge of stability), no rejecting run follows it.",
    ]
    print("\n".join(lines), flush=True)
    return "\n".join(lines), {"best_rate": best_rate, "best_steps": best_steps}


def _extra_targets(task: Task, starts, seeds, result, targets) -> str:
    lines = [
        "",
        f"Other targets on the same runs (median steps over starts {starts[0]:g} "
        f"to {starts[-1]:g} and seeds):",
        "",
        "| target | with rejection, all runs | without rejection, all runs "
        "| best constant |",
        "|---:|---:|---:|---:|",
    ]
    for target in targets:
        with_rejection = result["by_start"](result["rejection"], target).ravel()
        without = result["by_start"](result["plain"], target).ravel()
        best_rate, best_steps, _ = result["best_constant"](target)
        lines.append(
            f"| {target} | {_summary(list(with_rejection))} | "
            f"{_summary(list(without))} | "
            f"{_summary(best_steps)} (rate {best_rate:.3g}) |"
        )
    print("\n".join(lines), flush=True)
    return "\n".join(lines)


# Other settings of the rejecting rule, tried on both tasks: (increase factor,
# decrease factor, rtol). The first row is the default.
SETTINGS = (
    (None, None, 0.0),
    (1.05, 0.3, 0.0),
    (1.1, 0.1, 0.0),
    (1.1, 0.5, 0.0),
    (1.1, 0.7, 0.0),
    (1.2, 0.1, 0.0),
    (1.3, 0.05, 0.0),
    (1.5, 0.5, 0.0),
    (2.0, 0.05, 0.0),
    (1.1, 0.3, 0.1),
    (1.1, 0.3, 1.0),
    (1.2, 0.3, 1.0),
    (1.1, 0.3, 2.0),
)
QUICK_SETTINGS = SETTINGS[:2] + SETTINGS[-2:-1]


def _settings_run(task: Task, params, start, steps: int, setting):
    increase, decrease, rtol = setting
    opt = optax.chain(
        dynamic_lr(start, increase, decrease, rtol=rtol, reject_steps=True),
        optax.sgd(1.0),
    )

    def step(carry, _):
        params, state = carry
        loss, grads = jax.value_and_grad(task.loss_fn)(params)
        updates, state = opt.update(grads, state, params, value=loss)
        return (optax.apply_updates(params, updates), state), loss

    (params, _), losses = lax.scan(step, (params, opt.init(params)), None, length=steps)
    return {"loss": jnp.append(losses, task.loss_fn(params))}


def _settings_section(tasks, starts, seeds, bests, quick: bool) -> str:
    """Steps to target of other factor pairs and tolerances, with rejection."""
    settings = QUICK_SETTINGS if quick else SETTINGS
    lines = [
        "",
        "### Other settings of the rejecting rule",
        "",
        "Factor pairs and tolerances other than the defaults, with rejection, on "
        f"both tasks above: steps to their targets from starts "
        f"{', '.join(f'{x:g}' for x in starts)}, seeds "
        f"{', '.join(map(str, seeds))}; median over starts and seeds [slowest "
        "run], and how many runs reached the target within the best constant "
        "rate's steps from the same initialisation.",
        "",
        "| increase / decrease / rtol | "
        + " | ".join(f"{task.name}: steps | within best" for task in tasks)
        + " |",
        "|---|" + "---:|---:|" * len(tasks),
    ]
    for setting in settings:
        increase, decrease, rtol = setting
        if increase is None:
            increase, decrease = default_factors()
        cells = []
        for task, best in zip(tasks, bests, strict=True):
            params, rates = _grid(task, seeds, starts)
            record = _run_batch(
                lambda p, r, setting=setting, task=task: _settings_run(
                    task, p, r, task.cap, setting
                ),
                params,
                rates,
            )
            steps = _steps(record["loss"], task.target)
            by_seed = np.array(steps, dtype=object).reshape(len(seeds), len(starts))
            within = sum(
                1
                for (s, _), n in np.ndenumerate(by_seed)
                if n is not None
                and best["best_steps"][s] is not None
                and n <= best["best_steps"][s]
            )
            slowest = max(np.inf if n is None else n for n in steps)
            slowest = None if np.isinf(slowest) else int(slowest)
            cells.append(
                f"{_common.format_steps(_median(steps))} "
                f"[{_common.format_steps(slowest)}] | {within} of {len(steps)}"
            )
        lines.append(
            f"| {increase:g} / {decrease:g} / {rtol:g} | " + " | ".join(cells) + " |"
        )
    print("\n".join(lines), flush=True)
    return "\n".join(lines)


def _undo_figures(record) -> tuple[np.ndarray, np.ndarray]:
    """Median and max over rejections of the largest error, for each measure."""
    ulps = record["ulps"][record["rejected"]]
    if ulps.size == 0:
        return np.zeros(3), np.zeros(3)
    return np.median(ulps, axis=0), ulps.max(axis=0)


def _accepted_rises(record, target) -> tuple[int, int, int, float]:
    """Accepted calls whose loss was above the best accepted before them.

    Returns their number; how many of them were rises kept because a retry
    could not move the parameters (with rtol = 0, the only way an accepted loss
    rises above the previous accepted one), the others being accepted falls
    still above the earlier best; how many came before the run first reached
    ``target``; and the largest ratio of such a loss to the best before it.
    """
    rises = stuck = early = 0
    worst = 1.0
    for losses, accepted in zip(
        record["loss"][:, :-1], record["accepted"], strict=True
    ):
        kept = losses[accepted]
        best_before = np.full(kept.shape, np.inf)
        best_before[1:] = np.minimum.accumulate(kept)[:-1]
        above = kept > best_before
        kept_rise = np.zeros(kept.shape, bool)
        kept_rise[1:] = kept[1:] > kept[:-1]
        rises += int(above.sum())
        stuck += int(np.sum(above & kept_rise))
        reached = _common.steps_to_target(losses, target)
        calls = np.nonzero(accepted)[0]
        early += int(np.sum(above & (calls < (reached or len(losses)))))
        if above.any():
            worst = max(worst, float(np.max(kept[above] / best_before[above])))
    return rises, stuck, early, worst


def _at_floor(record) -> np.ndarray:
    return record["rate"][:, -1] <= FLOOR * 1.0001


def _precision_section(task: Task, starts, seeds, float32_record) -> str:
    """bfloat16 parameters on the same task, and the error of each undo."""
    params, rates = _grid(task, seeds, starts, jnp.bfloat16)
    library = _run_batch(
        lambda p, r: _dynamic_run(task, p, r, task.cap, True), params, rates, x64=True
    )
    ideal = _run_batch(
        lambda p, r: _ideal_rejection_run(task, p, r, task.cap), params, rates
    )
    plain = _run_batch(
        lambda p, r: _dynamic_run(task, p, r, task.cap, False), params, rates
    )
    constant_rates = (0.707, 1.0, 1.41)
    constant_params, constant_rate_grid = _grid(
        task, seeds, constant_rates, jnp.bfloat16
    )
    constant = _run_batch(
        lambda p, r: _constant_run(task, p, r, task.cap),
        constant_params,
        constant_rate_grid,
    )

    lines = [
        "",
        f"### Exactness of the undo, and bfloat16 parameters ({task.name})",
        "",
        "After a rejection the parameters should sit at accepted point + new "
        "rate x accepted direction (in update terms). The transform gets there "
        "with one more update, (new rate - old rate) x direction, added to "
        "parameters that were rounded at the rejected point. Each rejection is "
        "compared in float64 with that exact point; the figure is the largest "
        "error over all parameters, in ulps of the parameters' dtype at the exact "
        "value, in ulps at the larger of the exact and the rejected value (the "
        "magnitude the undo works at: about 1 is the best an added update can "
        "do), and absolute. Median over rejections / max over rejections, all "
        "runs of the table above (float32) and of the same grid in bfloat16. "
        "Where the exact value is near zero its ulp is tiny, so the largest "
        "figures in ulps of the exact value mostly say how close to zero some "
        "parameters are; the absolute error is the one to compare with the "
        "parameters (weights of about 0.1 to 1 here). A call is accepted with "
        "a loss above the last accepted one only where a retry could not move "
        "the parameters (the undo having missed the accepted point); that "
        "point is kept, and the accepted falls after it count as above the best "
        "before too, until they get below it.",
        "",
        "| parameters | rejections | ulps of exact value | ulps at undo magnitude "
        "| absolute | accepted calls above the best before | of them, where a "
        "retry could not move the parameters | before the target | largest "
        "ratio to the best before |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, record in (("float32", float32_record), ("bfloat16", library)):
        median, largest = _undo_figures(record)
        rises, stuck, early, worst = _accepted_rises(record, task.target)
        lines.append(
            f"| {name} | {int(record['rejected'].sum()):,} "
            f"| {median[0]:.3g} / {largest[0]:.3g} "
            f"| {median[1]:.3g} / {largest[1]:.3g} "
            f"| {median[2]:.2g} / {largest[2]:.2g} "
            f"| {rises:,} | {stuck:,} | {early:,} | {worst:.6g} |"
        )

    n_starts = len(starts)

    def per_start(record, key):
        return record[key].reshape(len(seeds), n_starts, *record[key].shape[1:])

    def largest_error(record, j):
        errors = per_start(record, "ulps")[:, j][per_start(record, "rejected")[:, j]]
        if errors.size == 0:
            return "-"
        return f"{errors[:, 1].max():.3g} / {errors[:, 2].max():.2g}"

    steps = {
        name: np.array(_steps(record["loss"], task.target), dtype=object).reshape(
            len(seeds), n_starts
        )
        for name, record in (("library", library), ("ideal", ideal), ("plain", plain))
    }
    lines += [
        "",
        f"Per start: the largest undo error (ulps at undo magnitude / absolute), "
        f"and for bfloat16 the steps to loss <= {task.target} (cap "
        f"{task.cap:,}), median [min-max] over seeds. 'Undo rounded once' is a "
        "reference written in this benchmark: the same rule, but a rejection "
        "sets the parameters to the exact point rounded once, as an accepted "
        "step from the accepted point would.",
        "",
        "| start | largest error, float32 | largest error, bfloat16 "
        "| bfloat16 with rejection | undo rounded once | without rejection |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for j, start in enumerate(starts):
        lines.append(
            f"| {start:g} | {largest_error(float32_record, j)} "
            f"| {largest_error(library, j)} "
            f"| {_summary(list(steps['library'][:, j]))} "
            f"| {_summary(list(steps['ideal'][:, j]))} "
            f"| {_summary(list(steps['plain'][:, j]))} |"
        )

    constant_losses = constant["loss"].reshape(len(seeds), len(constant_rates), -1)

    def frozen_details(record):
        details = []
        for k in np.nonzero(_at_floor(record))[0]:
            first = int(np.argmax(record["rate"][k] <= FLOOR * 1.0001))
            accepted = record["loss"][k][:first][record["accepted"][k][:first]]
            reached = _common.steps_to_target(record["loss"][k], task.target)
            details.append(
                f"seed {seeds[k // n_starts]}, start {starts[k % n_starts]:g}: "
                f"floor from call {first:,}"
                + (
                    f" (target reached at {reached:,})"
                    if reached is not None
                    else " (target never reached)"
                )
                + f", loss there {record['loss'][k][-1]:.6g} against "
                f"{accepted.min():.6g} accepted"
            )
        count = f"{len(details)} of {len(record['rate'])}"
        return count + (f" ({'; '.join(details)})" if details else "")

    lines += [
        "",
        "bfloat16 constant SGD: "
        + "; ".join(
            f"rate {rate}: "
            + _summary(_steps(constant_losses[:, k], task.target))
            + f" steps, best loss {constant_losses[:, k].min():.3g}"
            for k, rate in enumerate(constant_rates)
        )
        + ".",
        "",
        f"Runs whose rate ended at its floor ({FLOOR:g}): bfloat16 "
        f"with rejection {frozen_details(library)}; undo rounded once "
        f"{int(_at_floor(ideal).sum())}; without rejection "
        f"{int(_at_floor(plain).sum())}. float32 with rejection "
        f"{frozen_details(float32_record)}.",
    ]
    print("\n".join(lines), flush=True)
    return "\n".join(lines)


def _minibatch_run(params, start, key, steps: int, reject: bool, batch_size: int):
    """Digits MLP on minibatch losses; the full training loss is only observed.

    Records the full loss at each call's parameters and whether a rejection
    undid a step whose full loss had fallen below the accepted point's.
    """
    inputs, labels = _common.digits_classification()
    opt = optax.chain(dynamic_lr(start, reject_steps=reject), optax.sgd(1.0))

    def step(carry, step_key):
        params, state, accepted_full_loss = carry
        batch = jax.random.randint(step_key, (batch_size,), 0, inputs.shape[0])
        loss, grads = jax.value_and_grad(_common.softmax_cross_entropy)(
            params, inputs[batch], labels[batch]
        )
        full_loss = _common.softmax_cross_entropy(params, inputs, labels)
        updates, new_state = opt.update(grads, state, params, value=loss)
        rejected = new_state[0].num_rejections > state[0].num_rejections
        record = {
            "full_loss": full_loss,
            "rate": new_state[0].learning_rate,
            "rejected": rejected,
            "undid_progress": rejected & (full_loss < accepted_full_loss),
        }
        accepted_full_loss = jnp.where(rejected, accepted_full_loss, full_loss)
        params = optax.apply_updates(params, updates)
        return (params, new_state, accepted_full_loss), record

    carry = (params, opt.init(params), jnp.float32(jnp.inf))
    _, record = lax.scan(step, carry, jax.random.split(key, steps))
    return record


def _minibatch_section(quick: bool) -> str:
    """Why rejection and noisy losses do not mix, measured."""
    seeds = QUICK_SEEDS if quick else SEEDS
    starts = (0.1, 1.0)
    steps, batch_size = (100 if quick else 1000), 64
    task = digits_task(quick)
    params, rates = _grid(task, seeds, starts)
    keys = jnp.repeat(
        jax.vmap(jax.random.PRNGKey)(jnp.asarray(seeds) + 1000), len(starts), 0
    )
    lines = [
        "",
        f"### Noisy minibatch losses ({task.name}, batch {batch_size})",
        "",
        "The same MLP trained on minibatch losses (batches drawn with "
        "replacement), the minibatch loss passed as `value`; the full training "
        "loss is computed alongside but not used. A rejection compares a new "
        "batch's loss with another batch's loss at the accepted point, which was "
        "itself accepted for being low. 'Undid progress': the rejected point's "
        f"full loss was below the accepted point's. Starts {starts[0]} and "
        f"{starts[1]}, seeds {', '.join(map(str, seeds))}, {steps:,} calls.",
        "",
        "| | calls until the rate < 1e-4 | rejections before that (undid "
        "progress) | rejected calls, all | full loss at the end |",
        "|---|---:|---:|---:|---:|",
    ]
    for reject in (True, False):
        record = jax.jit(
            jax.vmap(
                lambda p, r, k, reject=reject: _minibatch_run(
                    p, r, k, steps, reject, batch_size
                )
            )
        )(params, rates, keys)
        record = {key: np.asarray(value) for key, value in record.items()}
        small = record["rate"] < 1e-4
        until = [int(np.argmax(row)) if row.any() else None for row in small]
        early_rejections = early_undid = 0
        for k, end in enumerate(until):
            end = steps if end is None else end
            early_rejections += int(record["rejected"][k][:end].sum())
            early_undid += int(record["undid_progress"][k][:end].sum())
        finals = record["full_loss"][:, -1]
        lines.append(
            f"| {'with' if reject else 'without'} rejection | {_summary(until)} "
            f"| {early_rejections} ({early_undid}) "
            f"| {int(record['rejected'].sum()):,} of {record['rejected'].size:,} "
            f"| {finals.min():.3g} to {finals.max():.3g} |"
        )
    params, rates = _grid(task, seeds, (1.0,))
    constant = jax.jit(
        jax.vmap(lambda p, k: _minibatch_constant_run(p, k, steps, batch_size))
    )(params, jax.vmap(jax.random.PRNGKey)(jnp.asarray(seeds) + 1000))
    constant = np.asarray(constant)
    lines += [
        "",
        f"Constant SGD at rate 1 on the same batches: full loss at the end "
        f"{constant[:, -1].min():.3g} to {constant[:, -1].max():.3g}.",
    ]
    print("\n".join(lines), flush=True)
    return "\n".join(lines)


def _minibatch_constant_run(params, key, steps: int, batch_size: int):
    inputs, labels = _common.digits_classification()

    def step(params, step_key):
        batch = jax.random.randint(step_key, (batch_size,), 0, inputs.shape[0])
        grads = jax.grad(_common.softmax_cross_entropy)(
            params, inputs[batch], labels[batch]
        )
        full_loss = _common.softmax_cross_entropy(params, inputs, labels)
        return jax.tree.map(lambda p, g: p - g, params, grads), full_loss

    _, full_losses = lax.scan(step, params, jax.random.split(key, steps))
    return full_losses


def _plot(tasks, starts, results, bests, out_dir: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(tasks), figsize=(6 * len(tasks), 4.5))
    for axis, task, result, best in zip(
        np.atleast_1d(axes), tasks, results, bests, strict=True
    ):
        never = task.cap * 1.6
        lowest = never
        for key, label, style in (
            ("steps_rejection", "dynamic_lr, reject_steps=True", "o-"),
            ("steps_plain", "dynamic_lr, reject_steps=False", "s--"),
            ("steps_constant", "constant SGD at the starting rate", "^:"),
        ):
            steps = np.array(
                [[never if s is None else s for s in row] for row in result[key]],
                dtype=float,
            )
            median = np.median(steps, axis=0)
            lowest = min(lowest, steps.min())
            line = axis.plot(starts, median, style, label=label)[0]
            axis.fill_between(
                starts,
                steps.min(axis=0),
                steps.max(axis=0),
                color=line.get_color(),
                alpha=0.15,
            )
        best_median = _median(best["best_steps"])
        if best_median is not None:
            axis.axhline(
                best_median,
                color="black",
                linewidth=1,
                label=f"best constant of the sweep ({best['best_rate']:.3g})",
            )
        axis.axhline(never, color="grey", linewidth=0.5, linestyle="-.")
        axis.text(starts[0], never * 1.05, f"never (cap {task.cap:,})", fontsize=8)
        axis.set_xscale("log")
        axis.set_yscale("log")
        # Fixed limits: with every run at "never" (a quick run) the automatic
        # ones collapse onto one value.
        axis.set_ylim(0.7 * min(lowest, best_median or never), 1.4 * never)
        axis.set_xlabel("starting learning rate")
        axis.set_ylabel(f"steps to full training loss <= {task.target}")
        axis.set_title(task.name)
        axis.legend(fontsize=8, loc="center left")
    figure.suptitle(
        "Steps to target against the starting rate "
        f"(median, band: min-max of {len(results[0]['steps_rejection'])} seeds)"
    )
    figure.tight_layout()
    path = out_dir / "rejection.png"
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def run(quick: bool, out_dir: Path) -> str:
    starts = QUICK_STARTS if quick else STARTS
    seeds = QUICK_SEEDS if quick else SEEDS
    tasks = [digits_task(quick), breast_cancer_task(quick)]

    sections, results, bests = [], [], []
    for task in tasks:
        result = _compare_task(task, starts, seeds)
        section, best = _task_section(task, starts, seeds, result)
        if task.name == "breast cancer":
            section += "\n" + _extra_targets(
                task, starts, seeds, result, BREAST_CANCER_EXTRA_TARGETS
            )
        sections.append(section)
        results.append(result)
        bests.append(best)

    settings = _settings_section(tasks, starts, seeds, bests, quick)
    precision = _precision_section(tasks[0], starts, seeds, results[0]["rejection"])
    minibatch = _minibatch_section(quick)
    plot = _plot(tasks, starts, results, bests, out_dir)
    print(f"saved {plot}")

    increase, decrease = default_factors()
    header = [
        "## Step rejection (`reject_steps=True`)",
        "",
        f"Machine: {_common.machine_description()}",
        "",
        "`optax.chain(dynamic_lr(start, reject_steps=...), optax.sgd(1.0))` with "
        f"the default factors (x{increase:g} after a fall, x{decrease:g} after a "
        "rise), the loss at "
        "the current parameters passed as `value` every step; constant SGD is "
        "`optax.sgd(rate)`. Steps count gradient evaluations (one per call, "
        "rejected or not). "
        f"Plot: `{plot.name}`.",
        "",
    ]
    return "\n".join(header + sections + [settings, precision, minibatch])
