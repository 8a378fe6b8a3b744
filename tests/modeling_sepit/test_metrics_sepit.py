"""The evaluation's text metrics against the metric libraries' own documented examples, computed through our wrappers
(so the tokens, references and settings reach the libraries intact), yes/no extraction, per-type scoring and the
report files. Offline: WordNet from Debian's wordnet-base, BERTScore with the MiniLM folder the eval extra ships."""

import json
import os

import pytest
from PIL import Image

from modeling_sepit.metrics_sepit import (
    bertscore,
    bleu,
    default_bertscore_model,
    extract_yes_no,
    load_wordnet,
    meteor,
    rouge,
    score_answers,
    tokenize,
    write_report,
)

# nltk's corpus_bleu and meteor_score docstrings (nltk/translate/bleu_score.py, meteor_score.py) share this example.
HYP1 = "It is a guide to action which ensures that the military always obeys the commands of the party"
REF1A = "It is a guide to action that ensures that the military will forever heed Party commands"
REF1B = "It is the guiding principle which guarantees the military forces always being under the command of the Party"
REF1C = "It is the practical guide for the army always to heed the directions of the party"
HYP2 = "he read the book because he was interested in world history"
REF2A = "he was interested in world history because he read the book"

PARAPHRASE = ("The enzyme hydrolyses peptidoglycan in bacterial cell walls.", "This enzyme breaks down peptidoglycan.")
UNRELATED = "The weather in Paris was rainy yesterday."
SENTENCE = "Lysozyme hydrolyses the beta-1,4 glycosidic bonds of peptidoglycan in bacterial cell walls."


def test_bleu_matches_nltk_corpus_bleu_docstring():
    # corpus_bleu docstring: `corpus_bleu(list_of_references, hypotheses)` -> 0.5920... (BLEU-4, uniform weights);
    # with weights (0.5, 0.5) -> 0.8242... Every n-gram order matches, so smoothing method 1 changes nothing, and
    # lowercasing changes nothing either (the lowercase "party" of REF1C already matches).
    scores = bleu([HYP1, HYP2], [[REF1A, REF1B, REF1C], [REF2A]])
    assert scores["bleu4"] == pytest.approx(0.5920778868801042, abs=1e-12)
    assert str(scores["bleu2"]).startswith("0.8242")
    assert scores["bleu1"] > scores["bleu2"] > scores["bleu3"] > scores["bleu4"]


def test_identical_answers_get_the_maximum_scores():
    assert bleu([SENTENCE], [SENTENCE]) == pytest.approx(dict.fromkeys(("bleu1", "bleu2", "bleu3", "bleu4"), 1.0))
    assert rouge([SENTENCE], [SENTENCE]) == pytest.approx(dict.fromkeys(("rouge1", "rouge2", "rougeL"), 1.0))
    # METEOR's maximum is below 1: one chunk of n matched words still pays the fragmentation penalty 0.5 * (1/n)^3.
    n = len(tokenize(SENTENCE))
    assert meteor([SENTENCE], [SENTENCE]) == pytest.approx(1 - 0.5 * (1 / n) ** 3)


def test_tokens_are_lowercased_wordpunct_tokens():
    assert tokenize("Yes. It binds Zn(2+), see EC 3.2.1.17") == [
        "yes", ".", "it", "binds", "zn", "(", "2", "+),", "see", "ec", "3", ".", "2", ".", "1", ".", "17"
    ]  # fmt: skip


