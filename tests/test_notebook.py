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
