"""The evaluation's text metrics against the metric libraries' own documented examples, computed through our wrappers
(so the tokens, references and settings reach the libraries intact), yes/no extraction, per-type scoring and the
report files; the paper's protocol ("sepit") on single pairs against the libraries called as its script calls them,
and its answer extraction and yes/no rule on tricky responses. Offline: WordNet from Debian's wordnet-base, BERTScore
with the MiniLM folder the eval extra ships."""

import json
import os

import pytest
from bert_score import BERTScorer
from nltk.translate.bleu_score import corpus_bleu
from nltk.translate.meteor_score import meteor_score
from PIL import Image
from rouge_score.rouge_scorer import RougeScorer
from transformers import AutoConfig, AutoTokenizer

from modeling_sepit.metrics_sepit import (
    bertscore,
    bleu,
    check_protocol,
    default_bertscore_model,
    extract_answer,
    extract_yes_no,
    extract_yes_no_sepit,
    load_wordnet,
    meteor,
    resolve_bertscore,
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


# The "sepit" protocol: the paper's evaluation script (evaluate_task.py of U-rara/SEPIT), each metric checked on single
# pairs against the library called directly as that script calls it.
QUESTION = "What is the function of <protein> ?"
ECHOED = "What is the function of  ? It hydrolyses peptidoglycan in cell walls of bacteria."
REFERENCE = "Lysozyme hydrolyses the peptidoglycan of bacterial cell walls."
PAPER_BLEU_WEIGHTS = [(1, 0, 0, 0), (0.5, 0.5, 0, 0), (0.33, 0.33, 0.33, 0), (0.25, 0.25, 0.25, 0.25)]


def sepit_scores(rows, model, questions=None):
    """score_answers under the sepit protocol on (prediction, reference, type, closed) rows."""
    predictions, references, types, closed = map(list, zip(*rows, strict=True))
    questions = questions or [QUESTION] * len(rows)
    return score_answers(predictions, references, types, closed, model, None, protocol="sepit", questions=questions)


def paper_pair_scores(output: str, reference: str, model: str) -> dict[str, float]:
    """The paper script's `calculate_scores` for one pair, through the libraries directly (x100)."""
    tokenizer = AutoTokenizer.from_pretrained(model)
    output_pieces = tokenizer.tokenize(output, add_special_tokens=False)
    reference_pieces = tokenizer.tokenize(reference, add_special_tokens=False)
    bleus = [corpus_bleu([[reference_pieces]], [output_pieces], weights=weights) for weights in PAPER_BLEU_WEIGHTS]
    rouge_scores = RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True).score(
        output, reference
    )  # as the script
    meteor_value = meteor_score([reference_pieces], output_pieces, wordnet=load_wordnet())

    def first_500(text: str) -> str:
        return tokenizer.decode(tokenizer.encode(text, max_length=500, truncation=True, add_special_tokens=False))

    scorer = BERTScorer(model_type=model, num_layers=AutoConfig.from_pretrained(model).num_hidden_layers)
    precision, recall, f1 = scorer.score([first_500(output)], [first_500(reference)])
    values = dict(zip(("bleu1", "bleu2", "bleu3", "bleu4"), bleus, strict=True))
    values |= {name: rouge_scores[name].fmeasure for name in ("rouge1", "rouge2", "rougeL")}
    values |= {"meteor": meteor_value, "bertscore_precision": precision.item(), "bertscore_recall": recall.item()}
    values["bertscore_f1"] = f1.item()
    return {name: 100 * value for name, value in values.items()}


def test_sepit_metrics_on_a_pair_are_the_libraries_called_as_the_paper(minilm):
    result = sepit_scores([(ECHOED, REFERENCE, "function", False)], minilm)
    answer = "It hydrolyses peptidoglycan in cell walls of bacteria."  # the echoed question cut off
    direct = paper_pair_scores(answer, REFERENCE, minilm)
    assert direct["bleu2"] > 0 and direct["bertscore_f1"] > 50  # every metric sees a partly matching pair
    assert {key: result["overall"]["open"][key] for key in direct} == pytest.approx(direct, rel=1e-9, abs=1e-9)
    assert result["settings"]["protocol"] == "sepit" and result["settings"]["scale"] == 100
    assert result["settings"]["bertscore"] == {"model": minilm, "num_layers": 6, "first_pieces": 500}


