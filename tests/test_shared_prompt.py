"""`Backend.score` with the prompt run once per question (`share_prompt`) against one forward per row, on
tiny random models of each backend: the same log-probs, entropies, pooled states and LoRA gradients, and
the automatic choice between the two paths."""

from __future__ import annotations

import pytest
import torch

from tars.models.loading import load_backend
from tiny_models import tiny_phi4_mm, tiny_qwen2_5_omni, tiny_qwen2_audio, tone_records

BUILDERS = {"qwen2_audio": tiny_qwen2_audio, "qwen2_5_omni": tiny_qwen2_5_omni,
            "phi4_mm": lambda path: tiny_phi4_mm(path, speech_lora=True)}
#: G = 3 rows for prompts 0 and 1 (interleaved, not prompt-major), one row for prompt 2.
PROMPT_INDEX = [0, 1, 0, 2, 1, 0, 1]


@pytest.fixture(scope="module", params=sorted(BUILDERS))
def setup(request, tmp_path_factory):
    from tars.models.lora import LoraSettings, add_lora

    d = tmp_path_factory.mktemp(request.param)
    BUILDERS[request.param](d / "model")
    backend = load_backend(d / "model")
    recs = tone_records(d, ["What is 2 plus 2?", "Which is bigger, 3 or 30? Think it through.", "Pick one."])
    torch.manual_seed(0)
    params = add_lora(backend, LoraSettings(r=4, dropout=0.0))
    with torch.no_grad():  # B starts at 0: give it values, so the LoRA changes the states and A gets a gradient
        g = torch.Generator().manual_seed(1)
        for k, p in params.items():
            if "lora_B" in k:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return backend, recs, d, params


def completions(backend, seed=0):
    """One completion per row of `PROMPT_INDEX`, lengths 2..11; some end with a stop token."""
    g = torch.Generator().manual_seed(seed)
    n_vocab = len(backend.tokenizer)
    lens = [6, 11, 3, 9, 2, 7, 5]
    out = [torch.randint(5, n_vocab - 1, (n,), generator=g).tolist() for n in lens]
    for r in (0, 2, 3):
        out[r][-1] = backend.stop_token_ids[0]
    return out


def run(backend, inputs, comps, params, share, last_layer):
    for p in params.values():
        p.grad = None
    layers = list(range(1, len(backend.decoder_layers()) + 1))
    seen = {}
    sc = backend.score(inputs, comps, PROMPT_INDEX, layers, grad=True, entropy=True, last_layer=last_layer,
                       token_states=lambda j, h, pool: seen.__setitem__(j, h.float().clone()), share_prompt=share)
    # A loss that weights every row and token differently, so no gradient term hides behind a symmetry.
    w = torch.linspace(-1.0, 2.0, sc.logprobs.numel()).view_as(sc.logprobs)
    (sc.logprobs * w).sum().backward()
    return sc, seen, {k: p.grad.clone() for k, p in params.items()}


@pytest.mark.parametrize("modality", ["text", "speech"])
@pytest.mark.parametrize("last_layer", ["pre_norm", "post_norm"])
def test_shared_prompt_scores_and_gradients_equal_one_forward_per_row(setup, modality, last_layer):
    backend, recs, d, params = setup
    inputs = backend.build_inputs(recs, modality, base_dir=d)
    assert len(set(inputs.lengths)) == 3, "prompts must differ in length for left padding to be exercised"
    comps = completions(backend)
    a, seen_a, ga = run(backend, inputs, comps, params, False, last_layer)
    b, seen_b, gb = run(backend, inputs, comps, params, True, last_layer)
    assert torch.equal(a.mask, b.mask)
    torch.testing.assert_close(b.logprobs, a.logprobs, atol=1e-5, rtol=0)
    torch.testing.assert_close(b.entropy, a.entropy, atol=1e-5, rtol=0)
    for kind in ("mean", "last"):
        torch.testing.assert_close(b.pooled[kind], a.pooled[kind], atol=1e-5, rtol=0)
    # The per-token states the hooks hand on cover the completion positions only, in both paths.
    assert seen_a.keys() == seen_b.keys()
    for j in seen_a:
        assert seen_b[j].shape == seen_a[j].shape == (len(comps), max(map(len, comps)), inputs.embeds.shape[-1])
        torch.testing.assert_close(seen_b[j][a.mask], seen_a[j][a.mask], atol=1e-5, rtol=0)
    # Gradients: float32 sums of the same terms in another order (the shared path adds the G rows'
    # contributions to a prompt's keys/values in the index backward, the unshared path in each
    # weight's matmul), so they agree to float32 round-off relative to the gradient's size, not to
    # a fixed absolute figure. Measured: at most 3e-6 of the largest entry on every tiny backend;
    # 1e-4 leaves a 30x margin and is still far below a real mismatch (a position off by one, or
    # the prompt's keys/values cut off from the graph, changes them at order 1).
    assert any(g.abs().max() > 0 for g in ga.values())
    for k in ga:
        scale = float(ga[k].abs().max())
        torch.testing.assert_close(gb[k], ga[k], atol=1e-4 * scale + 1e-9, rtol=1e-4)


def count_decoder_calls(backend, fn):
    calls = []
    hook = backend.decoder().register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        fn()
    finally:
        hook.remove()
    return len(calls)


def test_auto_shares_only_repeated_prompts_and_never_under_checkpointed_blocks(setup):
    backend, recs, d, params = setup
    inputs = backend.build_inputs(recs, "text")
    comps = completions(backend)

    def calls(index=PROMPT_INDEX, rows=comps, **kw):
        return count_decoder_calls(backend, lambda: backend.score(inputs, rows, index, [1], **kw))

    assert calls() == 2  # the prompts once, the completions once
    assert calls(grad=True) == 2
    assert calls(share_prompt=False) == 1
    assert calls(index=[0, 1, 2], rows=comps[:3]) == 1  # no prompt repeats: nothing to share
    assert calls(index=[0, 1, 2], rows=comps[:3], share_prompt=True) == 2
    backend.checkpoint_blocks(True)
    try:
        assert calls(grad=True) == 1  # the recompute would append to the KV cache a second time
        assert calls(grad=False) == 2  # without grad the blocks run plainly: nothing is recomputed
        with pytest.raises(ValueError, match="checkpointed"):
            calls(grad=True, share_prompt=True)
    finally:
        backend.checkpoint_blocks(False)
