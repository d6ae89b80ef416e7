"""A generated sentiment task: template reviews whose test adjectives training never shows."""

from __future__ import annotations

import random

TEMPLATES = (
    "The {noun} was {adj}.",
    "I found the {noun} {adj}.",
    "Honestly, the {noun} is {adj}.",
    "What a {adj} {noun}!",
    "Our {noun} turned out {adj}.",
    "Everyone said the {noun} felt {adj}.",
    "This {noun} seemed {adj} to me.",
    "In the end the {noun} was simply {adj}.",
)
NEGATED = (
    "The {noun} was not {adj}.",
    "I would not call the {noun} {adj}.",
    "Nobody thought the {noun} was {adj}.",
)
NOUNS = (
    "movie",
    "meal",
    "hotel",
    "book",
    "concert",
    "service",
    "phone",
    "trip",
    "game",
    "lecture",
    "apartment",
    "coffee",
)
POSITIVE = (
    "wonderful",
    "excellent",
    "delightful",
    "fantastic",
    "superb",
    "brilliant",
    "lovely",
    "great",
    "amazing",
    "charming",
    "pleasant",
    "outstanding",
    "marvelous",
    "enjoyable",
    "splendid",
    "terrific",
    "impressive",
    "beautiful",
    "fabulous",
    "perfect",
)
NEGATIVE = (
    "terrible",
    "awful",
    "dreadful",
    "horrible",
    "disappointing",
    "boring",
    "poor",
    "bad",
    "mediocre",
    "unpleasant",
    "miserable",
    "dull",
    "lousy",
    "annoying",
    "frustrating",
    "pathetic",
    "disgusting",
    "tedious",
    "useless",
    "painful",
)


def make_sentiment(
    n_train: int = 512, n_test: int = 256, seed: int = 0
) -> tuple[list[str], list[int], list[str], list[int]]:
    """``(train_texts, train_labels, test_texts, test_labels)``, labels 1 positive, 0 negative.

    Sentences come from templates, nouns and adjectives, a third of them negated (which flips
    the label); the last quarter of each adjective list appears only in the test set, so
    scoring well needs what the pretrained model knows about words it was not fine-tuned on.
    Generated, so it ships with the code (no download).
    """
    rng = random.Random(seed)
    cut_p, cut_n = len(POSITIVE) * 3 // 4, len(NEGATIVE) * 3 // 4

    def draw(n: int, positive: tuple[str, ...], negative: tuple[str, ...]):
        texts, labels = [], []
        for _ in range(n):
            praise, negated = rng.random() < 0.5, rng.random() < 1 / 3
            adj = rng.choice(positive if praise else negative)
            template = rng.choice(NEGATED if negated else TEMPLATES)
            texts.append(template.format(noun=rng.choice(NOUNS), adj=adj))
            labels.append(int(praise != negated))
        return texts, labels

    train = draw(n_train, POSITIVE[:cut_p], NEGATIVE[:cut_n])
    test = draw(n_test, POSITIVE[cut_p:], NEGATIVE[cut_n:])
    return train[0], train[1], test[0], test[1]
