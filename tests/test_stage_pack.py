"""Stage packs: a low-rank + sparse + whole update of the LLM and the projector, unpacked onto the base."""

import pytest
import torch

from tars.errors import UserError
from tars.models.loading import load_backend
from tars.models.projector import CTCProjector
from tars.models.stage_pack import dequantize_columns, low_rank, pack_stage, quantize_columns, unpack_stage
from tiny_models import tiny_qwen2_audio


def test_low_rank_keeps_the_top_singular_directions():
    torch.manual_seed(0)
    exact = torch.randn(12, 3) @ torch.randn(3, 9)
    A, B = low_rank(exact, 3)
    assert A.shape == (12, 3) and B.shape == (3, 9)
    torch.testing.assert_close(A @ B, exact, atol=1e-5, rtol=0)
    # rank 1 of diag(3, 2, 1) keeps the 3: the error is sqrt(2² + 1²)
    A, B = low_rank(torch.diag(torch.tensor([3.0, 2.0, 1.0])), 1)
    assert torch.linalg.norm(A @ B - torch.diag(torch.tensor([3.0, 0.0, 0.0]))) < 1e-6


def test_int8_columns_round_trip_within_half_a_step():
    x = torch.tensor([[1.0, -0.02], [-0.5, 0.01], [0.25, 0.0]])
    q, scale = quantize_columns(x)
    assert q.dtype == torch.int8 and q[0, 0] == 127 and q[0, 1] == -127
    # a column's step is its absmax / 127 (scales stored in fp16)
    err = (dequantize_columns(q, scale) - x).abs()
    assert bool((err <= 0.5 * x.abs().amax(0) / 127 + 1e-4).all())


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return tiny_qwen2_audio(tmp_path_factory.mktemp("base") / "model")


def make_stage(base, path, encoder_too=False):
    """A 'trained' stage: a rank-2 update of one linear, one embedding row, a norm, a CTC projector."""
    be = load_backend(base)
    torch.manual_seed(3)
    with torch.no_grad():
        q = be.decoder().layers[1].self_attn.q_proj.weight
        q += 0.05 * torch.randn(q.shape[0], 2) @ torch.randn(2, q.shape[1])
        be.decoder().embed_tokens.weight[7] += 0.1
        be.decoder().norm.weight.mul_(1.5)
        if encoder_too:
            next(be.model.model.audio_tower.parameters()).add_(1.0)
    emb = be.decoder().get_input_embeddings()
    be.model.model.multi_modal_projector = CTCProjector(32, emb.embedding_dim, emb, stack=2)
    be.save_pretrained(path)
    return path


def test_unpacked_stage_equals_the_stage(base, tmp_path):
    stage = make_stage(base, tmp_path / "stage")
    info = pack_stage(stage, base, tmp_path / "p.safetensors", rank=2)
    assert (info["low_rank"], info["rows"], info["full"]) == (1, 1, 1)
    assert info["relative_error"] < 0.01  # rank 2 holds the whole update: only int8 round-off is lost
    out = unpack_stage(tmp_path / "p.safetensors", base, tmp_path / "unpacked")
    want, got, before = ({k: v.detach() for k, v in load_backend(m).model.named_parameters()}
                         for m in (stage, out, base))
    for name, p in want.items():
        if "multi_modal_projector" in name:  # the base's is another module: compared by outputs below
            continue
        update = float((p - before[name]).abs().max())
        # int8 factors: each entry within 1 % of the update's largest entry; unchanged weights exact
        assert float((got[name] - p).abs().max()) <= 0.01 * update + 1e-6, name
    want, got = load_backend(stage), load_backend(out)
    assert isinstance(got.projector, CTCProjector)
    assert got.projector.embedding is got.decoder().get_input_embeddings()
    frames = torch.randn(6, 32)
    torch.testing.assert_close(got.projector(frames), want.projector(frames), atol=1e-2, rtol=0)


def test_a_lower_rank_loses_part_of_the_update(base, tmp_path):
    stage = make_stage(base, tmp_path / "stage")
    info = pack_stage(stage, base, tmp_path / "p.safetensors", rank=1)
    assert 0.05 < info["relative_error"] < 1.0


def test_a_stage_that_changed_the_encoder_is_refused(base, tmp_path):
    stage = make_stage(base, tmp_path / "stage", encoder_too=True)
    with pytest.raises(UserError, match="speech encoder differs"):
        pack_stage(stage, base, tmp_path / "p.safetensors")
    assert not (tmp_path / "p.safetensors").exists()


def test_a_file_that_is_not_a_pack_is_a_clear_error(base, tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not safetensors")
    with pytest.raises(UserError, match="bad.safetensors: not a readable stage pack"):
        unpack_stage(bad, base, tmp_path / "out")
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(bad))
    with pytest.raises(UserError, match="not a stage pack"):
        unpack_stage(bad, base, tmp_path / "out")


