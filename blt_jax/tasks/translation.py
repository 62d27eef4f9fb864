"""Translation from the machine's gettext catalogs (`/usr/share/locale/<lang>/LC_MESSAGES/*.mo`): English
msgids paired with their translations, a few-shot prompt, BLEU and chrF by sacrebleu.

The catalogs are whatever the installed packages ship, so the pairs differ between machines; they are
deterministic for a given machine, language and seed. No catalogs -> `NoCatalogs` (a FileNotFoundError:
`blt eval` reports it as an error; experiments may skip the task and say so)."""

from __future__ import annotations

import gettext
import random
import re
from pathlib import Path
from typing import Optional, Sequence

LOCALE_DIR = Path("/usr/share/locale")

LANGUAGE_NAMES = {
    "de": "German", "fr": "French", "es": "Spanish", "it": "Italian", "pt": "Portuguese", "pt_BR": "Portuguese",
    "nl": "Dutch", "sv": "Swedish", "da": "Danish", "nb": "Norwegian", "fi": "Finnish", "pl": "Polish",
    "cs": "Czech", "ru": "Russian", "uk": "Ukrainian", "ja": "Japanese", "ko": "Korean", "zh_CN": "Chinese",
    "zh_TW": "Chinese", "tr": "Turkish", "el": "Greek", "hu": "Hungarian", "ro": "Romanian", "ca": "Catalan",
    "vi": "Vietnamese", "id": "Indonesian", "ar": "Arabic", "he": "Hebrew",
}

# printf / python / brace / shell placeholders, and GTK/Qt mnemonic markers
_PLACEHOLDER = re.compile(r"%(\([^)]*\))?[-+ #0-9.*lhqjzt]*[a-zA-Z%]|\{[^}]*\}|\$\{?\w+\}?|<[^>]*>")
_MNEMONIC = re.compile(r"(?<![\w_])_\w|&\w")


class NoCatalogs(FileNotFoundError):
    """No usable gettext catalogs for the requested language on this machine (the evaluation cannot run)."""


def language_name(lang: str) -> str:
    return LANGUAGE_NAMES.get(lang, LANGUAGE_NAMES.get(lang.split("_")[0], lang))


def catalog_files(lang: str, locale_dir: Path | str = LOCALE_DIR) -> list[Path]:
    """The .mo catalogs of `lang`, sorted by name; NoCatalogs if there are none."""
    if not re.fullmatch(r"[A-Za-z]{2,3}(_[A-Za-z]{2})?(@\w+)?", lang):
        raise NoCatalogs(f"no gettext catalogs for {lang!r}: not a locale name (e.g. de, fr, pt_BR)")
    folder = Path(locale_dir) / lang / "LC_MESSAGES"
    files = sorted(folder.glob("*.mo")) if folder.is_dir() else []
    if not files:
        raise NoCatalogs(f"no gettext catalogs for {lang!r} under {folder} (install language packs, "
                         f"or pick a language listed in {locale_dir})")
    return files


def _usable(src: str, tgt: str, min_len: int, max_len: int) -> bool:
    if not (min_len <= len(src) <= max_len) or not tgt or len(tgt) > 3 * max_len:
        return False
    if src.strip() == tgt.strip() or src != src.strip() or tgt != tgt.strip():
        return False
    if any(ord(ch) < 32 for ch in src + tgt):  # newlines/tabs: the prompt is one line per side
        return False
    if _MNEMONIC.search(src) or _MNEMONIC.search(tgt):
        return False
    bare = _PLACEHOLDER.sub("", src)
    return sum(ch.isalpha() for ch in bare) >= 3 and " " in src.strip()  # words, not placeholders or one token


