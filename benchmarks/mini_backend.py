"""Mini-model backend throughput: generation at batch 1 / 8 / 32, the cost of recording the sampled
tokens' log-probs, and `score` with all-layer pooling.

    .venv/bin/python benchmarks/mini_backend.py [--model mini:base] [--new-tokens 128]

Generation: text prompts of the synthetic families, sampling at temperature 1 with a forced length
(`min_new_tokens` = `max_new_tokens`), tokens/s counted over all rows, end to end (prefill included)
and for the decode steps alone (minus a 1-token call's time: at batch 32 the prefill of 32 prompts is a
fixed cost that short generations do not amortise). Scoring: one group of 8
completions of the same question, log-probs only vs log-probs + mean/last pooling of every decoder
layer; time is the median of --repeat runs, peak memory is the largest RSS increase seen by a 1 ms
sampler thread during the call, each variant's first call in a fresh process (so neither reuses memory
the other freed). Ratios side by side from one run.
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time

import psutil
import torch

from tars.data.families import make_mixture
from tars.models.loading import load_backend
from tars.models.mini import build_mini


class PeakRSS:
    def __init__(self):
        self.proc = psutil.Process()
        self.peak = 0

    def __enter__(self):
        self.base = self.proc.memory_info().rss
        self.peak = self.base
        self._stop = False
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self):
        while not self._stop:
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(0.001)

    def __exit__(self, *exc):
        self._stop = True
        self._t.join()

    @property
    def delta_mb(self) -> float:
        return (self.peak - self.base) / 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model folder (default: the mini base model, built if missing)")
    ap.add_argument("--new-tokens", type=int, default=128,
                    help="forced completion length (the mini model's think/answer completions: mean ~75, up to 160)")
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--peak-only", choices=["plain", "pooled"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(2)
    backend = load_backend(args.model or build_mini())
    records = make_mixture(["comparison", "facts", "units", "counting"], 32, seed=7)
    g = torch.Generator().manual_seed(0)

    if args.peak_only:
        inputs = backend.build_inputs(records[:1], "text")
        group = backend.generate(inputs, num_samples=8, max_new_tokens=96, min_new_tokens=96, generator=g)
        layers = list(range(1, len(backend.decoder_layers()) + 1)) if args.peak_only == "pooled" else None
        with PeakRSS() as mem:
            backend.score(inputs, group.token_ids, group.prompt_index, layers=layers)
        print(f"PEAK {mem.delta_mb:.2f}")
        return

    rates, decode = {}, {}
    for bs in [int(b) for b in args.batches.split(",")]:
        inputs = backend.build_inputs(records[:bs], "text")
        backend.generate(inputs, max_new_tokens=2, min_new_tokens=2, generator=g)  # warm-up
        t = time.perf_counter()
        backend.generate(inputs, max_new_tokens=1, generator=g)  # the prefill (+ one token) alone
        t_prefill = time.perf_counter() - t
        t = time.perf_counter()
        gen = backend.generate(inputs, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, generator=g)
        dt = time.perf_counter() - t
        rates[bs] = sum(len(x) for x in gen.token_ids) / dt
        decode[bs] = bs * (args.new_tokens - 1) / max(dt - t_prefill, 1e-9)
        print(f"generate batch {bs:3d}: {rates[bs]:7.1f} tok/s  ({dt:.2f} s for {args.new_tokens} tokens; prefill "
              f"{t_prefill:.2f} s; decode alone {decode[bs]:7.1f} tok/s)")

    # The trainer records each sampled token's log-prob (generate(logprobs=True): one more softmax over
    # the vocabulary per step) for its sampler-vs-trainer KL and truncated importance sampling.
    inputs = backend.build_inputs(records[:2], "text")
    times = {False: [], True: []}
    for _ in range(args.repeat):
        for lp in (False, True):
            t = time.perf_counter()
            backend.generate(inputs, num_samples=8, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                             row_seeds=list(range(16)), logprobs=lp)
            times[lp].append(time.perf_counter() - t)
    off, on = statistics.median(times[False]), statistics.median(times[True])
    print(f"generate 2 prompts x 8 samples: {off:.2f} s plain, {on:.2f} s recording log-probs "
          f"(ratio {on / off:.3f})")

    inputs = backend.build_inputs(records[:1], "text")
    group = backend.generate(inputs, num_samples=8, max_new_tokens=96, min_new_tokens=96, generator=g)
    all_layers = list(range(1, len(backend.decoder_layers()) + 1))

    def once(layers) -> float:
        t = time.perf_counter()
        backend.score(inputs, group.token_ids, group.prompt_index, layers=layers)
        return time.perf_counter() - t

    once(None)  # warm-up
    # Alternate the two variants so that load from other processes hits both alike.
    runs = {"plain": [], "pooled": []}
    for _ in range(args.repeat):
        runs["plain"].append(once(None))
        runs["pooled"].append(once(all_layers))
    t0, t1 = statistics.median(runs["plain"]), statistics.median(runs["pooled"])
    m0, m1 = (_fresh_peak(args, v) for v in ("plain", "pooled"))
    print(f"score 8 x 96 tokens, log-probs only      : {t0 * 1000:7.1f} ms, peak +{m0:6.1f} MB")
    print(f"score 8 x 96 tokens, + {len(all_layers)} layers pooled  : {t1 * 1000:7.1f} ms, peak +{m1:6.1f} MB")
    first, last = min(rates), max(rates)
    print(f"generation batch {last} vs {first}: {rates[last] / rates[first]:.2f}x tokens/s "
          f"(decode alone {decode[last] / decode[first]:.2f}x); "
          f"score with all-layer pooling vs log-probs only: {t1 / t0:.3f}x time, {m1 / max(m0, 1e-9):.3f}x peak memory")


def _fresh_peak(args, variant: str) -> float:
    import subprocess
    import sys

    cmd = [sys.executable, __file__, "--peak-only", variant] + (["--model", args.model] if args.model else [])
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return float(next(l for l in out.splitlines() if l.startswith("PEAK")).split()[1])


if __name__ == "__main__":
    main()
