"""What dynamic_lr costs: time, memory and compile time against plain SGD.

A jitted training step (loss, gradient, optimizer update, apply) of tanh MLPs
of three sizes on a small synthetic batch, so that the optimizer's share of the
step is visible, and the optimizer update alone (update and apply_updates with
fixed gradients), where the transform's own cost shows. The variants are timed
interleaved (A, B, C, A, B, C, ...) in one process and compared by the median.
Memory is XLA's own account of the compiled programs.
"""

import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks import _common
from optax_dynlr import dynamic_lr

BATCH = 8
SCANNED_UPDATES = 20  # updates per call when timed inside a lax.scan
KINDS = ("step", "update", "scan")
FULL_SIZES = {
    "10k": (64, 128, 10),
    "1M": (512, 1024, 512, 10),
    "10M": (2048, 2048, 2048, 2048, 10),
}
QUICK_SIZES = {"1k": (16, 48, 10), "10k": (64, 128, 10)}

VARIANTS = {
    "sgd(1)": lambda: optax.sgd(1.0),
    "dynamic_lr(1) + sgd(1)": lambda: optax.chain(dynamic_lr(1.0), optax.sgd(1.0)),
    "dynamic_lr(1, reject_steps) + sgd(1)": lambda: optax.chain(
        dynamic_lr(1.0, reject_steps=True), optax.sgd(1.0)
    ),
    "dynamic_lr(1, noise_aware) + sgd(1)": lambda: optax.chain(
        dynamic_lr(1.0, noise_aware=True), optax.sgd(1.0)
    ),
}
BASELINE = "sgd(1)"


def _tree_bytes(tree) -> int:
    return sum(leaf.nbytes for leaf in jax.tree.leaves(tree))