def test_shipped_stages_unpack_in_order_and_again_when_a_pack_below_changes(base, tmp_path, monkeypatch, capsys):
    """mini:soft is unpacked onto mini:demo, itself unpacked onto the build: a first load makes both, a
    second returns at once, and a new demo pack makes both again (soft sits on top of it)."""
    from tars.models import mini
    from tars.models.projector import SoftCTCProjector

    monkeypatch.setenv("TARS_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(mini, "build_mini", lambda: base)
    demo_stage = make_stage(base, tmp_path / "demo_stage")
    pack_stage(demo_stage, base, tmp_path / "mini_demo.safetensors", rank=2)
    soft = load_backend(demo_stage)
    soft.model.model.multi_modal_projector = SoftCTCProjector.from_ctc(soft.projector)
    with torch.no_grad():
        soft.projector.residual.weight.fill_(0.01)
    soft.save_pretrained(tmp_path / "soft_stage")
    info = pack_stage(tmp_path / "soft_stage", demo_stage, tmp_path / "mini_soft.safetensors", rank=2)
    assert (info["low_rank"], info["rows"], info["full"]) == (0, 0, 0)  # the LLM is demo's: projector only
    monkeypatch.setattr("tars.models.stage_pack.SHIPPED", tmp_path / "mini_demo.safetensors")
    logs = []
    out = load_backend("mini:soft").projector  # load_backend unpacks what is missing
    assert isinstance(out, SoftCTCProjector)
    frames = torch.randn(9, 32)
    torch.testing.assert_close(out(frames), soft.projector(frames), atol=2e-3, rtol=0)  # fp16 in the pack
    assert mini.shipped_stage("soft", log=logs.append) == tmp_path / "home" / "mini" / "soft" and logs == []
    make_stage(base, tmp_path / "demo2")
    with torch.no_grad():  # another demo stage: its own projector
        be = load_backend(tmp_path / "demo2")
        be.projector.fc2.weight.add_(1.0)
        be.save_pretrained(tmp_path / "demo2")
    pack_stage(tmp_path / "demo2", base, tmp_path / "mini_demo.safetensors", rank=2)
    mini.shipped_stage("soft", log=logs.append)
    assert [l.split()[1] for l in logs] == ["mini_demo.safetensors", "mini_soft.safetensors"]
    # the user's own mini:demo: loading mini:soft puts soft on top of it and leaves it theirs
    pack_stage(demo_stage, base, tmp_path / "mine.safetensors", rank=2)
    mini.shipped_stage("demo", tmp_path / "mine.safetensors")
    capsys.readouterr()
    load_backend("mini:soft")
    assert mini.custom_stage("demo")
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) == 1 and "mini_soft.safetensors onto" in printed[0] and "your own pack" in printed[0]
    load_backend("mini:soft")  # already on top of it
    assert capsys.readouterr().out == ""
    # unpacking the shipped mini:soft (`tars mini unpack --stage soft`, `tars demo`) brings the shipped chain
    logs.clear()
    mini.shipped_stage("soft", log=logs.append)
    assert [l.split()[1] for l in logs] == ["mini_demo.safetensors", "mini_soft.safetensors"]
    assert not mini.custom_stage("demo")


def test_loading_a_stale_shipped_stage_unpacks_the_new_pack_but_keeps_a_custom_one(base, tmp_path, monkeypatch):
    """A tars that ships a new pack must not load the old unpacked stage; a stage the user unpacked
    from their own pack (`tars mini unpack --pack`) stays as it is until they unpack the shipped one."""
    from tars.models import mini

    monkeypatch.setenv("TARS_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(mini, "build_mini", lambda: base)
    shipped = tmp_path / "ship" / "mini_demo.safetensors"
    shipped.parent.mkdir()
    monkeypatch.setattr("tars.models.stage_pack.SHIPPED", shipped)

    def stage_pack(name, bump):
        stage = make_stage(base, tmp_path / name)
        with torch.no_grad():  # each stage its own projector
            be = load_backend(stage)
            be.projector.fc2.weight.add_(bump)
            be.save_pretrained(stage)
        pack_stage(stage, base, tmp_path / f"{name}.safetensors", rank=2)
        return load_backend(stage).projector.fc2.weight, tmp_path / f"{name}.safetensors"

    w1, p1 = stage_pack("v1", 1.0)
    w2, p2 = stage_pack("v2", 2.0)
    w3, p3 = stage_pack("mine", 3.0)
    fc2 = lambda: load_backend("mini:demo").projector.fc2.weight  # noqa: E731
    shipped.write_bytes(p1.read_bytes())
    torch.testing.assert_close(fc2(), w1, atol=0.05, rtol=0)  # int8 / fp16 in the pack
    shipped.write_bytes(p2.read_bytes())  # an upgraded tars
    torch.testing.assert_close(fc2(), w2, atol=0.05, rtol=0)
    mini.shipped_stage("demo", p3)  # the user's own pack
    assert mini.custom_stage("demo") and str(p3.resolve()) in (mini.mini_dir("demo") / "PACK").read_text()
    torch.testing.assert_close(fc2(), w3, atol=0.05, rtol=0)
    mini.shipped_stage("demo", p3, log=pytest.fail)  # the same custom pack again: nothing to do
    mini.shipped_stage("demo")  # `tars mini unpack` without --pack: the shipped one back
    assert not mini.custom_stage("demo")
    torch.testing.assert_close(fc2(), w2, atol=0.05, rtol=0)