def test_rouge_matches_rouge_scores_own_tests():
    # rouge_score/rouge_scorer_test.py (the README's example prints no values): testRouge1, testRouge2,
    # testRougeLNonConsecutive score("testing one two", prediction) -> F 1/2, 2/3, 4/5; Porter stemming does not
    # change these. testRougeAllMulti: score_multi(["first text", "first something"], "text first") -> 1, 0, 0.5.
    assert rouge(["testing"], ["testing one two"])["rouge1"] == pytest.approx(1 / 2)
    assert rouge(["testing one"], ["testing one two"])["rouge2"] == pytest.approx(2 / 3)
    assert rouge(["testing two"], ["testing one two"])["rougeL"] == pytest.approx(4 / 5)
    assert rouge(["text first"], [["first text", "first something"]]) == pytest.approx(
        {"rouge1": 1.0, "rouge2": 0.0, "rougeL": 0.5}
    )
    # the mean over pairs: rouge1 F of the three pairs above is 1/2, 4/5, 4/5
    assert rouge(["testing", "testing one", "testing two"], ["testing one two"] * 3)["rouge1"] == pytest.approx(0.7)


def test_meteor_matches_nltk_meteor_score_docstring():
    # meteor_score docstring: round(meteor_score([reference1, reference2, reference3], hypothesis1), 4) -> 0.6944 and
    # round(meteor_score([['this', 'is', 'a', 'cat']], ['non', 'matching', 'hypothesis']), 4) -> 0.0
    assert round(meteor([HYP1], [[REF1A, REF1B, REF1C]]), 4) == 0.6944
    assert meteor(["non matching hypothesis"], ["this is a cat"]) == 0.0
    assert meteor([HYP1, "non matching hypothesis"], [[REF1A, REF1B, REF1C], "this is a cat"]) == pytest.approx(
        0.6944444444444445 / 2
    )


def test_wordnet_is_debians_wordnet_30_with_lexicographer_files_in_order():
    wordnet = load_wordnet()
    assert wordnet.get_version() == "3.0"
    # the lexnames table nltk needs (Debian ships none) must follow WordNet's file numbers
    assert wordnet.synset("dog.n.01").lexname() == "noun.animal"
    assert wordnet.synset("run.v.01").lexname() == "verb.motion"
    assert wordnet.synset("quickly.r.01").lexname() == "adv.all"
    assert "guidebook" in {lemma for synset in wordnet.synsets("guide") for lemma in synset.lemma_names()}


def test_wordnet_folder_resolution_and_missing_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("SEPIT_WORDNET_DIR", str(tmp_path))
    with pytest.raises(ValueError, match=f"wordnet-base.*{tmp_path.name}|{tmp_path.name}.*wordnet-base"):
        load_wordnet()
    with pytest.raises(ValueError, match="SEPIT_WORDNET_DIR"):
        meteor(["a"], ["a"], wordnet_dir=tmp_path / "absent")
    assert load_wordnet("/usr/share/wordnet").get_version() == "3.0"  # an explicit folder wins over the variable
    monkeypatch.delenv("SEPIT_WORDNET_DIR")
    assert load_wordnet() is load_wordnet("/usr/share/wordnet")  # Debian's folder by default, loaded once


@pytest.fixture(scope="module")
def minilm() -> str:
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    return default_bertscore_model()


def test_bertscore_with_the_shipped_minilm_offline(minilm):
    assert os.path.isfile(os.path.join(minilm, "model.safetensors"))
    assert bertscore([SENTENCE], [SENTENCE], minilm, num_layers=6)["bertscore_f1"] == pytest.approx(1.0, abs=1e-5)
    paraphrase = bertscore([PARAPHRASE[0]], [PARAPHRASE[1]], minilm, num_layers=6)
    unrelated = bertscore([PARAPHRASE[0]], [UNRELATED], minilm, num_layers=6)
    assert set(paraphrase) == {"bertscore_precision", "bertscore_recall", "bertscore_f1"}
    assert paraphrase["bertscore_f1"] > unrelated["bertscore_f1"] + 0.3
    # the mean over pairs. Pairs with related words only: bert-score counts padded positions as cosine 0, so a token
    # whose best real match is negative (unrelated text) can score a little higher in a padded batch.
    both = bertscore([PARAPHRASE[0], SENTENCE], [PARAPHRASE[1], SENTENCE], minilm, num_layers=6)
    assert both["bertscore_f1"] == pytest.approx((paraphrase["bertscore_f1"] + 1) / 2, abs=1e-5)
    # several references: bert-score keeps the best one
    best = bertscore([SENTENCE, PARAPHRASE[0]], [SENTENCE, [UNRELATED, PARAPHRASE[1]]], minilm, num_layers=6)
    assert best["bertscore_f1"] == pytest.approx((1 + paraphrase["bertscore_f1"]) / 2, abs=1e-5)
    with pytest.raises(ValueError, match="num_layers"):
        bertscore([SENTENCE], [SENTENCE], minilm)


