"""dynamic_lr against the alternatives, on the same tasks, data and seeds.

Every method trains the same models from the same initialisations on the same
data order for the same number of steps, with three seeds, in one process.
The figures are steps until the *full* training loss reaches a target (and the
gradient and loss evaluations spent), the loss at the end of the budget, and
wall-clock to target as a ratio to the best constant SGD rate, from per-step
times measured interleaved in this process.

Runs are batched with ``jax.vmap`` over seeds and starting rates and stepped
with ``jax.lax.scan``; minibatch runs evaluate the full training loss every few
steps, so their steps to target are multiples of that interval.
"""

import dataclasses
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from optax import contrib

from benchmarks import _common
from optax_dynlr import current_learning_rate, dynamic_lr

SEEDS = (0, 1, 2)
START_RATE = 0.1  # the starting rate of the SGD-based methods in the tables
ADAM_START_RATE = 1e-3  # the starting rate of dynamic_lr after Adam
ROBUSTNESS_RATES = tuple(10.0**e for e in range(-4, 3))
LINESEARCH_MAX_BACKTRACKING = 15
# The quick smoke run's minibatch task runs only these, to stay short.
QUICK_MINIBATCH_METHODS = ("dynamic_lr", "constant SGD")


# --------------------------------------------------------------------------- tasks


@dataclasses.dataclass
class Task:
    name: str
    loss_fn: Callable  # (params, inputs, targets) -> scalar
    init_fn: Callable  # (key) -> params
    inputs: jax.Array
    targets: jax.Array
    batch_size: int | None  # None: full batch
    num_steps: int
    eval_every: int  # minibatch runs: steps between full-loss evaluations
    target: float
    sgd_rates: tuple
    adam_rates: tuple
    robustness: tuple  # starting rates of the robustness plot; () for none
    methods: tuple | None = None  # names of the methods to run; None: all

    @property
    def full_batch(self) -> bool:
        return self.batch_size is None


def _half_decades(low: float, high: float) -> tuple:
    exponents = np.arange(np.log10(low), np.log10(high) + 1e-9, 0.5)
    return tuple(float(10.0**e) for e in exponents)


def _standardise(array):
    array = np.asarray(array, dtype=np.float64)
    return (array - array.mean(0)) / array.std(0)


def _digits_task():
    inputs, labels = _common.digits_classification()
    return dict(
        loss_fn=_common.softmax_cross_entropy,
        init_fn=lambda key: _common.init_mlp(key, (64, 64, 10)),
        inputs=inputs,
        targets=labels,
    )


def _linear_init(num_features):
    def init(key):
        weights = jax.random.normal(key, (num_features,)) / np.sqrt(num_features)
        return {"w": weights, "b": jnp.zeros(())}

    return init


def _logistic_task():
    from sklearn.datasets import load_breast_cancer

    data = load_breast_cancer()

    def loss_fn(params, inputs, labels):
        logits = inputs @ params["w"] + params["b"]
        return optax.sigmoid_binary_cross_entropy(logits, labels).mean()

    inputs = jnp.asarray(_standardise(data.data), jnp.float32)
    return dict(
        loss_fn=loss_fn,
        init_fn=_linear_init(inputs.shape[1]),
        inputs=inputs,
        targets=jnp.asarray(data.target, jnp.float32),
    )


def _linear_task():
    from sklearn.datasets import load_diabetes

    data = load_diabetes()

    def loss_fn(params, inputs, targets):
        return jnp.mean((inputs @ params["w"] + params["b"] - targets) ** 2)

    inputs = jnp.asarray(_standardise(data.data), jnp.float32)
    return dict(
        loss_fn=loss_fn,
        init_fn=_linear_init(inputs.shape[1]),
        inputs=inputs,
        targets=jnp.asarray(_standardise(data.target), jnp.float32),
    )


def linear_regression_optimum() -> float:
    """The least-squares training loss of the linear regression task."""
    task = _linear_task()
    design = np.c_[np.asarray(task["inputs"], np.float64), np.ones(442)]
    targets = np.asarray(task["targets"], np.float64)
    solution, *_ = np.linalg.lstsq(design, targets, rcond=None)
    return float(np.mean((design @ solution - targets) ** 2))


CHAR_CONTEXT = 8
CHAR_EMBEDDING = 16
CHAR_HIDDEN = 128


