"""Peak memory of the demo's layer analysis — its most memory-hungry piece — in a fresh process.

    .venv/bin/python benchmarks/layers_memory.py [--questions 48]

Runs what `tars demo` runs after its live TARS steps: `tars analyze layers` on mini:soft and on it with
the shipped adapter (mini:soft-tars), teacher-forced on the gold chains of the demo's held-out
questions, with the demo's `release_freed_memory`. Prints the process's peak RSS before the analysis
(imports, questions) and after it, and the wall time. To compare two versions of the code, run it
under each one's `src` in the same shell command, e.g. with a worktree of the older commit:

    git worktree add /tmp/old REV && PYTHONPATH=/tmp/old/src .venv/bin/python benchmarks/layers_memory.py; \
    .venv/bin/python benchmarks/layers_memory.py
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--questions", type=int, default=48, help="held-out questions (the demo's default: 48)")
    args = ap.parse_args()

    import tars
    from tars.data.jsonl import write_records
    from tars.eval.layers import run_layers
    from tars.experiment.demo import demo_questions
    from tars.host_memory import peak_rss_gb, release_freed_memory
    from tars.models.mini import shipped_model

    release_freed_memory()
    models = [str(shipped_model("mini:soft", log=lambda _: None)), str(shipped_model("mini:soft-tars", log=lambda _: None))]
    with tempfile.TemporaryDirectory() as tmp:
        heldout, _ = demo_questions(args.questions, 0)
        write_records(Path(tmp) / "heldout.jsonl", heldout)
        before = peak_rss_gb()
        t0 = time.perf_counter()
        run_layers(models, str(Path(tmp) / "heldout.jsonl"), Path(tmp) / "layers", limit=args.questions,
                   completion="gold", progress=False, names=["base", "TARS adapter"])
        seconds = time.perf_counter() - t0
    print(f"tars from {Path(tars.__file__).parent}: peak RSS {before:.2f} GB before the layer analysis, "
          f"{peak_rss_gb():.2f} GB after ({args.questions} questions, 2 models, {seconds:.0f} s)")


if __name__ == "__main__":
    main()