def test_bertscore_gives_an_empty_answer_zero_as_bert_score_does(minilm):
    # A model that stops at once answers "": bert-score scores such a candidate 0 (its path for it breaks on
    # transformers 5 tokenizers), and the other answers keep their own scores.
    alone = bertscore([PARAPHRASE[0]], [PARAPHRASE[1]], minilm, num_layers=6)
    mixed = bertscore(["", PARAPHRASE[0], "  "], [SENTENCE, PARAPHRASE[1], SENTENCE], minilm, num_layers=6)
    assert mixed["bertscore_f1"] == pytest.approx(alone["bertscore_f1"] / 3, abs=1e-6)
    assert bertscore([""], [SENTENCE], minilm, num_layers=6) == dict.fromkeys(alone, 0.0)


@pytest.mark.parametrize(
    "answer, expected",
    [
        ("Yes", "yes"),
        ("No", "no"),
        ("yes.", "yes"),
        ("No, it does not.", "no"),
        ("YES!", "yes"),
        ("Yes, it is an enzyme, but no", "no"),
        ("No... actually, yes: it binds zinc.", "yes"),
        ("It is not known.", None),
        ("Nothing suggests that.", None),
        ("I know it binds DNA.", None),
        ("It is a non-binding protein.", None),
        ("No-one has characterised it.", None),
        ("It was seen yesterday with the naked eyes", None),
        ("Eyes; yesteryear; nonetheless; notion; nobody; Yesenia", None),
        ("The answer is (yes)", "yes"),
        ('"No"', "no"),
        ("yes\nno\n", "no"),
        ("Yes-man no", "no"),
        ("", None),
        ("The protein has no signal peptide", "no"),
    ],
)
def test_extract_yes_no(answer, expected):
    assert extract_yes_no(answer) == expected


ROWS = [  # (prediction, reference, type, closed)
    ("Yes, it binds zinc.", "Yes", "yes_no:metal", True),
    ("It does not bind zinc.", "No", "yes_no:metal", True),  # no standalone yes/no: wrong, counted in no_answer
    ("No.", "No", "yes_no:go", True),
    (PARAPHRASE[0], PARAPHRASE[1], "function", False),
    ("It is located in the nucleus.", "Nucleus.", "location", False),
    (SENTENCE, SENTENCE, "function", False),
]


def scores_of(rows, **kwargs):
    predictions, references, types, closed = map(list, zip(*rows, strict=True))
    return score_answers(predictions, references, types, closed, **kwargs)


