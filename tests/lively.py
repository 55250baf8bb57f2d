"""Makes a tiny random model's rollouts usable for trainer tests (shared by the in-process tests and
the multi-process worker, which cannot use pytest's monkeypatch).

A random tiny model never stops within a few tokens (every rollout truncated, no loss) nor answers
right (every reward 0, no advantage). Cut each rollout at a token-determined place and pay a
text-determined accuracy, so that the losses, references and alignment rewards all have something
to work on; both are deterministic functions of the sampled tokens."""

from tars.models.backend import Backend, Generation
from tars.rl import tars as tars_mod


def make_lively(setattr_):
    real = Backend._decode

    def cut(self, g):
        stop = self.stop_token_ids[0]
        ids, lps = [], []
        for j, row in enumerate(g.token_ids):
            at = next((i for i, t in enumerate(row) if i >= 1 and t % 3 == 0), None)
            ids.append(row if at is None else row[:at] + [stop])
            if g.logprobs is not None:  # the forced stop token had probability 1 under this "sampler"
                lps.append(g.logprobs[j] if at is None else g.logprobs[j][:at] + [0.0])
        return Generation(ids, [self.tokenizer.decode(r, skip_special_tokens=True) for r in ids],
                          [len(r) > 0 and r[-1] != stop for r in ids], g.prompt_index,
                          lps if g.logprobs is not None else None)

    def decode(self, *a, **k):  # under `generate` and `generate_paired` alike
        return [cut(self, g) for g in real(self, *a, **k)]

    def acc(texts, options, answers):
        return [float(sum(t.encode()) % 2) for t in texts]

    setattr_(Backend, "_decode", decode)
    setattr_(tars_mod, "accuracy_reward", acc)
