"""A few real architectures through benchmarks/sweep.py's checks (every surgery, each result
checked against what torch / safetensors / transformers read back). The full sweep (79 models
with timm, torchvision and torchaudio) runs on a GPU machine (benchmarks/gpu_session.sh); these
cover the layouts that broke before: MoE experts that transformers >= 5 fuses on load, tied and
thrice-shared embeddings, GPT-2's Conv1D, weight-norm parametrizations, BatchNorm."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import sweep  # noqa: E402


@pytest.mark.parametrize("name", ["Qwen3MoE", "GPT2(Conv1D,tied)", "T5(shared x3)", "Wav2Vec2(weight_norm)",
                                  "ResNet(HF,BN)", "ViT"])
def test_real_architecture_through_every_surgery(name):
    r = sweep.run_case("transformers", name, "cpu", [sys.executable, "-m", "ckptsurgeon"])
    assert "skipped" not in r, r
    bad = {k: v for k, v in r["checks"].items() if not (v.startswith("ok") or v.startswith("n/a"))}
    assert not bad, bad
    assert r["checks"]["verify"].startswith("ok") and r["checks"]["hf-folder"].startswith("ok")
