"""`tars plan` (issue 13): parameters counted on the meta device equal the loaded model's, the KV-cache
term by hand, a calibration on a tiny model predicts the bytes autograd saves (and the peak), the
command on a recipe, one-line errors, and the 7B recipes' comments agree with what the plan says."""

from __future__ import annotations

import json
import re

import pytest
import torch

from conftest import REPO, run_cli
from tars.plan.architecture import load_architecture
from tars.plan.memory import GIB, PlanOptions, make_plan
from tiny_models import tiny_phi4_mm, tiny_qwen2_5_omni, tiny_qwen2_audio

RECIPES = ["configs/qwen2_audio_7b.yaml", "configs/qwen2_5_omni_7b.yaml", "configs/phi4_mm.yaml"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_qwen2_audio(tmp_path_factory.mktemp("m") / "model", window_s=2.0)


@pytest.mark.parametrize("builder,kw", [(tiny_qwen2_audio, {}), (tiny_qwen2_5_omni, {"full": True}),
                                        (tiny_qwen2_5_omni, {}), (tiny_phi4_mm, {"speech_lora": True})],
                         ids=["qwen2_audio", "omni_full", "omni_thinker", "phi4_speech_lora"])
def test_parameter_counts_on_meta_equal_the_loaded_model(builder, kw, tmp_path):
    from tars.models.loading import load_backend
    from tars.models.lora import LoraSettings, add_lora

    folder = builder(tmp_path / "model", **kw)
    lora = LoraSettings(r=4)
    arch = load_architecture(str(folder), lora)
    be = load_backend(folder)
    assert arch.params == sum(p.numel() for p in be.parameters())  # the speech LoRA included, tied weights once
    assert arch.layers == len(be.decoder_layers())
    assert arch.vocab == be.lm_head().out_features
    assert arch.lora_params == sum(p.numel() for p in add_lora(be, lora).values())
    assert (arch.speech_lora is not None) == bool(kw.get("speech_lora"))
    assert arch.can_mix == be.can_mix(["speech", "text"])


def test_an_adapter_and_a_shipped_stage_plan_as_the_model_they_load(tiny, tmp_path, monkeypatch):
    """Where every command takes an adapter folder or `mini:NAME`, so does the plan: an adapter plans as
    its base (training on it merges it there), and a shipped stage is unpacked before its config is read."""
    import shutil

    import tars.models.mini as mini
    from tars.models.lora import ADAPTER_CONFIG

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / ADAPTER_CONFIG).write_text(json.dumps({"format": "tars-lora", "base_model": "somewhere/else",
                                                      "base_model_path": str(tiny)}))
    assert load_architecture(str(adapter)).params == load_architecture(str(tiny)).params
    unpacked = []

    def fake_shipped_stage(name, keep_custom=False):  # the real unpack is tested in test_stage_pack.py
        unpacked.append(name)
        shutil.copytree(tiny, mini.mini_dir(name), dirs_exist_ok=True)
        return mini.mini_dir(name)

    monkeypatch.setattr(mini, "shipped_stage", fake_shipped_stage)
    assert load_architecture("mini:soft").params == load_architecture(str(tiny)).params and unpacked == ["soft"]


def test_a_calibration_out_that_is_not_a_calibration_file_is_refused(tmp_path):
    from tars.errors import UserError
    from tars.plan.calibrate import calibrate

    with pytest.raises(UserError, match="not a calibration file to add to"):
        calibrate([], tmp_path)  # a folder, as --out is elsewhere
    (tmp_path / "list.json").write_text("[]")
    with pytest.raises(UserError, match="not a calibration file to add to .*a JSON object"):
        calibrate([], tmp_path / "list.json")


def test_a_broken_side_file_of_a_phi4_folder_is_named(tmp_path):
    from tars.errors import UserError

    folder = tiny_phi4_mm(tmp_path / "model", speech_lora=True)
    (folder / "speech-lora" / "adapter_config.json").write_text("{r: 8")
    with pytest.raises(UserError, match="adapter_config.json: not a JSON object"):
        load_architecture(str(folder))


