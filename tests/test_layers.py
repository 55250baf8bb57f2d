"""Layer analysis: the cosine per layer by hand, and `tars analyze layers` on a tiny random model."""

import json

import pytest
import torch

from conftest import needs_espeak, write_jsonl, good_row
from tars.eval.layers import layer_cosines, run_layers
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
    png = (tmp_path / "out" / "layers.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