def test_sepit_bleu3_weights_are_the_papers_0_33_and_no_smoothing(minilm):
    tokenizer = AutoTokenizer.from_pretrained(minilm)
    answer = "the protein binds zinc and calcium ions in the cell"
    reference = "the protein binds zinc ions in the membrane of the cell"
    output, ref = tokenizer.tokenize(answer), tokenizer.tokenize(reference)
    scores = sepit_scores([(answer, reference, "function", False)], minilm)["overall"]["open"]
    third = corpus_bleu([[ref]], [output], weights=(1 / 3, 1 / 3, 1 / 3, 0))
    assert scores["bleu3"] == pytest.approx(100 * corpus_bleu([[ref]], [output], weights=(0.33, 0.33, 0.33, 0)))
    assert scores["bleu3"] != pytest.approx(100 * third, rel=1e-6)  # 0.33 (sum 0.99) is not 1/3
    # no 4-gram in common: without smoothing BLEU-4 is (all but) 0, where corpus BLEU's method 1 stays informative
    no_four = sepit_scores([("binds zinc ions", "the protein binds zinc ions", "function", False)], minilm)
    assert no_four["overall"]["open"]["bleu4"] < 1e-50 and no_four["overall"]["open"]["bleu1"] > 50


def test_sepit_bertscore_cuts_each_text_to_its_first_500_word_pieces(minilm):
    tokenizer = AutoTokenizer.from_pretrained(minilm)
    long_reference = " ".join(["lysozyme hydrolyses peptidoglycan"] * 120)  # 960 word pieces
    assert len(tokenizer.tokenize(long_reference)) > 500
    scores = sepit_scores([(PARAPHRASE[0], long_reference, "function", False)], minilm)["overall"]["open"]
    direct = paper_pair_scores(PARAPHRASE[0], long_reference, minilm)
    assert scores["bertscore_recall"] == pytest.approx(direct["bertscore_recall"], abs=1e-9)


def test_sepit_scores_are_means_of_per_answer_scores_x100(minilm):
    rows = [(ECHOED, REFERENCE, "function", False), (PARAPHRASE[0], PARAPHRASE[1], "function", False)]
    rows.append(("It is located in the nucleus.", "Nucleus.", "location", False))
    together = sepit_scores(rows, minilm)
    alone = [sepit_scores([row], minilm)["overall"]["open"] for row in rows]
    for key in ("bleu1", "bleu4", "rouge2", "rougeL", "meteor", "bertscore_f1"):
        assert together["overall"]["open"][key] == pytest.approx(sum(scores[key] for scores in alone) / 3)
        assert together["per_type"]["function"]["open"][key] == pytest.approx((alone[0][key] + alone[1][key]) / 2)
    # corpus BLEU of the same answers is another figure: per-answer BLEU is not corpus BLEU
    assert together["overall"]["open"]["bleu2"] != pytest.approx(
        100 * bleu([row[0] for row in rows], [row[1] for row in rows])["bleu2"], rel=1e-3
    )


@pytest.mark.parametrize(
    "response, question, expected",
    [
        # the original decoded its whole prompt: the question is echoed, its <protein> gone with the special tokens
        (ECHOED, QUESTION, "It hydrolyses peptidoglycan in cell walls of bacteria."),
        # the lazy group takes what stood for the protein (letters, digits, spaces, / - _)
        ("Describe MKTAYIAK-QR briefly. It is a kinase.", "Describe <protein> briefly.", "It is a kinase."),
        # the question is a regular expression as written: "." matches any character, "?" makes the space optional
        ("Describe P12345 briefly! It is a kinase.", "Describe <protein> briefly.", "It is a kinase."),
        ("What is the function of It binds zinc.", QUESTION, "It binds zinc."),
        # its parentheses are a group, so an echo with them does not match: the whole response, "? " removed
        (
            "Which EC number (if any) has  ? 3.2.1.17",
            "Which EC number (if any) has <protein> ?",
            "Which EC number (if any) has  3.2.1.17",
        ),
        # an unbalanced parenthesis (the paper's script stops with re.error): matched literally
        ("Which pathway (KEGG has  ? Glycolysis.", "Which pathway (KEGG has <protein> ?", "Glycolysis."),
        # no echo (this project's answers): the whole response, stripped, every "? " removed, a final "?" kept
        ("  Is it secreted? Probably? Yes  ", QUESTION, "Is it secretedProbablyYes"),
        ("Why?", QUESTION, "Why?"),
        # the first echo counts; a later one stays in the answer
        (
            "What is the function of  ? What is the function of it? Binding.",
            QUESTION,
            "What is the function of itBinding.",
        ),
        ("", QUESTION, ""),
    ],
)
def test_extract_answer_after_the_echoed_question(response, question, expected):
    assert extract_answer(response, question) == expected


