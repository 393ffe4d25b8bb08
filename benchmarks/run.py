"""Runs the benchmarks and writes benchmarks/RESULTS.md.

    python benchmarks/run.py            # every benchmark, full size
    python benchmarks/run.py --quick    # a smoke test: small, nothing committed
    python benchmarks/run.py --only rejection

Each benchmark is a module of this folder with ``run(quick, out_dir) -> str``,
which prints its table, saves its plots in ``out_dir`` and returns its section of
RESULTS.md in Markdown. A full run stores each section under
``benchmarks/results/`` and assembles RESULTS.md from all stored sections, so
one benchmark can be rerun without rerunning the others. A quick run writes
everything into a temporary folder instead.
"""

import argparse
import importlib
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import _common  # noqa: E402

# Module names, in the order their sections appear in RESULTS.md.
BENCHMARKS = ["rejection", "factors", "minibatch", "peers", "overhead"]


def assemble_results() -> Path:
    sections = []
    for name in BENCHMARKS:
        path = _common.SECTIONS_DIR / f"{name}.md"
        if path.exists():
            sections.append(path.read_text())
    results = _common.BENCHMARKS_DIR / "RESULTS.md"
    header = (
        "# Benchmark results\n\n"
        "Written by `python benchmarks/run.py`; each section names the machine, "
        "the versions and the date of its run.\n\n"
    )
    results.write_text(header + "\n".join(sections))
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small smoke-test run")
    parser.add_argument("--only", nargs="*", choices=BENCHMARKS, default=None)
    args = parser.parse_args(argv)

    names = args.only or BENCHMARKS
    temporary = tempfile.TemporaryDirectory() if args.quick else None
    out_dir = Path(temporary.name) if temporary else _common.BENCHMARKS_DIR
    for name in names:
        module = importlib.import_module(f"benchmarks.{name}")
        print(f"\n=== {name} ===", flush=True)
        section = module.run(quick=args.quick, out_dir=out_dir)
        if args.quick:
            if not section.strip():
                raise RuntimeError(f"benchmark {name} produced no results")
        else:
            _common.write_section(name, section)
    if not args.quick:
        print(f"\nwrote {assemble_results()}")
    if temporary:
        temporary.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