def _programs(opt, sizes):
    """The training step and the update alone, and example arguments for both."""
    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    params = _common.init_mlp(keys[0], sizes)
    inputs = jax.random.normal(keys[1], (BATCH, sizes[0]))
    labels = jax.nn.one_hot(jax.random.randint(keys[2], (BATCH,), 0, 10), sizes[-1])
    state = opt.init(params)
    grads = jax.tree.map(lambda p: jnp.full_like(p, 1e-3), params)

    def step(params, state, inputs, labels):
        loss, grads = jax.value_and_grad(_common.softmax_cross_entropy)(
            params, inputs, labels
        )
        updates, state = opt.update(grads, state, params, value=loss)
        return optax.apply_updates(params, updates), state, loss

    def update(params, state, grads, loss):
        updates, state = opt.update(grads, state, params, value=loss)
        return optax.apply_updates(params, updates), state

    def scanned_updates(params, state, grads, losses):
        def body(carry, loss):
            return update(*carry, grads, loss), None

        return jax.lax.scan(body, (params, state), losses)[0]

    # Alternating losses, so that the rule both grows and cuts the rate.
    losses = jnp.tile(jnp.asarray([1.0, 2.0], jnp.float32), SCANNED_UPDATES // 2)
    return {
        "step": (step, (params, state, inputs, labels)),
        "update": (update, (params, state, grads, jnp.float32(1.0))),
        "scan": (scanned_updates, (params, state, grads, losses)),
    }, state


def _peak(memory) -> int:
    """Bytes live at once: arguments and outputs (less those aliased) and temps."""
    return (
        memory.argument_size_in_bytes
        + memory.output_size_in_bytes
        - memory.alias_size_in_bytes
        + memory.temp_size_in_bytes
    )


def _compile(function, arguments):
    started = time.perf_counter()
    compiled = jax.jit(function).lower(*arguments).compile()
    return compiled, time.perf_counter() - started


def measure(sizes, *, compile_repeats: int, seconds: float) -> dict:
    """Times, memory and compile times of every variant for one model size."""
    results = {name: {} for name in VARIANTS}
    compiled = {}
    program_memory = {}
    for name, make in VARIANTS.items():
        programs, state = _programs(make(), sizes)
        results[name]["state_bytes"] = _tree_bytes(state)
        for kind, (function, arguments) in programs.items():
            program, compile_seconds = _compile(function, arguments)
            jax.block_until_ready(program(*arguments))
            memory = program.memory_analysis()
            if kind == "step":
                program_memory[name] = memory
            results[name][kind] = {
                "temp": memory.temp_size_in_bytes,
                "argument": memory.argument_size_in_bytes,
                "output": memory.output_size_in_bytes,
                "times": [],
                # The first compilation counts only when there are no repeats:
                # it may include one-off work shared by all variants.
                "compile": [] if compile_repeats else [compile_seconds],
            }
            compiled[name, kind] = (program, arguments)

        # A training loop would donate the parameters and the state, so that
        # the new ones can take the old ones' place.
        function, arguments = programs["step"]
        donated = jax.jit(function, donate_argnums=(0, 1)).lower(*arguments)
        memory = donated.compile().memory_analysis()
        results[name]["donated"] = {
            "temp": memory.temp_size_in_bytes,
            "peak": _peak(memory),
        }
        results[name]["step"]["peak"] = _peak(program_memory[name])

    # Compile times, interleaved; the caches are cleared so that each one is a
    # real compilation.
    for _ in range(compile_repeats):
        for name, make in VARIANTS.items():
            programs, _ = _programs(make(), sizes)
            for kind, (function, arguments) in programs.items():
                jax.clear_caches()
                _, compile_seconds = _compile(function, arguments)
                results[name][kind]["compile"].append(compile_seconds)

    # Rounds for about `seconds` (at least ten), each calling every program
    # once, in an order shuffled afresh each round: in a fixed order, each
    # program would always follow the same one and inherit its cache state.
    order = np.random.default_rng(0)
    programs_in_turn = list(compiled.items())
    started = time.perf_counter()
    rounds = 0
    while rounds < 10 or (time.perf_counter() - started < seconds and rounds < 5000):
        for index in order.permutation(len(programs_in_turn)):
            (name, kind), (program, arguments) = programs_in_turn[index]
            call_started = time.perf_counter()
            jax.block_until_ready(program(*arguments))
            results[name][kind]["times"].append(time.perf_counter() - call_started)
        rounds += 1

    for name in VARIANTS:
        for kind in KINDS:
            entry = results[name][kind]
            entry["median"] = float(np.median(entry["times"]))
            entry["compile_median"] = float(np.median(entry["compile"]))
            entry["rounds"] = len(entry["times"])
    return results


def _parameter_count(sizes) -> int:
    return sum(a * b + b for a, b in zip(sizes[:-1], sizes[1:], strict=True))


def _megabytes(count: int) -> str:
    return f"{count / 2**20:.3g}"


def _plot(all_results, sizes_by_label, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(all_results)
    counts = [_parameter_count(sizes_by_label[label]) for label in labels]
    titles = {
        "step": "training step",
        "update": "optimizer update alone",
        "scan": f"{SCANNED_UPDATES} updates in one lax.scan",
    }
    figure, axes = plt.subplots(1, 3, figsize=(15, 4))
    for axis, kind in zip(axes, KINDS, strict=True):
        for name in VARIANTS:
            if name == BASELINE:
                continue
            ratios = [
                all_results[label][name][kind]["median"]
                / all_results[label][BASELINE][kind]["median"]
                for label in labels
            ]
            axis.plot(counts, ratios, marker="o", label=name)
        axis.axhline(1.0, color="grey", linestyle=":", linewidth=1)
        axis.set_xscale("log")
        axis.set_xlabel("parameters")
        axis.set_ylabel("median time / median time of sgd(1)")
        axis.set_title(f"{titles[kind]}, batch {BATCH}", fontsize=9)
    axes[0].legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def run(quick: bool, out_dir: Path) -> str:
    out_dir = Path(out_dir)
    sizes_by_label = QUICK_SIZES if quick else FULL_SIZES
    compile_repeats = 0 if quick else 3
    seconds = 1.0 if quick else 60.0

    all_results = {}
    for label, sizes in sizes_by_label.items():
        print(f"{label} parameters: {_parameter_count(sizes):,}", flush=True)
        all_results[label] = measure(
            sizes,
            compile_repeats=compile_repeats,
            seconds=seconds,
        )

    time_rows, memory_rows, absolute_rows = [], [], []
    for label, results in all_results.items():
        count = _parameter_count(sizes_by_label[label])
        base = results[BASELINE]
        for name, entry in results.items():
            step, update, scan = entry["step"], entry["update"], entry["scan"]
            if name != BASELINE:

                def ratio(kind, field, digits, entry=entry, base=base):
                    return f"{entry[kind][field] / base[kind][field]:.{digits}f}"

                time_rows.append(
                    f"| {count:,} | {name} | {ratio('step', 'median', 3)} | "
                    f"{ratio('update', 'median', 3)} | {ratio('scan', 'median', 3)} "
                    f"| {ratio('step', 'compile_median', 2)} | "
                    f"{ratio('update', 'compile_median', 2)} |"
                )
            donated = entry["donated"]
            memory_rows.append(
                f"| {count:,} | {name} | {_megabytes(entry['state_bytes'])} | "
                f"{_megabytes(step['argument'])} | {_megabytes(step['output'])} | "
                f"{_megabytes(step['temp'])} | {_megabytes(step['peak'])} | "
                f"{_megabytes(donated['temp'])} | {_megabytes(donated['peak'])} | "
                f"{_megabytes(update['temp'])} |"
            )
            absolute_rows.append(
                f"| {count:,} | {name} | {step['median'] * 1e3:.3f} | "
                f"{update['median'] * 1e3:.3f} | "
                f"{scan['median'] / SCANNED_UPDATES * 1e3:.3f} | "
                f"{step['compile_median']:.2f} | {step['rounds']} |"
            )

    _plot(all_results, sizes_by_label, out_dir / "overhead.png")
    on_gpu = any(device.platform == "gpu" for device in jax.devices())
    absolute_note = (
        "Absolute medians on this GPU:"
        if on_gpu
        else "Absolute medians, for reference only (a shared CPU; only the "
        "ratios above count):"
    )
    tables = [
        "| parameters | variant | step time | update time | update time in a "
        "scan | step compile time | update compile time |",
        "|---|---|---|---|---|---|---|",
        *time_rows,
        "",
        "Memory (MiB; XLA's `memory_analysis()` of the compiled programs; "
        "peak = arguments + outputs - aliased + temporaries; 'donated' compiles "
        "the step with the parameters and state donated, as a training loop "
        "would):",
        "",
        "| parameters | variant | optimizer state | step arguments | step outputs "
        "| step temp | step peak | donated temp | donated peak | update temp |",
        "|---|---|---|---|---|---|---|---|---|---|",
        *memory_rows,
        "",
        absolute_note,
        "",
        "| parameters | variant | step (ms) | update (ms) | update in a scan (ms "
        "per update) | step compile (s) | rounds |",
        "|---|---|---|---|---|---|---|",
        *absolute_rows,
    ]
    print("\n".join(tables))
    layer_sizes = ", ".join(str(sizes) for sizes in sizes_by_label.values())
    section = [
        "## Overhead of the transform" + (" (quick smoke run)" if quick else ""),
        "",
        f"Machine: {_common.machine_description()}.",
        "",
        f"tanh MLPs with layer sizes {layer_sizes}; a synthetic batch of {BATCH}; "
        "float32. 'Step' is a jitted loss, gradient, optimizer update and "
        "`apply_updates`; 'update' is the optimizer update and `apply_updates` "
        "alone on fixed gradients, one per call or "
        f"{SCANNED_UPDATES} in one `lax.scan` (which leaves out the cost of "
        "passing the state's scalars in and out of each call). Time and compile "
        f"time are ratios to `{BASELINE}`: medians of per-call times, every "
        "program called once per round in a freshly shuffled order, from the "
        "same inputs, without "
        "buffer donation; compile ratios are medians of "
        f"{max(compile_repeats, 1)} lower-and-compile timings after clearing "
        "JAX's caches.",
        "",
        *tables,
        "",
        "![time ratios to plain sgd](overhead.png)",
        "",
    ]
    return "\n".join(section)
