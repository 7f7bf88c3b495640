"""The shipped synthetic review language: a lexicon, a grammar, preference pairs and a tokenizer.

Provenance of `alignjax/data/assets/` (regenerate bit-identically with
`python -m alignjax.data.synthetic`; tests/test_data_assets.py checks that the committed files are
what this script writes):

- `reviews/sft.jsonl`   {"text"}: whole reviews of mixed sentiment, the SFT corpus.
- `reviews/train.jsonl` and `reviews/test.jsonl` {"prompt", "chosen", "rejected", "chosen_score",
  "rejected_score"}: a review opening and two continuations drawn with different sentiment
  mixes; `chosen` is the one with the higher gold score (ties are redrawn). Test prompts are
  drawn from a separate seed and never occur in train.
- `tokenizer/`: a byte-level BPE tokenizer (vocabulary 512) trained with the `tokenizers`
  library on the SFT corpus, with BOS/EOS/PAD and a chat template (see `CHAT_TEMPLATE`).

The gold score (`sentiment_score`) is the lexicon balance: the number of words from `POSITIVE`
and `POSITIVE_VERBS` minus those from `NEGATIVE` and `NEGATIVE_VERBS`. The grammar has no
negation, so the score is exactly the sentiment the generator put in. Everything is lower case
ASCII; nothing comes from a download.
"""

from __future__ import annotations

import argparse
import json
import random
import re
from pathlib import Path

ASSETS = Path(__file__).parent / "assets"

POSITIVE = (
    "great", "wonderful", "delicious", "friendly", "excellent", "lovely", "superb", "charming",
    "brilliant", "pleasant", "fantastic", "fresh", "tasty", "cozy", "perfect", "amazing",
)  # fmt: skip
NEGATIVE = (
    "awful", "terrible", "bland", "rude", "dirty", "boring", "horrible", "disappointing",
    "stale", "noisy", "greasy", "dreadful", "mediocre", "cold", "slow", "poor",
)  # fmt: skip
POSITIVE_VERBS = ("loved", "enjoyed", "liked", "adored")
NEGATIVE_VERBS = ("hated", "disliked", "regretted", "endured")
NEUTRAL_ADJECTIVES = ("large", "small", "busy", "quiet", "new", "old", "local", "simple")
SUBJECTS = (
    "the food", "the service", "the staff", "the room", "the pasta", "the soup", "the coffee",
    "the view", "the music", "the menu", "the waiter", "the bed", "the price", "the dessert",
    "the location", "the decor",
)  # fmt: skip
PLACES = (
    "the diner", "the hotel", "the cafe", "the bistro", "the bakery", "the inn",
    "the restaurant", "the bar",
)  # fmt: skip
DAYS = ("monday", "tuesday", "friday", "saturday", "sunday")
COMPANY = ("friends", "family", "my partner", "colleagues", "the kids")
INTENSIFIERS = ("", "very ", "really ", "quite ", "truly ", "so ")

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "<|{{ message['role'] }}|>{{ message['content'] }}<|end|>"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
VOCAB_SIZE = 512
_WORD = re.compile(r"[a-z]+")


def sentiment_score(text: str) -> int:
    """The gold score: lexicon balance (# positive words - # negative words)."""
    words = _WORD.findall(text.lower())
    pos = sum(w in POSITIVE or w in POSITIVE_VERBS for w in words)
    neg = sum(w in NEGATIVE or w in NEGATIVE_VERBS for w in words)
    return pos - neg


def _sentence(rng: random.Random, polarity: int) -> str:
    """One sentence carrying `polarity` (+1, -1 or 0)."""
    subj = rng.choice(SUBJECTS)
    if polarity == 0:
        if rng.random() < 0.5:
            return f"{subj} was {rng.choice(NEUTRAL_ADJECTIVES)}."
        return f"we went on a {rng.choice(DAYS)} with {rng.choice(COMPANY)}."
    adjectives, verbs = (POSITIVE, POSITIVE_VERBS) if polarity > 0 else (NEGATIVE, NEGATIVE_VERBS)
    if rng.random() < 0.7:
        return f"{subj} was {rng.choice(INTENSIFIERS)}{rng.choice(adjectives)}."
    return f"we {rng.choice(verbs)} {subj}."


def review_opening(rng: random.Random) -> str:
    """A review opening: a neutral first sentence, sometimes a dangling 'the X was'."""
    opening = f"review of {rng.choice(PLACES)}: {_sentence(rng, 0)}"
    if rng.random() < 0.5:
        opening += f" {rng.choice(SUBJECTS)} was"
    return opening


def _continuation(rng: random.Random, prompt: str, p_positive: float) -> str:
    """2-4 sentences, each positive with probability `p_positive`, some neutral."""
    parts = []
    if prompt.endswith(" was"):  # finish the dangling sentence first
        polarity = 1 if rng.random() < p_positive else -1
        words = POSITIVE if polarity > 0 else NEGATIVE
        parts.append(f"{rng.choice(INTENSIFIERS)}{rng.choice(words)}.")
    for _ in range(rng.randint(2, 4) - len(parts)):
        if rng.random() < 0.2:
            parts.append(_sentence(rng, 0))
        else:
            parts.append(_sentence(rng, 1 if rng.random() < p_positive else -1))
    return " " + " ".join(parts)


def review(rng: random.Random) -> str:
    """A whole review with a random sentiment mix (the SFT corpus)."""
    prompt = review_opening(rng)
    return prompt + _continuation(rng, prompt, rng.random())


def preference_pair(rng: random.Random) -> dict:
    """A prompt and two continuations with different sentiment mixes, ranked by the gold score."""
    prompt = review_opening(rng)
    while True:
        a = _continuation(rng, prompt, rng.random())
        b = _continuation(rng, prompt, rng.random())
        sa, sb = sentiment_score(a), sentiment_score(b)
        if sa != sb and a != b:
            break
    (chosen, sc), (rejected, sr) = sorted([(a, sa), (b, sb)], key=lambda x: -x[1])
    return dict(prompt=prompt, chosen=chosen, rejected=rejected, chosen_score=sc, rejected_score=sr)


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, sort_keys=True) + "\n")


def build_tokenizer(texts: list[str], directory: Path, vocab_size: int = VOCAB_SIZE) -> Path:
    """Train a byte-level BPE on `texts` and save it as a transformers tokenizer directory."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "pad_token": "<pad>",
        "additional_special_tokens": list(SPECIAL_TOKENS[3:]),
        "model_max_length": 1024,
        "padding_side": "right",
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }
    (directory / "tokenizer_config.json").write_text(
        json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8"
    )
    return directory


def generate(out: Path = ASSETS, *, n_sft: int = 2000, n_train: int = 1000, n_test: int = 200):
    """Write the review corpus, the preference splits and the tokenizer under `out`."""
    sft = [{"text": review(random.Random(f"sft-{i}"))} for i in range(n_sft)]
    train = [preference_pair(random.Random(f"train-{i}")) for i in range(n_train)]
    seen = {row["prompt"] for row in train}
    test, i = [], 0
    while len(test) < n_test:
        row = preference_pair(random.Random(f"test-{i}"))
        i += 1
        if row["prompt"] not in seen:
            test.append(row)
    _write_jsonl(out / "reviews" / "sft.jsonl", sft)
    _write_jsonl(out / "reviews" / "train.jsonl", train)
    _write_jsonl(out / "reviews" / "test.jsonl", test)
    build_tokenizer([r["text"] for r in sft], out / "tokenizer")
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ASSETS)
    args = parser.parse_args(argv)
    out = generate(args.out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