def _char_task(num_examples):
    """Next-character prediction on Python's own help text (pydoc_data).

    An MLP on the embeddings of the previous ``CHAR_CONTEXT`` characters, about
    ten times the digits MLP in parameters.
    """
    from pydoc_data.topics import topics

    text = "\n".join(topics[name] for name in sorted(topics))
    text = "".join(c if 32 <= ord(c) < 127 or c == "\n" else "?" for c in text)
    text = text[: num_examples + CHAR_CONTEXT]
    vocabulary = sorted(set(text))
    codes = np.array([vocabulary.index(c) for c in text], dtype=np.int32)
    windows = np.lib.stride_tricks.sliding_window_view(codes, CHAR_CONTEXT + 1)
    inputs = jnp.asarray(windows[:num_examples, :CHAR_CONTEXT])
    labels = jnp.asarray(windows[:num_examples, CHAR_CONTEXT])
    size = len(vocabulary)

    def init_fn(key):
        keys = jax.random.split(key, 3)
        flat = CHAR_CONTEXT * CHAR_EMBEDDING
        return {
            "embedding": jax.random.normal(keys[0], (size, CHAR_EMBEDDING)),
            "hidden": {
                "w": jax.random.normal(keys[1], (flat, CHAR_HIDDEN)) / np.sqrt(flat),
                "b": jnp.zeros(CHAR_HIDDEN),
            },
            "out": {
                "w": jax.random.normal(keys[2], (CHAR_HIDDEN, size))
                / np.sqrt(CHAR_HIDDEN),
                "b": jnp.zeros(size),
            },
        }

    def loss_fn(params, inputs, labels):
        embedded = params["embedding"][inputs].reshape(inputs.shape[0], -1)
        hidden = jnp.tanh(embedded @ params["hidden"]["w"] + params["hidden"]["b"])
        logits = hidden @ params["out"]["w"] + params["out"]["b"]
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    return dict(loss_fn=loss_fn, init_fn=init_fn, inputs=inputs, targets=labels)


def make_tasks(quick: bool) -> list[Task]:
    digits = _digits_task()
    if quick:
        # A few hundred examples and steps: the smoke run exercises every code
        # path, and its figures mean nothing.
        digits["inputs"] = digits["inputs"][:256]
        digits["targets"] = digits["targets"][:256]
        common = dict(
            num_steps=60,
            target=1.0,
            sgd_rates=(0.1, 1.0, 10.0),
            adam_rates=(1e-3, 1e-2, 1e-1),
            robustness=(0.01, 0.1, 1.0),
        )
        return [
            Task("digits MLP, full batch", **digits, batch_size=None, eval_every=1,
                 **common),
            Task("digits MLP, minibatch", **digits, batch_size=64, eval_every=10,
                 methods=QUICK_MINIBATCH_METHODS, **common),
        ]  # fmt: skip

    logistic = _logistic_task()
    linear = _linear_task()
    optimum = linear_regression_optimum()
    char = _char_task(512)
    digits_rates = dict(
        sgd_rates=_half_decades(1e-2, 1e1),
        adam_rates=_half_decades(1e-3, 1e0),
    )
    wide_rates = dict(
        sgd_rates=_half_decades(1e-4, 1e2),
        adam_rates=_half_decades(1e-4, 1e0),
    )
    char_rates = dict(
        sgd_rates=_half_decades(1e-2, 1e1),
        adam_rates=_half_decades(1e-3, 1e0),
    )
    return [
        Task("digits MLP, full batch", **digits, batch_size=None, num_steps=1500,
             eval_every=1, target=0.01, robustness=ROBUSTNESS_RATES, **digits_rates),
        Task("digits MLP, minibatch", **digits, batch_size=64, num_steps=2000,
             eval_every=25, target=0.01, robustness=ROBUSTNESS_RATES, **digits_rates),
        Task("logistic regression, full batch", **logistic, batch_size=None,
             num_steps=3000, eval_every=1, target=0.03, robustness=ROBUSTNESS_RATES,
             **wide_rates),
        Task("logistic regression, minibatch", **logistic, batch_size=64,
             num_steps=3000, eval_every=10, target=0.04, robustness=ROBUSTNESS_RATES,
             **wide_rates),
        Task("linear regression, full batch", **linear, batch_size=None,
             num_steps=3000, eval_every=1, target=optimum * 1.001,
             robustness=ROBUSTNESS_RATES, **wide_rates),
        Task("linear regression, minibatch", **linear, batch_size=64,
             num_steps=3000, eval_every=10, target=optimum * 1.005,
             robustness=ROBUSTNESS_RATES, **wide_rates),
        Task("char MLP, full batch", **char, batch_size=None, num_steps=800,
             eval_every=1, target=0.068, robustness=(), **char_rates),
        Task("char MLP, minibatch", **char, batch_size=64, num_steps=2000,
             eval_every=25, target=0.085, robustness=(), **char_rates),
    ]  # fmt: skip


# ------------------------------------------------------------------------- methods


@dataclasses.dataclass
class Method:
    name: str
    make: Callable  # (rate) -> GradientTransformationExtraArgs; rate may be traced
    rates: str  # "start": START_RATE, "adam_start", "sgd", "adam", "none"
    dynamic: bool = False  # a dynamic_lr variant (ours)
    robustness: bool = False  # has a starting rate: one line of the robustness plot
    full_batch_only: bool = False
    linesearch: bool = False
    label: str = ""  # the table's name for the run at the starting rate


