"""Rollouts of a fixed length for step benchmarks: every completion has exactly `n` tokens, the last
one a stop token, so a step's cost does not depend on what a (random or tiny) model happens to say
and no completion counts as truncated (truncated ones are masked out of the loss, which would leave
the backward nothing to do)."""

from __future__ import annotations


def force_lengths(n: int) -> None:
    """From now on, every decode (`Backend.generate`, `generate_paired`) samples `n - 1` tokens per row
    (stops forbidden) and ends each row with the model's first stop token."""
    from tars.models.backend import Backend, Generation

    real = getattr(Backend, "_decode", None)

    def decode(self, parts, temperature, top_p, max_new_tokens, generator, min_new_tokens, logprobs, *rest):
        return [fixed(self, g) for g in real(self, parts, temperature, top_p, n - 1, generator, n - 1, logprobs, *rest)]

    def fixed(self, g):
        stop = self.stop_token_ids[0]
        ids = [row[: n - 1] + [stop] for row in g.token_ids]
        lps = None if g.logprobs is None else [lp[: n - 1] + [0.0] for lp in g.logprobs]
        return Generation(ids, [self.tokenizer.decode(r, skip_special_tokens=True) for r in ids],
                          [False] * len(ids), g.prompt_index, lps)

    if hasattr(Backend, "_decode"):
        Backend._decode = decode
        return
    # tars before `generate_paired` (benchmarks' `--before` runs): one decode per `generate` call.
    real_generate = Backend.generate

    def generate(self, inputs, num_samples=1, temperature=1.0, top_p=1.0, max_new_tokens=256, **kw):
        kw["min_new_tokens"] = n - 1
        g = real_generate(self, inputs, num_samples, temperature, top_p, n - 1, **kw)
        return fixed(self, g)

    Backend.generate = generate
