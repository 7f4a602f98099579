"""A deterministic English corpus for the embedded default model, generated from a small grammar (no downloads):
short stories about animals and children, counting sentences and chat turns."""

from __future__ import annotations

import random

NAMES = ["Anna", "Ben", "Clara", "David", "Emma", "Finn", "Grace", "Henry", "Ivy", "Jack", "Lily", "Max"]
ANIMALS = ["cat", "dog", "bird", "fox", "rabbit", "horse", "duck", "mouse", "bear", "frog"]
PLACES = ["the park", "the garden", "the forest", "the river", "the beach", "the farm", "the hill", "the town"]
TIMES = ["One morning", "One day", "In the evening", "On a sunny day", "Once upon a time", "Last summer"]
ADJ = ["little", "big", "happy", "small", "brave", "old", "young", "quiet", "kind", "clever"]
COLORS = ["red", "blue", "green", "yellow", "brown", "white", "black", "orange"]
THINGS = ["ball", "apple", "book", "kite", "hat", "box", "stick", "flower", "cake", "boat"]
VERBS_PAST = ["found", "saw", "liked", "carried", "painted", "shared", "lost", "made", "wanted", "held"]
FEELINGS = ["happy", "sad", "tired", "excited", "surprised", "hungry", "sleepy", "proud"]
NUMBERS = ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]


def story(r: random.Random) -> str:
    name, animal, place = r.choice(NAMES), r.choice(ANIMALS), r.choice(PLACES)
    thing, color, adj = r.choice(THINGS), r.choice(COLORS), r.choice(ADJ)
    feeling, verb = r.choice(FEELINGS), r.choice(VERBS_PAST)
    friend = r.choice([n for n in NAMES if n != name])
    lines = [
        f"{r.choice(TIMES)}, {name} went to {place} with a {adj} {animal}.",
        f"The {animal} {verb} a {color} {thing}.",
        f"{name} was very {feeling}.",
        f"Then {friend} came to {place} and said hello.",
        f"{name} and {friend} played with the {color} {thing} all day.",
        f"At night the {animal} went to sleep, and {name} went home.",
    ]
    return " ".join(lines[: r.randint(3, 6)])


def counting(r: random.Random) -> str:
    k = r.randint(2, 9)
    thing = r.choice(THINGS)
    return f"{NAMES[k % len(NAMES)]} counted: " + ", ".join(NUMBERS[:k]) + f". There were {NUMBERS[k - 1]} {thing}s."


def chat(r: random.Random) -> str:
    animal, color, thing, name = r.choice(ANIMALS), r.choice(COLORS), r.choice(THINGS), r.choice(NAMES)
    qa = r.choice([
        (f"What color is the {thing}?", f"The {thing} is {color}."),
        (f"Where is the {animal}?", f"The {animal} is in {r.choice(PLACES)}."),
        (f"Who has the {thing}?", f"{name} has the {thing}."),
        ("Tell me a story.", story(r)),
    ])
    return f"<|im_start|>user\n{qa[0]}<|im_end|>\n<|im_start|>assistant\n{qa[1]}<|im_end|>"


def corpus(n: int = 20000, seed: int = 0) -> list[str]:
    r = random.Random(seed)
    makers = [story] * 6 + [counting] * 2 + [chat] * 2
    return [r.choice(makers)(r) for _ in range(n)]


if __name__ == "__main__":
    docs = corpus()
    print(len(docs), sum(map(len, docs)), "characters")
    print("\n".join(docs[:5]))