def noise_aware_available() -> tuple[bool, str]:
    """Whether ``dynamic_lr(0.1, noise_aware=True)`` builds and updates."""
    try:
        opt = optax.chain(dynamic_lr(0.1, noise_aware=True), optax.sgd(1.0))
        params = jnp.zeros(2)
        state = opt.init(params)
        jax.jit(lambda s: opt.update(jnp.ones(2), s, params, value=1.0))(state)
    except Exception as error:  # noqa: BLE001 - any failure means "not usable"
        return False, f"{type(error).__name__}: {str(error).splitlines()[0][:120]}"
    return True, ""


def default_factors(**options) -> tuple[float, float]:
    """The increase and decrease factors ``dynamic_lr`` uses by default.

    Read from the rule itself: a fall multiplies the rate by the one, a rise
    by the other.
    """
    opt = dynamic_lr(1.0, **options)
    state = opt.init(jnp.zeros(1))
    rates = []
    for loss in (1.0, 0.5, 1.0):
        _, state = opt.update(jnp.zeros(1), state, value=loss)
        rates.append(float(current_learning_rate(state)))
    return rates[1] / rates[0], rates[2] / rates[1]


def make_methods(include_noise_aware: bool) -> list[Method]:
    def after_sgd(**options):
        return lambda rate: optax.chain(dynamic_lr(rate, **options), optax.sgd(1.0))

    def plateau_sgd(**options):
        return lambda rate: optax.chain(
            optax.sgd(rate), contrib.reduce_on_plateau(**options)
        )

    def linesearch(**options):
        return lambda rate: optax.chain(
            optax.sgd(1.0),
            optax.scale_by_backtracking_linesearch(
                LINESEARCH_MAX_BACKTRACKING, **options
            ),
        )

    def rate_free(make):
        return lambda rate: optax.with_extra_args_support(make())

    variants = [
        ("dynamic_lr", {}),
        ("dynamic_lr, reject_steps", {"reject_steps": True}),
    ]
    if include_noise_aware:
        variants.append(("dynamic_lr, noise_aware", {"noise_aware": True}))
    methods = [
        Method(
            name,
            after_sgd(**options),
            "start",
            dynamic=True,
            robustness=True,
            label="dynamic_lr({rate}"
            + "".join(f", {k}={v}" for k, v in options.items())
            + ") + sgd(1)",
        )
        for name, options in variants
    ]
    methods += [
        Method(
            "adam(1) + dynamic_lr",
            lambda rate: optax.chain(optax.adam(1.0), dynamic_lr(rate)),
            "adam_start",
            dynamic=True,
            robustness=True,
            label="adam(1) + dynamic_lr({rate})",
        ),
        Method("constant SGD", optax.sgd, "sgd", robustness=True),
        Method("Adam", optax.adam, "adam"),
        Method(
            "reduce_on_plateau(0.8, 5)",
            plateau_sgd(factor=0.8, patience=5),
            "start",
            robustness=True,
            label="sgd({rate}) + reduce_on_plateau(factor=0.8, patience=5)",
        ),
        Method(
            "reduce_on_plateau()",
            plateau_sgd(),
            "start",
            label="sgd({rate}) + reduce_on_plateau()",
        ),
        Method("prodigy()", rate_free(contrib.prodigy), "none"),
        Method("dog()", rate_free(contrib.dog), "none"),
        Method("dadapt_adamw()", rate_free(contrib.dadapt_adamw), "none"),
        Method(
            "mechanize(sgd(1))",
            rate_free(lambda: contrib.mechanize(optax.sgd(1.0))),
            "none",
        ),
        Method("cocob()", rate_free(contrib.cocob), "none"),
        Method(
            "sgd(1) + backtracking line search",
            linesearch(),
            "none",
            full_batch_only=True,
            linesearch=True,
        ),
        Method(
            "sgd(1) + backtracking line search, max rate 100",
            linesearch(max_learning_rate=100.0),
            "none",
            full_batch_only=True,
            linesearch=True,
        ),
    ]
    return methods


def method_rates(method: Method, task: Task) -> tuple:
    """The rates one method runs with on one task (one run per rate and seed)."""
    if method.rates == "sgd":
        rates = set(task.sgd_rates) | {START_RATE}
        # The robustness plot's constant-SGD line needs every decade.
        if task.robustness:
            rates |= set(task.robustness)
        return tuple(sorted(rates))
    if method.rates == "adam":
        return tuple(sorted(task.adam_rates))
    start = START_RATE if method.rates == "start" else ADAM_START_RATE
    if method.rates in ("start", "adam_start"):
        if task.robustness and method.robustness:
            return tuple(sorted(set(task.robustness) | {start}))
        return (start,)
    return (float("nan"),)


