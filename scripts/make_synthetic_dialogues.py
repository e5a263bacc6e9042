"""Writes keras_dp/assets/synthetic_dialogues.jsonl: SYNTHETIC dialogue → summary pairs.

    python scripts/make_synthetic_dialogues.py

The offline stand-in for a summarisation dataset (DialogSum, SAMSum): short
two-person chats made from templates with a fixed seed, each with a one-line
summary. No real person or conversation is in it. Rerunning gives the same file.
"""

import json
import pathlib
import random

NAMES = [
    "Amara",
    "Ben",
    "Chen",
    "Dana",
    "Elif",
    "Farid",
    "Grace",
    "Hugo",
    "Ines",
    "Jonas",
    "Kemal",
    "Lena",
    "Mateo",
    "Nadia",
    "Omar",
    "Priya",
    "Quinn",
    "Rosa",
    "Sven",
    "Tariq",
    "Uma",
    "Victor",
    "Wen",
    "Yara",
    "Zoe",
]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
TIMES = ["nine", "ten", "eleven", "noon", "two", "three", "four", "six", "seven"]
PLACES = [
    "the library",
    "the cafe",
    "the station",
    "the office",
    "the park",
    "the gym",
    "the market",
    "the clinic",
    "the museum",
    "the bakery",
]
ITEMS = [
    "a laptop",
    "two tickets",
    "a birthday cake",
    "a new phone",
    "paint",
    "a bike",
    "groceries",
    "a winter coat",
    "some books",
    "a lamp",
]
TOPICS = [
    "the budget",
    "the project report",
    "the holiday plan",
    "the new schedule",
    "the team dinner",
    "the rent",
    "the exam",
    "the garden",
]

TEMPLATES = [
    (
        [
            "{a}: Hi {b}, can we meet on {day}?",
            "{b}: Sure. What time works for you?",
            "{a}: How about {time} at {place}?",
            "{b}: Perfect, see you at {place} on {day}.",
        ],
        "{a} and {b} will meet at {place} on {day} at {time}.",
    ),
    (
        [
            "{a}: I am going to buy {item} this weekend.",
            "{b}: Do you need help carrying it?",
            "{a}: Yes please, meet me at {place}.",
            "{b}: Okay, I will be there.",
        ],
        "{b} will help {a} carry {item} from {place}.",
    ),
    (
        [
            "{a}: Did you read the notes about {topic}?",
            "{b}: Not yet, I was busy all {day}.",
            "{a}: Please read them before {time} tomorrow.",
            "{b}: I will, thanks for the reminder.",
        ],
        "{a} asks {b} to read the notes about {topic} before {time} tomorrow.",
    ),
    (
        [
            "{a}: I cannot come to {place} on {day}, sorry.",
            "{b}: No problem. Shall we move it?",
            "{a}: Can we do {time} on the next day?",
            "{b}: That works for me.",
        ],
        "{a} cannot come on {day}; {a} and {b} move the meeting at {place} to {time} the next day.",
    ),
    (
        [
            "{a}: {b}, where did you leave {item}?",
            "{b}: I left it at {place}.",
            "{a}: I will pick it up on {day}.",
            "{b}: Thanks, {a}.",
        ],
        "{b} left {item} at {place}; {a} will pick it up on {day}.",
    ),
    (
        [
            "{a}: We should talk about {topic}.",
            "{b}: Agreed. Are you free on {day}?",
            "{a}: Only after {time}.",
            "{b}: Then let us meet at {place} after {time}.",
        ],
        "{a} and {b} will discuss {topic} at {place} on {day} after {time}.",
    ),
]


def make(count: int = 3000, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    pairs = []
    for _ in range(count):
        lines, summary = rng.choice(TEMPLATES)
        a, b = rng.sample(NAMES, 2)
        slots = {
            "a": a,
            "b": b,
            "day": rng.choice(DAYS),
            "time": rng.choice(TIMES),
            "place": rng.choice(PLACES),
            "item": rng.choice(ITEMS),
            "topic": rng.choice(TOPICS),
        }
        pairs.append(
            {
                "dialogue": "\n".join(line.format(**slots) for line in lines),
                "summary": summary.format(**slots),
            }
        )
    return pairs


def main() -> None:
    out = pathlib.Path(__file__).resolve().parents[1] / "keras_dp" / "assets"
    out.mkdir(exist_ok=True)
    path = out / "synthetic_dialogues.jsonl"
    with path.open("w") as f:
        for pair in make():
            f.write(json.dumps(pair) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
