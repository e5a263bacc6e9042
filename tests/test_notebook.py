"""The flagship notebook runs top to bottom on the offline default (small settings)."""

import pathlib
import re

import nbformat
from nbclient import NotebookClient

NOTEBOOK = pathlib.Path(__file__).parents[1] / "notebooks" / "gemma_lora_dp_finetuning.ipynb"


def test_gemma_notebook_runs_and_spends_at_most_its_target(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_DP_NOTEBOOK_SMOKE", "1")
    monkeypatch.setenv("KERAS_BACKEND", "jax")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()
    text = "\n".join(
        out.get("text", "")
        for cell in nb.cells
        if cell.cell_type == "code"
        for out in cell.get("outputs", [])
    )
    match = re.search(r"EPSILON_SPENT=([0-9.]+) TARGET=([0-9.]+)", text)
    assert match, text[-2000:]
    spent, target = float(match.group(1)), float(match.group(2))
    assert 0 < spent <= target
    assert "| DP LoRA |" in text and "epsilon:" in text  # ROUGE table; ε in the progress bar
    assert (tmp_path / "gemma_dp_lora_output" / "dp_lora.lora.h5").exists()
    statement = tmp_path / "gemma_dp_lora_output" / "dp_lora.lora.h5.privacy.txt"
    assert "Neighbouring relation" in statement.read_text()
    images = [o for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert images, "the ε/loss plot was not rendered"


def test_the_committed_notebook_reads_cleanly():
    """No machine paths, no TensorFlow/CUDA/absl log lines, one progress line per epoch,
    and the outputs a reader wants (plot, ROUGE table, statement)."""
    nb = nbformat.read(NOTEBOOK, as_version=4)
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    text = "\n".join(o.get("text", "") for o in outputs)
    text += "\n".join("".join(o.get("data", {}).get("text/plain", "")) for o in outputs)
    for needle in ("/root/", "/work/", "/home/", "/tmp/", "site-packages"):
        assert needle not in text, needle
    for log in ("absl::InitializeLog", "oneDNN", "cuda", "I0000", "E0000", "TqdmWarning"):
        assert log not in text, log
    epochs = int(re.search(r"^EPOCHS = (\d+)", nb.cells[1].source, re.M).group(1))
    progress = [line for line in text.splitlines() if "epsilon:" in line]
    assert 1 <= len(progress) <= epochs
    assert any("image/png" in o.get("data", {}) for o in outputs)
    assert "| DP LoRA |" in text and "Differential privacy statement" in text