def _linesearch_evaluations(state) -> jax.Array:
    """Loss evaluations the backtracking line search made in its last call."""
    leaves = jax.tree.leaves(
        state,
        is_leaf=lambda x: isinstance(x, optax.ScaleByBacktrackingLinesearchState),
    )
    for leaf in leaves:
        if isinstance(leaf, optax.ScaleByBacktrackingLinesearchState):
            return leaf.info.num_linesearch_steps.astype(jnp.int32)
    raise ValueError("no line search state")


# ------------------------------------------------------------------------ training


def _step_fn(task: Task, method: Method, opt):
    def step(carry, batch_indices):
        params, state = carry
        if task.full_batch:
            inputs, targets = task.inputs, task.targets
        else:
            inputs = task.inputs[batch_indices]
            targets = task.targets[batch_indices]
        loss, grad = jax.value_and_grad(task.loss_fn)(params, inputs, targets)
        kwargs = {"value": loss}
        if method.linesearch:
            kwargs.update(
                grad=grad, value_fn=lambda p: task.loss_fn(p, inputs, targets)
            )
        updates, state = opt.update(grad, state, params, **kwargs)
        params = optax.apply_updates(params, updates)
        extra = _linesearch_evaluations(state) if method.linesearch else 0
        return (params, state), (loss, jnp.asarray(extra, jnp.int32))

    return step


def _one_run(task: Task, method: Method, num_steps: int):
    """(initial params, rate, batch order) -> (full losses, cumulative extra evals).

    The initial parameters come in as arguments: drawing them inside would put
    the random-number generator into every compiled program, which triples the
    compile time of these small models.
    """

    def run(params, rate, order):
        opt = method.make(rate)
        state = opt.init(params)
        step = _step_fn(task, method, opt)

        if task.full_batch:
            (params, _), (losses, extra) = jax.lax.scan(
                step, (params, state), None, length=num_steps
            )
        else:

            def chunk(carry, chunk_order):
                full_loss = task.loss_fn(carry[0], task.inputs, task.targets)
                carry, (_, extra) = jax.lax.scan(step, carry, chunk_order)
                return carry, (full_loss, extra.sum())

            (params, _), (losses, extra) = jax.lax.scan(chunk, (params, state), order)
        final = task.loss_fn(params, task.inputs, task.targets)
        losses = jnp.concatenate([losses, final[None]])
        extra = jnp.concatenate([jnp.zeros(1, jnp.int32), jnp.cumsum(extra)])
        return losses, extra

    return run


