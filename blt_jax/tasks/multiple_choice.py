"""Multiple choice by likelihood: each choice is scored as a continuation of the item's context (total log2
probability of its bytes, and the same per byte); the best-scoring choice is the prediction.

Offline item builders: the next line of held-out stdlib files against lines from elsewhere, and picking the
right translation of a gettext catalog string among four."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from blt_jax.tasks.scoring import continuation_logprob


@dataclass(frozen=True)
class MCItem:
    context: bytes
    choices: tuple[bytes, ...]
    answer: int

    def __post_init__(self):
        if len(self.choices) < 2:
            raise ValueError(f"a multiple-choice item needs at least 2 choices, got {len(self.choices)}")
        if not 0 <= self.answer < len(self.choices):
            raise ValueError(f"answer index {self.answer} is out of range for {len(self.choices)} choices")
        if any(not c for c in self.choices):
            raise ValueError("a choice is empty; every choice needs at least one byte to score")


def _b(x: bytes | str) -> bytes:
    return x.encode("utf-8") if isinstance(x, str) else bytes(x)


def make_item(context: bytes | str, choices: Sequence[bytes | str], answer: int) -> MCItem:
    return MCItem(_b(context), tuple(_b(c) for c in choices), int(answer))


def choice_scores(model, items: Sequence[MCItem], batch_size: int = 8) -> list[np.ndarray]:
    """Total log2 p(choice | BOS + context) of every choice of every item."""
    pairs = [(it.context, c) for it in items for c in it.choices]
    flat = continuation_logprob(model, pairs, batch_size=batch_size)
    out, k = [], 0
    for it in items:
        out.append(flat[k:k + len(it.choices)])
        k += len(it.choices)
    return out


def accuracy_from_scores(items: Sequence[MCItem], scores: Sequence[np.ndarray]) -> dict:
    """Accuracy by total log-probability and by log-probability per byte (ties: the first choice)."""
    total_ok = per_byte_ok = 0
    preds = []
    for it, s in zip(items, scores, strict=True):
        lengths = np.array([len(c) for c in it.choices], np.float64)
        p_total, p_byte = int(np.argmax(s)), int(np.argmax(s / lengths))
        total_ok += p_total == it.answer
        per_byte_ok += p_byte == it.answer
        preds.append({"answer": it.answer, "pred": p_total, "pred_per_byte": p_byte,
                      "logprob_bits": [float(x) for x in s]})
    n = len(items)
    return {"items": n, "accuracy": total_ok / n if n else float("nan"),
            "accuracy_per_byte": per_byte_ok / n if n else float("nan"),
            "chance": float(np.mean([1 / len(it.choices) for it in items])) if n else float("nan"),
            "predictions": preds}


def evaluate(model, items: Sequence[MCItem], batch_size: int = 8) -> dict:
    if not items:
        raise ValueError("multiple choice: no items given")
    return accuracy_from_scores(items, choice_scores(model, items, batch_size))


# ---- item builders -------------------------------------------------------------------------------------

def heldout_files() -> list[Path]:
    """The held-out files of the embedded corpus (never trained on by default runs)."""
    from blt_jax.data.corpus import default_corpus_files, split_files, stdlib_root  # noqa: PLC0415

    return split_files(default_corpus_files(), stdlib_root())[1]


def _good_line(line: bytes, min_len: int, max_len: int) -> bool:
    s = line.strip()
    return min_len <= len(s) and len(line) <= max_len and any(chr(c).isalnum() for c in s)


def heldout_next_line_items(n: int, seed: int = 0, context_lines: int = 4, num_choices: int = 4,
                            min_len: int = 8, max_len: int = 120, files: Optional[Sequence[Path]] = None
                            ) -> list[MCItem]:
    """`n` items: a context of `context_lines` lines (ending in a newline) from a held-out file, the true
    next non-empty line (with its newline) vs `num_choices - 1` lines drawn from other held-out files (or far
    away in the same one). Deterministic for a seed and a set of files (default: the embedded held-out
    split)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    files = sorted(files if files is not None else heldout_files(), key=lambda p: str(p))
    docs = [Path(f).read_bytes().split(b"\n") for f in files]
    # (file, line) positions whose line is a good answer and whose context has some text
    positions = []
    for fi, lines in enumerate(docs):
        for li in range(context_lines, len(lines) - 1):  # the last element follows the final newline
            if _good_line(lines[li], min_len, max_len) and \
                    any(x.strip() for x in lines[li - context_lines:li]) and \
                    all(len(x) <= max_len for x in lines[li - context_lines:li]):
                positions.append((fi, li))
    if len(positions) < max(n, num_choices):
        raise ValueError(f"only {len(positions)} usable lines in {len(files)} files; asked for {n} items")
    rng = random.Random(seed)
    items = []
    for fi, li in rng.sample(positions, n):
        answer = docs[fi][li] + b"\n"
        distractors: list[bytes] = []
        while len(distractors) < num_choices - 1:
            fj, lj = positions[rng.randrange(len(positions))]
            cand = docs[fj][lj] + b"\n"
            if (fj == fi and abs(lj - li) < 50) or cand.strip() == answer.strip() or \
                    cand.strip() in (d.strip() for d in distractors):
                continue
            distractors.append(cand)
        choices = [answer] + distractors
        order = list(range(num_choices))
        rng.shuffle(order)
        context = b"\n".join(docs[fi][li - context_lines:li]) + b"\n"
        items.append(MCItem(context, tuple(choices[k] for k in order), order.index(0)))
    return items


def gettext_choice_items(lang: str, n: int, seed: int = 0, num_choices: int = 4, n_shots: int = 2,
                         **pairs_kwargs) -> list[MCItem]:
    """`n` items: a few-shot translation prompt 'English: <src>\\n<Lang>:' whose choices are ' <translation>\\n'
    for the right translation and `num_choices - 1` translations of other strings. Raises
    translation.NoCatalogs when the machine has no catalogs for `lang`."""
    from blt_jax.tasks.translation import few_shot_prompt, gettext_pairs  # noqa: PLC0415

    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    pairs = gettext_pairs(lang, max_pairs=n + n_shots + 3 * num_choices + 20, seed=seed, **pairs_kwargs)
    if len(pairs) < n + num_choices + n_shots:
        raise ValueError(f"only {len(pairs)} translation pairs for {lang!r}; too few for {n} items")
    rng = random.Random(seed)
    shots, rest = pairs[:n_shots], pairs[n_shots:]
    items = []
    for i in range(n):
        src, tgt = rest[i]
        others = [t for j, (_, t) in enumerate(rest) if j != i and t != tgt]
        choices = [tgt] + rng.sample(others, num_choices - 1)
        order = list(range(num_choices))
        rng.shuffle(order)
        items.append(make_item(few_shot_prompt(shots, src, lang), [f" {choices[k]}\n" for k in order],
                               order.index(0)))
    return items
