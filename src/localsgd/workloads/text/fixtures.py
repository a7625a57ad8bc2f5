"""``localsgd fixtures DIR``: small text data in the real formats, a WordPiece tokenizer
for it and a tiny BERT config, written in seconds.

The data is generated from a small grammar with a learnable signal, so that a tiny model
fine-tuned for a minute clearly beats chance:

- MNLI (``mnli/``: GLUE's ``train.tsv``, ``dev_matched.tsv``, ``dev_mismatched.tsv``): the
  hypothesis restates the premise (entailment), negates it (contradiction) or adds a claim
  the premise does not make (neutral). Matched and mismatched genres use different nouns.
- SQuAD v1.1 (``squad/train-v1.1.json``, ``squad/dev-v1.1.json``): a paragraph states
  attributes of several things; the question asks for one attribute of one thing.
- Text (``corpus/train.txt``, ``corpus/valid.txt``): one document per line, sentences whose
  words depend on each other (nouns choose their verbs and places).
- Single-text classification (``classification/train.tsv``, ``classification/test.tsv``,
  columns ``sentence`` and ``label``): a sentence of the corpus' grammar without its noun
  (``the old one plants the wheat in the field .``), labelled with the noun (six labels);
  one of its verb, object and place may belong to another noun. Which words go with which
  noun is what masked-LM pretraining on the corpus teaches (the STILT recipe).
- ``bert_tiny/``: the tiny BERT (``bert_tiny.json``) initialised from a fixed seed, saved
  with the tokenizer as a checkpoint folder (``[workload.model] path``): the starting point
  of continued pretraining.

Tests, the tiny studies and a first check of a cluster use them; nothing is downloaded.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from localsgd.util.files import write_atomic, write_json_atomic

SEED = 1234
SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
VOCAB_SIZE = 600

TINY_BERT: dict[str, Any] = {
    "model_type": "bert",
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "max_position_embeddings": 128,
    "type_vocab_size": 2,
    "hidden_dropout_prob": 0.0,
    "attention_probs_dropout_prob": 0.0,
}
"""A 2-layer, 32-wide BERT (about 30 k parameters with the fixture vocabulary)."""

ADJECTIVES = ["old", "young", "small", "large", "quiet", "loud", "happy", "tired", "clever", "busy"]
GENRES_MATCHED = {
    "fiction": ["wizard", "dragon", "knight", "queen", "castle", "sword"],
    "government": ["senator", "agency", "council", "minister", "budget", "report"],
    "travel": ["tourist", "guide", "hotel", "island", "museum", "train"],
}
GENRES_MISMATCHED = {
    "letters": ["writer", "reader", "editor", "parcel", "envelope", "stamp"],
    "verbatim": ["speaker", "teacher", "student", "lecture", "notebook", "class"],
}
VERBS = ["saw", "found", "liked", "visited", "followed", "helped", "called", "met"]
NEUTRAL_CLAIMS = ["because it was late", "for the first time", "with great joy", "after a long wait"]

ATTRIBUTES = {
    "color": ["red", "blue", "green", "yellow", "dark purple", "light gray"],
    "city": ["paris", "tokyo", "lima", "oslo", "cairo", "new delhi"],
    "owner": ["maria", "john", "aiko", "omar", "lena", "pedro"],
    "size": ["tiny", "huge", "medium", "enormous", "very small", "quite big"],
    "age": ["three years", "ten years", "one month", "two weeks", "six days", "forty years"],
}
THINGS = ["boat", "house", "lamp", "car", "garden", "piano", "clock", "bridge", "tower", "horse"]

NOUN_VERBS = {
    "farmer": (["plants", "harvests", "waters"], ["field", "barn", "orchard"]),
    "baker": (["bakes", "sells", "kneads"], ["bakery", "kitchen", "market"]),
    "pilot": (["flies", "lands", "checks"], ["airport", "runway", "hangar"]),
    "doctor": (["treats", "examines", "visits"], ["hospital", "clinic", "ward"]),
    "sailor": (["rows", "steers", "repairs"], ["harbor", "ship", "dock"]),
    "painter": (["paints", "sketches", "colors"], ["studio", "gallery", "attic"]),
}
OBJECTS = {
    "farmer": ["wheat", "corn", "apples"],
    "baker": ["bread", "cakes", "pies"],
    "pilot": ["planes", "jets", "gliders"],
    "doctor": ["patients", "wounds", "children"],
    "sailor": ["boats", "sails", "ropes"],
    "painter": ["portraits", "walls", "landscapes"],
}


def mnli_rows(rng: random.Random, genres: dict[str, list[str]], n: int) -> list[dict[str, str]]:
    rows = []
    names = list(genres)
    for i in range(n):
        genre = names[i % len(names)]
        subject, obj = rng.sample(genres[genre], 2)
        adj = rng.choice(ADJECTIVES)
        verb = rng.choice(VERBS)
        premise = f"The {adj} {subject} {verb} the {obj} yesterday ."
        label = ("entailment", "neutral", "contradiction")[rng.randrange(3)]
        if label == "entailment":
            hypothesis = rng.choice([f"The {subject} {verb} the {obj} .", f"A {subject} {verb} something ."])
        elif label == "contradiction":
            hypothesis = rng.choice(
                [f"The {subject} never {verb} the {obj} .", f"Nobody {verb} the {obj} yesterday ."]
            )
        else:
            hypothesis = f"The {subject} {verb} the {obj} {rng.choice(NEUTRAL_CLAIMS)} ."
        rows.append({"genre": genre, "sentence1": premise, "sentence2": hypothesis, "gold_label": label})
    return rows


def write_mnli_tsv(path: Path, rows: list[dict[str, str]], dev: bool) -> None:
    """GLUE's MNLI columns (parses left empty: nothing reads them)."""
    header = [
        "index",
        "promptID",
        "pairID",
        "genre",
        "sentence1_binary_parse",
        "sentence2_binary_parse",
        "sentence1_parse",
        "sentence2_parse",
        "sentence1",
        "sentence2",
        "label1",
        *(["label2", "label3", "label4", "label5"] if dev else []),
        "gold_label",
    ]
    lines = ["\t".join(header)]
    for i, r in enumerate(rows):
        labels = [r["gold_label"]] * (5 if dev else 1)
        cells = [str(i), str(i), f"{i}e", r["genre"], "", "", "", "", r["sentence1"], r["sentence2"]]
        lines.append("\t".join([*cells, *labels, r["gold_label"]]))
    write_atomic(path, "\n".join(lines) + "\n")


