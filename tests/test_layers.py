"""Layer analysis: the cosine per layer by hand, and `tars analyze layers` on a tiny random model."""

import json

import pytest
import torch

from conftest import needs_espeak, write_jsonl, good_row
from tars.eval.layers import analyze_model, layer_cosines, run_layers, token_cosines
from tiny_models import tiny_qwen2_audio


def test_layer_cosines_by_hand():
    s = torch.tensor([[[1.0, 0.0], [1.0, 1.0]], [[0.0, 2.0], [3.0, 0.0]]])  # [N=2, L=2, H=2]
    t = torch.tensor([[[1.0, 0.0], [1.0, -1.0]], [[0.0, 1.0], [1.0, 1.0]]])
    # layer 1: cos = 1, 1 → 1; layer 2: cos = 0, 1/√2 → 0.3536
    assert layer_cosines(s, t).tolist() == pytest.approx([1.0, 0.5 / 2 ** 0.5])


@needs_espeak
@pytest.mark.parametrize("completion", ["gold", "text_greedy"])
def test_analyze_layers_writes_a_curve_per_model_and_a_png(tmp_path, completion):
    a = tiny_qwen2_audio(tmp_path / "a", seed=0, window_s=20.0)
    b = tiny_qwen2_audio(tmp_path / "b", seed=1, window_s=20.0)
    rows = [good_row(i, cot="Two is less than three.") for i in range(3)]
    data = write_jsonl(tmp_path / "q.jsonl", rows)
    res = run_layers([str(a), str(b)], str(data), tmp_path / "out", completion=completion, batch_size=2,
                     progress=False)
    curves = res["curves"]
    assert list(curves) == [str(a), str(b)] and all(len(c) == 4 for c in curves.values())
    assert all(-1.0 <= v <= 1.0 for c in curves.values() for v in c)
    assert curves[str(a)] != curves[str(b)]
    saved = json.loads((tmp_path / "out" / "layers.json").read_text())
    assert saved["curves"] == curves and saved["completion"] == completion
    assert saved["cosine"] == "per_token" and saved["last_layer"] == "pre_norm"
    png = (tmp_path / "out" / "layers.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_token_cosines_by_hand_and_against_the_pooled_cosine():
    # one question, two tokens: speech [1,0], [0,1]; text [1,0], [1,0]
    s = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [float("nan"), 1.0]]])
    t = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [float("inf"), 0.0]]])
    mask = torch.tensor([[True, True, False]])  # the third position is padding holding NaN / inf
    # per token: cos 1 and 0 → mean 0.5 (the padding never enters)
    assert token_cosines(s, t, mask).tolist() == pytest.approx([0.5])
    # mean-pooled (R_rep's quantity): [0.5, 0.5] vs [1, 0] → 1/√2 = 0.7071
    assert layer_cosines(s[:, None, :2].mean(2), t[:, None, :2].mean(2)).tolist() == pytest.approx([0.5 ** 0.5])


def _records_with_audio(tmp_path, n=2):
    from conftest import write_wav
    from tars.data.schema import Record

    recs = []
    for i in range(n):
        write_wav(tmp_path / f"a{i}.wav", seconds=0.4 + 0.2 * i)
        recs.append(Record(id=f"q{i}", question=f"What is {i} plus 2?", options=["3", "4", "5"], answer="B",
                           audio=f"a{i}.wav", cot="Two and two."))
    return recs


def _uneven_final_norm(be):
    """A random model's final norm has unit weights: it only rescales each token, which leaves a
    per-token cosine as it was. Uneven weights make before / after the norm tell apart."""
    with torch.no_grad():
        be.decoder().norm.weight.copy_(torch.linspace(0.1, 4.0, be.decoder().norm.weight.numel()))


