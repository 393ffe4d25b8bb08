"""The README's code runs as written and prints what the README promises."""

import contextlib
import io
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"


def python_blocks():
    return re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def test_quick_start_trains_and_reads_the_rate_back():
    quick_start = python_blocks()[0]
    output = io.StringIO()
    namespace = {}
    with contextlib.redirect_stdout(output):
        exec(compile(quick_start, str(README), "exec"), namespace)

    loss, rate = (float(word) for word in output.getvalue().split())
    # The data are noiseless, so the loss of a well-tuned run falls to almost
    # nothing; a rate stuck at its start or floor would leave it far higher.
    assert loss < 1e-6
    # Losses that keep falling grow the rate from 0.01 by 1.1 per step.
    assert 0.01 < rate <= 0.01 * 1.1**99 * (1 + 1e-5)


def _block_with(text):
    (block,) = [block for block in python_blocks() if text in block]
    return block


def test_minibatch_snippet_climbs_from_a_far_too_small_rate():
    snippet = _block_with("noise_aware=True")
    namespace = {}
    with contextlib.redirect_stdout(io.StringIO()):
        exec(compile(snippet, str(README), "exec"), namespace)
    rate = float(namespace["current_learning_rate"](namespace["state"]))
    # From 1e-4 the trend test alone left the rate where it was within 200
    # steps; the Polyak climb lifts it by a factor of more than 100, and the
    # noiseless linear model is then fitted.
    assert rate > 100 * 1e-4
    assert float(namespace["batch_loss"]) < 1e-6


def test_logging_snippet_returns_one_rate_per_step():
    logging_snippet = _block_with("find_dynamic_lr_state")
    namespace = {}
    with contextlib.redirect_stdout(io.StringIO()):
        exec(compile(logging_snippet, str(README), "exec"), namespace)

    log = namespace["log"]
    rates = log["learning_rate"]
    assert rates.shape == (100,)
    # The first call leaves 0.1 alone; each later call moves it by one factor.
    assert float(rates[0]) == pytest.approx(0.1)
    ratios = rates[1:] / rates[:-1]
    for ratio in ratios.tolist():
        assert (
            ratio == pytest.approx(1.1) or ratio == pytest.approx(0.3) or (ratio == 1.0)
        )
    falls = int(log["num_falls"][-1])
    rises = int(log["num_rises"][-1])
    assert float(rates[-1]) == pytest.approx(0.1 * 1.1**falls * 0.3**rises, rel=1e-4)
    assert float(log["loss"][-1]) < float(log["loss"][0])