def squad_articles(rng: random.Random, paragraphs: int, prefix: str) -> dict[str, Any]:
    data = []
    for p in range(paragraphs):
        facts = []
        for thing, attribute in zip(rng.sample(THINGS, 3), rng.sample(list(ATTRIBUTES), 3)):
            facts.append((thing, attribute, rng.choice(ATTRIBUTES[attribute])))
        context = ""
        qas = []
        for q, (thing, attribute, value) in enumerate(facts):
            sentence = f"The {attribute} of the {thing} is "
            start = len(context) + len(sentence)
            context += f"{sentence}{value}. "
            qas.append(
                {
                    "id": f"{prefix}{p}q{q}",
                    "question": f"What is the {attribute} of the {thing}?",
                    "answers": [{"text": value, "answer_start": start}],
                }
            )
        data.append({"title": f"{prefix}{p}", "paragraphs": [{"context": context.strip(), "qas": qas}]})
    return {"version": "1.1", "data": data}


def corpus_lines(rng: random.Random, n: int) -> list[str]:
    docs = []
    nouns = list(NOUN_VERBS)
    for _ in range(n):
        sentences = []
        for _ in range(rng.randint(3, 6)):
            noun = rng.choice(nouns)
            verbs, places = NOUN_VERBS[noun]
            sentences.append(
                f"the {rng.choice(ADJECTIVES)} {noun} {rng.choice(verbs)} the "
                f"{rng.choice(OBJECTS[noun])} in the {rng.choice(places)} ."
            )
        docs.append(" ".join(sentences))
    return docs


def classification_rows(rng: random.Random, n: int) -> list[tuple[str, str]]:
    """``(sentence, label)``: a sentence of the corpus' grammar with its noun left out
    (``the old one plants the wheat in the field .``), labelled with that noun. Of its
    verb, object and place, one may belong to another noun: the label is what the other
    two say."""
    nouns = list(NOUN_VERBS)
    rows = []
    for _ in range(n):
        noun = rng.choice(nouns)
        other = rng.choice([m for m in nouns if m != noun])
        odd = rng.randrange(4)  # 3: every slot is the noun's own
        slots = []
        for slot in range(3):
            owner = other if slot == odd else noun
            verbs, places = NOUN_VERBS[owner]
            slots.append(rng.choice((verbs, OBJECTS[owner], places)[slot]))
        verb, obj, place = slots
        rows.append((f"the {rng.choice(ADJECTIVES)} one {verb} the {obj} in the {place} .", noun))
    return rows