@pytest.mark.parametrize("last_layer", ["pre_norm", "post_norm"])
def test_per_token_curve_matches_the_hidden_states_by_hand(tmp_path, last_layer):
    """`cosine=per_token` against a plain forward per question: the mean over its completion tokens
    (final stop token excluded) of the per-token cosine; `mean_pooled` against the pooled states. The
    last layer is checked against transformers' hidden_states[-1] (after the final norm) for
    `post_norm` and against the last block's own output for `pre_norm`."""
    from tars.data.prompts import gold_completion
    from tars.models.loading import load_backend

    be = load_backend(tiny_qwen2_audio(tmp_path / "m"))
    _uneven_final_norm(be)
    recs = _records_with_audio(tmp_path)
    n_layers = len(be.decoder_layers())
    stop = be.stop_token_ids[0]

    def states(rec, modality, comp):
        inp = be.build_inputs([rec], modality, base_dir=tmp_path)
        embeds = torch.cat([inp.embeds[0], be.embed_tokens(torch.tensor(comp))], 0)[None]
        block_out = {}
        hook = be.decoder_layers()[-1].register_forward_hook(
            lambda m, i, o: block_out.setdefault("h", (o[0] if isinstance(o, tuple) else o)))
        with torch.no_grad():
            hs = be.decoder()(inputs_embeds=embeds, output_hidden_states=True).hidden_states
        hook.remove()
        P = inp.embeds.shape[1]
        per_layer = [hs[l][0, P : P + len(comp) - 1] for l in range(1, n_layers)]
        last = hs[n_layers] if last_layer == "post_norm" else block_out["h"]
        return per_layer + [last[0, P : P + len(comp) - 1]]

    want_tok, want_pool = torch.zeros(n_layers), torch.zeros(n_layers)
    for rec in recs:
        comp = be.tokenizer(gold_completion(rec), add_special_tokens=False)["input_ids"] + [stop]
        sp, tx = states(rec, "speech", comp), states(rec, "text", comp)
        for l in range(n_layers):
            want_tok[l] += torch.nn.functional.cosine_similarity(sp[l], tx[l], dim=-1).mean() / len(recs)
            want_pool[l] += torch.nn.functional.cosine_similarity(sp[l].mean(0), tx[l].mean(0), dim=0) / len(recs)
    got_tok = analyze_model(be, recs, tmp_path, "gold", progress=False, cosine="per_token", last_layer=last_layer)
    got_pool = analyze_model(be, recs, tmp_path, "gold", progress=False, cosine="mean_pooled", last_layer=last_layer)
    assert got_tok == pytest.approx(want_tok.tolist(), abs=1e-5)
    assert got_pool == pytest.approx(want_pool.tolist(), abs=1e-5)
    assert max(abs(a - b) for a, b in zip(got_tok, got_pool)) > 1e-3  # the two curves are not the same
    with pytest.raises(ValueError, match="cosine must be one of"):
        analyze_model(be, recs, tmp_path, "gold", progress=False, cosine="max")


def test_the_last_layer_choice_moves_only_the_last_point(tmp_path):
    from tars.models.loading import load_backend

    be = load_backend(tiny_qwen2_audio(tmp_path / "m"))
    _uneven_final_norm(be)
    recs = _records_with_audio(tmp_path)
    pre = analyze_model(be, recs, tmp_path, "gold", progress=False, last_layer="pre_norm")
    post = analyze_model(be, recs, tmp_path, "gold", progress=False, last_layer="post_norm")
    assert pre[:-1] == post[:-1] and abs(pre[-1] - post[-1]) > 1e-3


def test_the_layer_analysis_defaults_to_the_papers_per_token_cosine():
    import inspect

    from tars.eval import layers as layers_mod

    assert inspect.signature(layers_mod.run_layers).parameters["cosine"].default == "per_token"
    assert inspect.signature(layers_mod.analyze_model).parameters["cosine"].default == "per_token"


def test_the_analysis_builds_no_autograd_graph(tmp_path):
    """A loaded model's weights require grad; encoding the prompts under grad kept the audio encoder's
    graph beside every batch (measured: 3.34 against 1.39 GB peak on mini:soft, benchmarks/layers_memory.py)."""
    from tars.models.loading import load_backend

    be = load_backend(tiny_qwen2_audio(tmp_path / "m"))
    assert any(p.requires_grad for p in be.model.parameters())
    built, build = [], be.build_inputs
    be.build_inputs = lambda *a, **k: built.append(build(*a, **k)) or built[-1]
    analyze_model(be, _records_with_audio(tmp_path), tmp_path, "gold", progress=False)
    assert built and all(b.embeds.grad_fn is None for b in built)
