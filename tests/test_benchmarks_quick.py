"""Smoke tests of the peers and overhead benchmarks in their quick mode.

They check that every table has the rows it should and that the plots are
written, never how fast or how good any method was.
"""

import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import overhead, peers  # noqa: E402

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _table_after(markdown: str, heading: str) -> list[list[str]]:
    """The body cells of the table that starts at, or follows, a line `heading`."""
    lines = markdown.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(heading))
    if not heading.startswith("|"):
        start += 1
    rows = []
    for line in lines[start:]:
        if line.startswith("|"):
            rows.append([cell.strip() for cell in line.strip("|").split("|")])
        elif rows:
            break
    return [row for row in rows[2:]]  # without the header and the rule


def _assert_png(path: Path):
    assert path.read_bytes()[:8] == PNG_SIGNATURE, path


@pytest.fixture(scope="module")
def peers_section(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("peers")
    return peers.run(quick=True, out_dir=out_dir), out_dir


def test_peers_quick_writes_both_plots(peers_section):
    _, out_dir = peers_section
    _assert_png(out_dir / "peers_robustness.png")
    _assert_png(out_dir / "peers_curves.png")


def test_peers_quick_full_batch_table_has_every_method(peers_section):
    section, _ = peers_section
    rows = _table_after(section, "**digits MLP, full batch**")
    names = [row[0].strip("*") for row in rows]
    noise_aware = ["dynamic_lr(0.1, noise_aware=True) + sgd(1)"]
    if not peers.noise_aware_available()[0]:
        noise_aware = []
    assert names[:2] == [
        "dynamic_lr(0.1) + sgd(1)",
        "dynamic_lr(0.1, reject_steps=True) + sgd(1)",
    ]
    assert names[2:] == [
        *noise_aware,
        "adam(1) + dynamic_lr(0.001)",
        "constant SGD, rate 0.1",
        names[4 + len(noise_aware)],  # the best rates of the sweeps, checked below
        names[5 + len(noise_aware)],
        "sgd(0.1) + reduce_on_plateau(factor=0.8, patience=5)",
        "sgd(0.1) + reduce_on_plateau()",
        "prodigy()",
        "dog()",
        "dadapt_adamw()",
        "mechanize(sgd(1))",
        "cocob()",
        "sgd(1) + backtracking line search",
        "sgd(1) + backtracking line search, max rate 100",
    ]
    # The quick sweeps are 0.1, 1, 10 for SGD and 0.001, 0.01, 0.1 for Adam.
    best_sgd, best_adam = names[4 + len(noise_aware)], names[5 + len(noise_aware)]
    assert re.fullmatch(
        r"best constant SGD, rate (0\.1|1|10)( \(edge of sweep\))?", best_sgd
    )
    assert re.fullmatch(
        r"best Adam, rate (0\.001|0\.01|0\.1)( \(edge of sweep\))?", best_adam
    )
    # method, steps, evaluations, wall-clock ratio, loss at budget
    assert all(len(row) == 5 for row in rows)
    for row in rows:
        assert re.fullmatch(r"(never|[\d,]+)( \(\S+-\S+\))?", row[1]), row


def test_peers_quick_minibatch_table_leaves_out_the_line_search(peers_section):
    section, _ = peers_section
    rows = _table_after(section, "**digits MLP, minibatch**")
    names = [row[0].strip("*") for row in rows]
    assert names[0] == "dynamic_lr(0.1) + sgd(1)"
    assert names[1] == "constant SGD, rate 0.1"
    assert names[2].startswith("best constant SGD, rate ")
    assert len(names) == 3


def test_peers_quick_robustness_tables_cover_every_starting_rate(peers_section):
    section, _ = peers_section
    for task in ("full batch", "minibatch"):
        heading = "Steps to target 1 by starting rate, **digits MLP, " + task
        rows = _table_after(section, heading)
        names = [row[0] for row in rows]
        assert "dynamic_lr" in names
        assert "constant SGD" in names
        # The quick robustness grid is 0.01, 0.1 and 1: one column each.
        assert all(len(row) == 4 for row in rows)
        assert all(cell != "-" for row in rows for cell in row[1:])


def test_peers_quick_summary_has_one_column_per_task(peers_section):
    section, _ = peers_section
    rows = _table_after(section, "Median steps to target, and in brackets")
    assert [row[0] for row in rows][:2] == [
        "**dynamic_lr(0.1) + sgd(1)**",
        "**dynamic_lr(0.1, reject_steps=True) + sgd(1)**",
    ]
    assert all(len(row) == 3 for row in rows)


def test_overhead_quick_tables_and_plot(tmp_path):
    section = overhead.run(quick=True, out_dir=tmp_path)
    _assert_png(tmp_path / "overhead.png")

    # Parameters of the quick MLPs, by hand: 16*48+48 + 48*10+10 = 1,306 and
    # 64*128+128 + 128*10+10 = 9,610.
    time_rows = _table_after(section, "| parameters | variant | step time |")
    assert [(row[0], row[1]) for row in time_rows] == [
        (count, name)
        for count in ("1,306", "9,610")
        for name in (
            "dynamic_lr(1) + sgd(1)",
            "dynamic_lr(1, reject_steps) + sgd(1)",
            "dynamic_lr(1, noise_aware) + sgd(1)",
        )
    ]
    memory_rows = _table_after(section, "Memory (MiB;")
    assert len(memory_rows) == 8
    assert all(len(row) == 10 for row in memory_rows)
    absolute_rows = _table_after(section, "Absolute medians")
    assert len(absolute_rows) == 8


def test_overhead_state_of_step_rejection_adds_one_parameter_sized_buffer():
    # The rejecting state holds one float32 buffer per parameter on top of the
    # plain rule's scalars: 4 bytes x 1,306 parameters = 5,224 bytes.
    sizes = overhead.QUICK_SIZES["1k"]
    states = {
        name: overhead._programs(make(), sizes)[1]
        for name, make in overhead.VARIANTS.items()
    }
    plain = overhead._tree_bytes(states["dynamic_lr(1) + sgd(1)"])
    rejecting = overhead._tree_bytes(states["dynamic_lr(1, reject_steps) + sgd(1)"])
    assert rejecting - plain == 4 * 1306
    assert overhead._tree_bytes(states["sgd(1)"]) == 0
    # The noise-aware state adds one vector of 20 float32 statistics (4 bytes
    # each), whatever the model's size.
    noise_aware = overhead._tree_bytes(states["dynamic_lr(1, noise_aware) + sgd(1)"])
    assert noise_aware - plain == 20 * 4
