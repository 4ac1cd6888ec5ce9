"""Draw ``docs/orientation_responses.png``: what the orientation responses of an R4 model mean.

A real MNIST digit, turned by 0, 90, 180 and 270 degrees, goes through a committed ONNX graph in
ONNX Runtime (no torch); under each turn are the responses of the predicted class, one bar per group
element. The label and its probability stay the same, and the bars move one element on per quarter
turn: the net is invariant in its answer and equivariant in its responses.

    python docs/make_figures.py [--data $GSA_TEST_DATA/mnist/mnist-train-10k.npz] \
        [--model models/rotmnist-r4/4] [--digit 2] [--output docs/orientation_responses.png]

Prints the responses it plots. Needs numpy, onnxruntime and matplotlib.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from data_paths import MNIST, data_path  # noqa: E402  (the one data setting, GSA_TEST_DATA)


def responses(model_dir: Path, digit: np.ndarray) -> tuple[dict, np.ndarray, np.ndarray, np.ndarray]:
    """The card, and for the digit turned counter-clockwise by 0..3 quarter turns: the predicted class
    indices [4], their probabilities [4] and the orientation responses [4, K, G]."""
    import onnxruntime as ort

    card = json.loads((model_dir / "card.json").read_text())
    session = ort.InferenceSession(str(model_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    turned = np.stack([np.rot90(digit, k) for k in range(4)])[..., None]  # 4, 28, 28, 1 uint8
    logits, probs, resp = session.run(["logits", "probabilities", "orientation_responses"], {"image": turned})
    top = logits.argmax(1)
    return card, top, probs[np.arange(4), top], resp


def draw(card: dict, digit: np.ndarray, top: np.ndarray, prob: np.ndarray, resp: np.ndarray, output: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    angles = [f"{e['angle']:g}°" + (" m" if e["reflection"] else "") for e in card["group"]["elements"]]
    labels = card["labels"]
    cls = int(top[0])
    lo, hi = float(resp[:, cls].min()), float(resp[:, cls].max())
    fig, axes = plt.subplots(2, 4, figsize=(8.0, 4.2), gridspec_kw={"height_ratios": [1, 1.1]})
    for k in range(4):
        ax = axes[0, k]
        ax.imshow(np.rot90(digit, k), cmap="gray_r", vmin=0, vmax=255)
        ax.set_xticks([]), ax.set_yticks([])
        ax.set_title(f"input turned {90 * k}°\n\"{labels[top[k]]}\", p = {prob[k]:.3f}", fontsize=9)
        ax = axes[1, k]
        r = resp[k, cls]
        colors = ["#c62828" if i == int(r.argmax()) else "#90a4ae" for i in range(len(r))]
        ax.bar(range(len(r)), r, color=colors)
        ax.axhline(0, color="black", linewidth=0.6)
        ax.set_xticks(range(len(r)), angles, fontsize=8)
        ax.set_ylim(min(0.0, lo) * 1.15, hi * 1.15)
        ax.tick_params(axis="y", labelsize=8)
        if k == 0:
            ax.set_ylabel(f"response of class \"{labels[cls]}\"", fontsize=9)
        ax.set_xlabel("group element", fontsize=8)
    fig.suptitle(f"{card['name']}/{card['version']} ({card['group']['name']}): same answer, "
                 "responses move one element per quarter turn", fontsize=10)
    fig.tight_layout()
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=data_path(MNIST), help="MNIST .npz (images uint8 [N, 28, 28], labels)")
    parser.add_argument("--model", type=Path, default=ROOT / "models" / "rotmnist-r4" / "4", help="a model version folder")
    parser.add_argument("--digit", type=int, default=2, help="draw the first digit of this class in the file")
    parser.add_argument("--output", type=Path, default=ROOT / "docs" / "orientation_responses.png")
    args = parser.parse_args(argv)

    data = np.load(args.data)
    index = int(np.flatnonzero(data["labels"] == args.digit)[0])
    digit = data["images"][index]
    card, top, prob, resp = responses(args.model, digit)
    cls = int(top[0])
    print(f"{args.data.name} digit #{index} (label {args.digit}), {card['name']}/{card['version']}, "
          f"responses of class {card['labels'][cls]!r}")
    for k in range(4):
        cells = "  ".join(f"{v:7.2f}" for v in resp[k, cls])
        print(f"  turned {90 * k:3d}: predicted {card['labels'][top[k]]!r} p={prob[k]:.4f}  responses {cells}")
    draw(card, digit, top, prob, resp, args.output)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
