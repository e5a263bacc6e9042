"""The clip norm C on the notebook's DP LoRA fine-tuning: held-out loss and ROUGE.

The offline tiny Gemma3 of the notebook and quickstart (pretrained on the public split),
LoRA rank 4, the 2,000 synthetic training dialogues, ε = 4, batch 32, 2 epochs, Adam
5e-3; only ``l2_clip_norm`` changes. Prints, for each C, the per-example gradient norms
of the starting model on the PUBLIC split (what C can be chosen from without spending
privacy), then per seed the held-out loss (pairs 0-199 of the eval split) and the
ROUGE-1/ROUGE-L F1 of greedy summaries of pairs 0-39 (the notebook's table).

Each run draws a secret DP seed (a fixed one would make the noise removable); ``--seeds``
fixes the LoRA initialisation only, so reruns differ within the ranges shown.

    python examples/clip_norm_lora.py [--clip-norms 1 0.5 0.25] [--seeds 3]
        [--out benchmarks/results/clip_norm_lora]
"""

import argparse
import math
import os

os.environ.setdefault("KERAS_BACKEND", "jax")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import _report  # noqa: E402  (examples/_report.py)
import jax  # noqa: E402
import keras  # noqa: E402
import keras_hub  # noqa: E402
import numpy as np  # noqa: E402

import keras_dp  # noqa: E402
from keras_dp import offline  # noqa: E402

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def lora_lm():
    lm = offline.gemma3_causal_lm(None, 128)
    lm.backbone.enable_lora(rank=4)
    return lm


def public_norms(count: int = 64) -> np.ndarray:
    """Per-example gradient norms of the starting LoRA model on PUBLIC pairs."""
    lm = lora_lm()
    public = offline.as_prompts_and_responses(offline.synthetic_dialogues()[offline.PUBLIC])
    x, y, sw = lm.preprocessor({k: v[:count] for k, v in public.items()})
    trainable = [v.value for v in lm.trainable_variables]
    frozen = [v.value for v in lm.non_trainable_variables]

    def loss(params, xi, yi, wi):
        pred, _ = lm.stateless_call(params, frozen, xi, training=True)
        return LOSS(yi, pred, sample_weight=wi)

    grad = jax.jit(jax.grad(loss))
    norms = []
    for i in range(count):
        row = jax.tree.map(lambda a, i=i: a[i : i + 1], (x, y, sw))
        g = grad(trainable, *row)
        norms.append(math.sqrt(sum(float(np.sum(np.square(a))) for a in g)))
    return np.array(norms)


def run(clip: float, seed: int) -> dict:
    pairs = offline.synthetic_dialogues()
    train = offline.as_prompts_and_responses(pairs[offline.TRAIN])
    held = pairs[offline.EVAL]
    keras.utils.set_random_seed(seed)  # LoRA initialisation only; the DP seed stays secret
    config = keras_dp.DPConfig(target_epsilon=4.0, batch_size=32, epochs=2, l2_clip_norm=clip)
    lm = keras_dp.make_private(lora_lm(), config)
    lm.compile(optimizer=keras.optimizers.Adam(5e-3), loss=LOSS)
    history = lm.fit(train, verbose=0)
    held_out = offline.as_prompts_and_responses(held[:200])
    loss = lm.evaluate(held_out, verbose=0, return_dict=True)["loss"]
    prompts = offline.as_prompts_and_responses(held[:40])["prompts"]
    outputs = lm.generate(prompts, max_length=128)
    summaries = [
        o.split("<start_of_turn>model")[-1].split("<end_of_turn>")[0].strip() for o in outputs
    ]
    references = [p["summary"] for p in held[:40]]
    scores = {}
    for name, metric in (
        ("rouge1", keras_hub.metrics.RougeN(1)),
        ("rougeL", keras_hub.metrics.RougeL()),
    ):
        metric.update_state(references, summaries)
        scores[name] = float(metric.result()["f1_score"])
    clipped = float(history.history["clipped_fraction"][-1])
    return {"clip": clip, "seed": seed, "loss": float(loss), "clipped": clipped, **scores}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clip-norms", type=float, nargs="+", default=[1.0, 0.5, 0.25])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    norms = public_norms()
    low, mid, high = np.percentile(norms, [10, 50, 90])
    print(f"public per-example gradient norms: 10% {low:.3f}, median {mid:.3f}, 90% {high:.3f}")
    rows = []
    for clip in args.clip_norms:
        for seed in range(1, args.seeds + 1):
            rows.append(run(clip, seed))
            print(rows[-1], flush=True)
    lines = []
    for clip in args.clip_norms:
        mine = [r for r in rows if r["clip"] == clip]
        cells = [_report.spread([r[k] for r in mine], 3) for k in ("loss", "rouge1", "rougeL")]
        clipped = _report.spread([r["clipped"] for r in mine], 2)
        lines.append(f"| {clip:g} | {clipped} | " + " | ".join(cells) + " |")
    header = "| C | clipped fraction (last epoch) | held-out loss | ROUGE-1 | ROUGE-L |"
    print("\n".join([header, "|---|---|---|---|---|", *lines]))
    if args.out:
        _report.save(args.out, rows, header, lines)


if __name__ == "__main__":
    main()
