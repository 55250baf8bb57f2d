"""`tars speak` throughput: 2 workers vs 1, and a rerun served from the cache, in one run.

    .venv/bin/python benchmarks/speak.py [--n 200] [--data openbookqa]

Each timing synthesises into a fresh folder with no shared cache, so workers are compared on the same
work; the cache rerun repeats the 2-worker folder. Ratios are side by side because this machine is noisy.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

from tars.data.bundled import resolve_data
from tars.data.jsonl import read_records
from tars.data.speech import EspeakEngine, speak


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=200, help="items to synthesise (default 200)")
    ap.add_argument("--data", default="openbookqa", help="JSONL file or bundled name")
    args = ap.parse_args()
    records = read_records(resolve_data(args.data))[: args.n]
    engine = EspeakEngine()
    tmp = Path(tempfile.mkdtemp(prefix="tars-speak-bench-"))
    try:
        t1 = timed(lambda: speak(records, tmp / "w1", engine, workers=1))
        t2 = timed(lambda: speak(records, tmp / "w2", engine, workers=2))
        tc = timed(lambda: speak(records, tmp / "w2", engine, workers=2))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"items: {len(records)}  cores: {os.cpu_count()}  engine: espeak-ng {engine.version}")
    print(f"1 worker : {t1:7.2f} s  ({len(records) / t1:6.1f} clips/s)")
    print(f"2 workers: {t2:7.2f} s  ({len(records) / t2:6.1f} clips/s)")
    print(f"cache    : {tc:7.2f} s")
    print(f"speak 2 workers vs 1: {t1 / t2:.2f}x faster; cached rerun: {100 * tc / t2:.1f}% of the first run's time")


if __name__ == "__main__":
    main()