def test_score_answers_groups_by_type_and_counts():
    result = scores_of(ROWS, bertscore_model=None, bertscore_num_layers=None)
    assert result["settings"]["bertscore"] == "skipped (bertscore_model=None)"
    overall = result["overall"]
    assert (overall["n"], overall["open"]["n"], overall["closed"]["n"]) == (6, 3, 3)
    assert overall["closed"] == {"n": 3, "accuracy": pytest.approx(2 / 3), "no_answer": 1}
    assert overall["open"]["bertscore_f1"] is None and overall["open"]["bertscore_precision"] is None
    assert list(result["per_type"]) == ["function", "location", "yes_no:go", "yes_no:metal"]
    metal, go, function = (result["per_type"][t] for t in ("yes_no:metal", "yes_no:go", "function"))
    assert (metal["n"], metal["closed"]["accuracy"], metal["closed"]["no_answer"]) == (2, 0.5, 1)
    assert metal["open"]["n"] == 0 and metal["open"]["bleu4"] is None
    assert go["closed"]["accuracy"] == 1.0
    assert function["closed"] == {"n": 0, "accuracy": None, "no_answer": 0}
    # a type's text metrics are the wrappers' on its rows: corpus BLEU within the type, means of the others
    open_rows = [row for row in ROWS if row[2] == "function"]
    predictions, references = [row[0] for row in open_rows], [row[1] for row in open_rows]
    assert function["open"] == pytest.approx(
        {
            "n": 2,
            **bleu(predictions, references),
            **rouge(predictions, references),
            "meteor": meteor(predictions, references),
            "bertscore_precision": None,
            "bertscore_recall": None,
            "bertscore_f1": None,
        }
    )
    everything = [row for row in ROWS if not row[3]]
    assert overall["open"]["bleu4"] == pytest.approx(
        bleu([r[0] for r in everything], [r[1] for r in everything])["bleu4"]
    )


def test_score_answers_with_bertscore(minilm):
    result = scores_of(ROWS, bertscore_model=minilm, bertscore_num_layers=6)
    assert result["settings"]["bertscore"] == {"model": minilm, "num_layers": 6}
    function = result["per_type"]["function"]["open"]
    direct = bertscore([PARAPHRASE[0], SENTENCE], [PARAPHRASE[1], SENTENCE], minilm, num_layers=6)
    assert {key: function[key] for key in direct} == pytest.approx(direct)
    assert result["overall"]["open"]["bertscore_f1"] > result["per_type"]["location"]["open"]["bertscore_f1"]


def test_score_answers_rejects_bad_input():
    with pytest.raises(ValueError, match="differ in length"):
        score_answers(["a"], ["a", "b"], ["t"], [False], None, None)
    with pytest.raises(ValueError, match="row 1.*start with Yes or No"):
        score_answers(["yes", "no"], ["Yes", "Maybe"], ["t", "t"], [True, True], None, None)
    closed_only = score_answers(["yes"], ["Yes, it does."], ["t"], [True], None, None)
    assert closed_only["overall"]["closed"]["accuracy"] == 1.0 and closed_only["overall"]["open"]["meteor"] is None


def test_write_report_files(tmp_path):
    sepit = scores_of(ROWS, bertscore_model=None, bertscore_num_layers=None)
    llm_only = scores_of([(UNRELATED, *row[1:]) for row in ROWS], bertscore_model=None, bertscore_num_layers=None)
    results = {"sepit": sepit, "sepit (structure withheld)": sepit, "llm only (no protein)": llm_only}
    (tmp_path / "metrics.md").write_text("an older report")
    paths = write_report(results, tmp_path)
    assert paths == {
        "json": tmp_path / "metrics.json",
        "markdown": tmp_path / "metrics.md",
        "chart": tmp_path / "metrics.png",
    }
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json", "metrics.md", "metrics.png"]  # no temp files
    assert json.loads(paths["json"].read_text()) == results

    markdown = paths["markdown"].read_text()
    header = "| metric | sepit | sepit (structure withheld) | llm only (no protein) |"
    assert header in markdown and "| question type | metric | sepit |" in markdown
    assert f"| BLEU-4 | {sepit['overall']['open']['bleu4']:.4f} |" in markdown
    assert "| yes/no accuracy | 0.6667 | 0.6667 | 0.0000 |" in markdown
    assert "| BERTScore F1 | skipped | skipped | skipped |" in markdown
    assert "| yes_no:metal | closed questions (n) | 2 | 2 | 2 |" in markdown
    assert "| yes_no:metal | BLEU-4 |" not in markdown  # a closed type has no text-metric rows

    with Image.open(paths["chart"]) as image:
        assert image.format == "PNG" and image.width > 300 and image.height > 200
        image.verify()
