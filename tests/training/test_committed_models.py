"""The models committed in models/: each graph matches the checkpoint it was exported from, on
real validation digits, and is equivariant and invariant under quarter turns in ONNX Runtime."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from data_paths import MNIST, require

from training.checkpoint import load_model
from training.data import build_dataset
from training.equivariance import act_on_group_signal, act_on_spatial, relative_error

ROOT = Path(__file__).resolve().parents[2]
MODELS = sorted(p for p in (ROOT / "models").glob("*/*") if (p / "checkpoint_best.pt").is_file())


def test_every_committed_model_ships_its_checkpoint():
    versions = sorted(p for p in (ROOT / "models").glob("*/*") if (p / "model.onnx").is_file())
    assert versions and versions == MODELS


@pytest.fixture(scope="module")
def val_digits():
    mnist = require(MNIST)
    options = {"val_size": 1000, "split_seed": 0, "rotate": True, "rotation_seed": 0}
    val = build_dataset("mnist", mnist, "val", **options)
    x = torch.stack([val[i][0] for i in range(16)])  # 16, 1, 28, 28 in [0, 1]
    return x


@pytest.mark.parametrize("version", MODELS, ids=[f"{p.parent.name}/{p.name}" for p in MODELS])
def test_committed_graph_matches_its_checkpoint_and_card(version, val_digits):
    card = json.loads((version / "card.json").read_text())
    graph = (version / "model.onnx").read_bytes()
    assert hashlib.sha256(graph).hexdigest() == card["sha256"]
    model, ckpt = load_model(version / "checkpoint_best.pt")
    model.eval()
    assert card["metrics"]["best"] == ckpt["best"]  # the card reports the checkpoint it came from
    # The graph takes raw uint8 pixels: quantise the digits the way a client would send them.
    pixels = (val_digits * 255).round().to(torch.uint8)
    with torch.no_grad():
        ref = model.forward_all(pixels.float() / 255)
    session = ort.InferenceSession(graph, providers=["CPUExecutionProvider"])
    image = pixels.permute(0, 2, 3, 1).numpy()  # N, H, W, C
    logits, responses = session.run(["logits", "orientation_responses"], {"image": image})
    assert np.abs(logits - ref["logits"].numpy()).max() <= 1e-4
    assert np.abs(responses - ref["orientation_responses"].numpy()).max() <= 1e-4
    # Grid-exact elements: logits invariant, responses permuted the group's way. Z2 has none but
    # the identity, so its graph is checked under the quarter turns of R4 for invariance only.
    group = model.group
    elements = [e for e in range(group.order) if group.is_grid_exact(e) and e != 0]
    for e in elements:
        turned = act_on_spatial(pixels, group, e, (2, 3)).permute(0, 2, 3, 1).contiguous().numpy()
        logits_e, responses_e = session.run(["logits", "orientation_responses"], {"image": turned})
        expected = act_on_group_signal(torch.from_numpy(responses), group, e, None, 2)
        assert relative_error(torch.from_numpy(logits_e), torch.from_numpy(logits)) <= 1e-5
        assert relative_error(torch.from_numpy(responses_e), expected) <= 1e-5
    if group.order == 1:
        turned = np.ascontiguousarray(np.rot90(image, 1, axes=(1, 2)))
        changed = session.run(["logits"], {"image": turned})[0]
        assert np.abs(changed - logits).max() > 1e-2  # a plain net is not invariant: the check has power
