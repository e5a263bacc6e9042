"""Writing a comparison's results: JSON, a markdown table and a plot of medians.

Shared by the examples that compare two settings over ε and seeds
(``bandmf_digits.py``, ``bandmf_lora.py``, ``user_level_digits.py``).
"""

import json
import os
import statistics


def spread(values, digits: int = 3) -> str:
    """``median [min, max]`` of ``values``."""
    median, low, high = statistics.median(values), min(values), max(values)
    return f"{median:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"


def save(out: str, rows: list[dict], header: str, lines: list[str]) -> None:
    """``rows`` as ``out.json``, and the markdown table ``header`` + ``lines`` as ``out.md``."""
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out + ".json", "w") as f:
        json.dump(rows, f, indent=1)
    columns = header.count("|") - 1
    table = [header, "|" + "---|" * columns, *lines]
    with open(out + ".md", "w") as f:
        f.write("\n".join(table) + "\n")


def plot(out: str, epsilons: list, series: dict, ylabel: str, title: str) -> None:
    """``out.png``: for each label in ``series`` (a list of per-ε value lists), the median
    with its min–max range against ε (log scale). Skipped without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for label, values in series.items():
        med = [statistics.median(v) for v in values]
        err = [[m - min(v) for m, v in zip(med, values)], [max(v) - m for m, v in zip(med, values)]]
        ax.errorbar(epsilons, med, yerr=err, marker="o", capsize=3, label=label)
    ax.set_xscale("log")
    ax.set_xlabel("ε (δ = 1e-5)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out + ".png", dpi=120)