def test_device_names_are_checked_where_they_are_given():
    from tars.errors import UserError
    from tars.models.backend import parse_device

    assert parse_device("cpu", "--device") == torch.device("cpu")
    with pytest.raises(UserError, match="--device: 'gpu' is not a device"):
        parse_device("gpu", "--device")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="config: device: cuda: this machine has no CUDA GPU"):
            parse_device("cuda", "config: device")


def test_published_7b_architectures_count_their_published_sizes():
    sizes = {"Qwen/Qwen2-Audio-7B-Instruct": 8.397, "Qwen/Qwen2.5-Omni-7B": 8.932,
             "microsoft/Phi-4-multimodal-instruct": 5.205}
    for name, billions in sizes.items():
        arch = load_architecture(name)
        assert arch.params / 1e9 == pytest.approx(billions, abs=1e-3), name
    qa = load_architecture("Qwen/Qwen2-Audio-7B-Instruct")
    assert (qa.hidden, qa.layers, qa.kv_heads, qa.head_dim) == (4096, 32, 32, 128)  # Qwen-7B's LLM: MHA
    assert qa.audio_tokens(30.0) == 750
    assert load_architecture("microsoft/Phi-4-multimodal-instruct").audio_tokens(30.0) == 375


def _zero_calibration():
    zero = {"per_layer_token": 0.0, "per_token": 0.0, "per_completion_token": 0.0, "constant": 0.0}
    mode = {"saved": zero, "peak": {k: v for k, v in zero.items() if k != "per_completion_token"}}
    return {"modalities": {"text": {"full": mode, "checkpoint": mode}}, "forward": {"per_token": 0.0, "constant": 0.0},
            "head": {"per_row": 0.0, "constant": 0.0}, "sampling_bytes_per_logit": {"1.0": 24.0, "0.9": 33.0}}


def test_kv_cache_term_by_hand(tiny, tmp_path):
    from tars.config import validate
    from tars.rl.tars import TarsConfig

    cfg = validate(TarsConfig, dict(model=str(tiny), out=str(tmp_path), questions_per_step=2, speech_rollouts=2,
                                    text_rollouts=3, max_new_tokens=10, method="grpo"))
    arch = load_architecture(str(tiny), cfg.lora)
    # 4 layers × 2 KV heads × head dim 16 × keys and values × 4 bytes (float32)
    assert arch.kv_bytes_per_token(4) == 4 * 2 * 16 * 2 * 4 == 1024
    plan = make_plan(cfg, arch, PlanOptions(audio_s=1.0, question_tokens=20), _zero_calibration(),
                     {"fixed_overhead_gib": 0.0})
    # 1 s = 100 mel frames → ((99 // 2 + 1) − 2) // 2 + 1 = 25 audio tokens; + 70 template tokens
    speech, text = 70 + 25, 70 + 20
    assert plan.prompt_tokens["speech"] == speech and plan.prompt_tokens["text"] == text
    kv = next(t for t in plan.terms if t.name.startswith("KV cache"))
    rows = 2 * (2 + 3)  # speech and text rows of both questions, one batch, padded to the longer prompt
    assert kv.bytes == rows * (max(speech, text) + 10) * 1024
    assert kv.phase == "generation"