def train_tokenizer(texts: list[str], folder: Path) -> int:
    """A lower-cased WordPiece tokenizer for ``texts``, saved for ``AutoTokenizer``; returns
    its vocabulary size. The vocabulary is built here rather than by tokenizers' trainer,
    whose ties fall in hash order (a different vocabulary on every call): the special tokens,
    every character alone and as a continuation piece, then the words by falling count (ties
    alphabetical), up to 600 entries; a word left out is split into its characters."""
    from collections import Counter

    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    from localsgd.workloads.text.hf import transformers_module

    normalizer, pre_tokenizer = normalizers.BertNormalizer(lowercase=True), pre_tokenizers.BertPreTokenizer()
    counts = Counter(word for text in texts for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text)))
    chars = sorted({c for word in counts for c in word})
    words = sorted((w for w in counts if len(w) > 1), key=lambda w: (-counts[w], w))
    pieces = SPECIAL_TOKENS + chars + ["##" + c for c in chars]
    pieces += words[: max(0, VOCAB_SIZE - len(pieces))]
    tok = Tokenizer(models.WordPiece({piece: i for i, piece in enumerate(pieces)}, unk_token="[UNK]"))
    tok.normalizer, tok.pre_tokenizer = normalizer, pre_tokenizer
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls), ("[SEP]", sep)],
    )
    tok.decoder = decoders.WordPiece()
    transformers = transformers_module()
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=TINY_BERT["max_position_embeddings"],
        model_input_names=["input_ids", "token_type_ids", "attention_mask"],  # BERT's: pairs need segments
    )
    fast.save_pretrained(str(folder))
    return int(tok.get_vocab_size())


def write_classification_tsv(path: Path, rows: list[tuple[str, str]]) -> None:
    write_atomic(path, "sentence\tlabel\n" + "".join(f"{text}\t{label}\n" for text, label in rows))


def save_tiny_bert(folder: Path, config_file: Path, tokenizer: Path) -> None:
    """The tiny BERT with a masked-LM head, initialised from :data:`SEED`, saved with the
    tokenizer (the same bytes on every call)."""
    import shutil

    import torch

    from localsgd.workloads.text.hf import transformers_module

    transformers = transformers_module()
    config = transformers.AutoConfig.for_model(**json.loads(config_file.read_text()))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        model = transformers.AutoModelForMaskedLM.from_config(config)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(folder))
    for file in sorted(tokenizer.iterdir()):
        shutil.copyfile(file, folder / file.name)


def write_fixtures(root: str | Path, *, scale: int = 1) -> dict[str, Path]:
    """Write every fixture under ``root`` (``scale`` multiplies the number of examples);
    returns the paths by kind. The same call always writes the same files."""
    root = Path(root)
    rng = random.Random(SEED)
    paths = {
        "mnli": root / "mnli",
        "squad": root / "squad",
        "corpus": root / "corpus",
        "classification": root / "classification",
        "tokenizer": root / "tokenizer",
        "model_config": root / "bert_tiny.json",
        "model": root / "bert_tiny",
    }
    for key in ("mnli", "squad", "corpus", "classification", "tokenizer"):
        paths[key].mkdir(parents=True, exist_ok=True)
    train = mnli_rows(rng, GENRES_MATCHED, 3000 * scale)
    matched = mnli_rows(rng, GENRES_MATCHED, 300 * scale)
    mismatched = mnli_rows(rng, GENRES_MISMATCHED, 300 * scale)
    write_mnli_tsv(paths["mnli"] / "train.tsv", train, dev=False)
    write_mnli_tsv(paths["mnli"] / "dev_matched.tsv", matched, dev=True)
    write_mnli_tsv(paths["mnli"] / "dev_mismatched.tsv", mismatched, dev=True)
    squad_train = squad_articles(rng, 800 * scale, "train")
    squad_dev = squad_articles(rng, 80 * scale, "dev")
    write_json_atomic(paths["squad"] / "train-v1.1.json", squad_train)
    write_json_atomic(paths["squad"] / "dev-v1.1.json", squad_dev)
    corpus_train, corpus_valid = corpus_lines(rng, 1500 * scale), corpus_lines(rng, 150 * scale)
    write_atomic(paths["corpus"] / "train.txt", "\n".join(corpus_train) + "\n")
    write_atomic(paths["corpus"] / "valid.txt", "\n".join(corpus_valid) + "\n")
    texts = [r[k] for r in train + matched + mismatched for k in ("sentence1", "sentence2")]
    texts += [p["context"] for a in squad_train["data"] + squad_dev["data"] for p in a["paragraphs"]]
    texts += [q["question"] for a in squad_train["data"] for p in a["paragraphs"] for q in p["qas"]]
    texts += corpus_train
    vocab = train_tokenizer(texts, paths["tokenizer"])
    write_json_atomic(paths["model_config"], {**TINY_BERT, "vocab_size": vocab})
    # Its own stream, after the others: the files above stay what they were. Its words are
    # the corpus' (the tokenizer knows them all).
    labelled = random.Random(SEED + 1)
    write_classification_tsv(paths["classification"] / "train.tsv", classification_rows(labelled, 1200 * scale))
    write_classification_tsv(paths["classification"] / "test.tsv", classification_rows(labelled, 400 * scale))
    save_tiny_bert(paths["model"], paths["model_config"], paths["tokenizer"])
    return paths


__all__ = ["TINY_BERT", "write_fixtures", "write_mnli_tsv"]