def batch_order(task: Task, seed: int, num_steps: int) -> np.ndarray:
    """The minibatch indices of one seed: [evaluations, eval_every, batch]."""
    if task.full_batch:
        return np.zeros((1,), np.int32)
    rng = np.random.default_rng(seed)
    count = task.inputs.shape[0]
    indices = rng.integers(0, count, (num_steps, task.batch_size), dtype=np.int32)
    return indices.reshape(num_steps // task.eval_every, task.eval_every, -1)


_INITIAL = {}


def initial_params(task: Task, seed: int):
    """The initial parameters of one seed, the same for every method."""
    key = (id(task.init_fn), seed)
    if key not in _INITIAL:
        _INITIAL[key] = jax.jit(task.init_fn)(jax.random.PRNGKey(seed))
    return _INITIAL[key]


def train(task: Task, method: Method, rates: tuple):
    """Runs every (rate, seed); losses[rate, seed, evaluation], extra likewise."""
    grid = [(rate, seed) for rate in rates for seed in SEEDS]
    initial = [initial_params(task, seed) for _, seed in grid]
    initial = jax.tree.map(lambda *leaves: jnp.stack(leaves), *initial)
    rate_array = jnp.asarray([rate for rate, _ in grid], jnp.float32)
    orders = jnp.asarray(
        np.stack([batch_order(task, seed, task.num_steps) for _, seed in grid])
    )
    run = jax.jit(jax.vmap(_one_run(task, method, task.num_steps)))
    losses, extra = run(initial, rate_array, orders)
    shape = (len(rates), len(SEEDS), -1)
    return np.asarray(losses).reshape(shape), np.asarray(extra).reshape(shape)


def time_per_step(task: Task, methods, rates, *, steps: int, repeats: int) -> dict:
    """Median seconds per step of each method, timed interleaved.

    Each timing is a jitted scan of ``steps`` steps from the initial point, so
    dispatch overhead is spread over the steps; the rounds go A, B, C, A, B, C.
    """
    runners = {}
    for method in methods:
        rate = rates[method.name]
        opt = method.make(jnp.float32(1.0 if np.isnan(rate) else rate))
        params = initial_params(task, SEEDS[0])
        state = opt.init(params)
        step = _step_fn(task, method, opt)
        order = None
        if not task.full_batch:
            rng = np.random.default_rng(0)
            shape = (steps, task.batch_size)
            order = jnp.asarray(rng.integers(0, task.inputs.shape[0], shape))

        def scan(params, state, order, step=step):
            carry, _ = jax.lax.scan(step, (params, state), order, length=steps)
            return carry

        compiled = jax.jit(scan).lower(params, state, order).compile()
        jax.block_until_ready(compiled(params, state, order))
        runners[method.name] = (compiled, params, state, order)

    times = {name: [] for name in runners}
    for _ in range(repeats):
        for name, (compiled, params, state, order) in runners.items():
            start = time.perf_counter()
            jax.block_until_ready(compiled(params, state, order))
            times[name].append((time.perf_counter() - start) / steps)
    return {name: float(np.median(values)) for name, values in times.items()}


# ---------------------------------------------------------------------- statistics


def _steps(task: Task, losses: np.ndarray) -> float:
    """Steps to target of one run; inf if never reached."""
    hit = _common.steps_to_target(np.nan_to_num(losses, nan=np.inf), task.target)
    return np.inf if hit is None else hit * task.eval_every


def _median_spread(values) -> tuple[float, float, float]:
    values = np.asarray(values, dtype=np.float64)
    return float(np.median(values)), float(values.min()), float(values.max())


def _format_count(values) -> str:
    median, low, high = _median_spread(values)

    def one(x):
        return "never" if not np.isfinite(x) else f"{x:,.0f}"

    if low == high:
        return one(median)
    return f"{one(median)} ({one(low)}-{one(high)})"


def _format_loss(values) -> str:
    values = np.asarray(values, dtype=np.float64)
    if np.all(np.isnan(values)):
        return "nan"
    median, low, high = _median_spread(np.nan_to_num(values, nan=np.inf))

    def one(x):
        return "nan" if not np.isfinite(x) else f"{x:.3g}"

    return f"{one(median)} ({one(low)}-{one(high)})"


@dataclasses.dataclass
class Row:
    method: str
    rate: float
    steps: np.ndarray  # per seed
    evaluations: np.ndarray  # gradient evaluations plus extra loss evaluations
    extra: np.ndarray  # extra loss evaluations to target
    final: np.ndarray  # loss at the budget, per seed
    curve: np.ndarray  # median loss curve over seeds
    dynamic: bool
    source: str  # the method's name, which keys its per-step time
    key: str  # the same on every task (the swept rate left out)
    seconds_per_step: float = float("nan")
    wallclock_ratio: float = float("nan")


def _row(task, method, label, rate, losses, extra, key=None) -> Row:
    steps = np.array([_steps(task, run) for run in losses])
    extra_to_target = np.array(
        [
            e[int(s) // task.eval_every] if np.isfinite(s) else np.inf
            for s, e in zip(steps, extra, strict=True)
        ]
    )
    return Row(
        method=label,
        rate=rate,
        steps=steps,
        evaluations=steps + extra_to_target,
        extra=extra_to_target,
        final=losses[:, -1],
        curve=np.median(np.nan_to_num(losses, nan=np.inf), axis=0),
        dynamic=method.dynamic,
        source=method.name,
        key=key or label,
    )


def _best_rate(task, rates, losses) -> int:
    """Index of the rate with the fewest median steps; ties by final loss."""
    keys = []
    for runs in losses:
        steps = np.median([_steps(task, run) for run in runs])
        final = np.median(np.nan_to_num(runs[:, -1], nan=np.inf))
        keys.append((steps, final))
    return min(range(len(rates)), key=lambda i: keys[i])


def _rate_label(rate: float) -> str:
    return f"{rate:.3g}"


# ------------------------------------------------------------------------ the run


def run_task(task: Task, methods, timing_steps, timing_repeats):
    rows = []
    robustness = {}  # method -> {rate: steps per seed}
    table_rates = {}
    for method in methods:
        if method.full_batch_only and not task.full_batch:
            continue
        if task.methods is not None and method.name not in task.methods:
            continue
        rates = method_rates(method, task)
        started = time.perf_counter()
        losses, extra = train(task, method, rates)
        seconds = time.perf_counter() - started
        print(f"  {method.name}: {len(rates)} rates x {len(SEEDS)} seeds, "
              f"{seconds:.1f} s", flush=True)  # fmt: skip
        if method.robustness and task.robustness:
            robustness[method.name] = {
                rate: np.array([_steps(task, run) for run in losses[i]])
                for i, rate in enumerate(rates)
                if rate in task.robustness
            }
        if method.rates == "sgd":
            i = rates.index(START_RATE)
            rows.append(
                _row(task, method, f"constant SGD, rate {_rate_label(START_RATE)}",
                     START_RATE, losses[i], extra[i])
            )  # fmt: skip
            sweep = [k for k, r in enumerate(rates) if r in task.sgd_rates]
            best = sweep[_best_rate(task, task.sgd_rates, losses[sweep])]
            rows.append(
                _row(task, method, f"best constant SGD, rate {_rate_label(rates[best])}"
                     + _edge_note(rates[best], task.sgd_rates), rates[best],
                     losses[best], extra[best], key="best constant SGD")
            )  # fmt: skip
            table_rates[method.name] = rates[best]
        elif method.rates == "adam":
            best = _best_rate(task, rates, losses)
            rows.append(
                _row(task, method, f"best Adam, rate {_rate_label(rates[best])}"
                     + _edge_note(rates[best], rates), rates[best], losses[best],
                     extra[best], key="best Adam")
            )  # fmt: skip
            table_rates[method.name] = rates[best]
        elif method.rates == "none":
            rows.append(_row(task, method, method.name, np.nan, losses[0], extra[0]))
            table_rates[method.name] = float("nan")
        else:
            start = START_RATE if method.rates == "start" else ADAM_START_RATE
            i = rates.index(start)
            label = method.label.format(rate=f"{start:g}")
            rows.append(_row(task, method, label, start, losses[i], extra[i]))
            table_rates[method.name] = start

    timed = [m for m in methods if m.name in table_rates]
    per_step = time_per_step(
        task,
        timed,
        table_rates,
        steps=timing_steps,
        repeats=timing_repeats,
    )
    for row in rows:
        row.seconds_per_step = per_step[row.source]
    best_sgd = next(r for r in rows if r.method.startswith("best constant SGD"))
    reference = np.median(best_sgd.steps) * best_sgd.seconds_per_step
    for row in rows:
        row.wallclock_ratio = np.median(row.steps) * row.seconds_per_step / reference
    return rows, robustness


def _edge_note(rate, grid) -> str:
    return " (edge of sweep)" if rate in (min(grid), max(grid)) else ""


# ----------------------------------------------------------------------- reporting


def _markdown_table(task: Task, rows: list[Row]) -> str:
    lines = [
        f"**{task.name}**: target full training loss {task.target:.4g}, budget "
        f"{task.num_steps:,} steps"
        + (
            ""
            if task.full_batch
            else f", batch {task.batch_size}, full loss every {task.eval_every} steps"
        ),
        "",
        "| method | steps to target | grad + loss evals to target | wall-clock "
        "vs best SGD | loss at budget |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        ratio = (
            f"{row.wallclock_ratio:.2f}" if np.isfinite(row.wallclock_ratio) else "-"
        )
        evaluations = _format_count(row.evaluations)
        if np.any(row.extra > 0) and np.all(np.isfinite(row.extra)):
            evaluations += f" (of which {_format_count(row.extra)} loss-only)"
        name = f"**{row.method}**" if row.dynamic else row.method
        lines.append(
            f"| {name} | {_format_count(row.steps)} | {evaluations} | {ratio} "
            f"| {_format_loss(row.final)} |"
        )
    return "\n".join(lines)


def _median_final(row: Row) -> float:
    return float(np.median(np.nan_to_num(row.final, nan=np.inf)))


def _steps_phrase(row: Row) -> str:
    steps = np.median(row.steps)
    if not np.isfinite(steps):
        return f"{row.method} does not reach the target"
    return f"{row.method} takes {steps:,.0f} steps"


def _peer_wins(task: Task, rows: list[Row]) -> str:
    """Which peers beat the default dynamic_lr row, and every dynamic_lr row."""
    default, ours = rows[0], [r for r in rows if r.dynamic]
    peers = [r for r in rows if not r.dynamic]
    best = min(ours, key=lambda r: (np.median(r.steps), _median_final(r)))

    def faster_than(row):
        return [
            f"{p.method} ({np.median(p.steps):,.0f}, wall-clock ratio "
            f"{p.wallclock_ratio:.2f})"
            for p in peers
            if np.median(p.steps) < np.median(row.steps)
        ]

    text = [f"- **{task.name}**: {_steps_phrase(default)}"]
    beating_default = faster_than(default)
    text.append(
        "; fewer steps: " + "; ".join(beating_default) + "."
        if beating_default
        else "; no peer reaches the target in fewer steps."
    )
    if best is not default and np.isfinite(np.median(best.steps)):
        beating_best = faster_than(best)
        text.append(
            f" Our best variant here, {_steps_phrase(best)}; "
            + (
                "faster still: " + "; ".join(beating_best) + "."
                if beating_best
                else "no peer is faster."
            )
        )
    lowest_ours = min(_median_final(r) for r in ours)
    lower = [
        f"{p.method} ({_median_final(p):.3g})"
        for p in peers
        if _median_final(p) < lowest_ours
    ]
    text.append(
        f" Lowest loss at the budget among our variants {lowest_ours:.3g}; "
        + ("lower: " + "; ".join(lower) + "." if lower else "no peer ends lower.")
    )
    return "".join(text)


def _colours(names):
    """One colour per name, the same in every panel."""
    import matplotlib

    palette = matplotlib.colormaps["tab20"].colors
    ordered = list(dict.fromkeys(names))
    return {
        name: palette[(2 * i) % 20 + (2 * i) // 20] for i, name in enumerate(ordered)
    }


def _plot_robustness(tasks, robustness, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [t for t in tasks if t.robustness]
    columns = min(2, len(shown))
    rows_count = int(np.ceil(len(shown) / columns))
    figure, axes = plt.subplots(
        rows_count, columns, figsize=(6 * columns, 4 * rows_count), squeeze=False
    )
    colours = _colours(name for task in shown for name in robustness[task.name])
    markers = "osD^vP*X"
    for axis, task in zip(axes.flat, shown, strict=False):
        never = task.num_steps * 1.5
        for i, (name, by_rate) in enumerate(robustness[task.name].items()):
            rates = sorted(by_rate)
            medians = [np.median(by_rate[r]) for r in rates]
            plotted = [m if np.isfinite(m) else never for m in medians]
            axis.plot(
                rates,
                plotted,
                marker=markers[i % len(markers)],
                markersize=9 - i,
                color=colours[name],
                linestyle="-" if "dynamic_lr" in name else "--",
                alpha=0.85,
                label=name,
            )
        axis.axhline(never, color="grey", linestyle=":", linewidth=1)
        axis.text(
            min(task.robustness), never * 1.05, "never (within budget)", fontsize=7
        )
        axis.set_xscale("log")
        axis.set_yscale("log")
        axis.set_xlabel("starting (or constant) rate")
        axis.set_ylabel("steps to target, median of 3 seeds")
        axis.set_title(f"{task.name}, target {task.target:.3g}", fontsize=9)
    for axis in list(axes.flat)[len(shown) :]:
        axis.axis("off")
    axes.flat[0].legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


CURVE_METHODS = (
    "dynamic_lr(",
    "adam(1) + dynamic_lr",
    "best constant SGD",
    "constant SGD, rate",
    "best Adam",
    "sgd(0.1) + reduce_on_plateau(factor",
    "prodigy",
    "dog",
    "dadapt_adamw",
    "mechanize",
    "cocob",
    "sgd(1) + backtracking line search",
)


def _plot_curves(tasks, results, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = min(2, len(tasks))
    rows_count = int(np.ceil(len(tasks) / columns))
    figure, axes = plt.subplots(
        rows_count, columns, figsize=(7 * columns, 4 * rows_count), squeeze=False
    )
    colours = _colours(row.key for task in tasks for row in results[task.name])
    labelled = {}
    for axis, task in zip(axes.flat, tasks, strict=False):
        for row in results[task.name]:
            if not row.method.startswith(CURVE_METHODS):
                continue
            steps = np.arange(len(row.curve)) * task.eval_every
            # A few hundred points per line are plenty and keep the file small.
            every = max(1, len(steps) // 300)
            style = "-" if row.dynamic else "--"
            (line,) = axis.plot(
                steps[::every],
                row.curve[::every],
                style,
                linewidth=1,
                color=colours[row.key],
            )
            labelled.setdefault(row.key, line)
        axis.axhline(task.target, color="black", linestyle=":", linewidth=1)
        axis.set_yscale("log")
        axis.set_xlabel("step")
        axis.set_ylabel("full training loss (median of 3 seeds)")
        axis.set_title(task.name, fontsize=9)
    for axis in list(axes.flat)[len(tasks) :]:
        axis.axis("off")
    figure.legend(
        list(labelled.values()),
        list(labelled),
        loc="lower center",
        ncol=4,
        fontsize=7,
    )
    bottom = 0.1 if len(tasks) <= 2 else 0.05
    figure.tight_layout(rect=(0, bottom, 1, 1))
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _short_name(task: Task) -> str:
    return (
        task.name.replace(" MLP", "")
        .replace(" regression", "")
        .replace(", full batch", ", full")
        .replace(", minibatch", ", mini")
    )


def _summary_table(tasks, results) -> str:
    """Median steps to target and wall-clock ratio, one column per task."""
    keys = list(dict.fromkeys(row.key for t in tasks for row in results[t.name]))
    lines = [
        "| method | " + " | ".join(_short_name(t) for t in tasks) + " |",
        "|---|" + "---|" * len(tasks),
    ]
    for key in keys:
        cells = []
        for task in tasks:
            row = next((r for r in results[task.name] if r.key == key), None)
            if row is None:
                cells.append("")
                continue
            steps = np.median(row.steps)
            if not np.isfinite(steps):
                cells.append("never")
            else:
                cells.append(f"{steps:,.0f} ({row.wallclock_ratio:.2f})")
        name = f"**{key}**" if "dynamic_lr" in key else key
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _robustness_table(task, by_method) -> str:
    header = "| method | " + " | ".join(f"{r:g}" for r in task.robustness) + " |"
    lines = [
        f"Steps to target {task.target:.4g} by starting rate, **{task.name}** "
        "(median of 3 seeds; 'never' within the budget):",
        "",
        header,
        "|---|" + "---|" * len(task.robustness),
    ]
    for name, by_rate in by_method.items():
        cells = [
            _format_count(by_rate[r]) if r in by_rate else "-" for r in task.robustness
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run(quick: bool, out_dir: Path) -> str:
    out_dir = Path(out_dir)
    started = time.perf_counter()
    available, why = noise_aware_available()
    methods = make_methods(available)
    tasks = make_tasks(quick)
    timing_steps, timing_repeats = (5, 3) if quick else (20, 15)

    results, robustness = {}, {}
    for task in tasks:
        print(f"{task.name}", flush=True)
        rows, by_method = run_task(task, methods, timing_steps, timing_repeats)
        results[task.name] = rows
        robustness[task.name] = by_method

    tables = [_markdown_table(task, results[task.name]) for task in tasks]
    for table in tables:
        print("\n" + table)
    robustness_tables = [
        _robustness_table(task, robustness[task.name])
        for task in tasks
        if task.robustness
    ]
    _plot_robustness(tasks, robustness, out_dir / "peers_robustness.png")
    _plot_curves(tasks, results, out_dir / "peers_curves.png")
    elapsed = time.perf_counter() - started

    increase, decrease = default_factors()
    factors_note = (
        f"dynamic_lr's default factors in this run: x{increase:.3g} after a "
        f"fall, x{decrease:.3g} after a rise."
    )
    noise_note = (
        "The noise-aware form (`dynamic_lr(0.1, noise_aware=True)`) ran."
        if available
        else f"The noise-aware form was not available in this run ({why}); "
        "its rows are absent."
    )
    linesearch = (
        "`chain(sgd(1.0), scale_by_backtracking_linesearch("
        f"{LINESEARCH_MAX_BACKTRACKING}))`"
    )
    section = [
        "## Against the peers" + (" (quick smoke run)" if quick else ""),
        "",
        f"Machine: {_common.machine_description()}. One process, "
        f"{elapsed / 60:.1f} minutes under `nice`, sharing the CPU with other "
        "work.",
        "",
        "Every method ran on the same tasks, initialisations (seeds "
        f"{', '.join(map(str, SEEDS))}), minibatch order (64 examples drawn "
        "with replacement) and budget, in this one process. Steps to target "
        "count updates until the *full* training loss is at or below the "
        "target: the median of the seeds, with the range; 'never' means not "
        "within the budget. The dynamic_lr variants (in bold) start at "
        f"{START_RATE:g} before `sgd(1.0)`, or at {ADAM_START_RATE:g} after "
        f"`adam(1.0)`; reduce_on_plateau scales `sgd({START_RATE:g})`; constant "
        "SGD is reported at the same starting rate and at the best rate of a "
        "half-decade sweep, and Adam at the best of its sweep (best: fewest "
        "median steps, then lowest final loss; '(edge of sweep)' marks a best "
        "rate at the end of the grid). The learning-rate-free methods of "
        "`optax.contrib` run with their defaults (`mechanize` wraps "
        f"`sgd(1.0)`). The backtracking line search, {linesearch}, runs on full "
        "batches only, with its default rate cap of 1 and with a cap of 100; it "
        "follows `sgd` because it needs a descent direction, which `sgd`'s sign "
        "flip provides. Evaluations count one gradient per step, plus the loss "
        "evaluations the line search's state reports. Wall-clock to target is "
        "(median steps x seconds per step) over the same for the best constant "
        f"SGD; seconds per step are the median of {timing_repeats} timings, "
        "interleaved across methods, of a jitted scan of "
        f"{timing_steps} steps from the initial point. {factors_note} "
        f"{noise_note}",
        "",
        "Targets were chosen with a probe run so that the best constant SGD "
        "needs a few hundred steps or more. The linear-regression targets are "
        "1.001 (full batch) and 1.005 (minibatch) times the least-squares loss "
        f"{linear_regression_optimum():.5f}. To fit the run into about 25 "
        "minutes of a shared 2-core CPU, the budgets are 1,500 steps (digits, "
        "full batch), 800 (char MLP, full batch) and 2,000 (digits and char, "
        "minibatch) instead of 3,000; the char MLP trains on 512 windows of "
        "Python's help text (`pydoc_data`) and has no robustness sweep."
        if not quick
        else "",
        "",
        "### Summary",
        "",
        "Median steps to target, and in brackets wall-clock to target as a "
        "ratio to the best constant SGD (lower is better); 'never': not within "
        "the budget.",
        "",
        _summary_table(tasks, results),
        "",
        "### Per task",
        "",
        *[t + "\n" for t in tables],
        "### Where a peer wins",
        "",
        "Per task: the default dynamic_lr row against every peer, in median "
        "steps to target (and wall-clock ratio to the best constant SGD); then "
        "our fastest variant, if another; then the loss at the budget.",
        "",
        *[_peer_wins(task, results[task.name]) for task in tasks],
        "",
        "### Robustness to the starting rate",
        "",
        "![steps to target against starting rate](peers_robustness.png)",
        "",
        *[t + "\n" for t in robustness_tables],
        "### Loss curves",
        "",
        "![training loss curves](peers_curves.png)",
        "",
    ]
    return "\n".join(section)
