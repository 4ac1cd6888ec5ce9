"""The models committed in models/: each graph matches the checkpoint it was exported from, on
real validation images (RotMNIST digits; for the RGB pathology models the PCam patches committed
in tests/data/pcam-valid-sample), and is equivariant and invariant under every grid-exact element
of its group in ONNX Runtime (quarter turns, and for R4M also the mirrors: all of D4)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from data_paths import MNIST, require
from PIL import Image

from training.checkpoint import load_model
from training.data import build_dataset
from training.equivariance import act_on_group_signal, act_on_spatial, relative_error

ROOT = Path(__file__).resolve().parents[2]
MODELS = sorted(p for p in (ROOT / "models").glob("*/*") if (p / "checkpoint_best.pt").is_file())
PCAM_SAMPLE = ROOT / "tests" / "data" / "pcam-valid-sample"


def test_every_committed_model_ships_its_checkpoint():
    versions = sorted(p for p in (ROOT / "models").glob("*/*") if (p / "model.onnx").is_file())
    assert versions and versions == MODELS


@pytest.fixture(scope="module")
def val_digits():
    mnist = require(MNIST)
    options = {"val_size": 1000, "split_seed": 0, "rotate": True, "rotation_seed": 0}
    val = build_dataset("mnist", mnist, "val", **options)
    x = torch.stack([val[i][0] for i in range(16)])  # 16, 1, 28, 28 in [0, 1]
    return (x * 255).round().to(torch.uint8)  # raw pixels, quantised the way a client sends them


def pcam_patches() -> torch.Tensor:
    """The 32 committed PCam validation patches as uint8 ``[N, 3, 96, 96]``."""
    files = sorted(PCAM_SAMPLE.glob("[01]/*.jpg"))
    assert len(files) == 32
    return torch.from_numpy(np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files])).permute(0, 3, 1, 2)


@pytest.mark.parametrize("version", MODELS, ids=[f"{p.parent.name}/{p.name}" for p in MODELS])
def test_committed_graph_matches_its_checkpoint_and_card(version, request):
    card = json.loads((version / "card.json").read_text())
    graph = (version / "model.onnx").read_bytes()
    assert hashlib.sha256(graph).hexdigest() == card["sha256"]
    model, ckpt = load_model(version / "checkpoint_best.pt")
    model.eval()
    assert card["metrics"]["best"] == ckpt["best"]  # the card reports the checkpoint it came from
    channels = card["input"]["channels"]
    pixels = request.getfixturevalue("val_digits") if channels == 1 else pcam_patches()
    with torch.no_grad():
        ref = model.forward_all(pixels.float() / 255)
    session = ort.InferenceSession(graph, providers=["CPUExecutionProvider"])
    image = pixels.permute(0, 2, 3, 1).numpy()  # N, H, W, C
    logits, responses, probs = session.run(["logits", "orientation_responses", "probabilities"], {"image": image})
    assert np.abs(logits - ref["logits"].numpy()).max() <= 1e-4
    assert np.abs(responses - ref["orientation_responses"].numpy()).max() <= 1e-4
    # Grid-exact elements: logits invariant, responses permuted the group's way. Z2 has none but
    # the identity, so its graph is checked under the quarter turns of R4 for invariance only.
    group = model.group
    elements = [e for e in range(group.order) if group.is_grid_exact(e) and e != 0]
    for e in elements:
        turned = act_on_spatial(pixels, group, e, (2, 3)).permute(0, 2, 3, 1).contiguous().numpy()
        logits_e, responses_e, probs_e = session.run(["logits", "orientation_responses", "probabilities"],
                                                     {"image": turned})
        expected = act_on_group_signal(torch.from_numpy(responses), group, e, None, 2)
        assert relative_error(torch.from_numpy(logits_e), torch.from_numpy(logits)) <= 1e-5
        assert relative_error(torch.from_numpy(responses_e), expected) <= 1e-5
        assert np.abs(probs_e - probs).max() <= 1e-5, f"element {e}"
        assert (probs_e.argmax(-1) == probs.argmax(-1)).all(), f"element {e}"
    if group.name == "R4M":
        assert len(elements) == 7  # all of D4 checked: three turns, four mirrors
    if group.order == 1:
        turned = np.ascontiguousarray(np.rot90(image, 1, axes=(1, 2)))
        changed = session.run(["logits"], {"image": turned})[0]
        assert np.abs(changed - logits).max() > 1e-2  # a plain net is not invariant: the check has power
