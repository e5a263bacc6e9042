"""Writes notebooks/gemma_lora_dp_finetuning.ipynb from the cells below.

    python scripts/build_notebook.py [--execute]

With --execute the notebook is run (offline default, full settings) and saved with
its outputs; the README's ROUGE table comes from that run.
"""

import pathlib
import re
import site
import sys

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

CELLS = [
    (
        "md",
        """# LoRA fine-tuning of Gemma with differential privacy (keras_dp)

Summarise dialogues with a Gemma3 causal LM, fine-tuned with LoRA under DP-SGD to a
target ε. The privacy unit is one training example (one dialogue/summary pair); the
ε covers this fine-tuning run only (not the pretraining data or the tokenizer).

* **Offline default** (`PRESET = None`): a tiny Gemma3 built from config, with a
  SentencePiece tokenizer trained at run time and a few epochs of non-private language
  pretraining on the *public* split's dialogues (no summaries), then DP LoRA on the
  *train* split of the **synthetic** dialogue corpus shipped in `keras_dp/assets`
  (template-made; no real people). Its ROUGE numbers show the pipeline works end to
  end; they say nothing about Gemma.
* **Real run**: set `PRESET = "gemma3_instruct_1b"` (needs Kaggle/Hugging Face access) and,
  optionally, `TFDS_DATASET` to a tensorflow-datasets summarisation set whose examples
  have `dialogue` and `summary` features.""",
    ),
    (
        "code",
        """# Parameters (papermill-style: this is the only cell to edit).
import os

PRESET = None  # e.g. "gemma3_instruct_1b"; None builds the offline tiny Gemma3
TFDS_DATASET = None  # e.g. a tfds dataset with "dialogue"/"summary"; None: synthetic
TARGET_EPSILON = 4.0
EPOCHS = 2
BATCH_SIZE = 32
TRAIN_EXAMPLES = 2000
EVAL_EXAMPLES = 40
SEQUENCE_LENGTH = 128
LORA_RANK = 4
LEARNING_RATE = 5e-3
CLIP_NORM = 1.0  # clips no LoRA gradient offline; README "Results" compares 0.25 and 0.5
PRETRAIN_EPOCHS = 3  # offline only: the tiny model's stand-in for pretraining
OUTPUT_DIR = "gemma_dp_lora_output"

if os.environ.get("KERAS_DP_NOTEBOOK_SMOKE"):  # CI: the same notebook, smaller
    TRAIN_EXAMPLES, EVAL_EXAMPLES, EPOCHS, SEQUENCE_LENGTH, BATCH_SIZE = 256, 6, 1, 96, 16
    PRETRAIN_EPOCHS = 1""",
    ),
    (
        "code",
        """os.environ.setdefault("KERAS_BACKEND", "jax")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # keras-hub imports TensorFlow: quiet it
import math
import warnings

warnings.filterwarnings("ignore", message=".*shuffle=True.*")  # keras-hub's tf.data path
warnings.filterwarnings("ignore", message=".*IProgress not found.*")

import keras
import keras_hub
import matplotlib.pyplot as plt
import numpy as np

import keras_dp
from keras_dp import offline""",
    ),
    ("md", "## 1. Data: dialogue → summary pairs in the `{prompts, responses}` form"),
    (
        "code",
        """def load_pairs():
    if TFDS_DATASET is not None:  # the real path (needs the dataset downloaded)
        import tensorflow_datasets as tfds

        rows = tfds.as_numpy(tfds.load(TFDS_DATASET, split="train"))
        return [{"dialogue": r["dialogue"].decode(), "summary": r["summary"].decode()}
                for r in rows]
    return offline.synthetic_dialogues()


pairs = load_pairs()
if TFDS_DATASET is not None:
    train_pairs, eval_pairs = pairs[:TRAIN_EXAMPLES], pairs[-EVAL_EXAMPLES:]
else:  # the synthetic corpus has fixed train / eval / public splits
    train_pairs = pairs[offline.TRAIN][:TRAIN_EXAMPLES]
    eval_pairs = pairs[offline.EVAL][:EVAL_EXAMPLES]
train = offline.as_prompts_and_responses(train_pairs)
held_out = offline.as_prompts_and_responses(eval_pairs)
print(f"{len(train_pairs)} training pairs, {len(eval_pairs)} held out")
print(train["prompts"][0] + train["responses"][0])""",
    ),
    ("md", "## 2–3. Model and LoRA"),
    (
        "code",
        """def lora_model():
    # PRESET=None: the offline tiny Gemma3; else Gemma3CausalLM.from_preset(PRESET).
    lm = offline.gemma3_causal_lm(PRESET, SEQUENCE_LENGTH, pretrain_epochs=PRETRAIN_EPOCHS)
    lm.backbone.enable_lora(rank=LORA_RANK)
    return lm


def compile_lm(lm):
    lm.compile(
        optimizer=keras.optimizers.Adam(LEARNING_RATE),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        weighted_metrics=[keras.metrics.SparseCategoricalAccuracy()],
    )
    return lm


lm = lora_model()
trainable = sum(math.prod(v.shape) for v in lm.trainable_weights)
total = sum(math.prod(v.shape) for v in lm.weights)
print(f"trainable (LoRA) parameters: {trainable:,} of {total:,} ({trainable / total:.2%})")""",
    ),
    ("md", "## 4. DP fine-tuning: `DPConfig` → `make_private` → `fit` (ε in the progress bar)"),
    (
        "code",
        """config = keras_dp.DPConfig(
    target_epsilon=TARGET_EPSILON, batch_size=BATCH_SIZE, epochs=EPOCHS, l2_clip_norm=CLIP_NORM
)
dp_lm = compile_lm(keras_dp.make_private(lm, config))
history = dp_lm.fit(
    train, validation_data=held_out, callbacks=[keras_dp.callbacks.PrivacyBudget()], verbose=2
)
print(dp_lm.privacy_spent())""",
    ),
    ("md", "## 5. ε spent per step, and the losses"),
    (
        "code",
        """steps = dp_lm.dp_steps
marks = sorted({max(1, round(steps * f / 10)) for f in range(1, 11)})
eps_curve = [dp_lm.dp_config.epsilon(k) for k in marks]
fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.5))
left.plot(marks, eps_curve, "o-")
left.axhline(TARGET_EPSILON, color="gray", linestyle="--", label="target ε")
left.set(xlabel="optimizer updates", ylabel=f"ε (δ = {dp_lm.dp_config.delta:.0e})",
         title="privacy spent")
left.legend()
epochs_axis = range(1, len(history.history["loss"]) + 1)
right.plot(epochs_axis, history.history["loss"], "o-", label="training loss")
right.plot(epochs_axis, history.history["val_loss"], "o-", label="validation loss")
right.set(xlabel="epoch", title="loss (DP LoRA)")
right.legend()
plt.tight_layout()
plt.show()""",
    ),
    (
        "md",
        """## 6. Summaries before and after fine-tuning, with ROUGE

Three models on the same held-out dialogues: no fine-tuning, non-private LoRA, DP LoRA.""",
    ),
    (
        "code",
        """rouge = {
    "ROUGE-1": keras_hub.metrics.RougeN(order=1),
    "ROUGE-2": keras_hub.metrics.RougeN(order=2),
    "ROUGE-L": keras_hub.metrics.RougeL(),
}


def summaries(model):
    outputs = model.generate(held_out["prompts"], max_length=SEQUENCE_LENGTH)
    return [out.split("<start_of_turn>model")[-1].split("<end_of_turn>")[0].strip()
            for out in outputs]


def rouge_f1(predicted):
    references = [p["summary"] for p in eval_pairs]
    scores = {}
    for name, metric in rouge.items():
        metric.reset_state()
        metric.update_state(references, predicted)
        scores[name] = float(metric.result()["f1_score"])
    return scores


base = compile_lm(lora_model())  # LoRA at init is the base model (lora_kernel_b = 0)
plain = compile_lm(lora_model())
plain.fit(train, batch_size=BATCH_SIZE, epochs=EPOCHS, verbose=0)
outputs = {name: summaries(m) for name, m in
           [("no fine-tuning", base), ("non-private LoRA", plain), ("DP LoRA", dp_lm)]}
table = {name: rouge_f1(out) for name, out in outputs.items()}
print("| model | ROUGE-1 | ROUGE-2 | ROUGE-L |")
print("|---|---|---|---|")
for name, scores in table.items():
    print(f"| {name} | " + " | ".join(f"{scores[k]:.3f}" for k in rouge) + " |")
print("\\ndialogue:", eval_pairs[0]["dialogue"])
print("reference:", eval_pairs[0]["summary"])
for name, out in outputs.items():
    print(f"{name}:", out[0])""",
    ),
    ("md", "## 7. The privacy statement, and the LoRA adapter saved beside it"),
    (
        "code",
        """statement = keras_dp.privacy_statement(dp_lm)
print(statement)
os.makedirs(OUTPUT_DIR, exist_ok=True)
adapter_path = os.path.join(OUTPUT_DIR, "dp_lora.lora.h5")
keras_dp.save_lora_weights(dp_lm, adapter_path)  # writes dp_lora.lora.h5.privacy.txt beside it
print("saved", sorted(os.listdir(OUTPUT_DIR)))
EPSILON_SPENT = dp_lm.privacy_spent().epsilon
print(f"EPSILON_SPENT={EPSILON_SPENT:.6f} TARGET={TARGET_EPSILON}")""",
    ),
]


