"""The README's code runs as written and prints what the README promises."""

import contextlib
import io
import re
from pathlib import Path

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
    # Losses that keep falling grow the rate from 0.01 by 1.05 per step.
    assert 0.01 < rate <= 0.01 * 1.05**99 * (1 + 1e-5)
