"""The examples, run in their short forms so that they cannot rot."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from optax_dynlr import current_learning_rate

EXAMPLES_DIR = Path(__file__).resolve().parent.parent / "examples"


def load_example(name):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES_DIR / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_seed_experiment_quick_run_reports_the_runs_it_recorded(tmp_path, capsys):
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    example = load_example("seed_experiment")
    plot_path = tmp_path / "seed.png"

    results = example.main(["--quick", "--plot", str(plot_path)])
    printed = capsys.readouterr().out
    runs = results["runs"]
    dynamic, static = runs["dynamic"], runs["static"]

    # Quick mode: 300 dynamic iterations, so the post's checkpoints 1,000,
    # 1,100, 2,000 and 10,000 of 10,000 become 30, 33, 60 and 300.
    assert len(dynamic["rates"]) == 300
    assert len(dynamic["costs"]) == 301
    assert list(results["checkpoints"]) == [30, 33, 60, 300]
    for iteration, rate in results["checkpoints"].items():
        assert rate == dynamic["rates"][iteration - 1]
        assert f"iteration {iteration:>7,}: rate {rate:.4g}" in printed
    assert results["checkpoints"][300] == float(
        current_learning_rate(dynamic["opt_state"])
    )

    # Replay the rule on the recorded costs: iteration k sees the cost after
    # k - 1 updates, keeps 0.02 on the first call, then multiplies by 1.1
    # after a fall and 0.3 after a rise (the defaults), in float32 like the transform.
    rate = np.float32(0.02)
    expected = [rate]
    for previous, value in zip(
        dynamic["costs"][:-2], dynamic["costs"][1:-1], strict=True
    ):
        if value < previous:
            rate = rate * np.float32(1.1)
        elif value > previous:
            rate = rate * np.float32(0.3)
        expected.append(rate)
    np.testing.assert_allclose(dynamic["rates"], expected, rtol=1e-6)

    # The post's claim on this data: after 300 iterations the dynamic run is
    # below what the static rate reaches in ten times as many.
    assert dynamic["costs"][-1] < 0.5 * dynamic["costs"][0]
    assert dynamic["costs"][-1] < static["costs"][-1]
    assert results["steps_to_target"]["static"] is None

    # Full-batch descent at 0.02 lowers the cost at every iteration, so the
    # decreasing-only rule never finds a plateau and stays at 0.02 throughout.
    assert np.all(np.diff(static["costs"]) < 0)
    np.testing.assert_array_equal(static["rates"], np.float32(0.02))
    np.testing.assert_array_equal(runs["decreasing only"]["rates"], np.float32(0.02))

    target = results["target"]
    assert target == dynamic["costs"][-1]
    for name, steps in results["steps_to_target"].items():
        costs = runs[name]["costs"]
        if steps is None:
            assert len(costs) == 3_001
            assert costs.min() > target
        else:
            assert len(costs) == steps + 1
            assert costs[steps] <= target < costs[:steps].min()
    for name, steps in results["dynamic_steps_to_baseline_final"].items():
        baseline_final = runs[name]["costs"][-1]
        assert dynamic["costs"][steps] <= baseline_final
        assert dynamic["costs"][:steps].min() > baseline_final

    assert plot_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