def gettext_pairs(target_lang: str, max_pairs: Optional[int] = 200, seed: int = 0, min_len: int = 12,
                  max_len: int = 80, locale_dir: Path | str = LOCALE_DIR) -> list[tuple[str, str]]:
    """(english, translation) pairs of `target_lang`, aligned by the English msgid, deterministic per seed.

    Skipped: the header, plural forms, context-qualified ids, entries left untranslated or identical, ids
    outside [min_len, max_len] characters, multi-line or mnemonic-marked strings, and single words or
    placeholder-only ids. An English id translated differently by several catalogs keeps the translation of
    the first catalog by name. `max_pairs=None`: all of them, sorted by the English side."""
    chosen: dict[str, str] = {}
    readable = 0
    for path in catalog_files(target_lang, locale_dir):
        try:
            with open(path, "rb") as f:
                catalog = gettext.GNUTranslations(f)._catalog  # noqa: SLF001 (msgid -> msgstr)
        except (OSError, UnicodeDecodeError, LookupError, ValueError):
            continue  # a corrupt or oddly encoded catalog: skip it
        readable += 1
        for src, tgt in catalog.items():
            if not isinstance(src, str) or not isinstance(tgt, str) or "\x04" in src or src in chosen:
                continue  # plural entries have (msgid, n) keys; \x04 separates a msgctxt
            if _usable(src, tgt, min_len, max_len):
                chosen[src] = tgt
    if not chosen:
        raise NoCatalogs(f"no usable gettext pairs for {target_lang!r} ({readable} readable catalogs under "
                         f"{Path(locale_dir) / target_lang / 'LC_MESSAGES'}, none with {min_len}-{max_len} "
                         f"character entries)")
    pairs = sorted(chosen.items())
    if max_pairs is None or max_pairs >= len(pairs):
        return pairs
    return random.Random(seed).sample(pairs, max_pairs)


def few_shot_prompt(shots: Sequence[tuple[str, str]], source: str, lang: str) -> str:
    """'English: ...\\n<Lang>: ...\\n\\n' per shot, then 'English: <source>\\n<Lang>:'."""
    name = language_name(lang)
    parts = [f"English: {s}\n{name}: {t}\n\n" for s, t in shots]
    return "".join(parts) + f"English: {source}\n{name}:"


def build_prompts(pairs: Sequence[tuple[str, str]], lang: str, n_items: int, n_shots: int = 3,
                  seed: int = 0) -> list[tuple[str, str]]:
    """(prompt, reference) for the first `n_items` pairs; each prompt's shots are other pairs, chosen
    deterministically from the rest (never the item itself)."""
    if n_items < 1:
        raise ValueError(f"n_items must be >= 1, got {n_items}")
    if len(pairs) < n_items + (1 if n_shots else 0) or (n_shots and len(pairs) - 1 < n_shots):
        raise ValueError(f"{len(pairs)} pairs are too few for {n_items} items with {n_shots} shots each")
    rng = random.Random(seed)
    out = []
    for i in range(n_items):
        others = [j for j in range(len(pairs)) if j != i]
        shots = [pairs[j] for j in rng.sample(others, n_shots)]
        out.append((few_shot_prompt(shots, pairs[i][0], lang), pairs[i][1]))
    return out


def hypothesis(generated: str) -> str:
    """The translation in a generated continuation: up to the first newline, stripped."""
    return generated.split("\n", 1)[0].strip()


def score(hypotheses: Sequence[str], references: Sequence[str]) -> dict:
    """Corpus BLEU and chrF (sacrebleu, default settings; 0-100)."""
    import sacrebleu  # noqa: PLC0415

    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses for {len(references)} references")
    if not references:
        raise ValueError("score: no hypotheses given")
    hyps, refs = list(hypotheses), [list(references)]
    return {"bleu": float(sacrebleu.corpus_bleu(hyps, refs).score),
            "chrf": float(sacrebleu.corpus_chrf(hyps, refs).score)}


def evaluate(model, lang: str, n_items: int = 50, n_shots: int = 3, seed: int = 0, max_new_bytes: int = 96,
             batch_size: int = 8, locale_dir: Path | str = LOCALE_DIR, **generate_kwargs) -> dict:
    """Few-shot translation of `n_items` catalog strings English -> `lang`: BLEU, chrF and examples.
    Raises NoCatalogs when the machine has no catalogs for `lang`."""
    from blt_jax.tasks.batching import generate_in_batches  # noqa: PLC0415

    pairs = gettext_pairs(lang, max_pairs=n_items + max(n_shots, 1) * 20, seed=seed, locale_dir=locale_dir)
    n_items = min(n_items, len(pairs) - max(n_shots, 1))
    items = build_prompts(pairs, lang, n_items, n_shots, seed)
    hyps = [hypothesis(r.text) for r in generate_in_batches(model, [p for p, _ in items], max_new_bytes,
                                                            batch_size, seed, **generate_kwargs)]
    refs = [r for _, r in items]
    return {"task": "translate", "lang": lang, "items": len(items), "shots": n_shots, **score(hyps, refs),
            "examples": [{"source": pairs[i][0], "reference": refs[i], "hypothesis": hyps[i]}
                         for i in range(min(5, len(items)))]}