def test_calibration_predicts_saved_bytes_and_peak_of_a_deeper_model(tiny):
    """Coefficients measured at 2 and 3 blocks predict the 4-block model's saved bytes (within 10 %) and
    peak at another shape, with and without activation checkpointing."""
    from tars.models.loading import load_backend
    from tars.plan import calibrate as cal
    from tars.plan.memory import modality_peak
    from tars.models.lora import LoraSettings, add_lora

    lora = LoraSettings(r=4)
    arch = load_architecture(str(tiny), lora)
    entry = cal.calibrate_architecture(arch, torch.float32, lora, log=lambda s: None, extras=False)
    be = load_backend(tiny)
    torch.manual_seed(0)
    params = list(add_lora(be, lora).values())
    rows, prompt, completion = 3, 90, 40
    for ck in (False, True):
        be.checkpoint_blocks(ck)
        saved, peak = cal.measure_step(be, params, rows, prompt, completion)
        # the LM head's chunk is not part of the decoder-phase fit: compare the decoder phase, head aside
        want_peak, want_saved = modality_peak({**entry, "head": {"constant": 0.0, "per_row": 0.0}}, "text", ck,
                                              arch.layers, rows, prompt + completion, completion)
        assert want_saved == pytest.approx(saved, rel=0.10), (ck, want_saved, saved)
        if not ck:  # with checkpointing the tiny model's head chunk (64 MiB) is the peak: compared below
            assert want_peak == pytest.approx(peak, rel=0.10), (ck, want_peak, peak)


def test_plan_command_on_a_recipe_prints_the_table():
    res = run_cli("plan", "--config", "configs/qwen2_5_omni_7b.yaml")
    assert res.returncode == 0, res.stderr
    out = res.stdout
    for needle in ("weights: 8.93 B parameters", "KV cache", "scoring speech", "generation phase total",
                   "largest micro_batch_questions that fits:", "coefficients:"):
        assert needle in out, (needle, out)
    res = run_cli("plan", "--config", "configs/qwen2_5_omni_7b.yaml", "--json", "--gpu-gb", "40", "questions_per_step=4")
    assert res.returncode == 0, res.stderr
    plan = json.loads(res.stdout)
    assert plan["options"]["gpu_gib"] == 40 and plan["prompt_tokens"]["questions_per_process"] == 4
    assert plan["peak_gib"] == max(plan["phases_gib"].values())


@pytest.mark.parametrize("args,needle", [
    (["bogus=1"], "configs/phi4_mm.yaml: bogus: unknown key"),
    (["lora.r=zero"], "configs/phi4_mm.yaml: lora.r:"),
    (["model=/nowhere/model"], "/nowhere/model: no config.json there"),
    (["--audio-s", "50"], "--audio-s 50: longer than"),
])
def test_bad_input_is_one_line_and_exit_2(args, needle):
    res = run_cli("plan", "--config", "configs/phi4_mm.yaml", *args)
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], res.stderr
    assert "Traceback" not in res.stderr


def test_plan_without_a_calibration_for_the_widths_says_how_to_make_one(tiny, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model: {tiny}\nout: {tmp_path / 'run'}\n")
    res = run_cli("plan", "--config", cfg)
    assert res.returncode == 2
    assert f"run `tars plan --calibrate --config {cfg}`" in res.stderr


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_comments_state_what_the_plan_says(recipe):
    """Each 7B recipe picks a micro-batch the plan says fits an 80 GiB card, and its comment quotes the
    plan's peak, its phase and the largest micro-batch. Checkpointing is on, except where the comment
    says why not (Phi-4: the speech LoRA is off in the recompute, a CheckpointError)."""
    from tars.plan.memory import plan_config

    text = (REPO / recipe).read_text()
    plan, cfg = plan_config(REPO / recipe, [], PlanOptions(gpu_gib=80.0))
    assert cfg.activation_checkpointing or "CheckpointError" in text
    assert plan.fits
    assert plan.max_micro_batch_questions is not None and cfg.micro_batch_questions <= plan.max_micro_batch_questions
    assert f"tars plan --config {recipe}" in text and "80 GiB card" in text
    peak = re.search(r"peak ([\d.]+) GiB \((generation|scoring)\)", text)
    largest = re.search(r"largest\s+#?\s*micro_batch_questions that fits: (\d+)", text)
    assert peak and largest, "the recipe's comment quotes tars plan"
    assert float(peak.group(1)) == pytest.approx(plan.peak / GIB, abs=0.051)
    assert peak.group(2) == plan.peak_phase
    assert int(largest.group(1)) == plan.max_micro_batch_questions
