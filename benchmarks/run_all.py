"""Run every CPU benchmark of this folder in turn, each with its own defaults.

Usage: ``python benchmarks/run_all.py [--only NAME ...]`` (``make bench``). Each script prints its
table and writes its JSON under ``bench-out/``; copy the figures worth keeping into RESULTS.md with
the date and machine. ``extract_gpu.py`` needs a CUDA device and is left out unless asked for with
``--only extract_gpu``; so is ``bench_extract_7b.py`` (the 7B model on CPU: about 14 GiB of memory and
several minutes), with ``--only bench_extract_7b``.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
OPT_IN = {"bench_extract_7b"}  # bench_*.py run only when named with --only


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--only",
        nargs="*",
        help=f"script names without .py (default: every bench_*.py but {', '.join(sorted(OPT_IN))})",
    )
    args = ap.parse_args()
    names = args.only or sorted(p.stem for p in HERE.glob("bench_*.py") if p.stem not in OPT_IN)
    failed = []
    for name in names:
        script = HERE / f"{name}.py"
        if not script.exists():
            print(f"no benchmark {script}", file=sys.stderr)
            return 2
        print(f"== {name}", flush=True)
        if subprocess.run([sys.executable, str(script)], cwd=HERE.parent).returncode:
            failed.append(name)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