@pytest.mark.parametrize(
    "response, expected",
    [
        ("No, it does not bind zinc... yes", "yes"),
        ("Yes, it binds zinc. No", "no"),
        ("YES.", "yes"),
        ("No-one has characterised it.", "no"),  # a hyphen is a word boundary here, unlike extract_yes_no
        ("The answer is yes_no", None),  # "_" is a word character
        ("It is not known, I know; eyes, yesterday, nobody.", None),
        ("", None),
    ],
)
def test_extract_yes_no_sepit_the_last_standalone_yes_or_no(response, expected):
    assert extract_yes_no_sepit(response) == expected


def test_sepit_yes_no_accuracy_compares_with_the_whole_lowercased_reference(minilm):
    rows = [
        ("No, it does not... actually yes.", "Yes", "yes_no:go", True),  # the last one counts: right
        ("Yes, but no-one knows", "Yes", "yes_no:go", True),  # "no" of "no-one" is the last: wrong
        ("It does not bind zinc.", "No", "yes_no:metal", True),  # none found: wrong, and counted
        ("Yes", "Yes, it does.", "yes_no:metal", True),  # the reference is not "yes": wrong, as in the paper
    ]
    result = sepit_scores(rows, minilm)
    assert result["overall"]["closed"] == {"n": 4, "accuracy": 25.0, "no_answer": 1}
    assert result["per_type"]["yes_no:go"]["closed"]["accuracy"] == 50.0
    # the corpus protocol skips "no-one" and reads "Yes, it does." as Yes
    corpus = scores_of(rows, bertscore_model=None, bertscore_num_layers=None)
    assert corpus["overall"]["closed"]["accuracy"] == pytest.approx(3 / 4)
    assert result["overall"]["open"]["n"] == 0 and result["overall"]["open"]["bleu1"] is None


def test_protocol_arguments_are_checked(minilm):
    with pytest.raises(ValueError, match="protocol: 'paper'; choose from"):
        check_protocol("paper", minilm, None)
    with pytest.raises(ValueError, match="bertscore_model: the sepit protocol"):
        score_answers(["a"], ["a"], ["t"], [False], None, None, protocol="sepit", questions=["q"])
    with pytest.raises(ValueError, match="bertscore_num_layers: the sepit protocol reads every layer"):
        score_answers(["a"], ["a"], ["t"], [False], minilm, 6, protocol="sepit", questions=["q"])
    with pytest.raises(ValueError, match="questions: the sepit protocol"):
        score_answers(["a"], ["a"], ["t"], [False], minilm, None, protocol="sepit")
    with pytest.raises(ValueError, match="differ in length: 1, 1, 1, 1, 2"):
        score_answers(["a"], ["a"], ["t"], [False], minilm, None, protocol="sepit", questions=["q", "r"])
    assert resolve_bertscore(None, None, "corpus") == (minilm, 6)
    assert resolve_bertscore(None, None, "sepit") == (minilm, None)
    assert resolve_bertscore("None", 3, "corpus") == (None, 3)
    with pytest.raises(ValueError, match="bertscore_model: .*not none"):
        resolve_bertscore("none", None, "sepit")


def test_reports_name_the_protocol_and_refuse_mixing_them(tmp_path, minilm):
    sepit = sepit_scores(ROWS, minilm, questions=[QUESTION] * len(ROWS))
    corpus = scores_of(ROWS, bertscore_model=None, bertscore_num_layers=None)
    paths = write_report({"sepit": sepit}, tmp_path)
    markdown = paths["markdown"].read_text()
    assert "Protocol `sepit` (the paper's evaluation script)" in markdown
    assert f"| BLEU-1 | {sepit['overall']['open']['bleu1']:.2f} |" in markdown  # x100, two decimals
    assert "| yes/no accuracy | 66.67 |" in markdown
    assert json.loads(paths["json"].read_text())["sepit"]["settings"]["protocol"] == "sepit"
    assert "Protocol `corpus`" in write_report({"sepit": corpus}, tmp_path / "corpus")["markdown"].read_text()
    with pytest.raises(ValueError, match="one protocol per report"):
        write_report({"sepit": sepit, "corpus": corpus}, tmp_path / "mixed")