# Lines a reader does not need: TensorFlow/XLA/absl start-up logs and machine paths.
LOG_LINE = re.compile(
    r"^(WARNING: All log messages before absl|[IWE]\d{4} |.*oneDNN|.*cuda|.*TqdmWarning"
    r"|\s*from \.autonotebook import)"
)


def clean_outputs(nb) -> None:
    """Drops log lines from stream outputs and replaces machine-specific paths."""
    prefixes = sorted({sys.prefix, site.getsitepackages()[0], str(pathlib.Path.home())}, key=len)
    root = str(pathlib.Path(__file__).resolve().parents[1])
    for cell in nb.cells:
        kept = []
        for out in cell.get("outputs", []):
            if out.get("output_type") == "stream":
                lines = [ln for ln in out["text"].splitlines() if not LOG_LINE.match(ln)]
                text = "\n".join(lines)
                for prefix in [root, *reversed(prefixes)]:
                    text = text.replace(prefix, "…")
                if not text.strip():
                    continue
                out["text"] = text + "\n"
            kept.append(out)
        if cell.cell_type == "code":
            cell["outputs"] = kept


def main() -> None:
    cells = [new_markdown_cell(src) if kind == "md" else new_code_cell(src) for kind, src in CELLS]
    cells[1].metadata["tags"] = ["parameters"]
    nb = new_notebook(
        cells=cells,
        metadata={
            "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
        },
    )
    path = (
        pathlib.Path(__file__).resolve().parents[1] / "notebooks" / "gemma_lora_dp_finetuning.ipynb"
    )
    if "--execute" in sys.argv:
        from nbclient import NotebookClient

        out_dir = path.parent / "outputs"
        out_dir.mkdir(exist_ok=True)
        NotebookClient(nb, timeout=3600, resources={"metadata": {"path": str(out_dir)}}).execute()
        clean_outputs(nb)
    nbformat.write(nb, path)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
