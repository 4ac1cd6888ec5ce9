"""Draw ``docs/slide_heatmap.png``: a real slide scored by the shipped pathology model.

Reads what ``python -m service.score slide`` wrote (``metadata.json``, ``heatmap.npy``) and the slide
itself; draws the slide's thumbnail beside the same thumbnail under the tile grid's tumour
probability (unscored tiles, glass, left clear), with the tissue tiles' figures in the title.

    .venv/bin/python -m service.score slide ../shared/data/slides/cmu_small_region.svs --out /tmp/cmu
    .venv/bin/python docs/make_slide_figure.py /tmp/cmu --slide ../shared/data/slides/cmu_small_region.svs \
        [--output docs/slide_heatmap.png]

Prints the figures it draws. Needs numpy, openslide and matplotlib.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def draw(meta: dict, heat: np.ndarray, thumb: np.ndarray, label: str, output: Path) -> dict:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plan, model = meta["plan"], meta["model"]
    k = model["labels"].index(label)
    prob = heat[:, :, k]
    scored = np.isfinite(prob)
    # the grid's extent in thumbnail pixels: tiles of tile_level0_px every stride (level-0 px), from (0, 0)
    scale = meta["tissue"]["thumbnail_scale"]
    step = plan["stride_px"] * plan["level0_px_per_model_px"] / scale
    extent = (0, prob.shape[1] * step, prob.shape[0] * step, 0)
    figures = {"tiles": int(scored.sum()), "grid": list(prob.shape), "label": label,
               "mean": float(np.nanmean(prob)), "above_0.5": int((prob[scored] > 0.5).sum())}
    fig, axes = plt.subplots(1, 2, figsize=(9.0, 6.2))
    for ax in axes:
        ax.imshow(thumb)
        ax.set_xticks([]), ax.set_yticks([])
    axes[0].set_title(f"{meta['slide']['name']} ({plan['slide_mpp']:.3f} µm/px)", fontsize=9)
    shown = axes[1].imshow(np.ma.masked_invalid(prob), cmap="inferno", vmin=0, vmax=1, alpha=0.6,
                           extent=extent, interpolation="nearest")
    axes[1].set_xlim(0, thumb.shape[1]), axes[1].set_ylim(thumb.shape[0], 0)
    axes[1].set_title(f"P({label}) of {figures['tiles']} tissue tiles\n({plan['tile_level0_px']} px at level 0, "
                      f"read at {model['mpp']} µm/px)", fontsize=9)
    fig.colorbar(shown, ax=axes[1], fraction=0.046, pad=0.02, label=f"probability of '{label}'")
    fig.suptitle(f"{model['name']}/{model['version']} on a real H&E slide: {figures['above_0.5']} of "
                 f"{figures['tiles']} tiles above 0.5, mean {figures['mean']:.2f}", fontsize=10)
    fig.tight_layout()
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, dpi=100)
    plt.close(fig)
    return figures


def main(argv: list[str] | None = None) -> None:
    import openslide

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", type=Path, help="a folder written by `python -m service.score slide`")
    parser.add_argument("--slide", type=Path, default=None,
                        help="the slide (default: metadata.json's slide path, relative to the current folder)")
    parser.add_argument("--label", default=None, help="the label drawn (default: the last, e.g. tumor)")
    parser.add_argument("--output", type=Path, default=ROOT / "docs" / "slide_heatmap.png")
    args = parser.parse_args(argv)

    meta = json.loads((args.results / "metadata.json").read_text())
    heat = np.load(args.results / "heatmap.npy")
    label = args.label or meta["model"]["labels"][-1]
    slide_path = args.slide or Path(meta["slide"]["path"])
    if not slide_path.is_file():
        parser.error(f"slide {slide_path} not found: name it with --slide")
    with openslide.OpenSlide(str(slide_path)) as slide:
        w, h = slide.dimensions
        scale = meta["tissue"]["thumbnail_scale"]
        thumb = np.asarray(slide.get_thumbnail((w // scale, h // scale)).convert("RGB"))
    figures = draw(meta, heat, thumb, label, args.output)
    print(json.dumps(figures))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
