"""Plot validation accuracy per epoch from training runs' ``metrics.jsonl`` logs.

    python -m training.plot --run Z2=models/rotmnist-z2/2/metrics.jsonl \
        --run R4=models/rotmnist-r4/2/metrics.jsonl --output docs/rotmnist_val_acc.png
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

__all__ = ["read_metrics", "plot_runs", "main"]


def read_metrics(path: str | Path) -> list[dict]:
    """The epoch records of a metrics log, in order; a clear ValueError for a malformed line."""
    path = Path(path)
    records = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{number}: not JSON ({exc.msg})") from None
        if not isinstance(record, dict) or "epoch" not in record or "val_acc" not in record:
            raise ValueError(f"{path}:{number}: expected an object with 'epoch' and 'val_acc'")
        records.append(record)
    if not records:
        raise ValueError(f"{path}: no epoch records")
    return records


def plot_runs(runs: dict[str, Sequence[dict]], output: str | Path, title: str = "") -> Path:
    """One line of validation accuracy (%) per run against the epoch; written as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=120)
    for label, records in runs.items():
        epochs = [r["epoch"] for r in records]
        acc = [100.0 * r["val_acc"] for r in records]
        best = max(acc)
        ax.plot(epochs, acc, marker="o", markersize=3, label=f"{label} (best {best:.1f}%)")
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, format="png")
    plt.close(fig)
    return output


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.plot", description=__doc__.splitlines()[0])
    parser.add_argument("--run", action="append", required=True, metavar="LABEL=METRICS_JSONL",
                        help="a run to plot (repeatable)")
    parser.add_argument("--output", type=Path, required=True, help="PNG to write")
    parser.add_argument("--title", default="")
    args = parser.parse_args(argv)
    runs = {}
    try:
        for item in args.run:
            label, sep, path = item.partition("=")
            if not sep or not label or not path:
                raise ValueError(f"--run {item}: expected LABEL=PATH")
            runs[label] = read_metrics(path)
        print(plot_runs(runs, args.output, args.title))
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
