"""AMBER scoring (spec A2-A5, A8) on a handful of entries written here, expected figures counted by hand in the
comments; the similarity backends and their errors; the loader's checks."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pytest

from vlmfix.eval import amber
from vlmfix.eval.errors import EvalInputError, NormalizerUnavailableError

RELATION = {"dog": ["puppy"], "grass": ["ground"], "frisbee": [], "cat": [], "car": [], "light": [], "ship": []}
GEN = {"type": "generative", "truth": ["dog", "grass"], "hallu": ["frisbee", "cat"]}
DISCRIMINATIVE = [  # (type, truth, response): ids 4..11
    ("discriminative-hallucination", "no", "No"),
    ("discriminative-hallucination", "no", "Yes"),
    ("discriminative-attribute-state", "yes", "Yes"),
    ("discriminative-attribute-state", "no", "No"),
    ("discriminative-attribute-number", "yes", "No"),
    ("discriminative-attribute-action", "no", "yes"),
    ("discriminative-relation", "yes", "Yes"),
    ("relation", "no", "No."),
]
# nouns in V: dog puppy ground frisbee car light
R1 = "A dog and a puppy on the ground with a frisbee, a car and a light."
R2 = "Dog on grass."  # reference: "Dog" is not in V (case-sensitive) -> [grass]; fixed -> [dog, grass]


def write_amber(root: Path, relation: dict = RELATION, safe: str = "light\n") -> Path:
    annotations = [{"id": 1, **GEN}, {"id": 2, **GEN},
                   {"id": 3, "type": "generative", "truth": ["ship", "ship"], "hallu": []}]
    annotations += [{"id": 4 + i, "type": t, "truth": truth} for i, (t, truth, _) in enumerate(DISCRIMINATIVE)]
    (root / "data" / "query").mkdir(parents=True)
    (root / "data" / "annotations.json").write_text(json.dumps(annotations))
    (root / "data" / "relation.json").write_text(json.dumps(relation))
    (root / "data" / "safe_words.txt").write_text(safe)
    queries = [{"id": 1, "image": "AMBER_1.jpg", "query": "Describe this image."}]
    (root / "data" / "query" / "query_generative.json").write_text(json.dumps(queries))
    return root


@pytest.fixture
def data(tmp_path: Path) -> amber.AmberData:
    return amber.load_amber(write_amber(tmp_path))


def simple(quirks: str = "reference") -> amber.SimpleNouns:
    return amber.SimpleNouns(lower=quirks == "fixed")


def table(tmp_path: Path, data: amber.AmberData, pairs: list, floor: float = 0.5) -> amber.TableSimilarity:
    vocabulary = sorted(data.vocabulary)
    digest = hashlib.sha256(json.dumps(vocabulary, separators=(",", ":")).encode()).hexdigest()
    path = tmp_path / "table.json"
    path.write_text(json.dumps({"format": 1, "header": {"model": "en_core_web_lg", "vocabulary_sha256": digest,
                                                        "floor": floor}, "pairs": pairs}))
    return amber.make_similarity("table", table=path, vocabulary_sha256=data.vocabulary_sha256)


# ------------------------------------------------------------------ generative
def test_generative_without_similarity(data: amber.AmberData) -> None:
    scores = amber.score_generative({1: R1, 2: R2}, data, simple(), amber.NoSimilarity())
    # R1: dog (truth), puppy (-> dog), ground (-> grass), frisbee (hallu, credited to Cog, hallucinated),
    # car (hallucinated), light (global safe: skipped, still counted) -> 6 nouns, 2 hallucinated.
    # R2: grass -> 1 noun, credits grass.  CHAIR 2/7; Cover (2 + 1) / (2 + 2); Hal 1/2; Cog (1 + 0) / (2 + 2)
    assert scores.chair == pytest.approx(2 / 7)
    assert (scores.cover, scores.hal, scores.cog) == (0.75, 0.5, 0.25)
    assert scores.as_printed == {"CHAIR": 28.6, "Cover": 75.0, "Hal": 50.0, "Cog": 25.0}
    assert scores.outcomes[0].nouns == ("dog", "puppy", "ground", "frisbee", "car", "light")
    assert scores.outcomes[1].nouns == ("grass",)


def test_generative_fixed_quirks_count_the_capitalised_noun(data: amber.AmberData) -> None:
    scores = amber.score_generative({1: R1, 2: R2}, data, simple("fixed"), amber.NoSimilarity(), quirks="fixed")
    # R2 -> [dog, grass]: 8 nouns, 2 hallucinated; every truth word covered
    assert scores.chair == pytest.approx(2 / 8)
    assert scores.cover == 1.0


@pytest.mark.parametrize(("pair", "chair", "cog"), [
    (["car", "cat", 0.85], 2 / 7, 2 / 4),   # car ~ cat credits cat (Cog), car is still hallucinated
    (["car", "dog", 0.81], 1 / 7, 1 / 4),   # car ~ dog: a safe match, not hallucinated
    (["car", "dog", 0.80], 2 / 7, 1 / 4),   # exactly the threshold: still hallucinated (strict >)
])
def test_generative_similarity_table(tmp_path: Path, data: amber.AmberData, pair: list, chair: float,
                                     cog: float) -> None:
    scores = amber.score_generative({1: R1, 2: R2}, data, simple(), table(tmp_path, data, [pair]))
    assert scores.chair == pytest.approx(chair)
    assert scores.cog == pytest.approx(cog)


def test_duplicated_truth_word(data: amber.AmberData) -> None:
    # truth [ship, ship], noun [ship]: the first entry only (reference), both (fixed)
    assert amber.score_generative({3: "A ship."}, data, simple(), amber.NoSimilarity()).cover == 0.5
    fixed = amber.score_generative({3: "A ship."}, data, simple("fixed"), amber.NoSimilarity(), quirks="fixed")
    assert fixed.cover == 1.0


def test_shared_association_credits_the_first_truth_word_only(tmp_path: Path) -> None:
    relation = {**RELATION, "dog": ["pet"], "cat": ["pet"], "pet": []}
    root = write_amber(tmp_path, relation)
    annotations = json.loads((root / "data" / "annotations.json").read_text())
    annotations[0] = {"id": 1, "type": "generative", "truth": ["dog", "cat"], "hallu": ["car"]}
    (root / "data" / "annotations.json").write_text(json.dumps(annotations))
    data = amber.load_amber(root)
    # "pet" belongs to dog and cat: reference credits dog only (1/2), fixed both (2/2)
    assert amber.score_generative({1: "A pet."}, data, simple(), amber.NoSimilarity()).cover == 0.5
    assert amber.score_generative({1: "A pet."}, data, simple("fixed"), amber.NoSimilarity(),
                                  quirks="fixed").cover == 1.0


def test_one_clean_response_prints_hal_0_1(data: amber.AmberData) -> None:
    # 100 - 1 / 1.001 * 100 = 0.0999 -> 0.1 (the 0.001 seed)
    assert amber.score_generative({1: "A dog."}, data, simple(), amber.NoSimilarity()).as_printed["Hal"] == 0.1


# ------------------------------------------------------------------ discriminative
def answers() -> dict[int, str]:
    return {4 + i: response for i, (_, _, response) in enumerate(DISCRIMINATIVE)}


def test_discriminative_amber_exact(data: amber.AmberData) -> None:
    scores = amber.score_discriminative(answers(), data)
    # correct: 4 (exist No, state Yes, state No, drel Yes) of 8; answered No: 3 (exist, state, number), of which
    # truth no: 2; truth no: 5 -> P 2/3, R 2/5, F1 = 2(2/3)(2/5)/(2/3 + 2/5) = 1/2. "yes" and "No." are unknown.
    overall = scores.groups["overall"]
    assert (overall["accuracy"], overall["precision"], overall["recall"], overall["f1"]) == pytest.approx(
        (1 / 2, 2 / 3, 2 / 5, 1 / 2))
    existence = scores.groups["existence"]  # 1 of 2 correct; one answered No (right); 2 truth no
    assert (existence["accuracy"], existence["precision"], existence["recall"], existence["f1"]) == pytest.approx(
        (1 / 2, 1, 1 / 2, 2 / 3))
    attribute = scores.groups["attribute"]  # state Yes/No right, number No and action "yes" wrong
    assert [attribute[k] for k in ("accuracy", "precision", "recall", "f1")] == pytest.approx([1 / 2] * 4)
    relation = scores.groups["relation"]  # Yes right, "No." unknown: no answered No
    assert [relation[k] for k in ("accuracy", "precision", "recall", "f1")] == [1 / 2, 0, 0, 0]
    assert scores.unknown_rate == 2 / 8
    assert scores.yes_ratio == 3 / 8  # exist Yes, state Yes, drel Yes


def test_discriminative_as_printed(data: amber.AmberData) -> None:
    printed = amber.score_discriminative(answers(), data).as_printed
    # overall: 4/8.001 = 49.99 -> 50.0; 2/3.001 = 66.64 -> 66.6; 2/5.001 -> 40.0; F1 from rounded P, R -> 50.0
    assert printed["overall"] == {"Accuracy": 50.0, "Precision": 66.6, "Recall": 40.0, "F1": 50.0}
    # existence: 1/1.001 -> 99.9; F1 = 2(.999)(.5)/(1.499 + .001) -> 66.6
    assert printed["existence"] == {"Accuracy": 50.0, "Precision": 99.9, "Recall": 50.0, "F1": 66.6}
    # attribute sums three seeded counters: 1/2.003 = 49.93 -> 49.9
    assert printed["attribute"] == {"Accuracy": 50.0, "Precision": 49.9, "Recall": 49.9, "F1": 49.9}


def test_discriminative_vlmevalkit_parser(data: amber.AmberData) -> None:
    scores = amber.score_discriminative(answers(), data, parser="vlmevalkit_yorn")
    # "yes" -> yes (wrong), "No." -> no (right): 5/8 correct; answered No 4, of which truth no 3; truth no 5
    overall = scores.groups["overall"]
    assert (overall["accuracy"], overall["precision"], overall["recall"]) == pytest.approx((5 / 8, 3 / 4, 3 / 5))
    assert overall["f1"] == pytest.approx(2 * 0.75 * 0.6 / 1.35)
    assert scores.unknown_rate == 0


def test_amber_score(data: amber.AmberData) -> None:
    generative = amber.score_generative({1: R1, 2: R2}, data, simple(), amber.NoSimilarity())
    discriminative = amber.score_discriminative(answers(), data)
    # (100 - 28.57 + 50) / 2 = 60.71
    assert 100 * amber.amber_score(generative, discriminative) == pytest.approx(60.714, abs=1e-3)
    assert amber.missing_dimensions(discriminative) == []
    only_existence = amber.score_discriminative({4: "No"}, data)
    assert amber.missing_dimensions(only_existence) == ["attribute", "relation"]


def test_wrong_task_ids_are_refused(data: amber.AmberData) -> None:
    with pytest.raises(EvalInputError, match="AMBER id 4 is a 'discriminative-hallucination' entry, not generative"):
        amber.score_generative({4: "A dog."}, data, simple(), amber.NoSimilarity())
    with pytest.raises(EvalInputError, match="AMBER id 1 is generative"):
        amber.score_discriminative({1: "Yes"}, data)
    with pytest.raises(EvalInputError, match=r"AMBER id 99 is not in annotations.json \(ids 1..11\)"):
        amber.score_discriminative({99: "Yes"}, data)


# ------------------------------------------------------------------ similarity backends and normalizers
def test_official_without_spacy_or_table_is_one_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "spacy", None)
    monkeypatch.setattr("vlmfix.eval.amber.similarity.TABLE_DIR", tmp_path)
    with pytest.raises(amber.SimilarityUnavailableError,
                       match=r"python -m spacy download en_core_web_lg.*amber\.similarity=none"):
        amber.make_similarity("official")


def test_official_falls_back_to_the_shipped_table(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                  data: amber.AmberData) -> None:
    monkeypatch.setitem(sys.modules, "spacy", None)
    monkeypatch.setattr("vlmfix.eval.amber.similarity.TABLE_DIR", tmp_path)
    amber.write_table(tmp_path / "amber_similarity_en_core_web_lg-3.8.0.json", data.vocabulary,
                      lambda a, b: 0.9 if {a, b} == {"car", "cat"} else 0.1,
                      {"spacy_version": "3.8", "model": "en_core_web_lg", "model_version": "3.8.0", "vectors": "x"})
    similarity = amber.make_similarity("official", vocabulary_sha256=data.vocabulary_sha256)
    described = similarity.describe()
    assert (described["similarity"], described["backend"], described["comparable_to_official"]) == (
        "official", "table", True)
    assert similarity("car", "cat") == 0.9 and similarity("cat", "car") == 0.9
    assert similarity("car", "dog") == 0.0  # under the floor: not stored
    assert similarity("dog", "dog") == 1.0


def test_table_checks(tmp_path: Path, data: amber.AmberData) -> None:
    path = tmp_path / "t.json"
    path.write_text(json.dumps({"format": 1, "header": {"model": "en_core_web_lg", "vocabulary_sha256": "00",
                                                        "floor": 0.5}, "pairs": []}))
    with pytest.raises(EvalInputError, match="made for another vocabulary"):
        amber.make_similarity("table", table=path, vocabulary_sha256=data.vocabulary_sha256)
    with pytest.raises(EvalInputError, match="below the table's floor 0.5"):
        amber.make_similarity("table", table=path, threshold=0.4)
    with pytest.raises(EvalInputError, match="`amber.similarity` must be one of official, table, spacy, none"):
        amber.make_similarity("lg")


def test_none_backend_is_marked_not_comparable() -> None:
    assert amber.NoSimilarity().describe() == {"similarity": "none", "comparable_to_official": False}


def test_nltk_normalizer_names_its_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "nltk", None)
    with pytest.raises(NormalizerUnavailableError, match=r"amber\.normalizer='nltk' needs the optional package nltk"):
        amber.make_normalizer("nltk")


def test_simple_normalizer_plurals_and_non_noun_readings() -> None:
    vocabulary = frozenset({"dog", "knife", "watch", "bench", "man"})
    text = "Two dogs, knives and benches; men watch a watch."
    # dogs -> dog, knives -> knife, benches -> bench, men -> man; "watch" counts only after a determiner
    assert amber.SimpleNouns()(text, vocabulary) == ["dog", "knife", "bench", "man", "watch"]


# ------------------------------------------------------------------ loader
def test_loader_checks(tmp_path: Path) -> None:
    with pytest.raises(EvalInputError, match=r"annotations.json' does not exist; expected .*junyangwang0410/AMBER"):
        amber.load_amber(tmp_path)
    root = write_amber(tmp_path / "a", {**RELATION, "cat": None})
    with pytest.raises(EvalInputError, match="relation.json must be a JSON object word -> list"):
        amber.load_amber(root)
    relation = {k: v for k, v in RELATION.items() if k != "cat"}
    root = write_amber(tmp_path / "b", relation)
    with pytest.raises(EvalInputError, match=r"AMBER id 1: the word\(s\) \['cat'\] are not keys"):
        amber.load_amber(root)


def test_loader_reads_the_files(data: amber.AmberData) -> None:
    assert data.vocabulary == {"dog", "puppy", "grass", "ground", "frisbee", "cat", "car", "light", "ship"}
    assert data.safe_words == {"light"}
    assert data.queries("generative")[0] == amber.AmberQuery(1, "AMBER_1.jpg", "Describe this image.")
    assert set(data.sha256) == {"annotations.json", "relation.json", "safe_words.txt", "query/query_generative.json"}


def test_fingerprint_records_the_similarity_backend(data: amber.AmberData) -> None:
    from vlmfix.eval import Decoding, amber_protocol, protocol_fingerprint

    fields = amber_protocol(data, parts=["generative"], parser="amber_exact", normalizer=simple(),
                            similarity=amber.NoSimilarity(), threshold=0.8, quirks="reference", n_images=1,
                            subset=False)
    assert fields["similarity"] == {"similarity": "none", "comparable_to_official": False}
    assert fields["comparable_to_official"] is False  # `simple` and `none` are not the official protocol
    fingerprint = protocol_fingerprint(model_id="m", model_revision=None, method="greedy", method_params={},
                                       decoding=Decoding(max_new_tokens=4), prompt="p", chat_template=None,
                                       amber=fields)
    assert fingerprint["benchmark"] == "amber" and fingerprint["amber"]["normalizer"] == "amber-simple-1"
    assert "mme" not in fingerprint


def stub_nltk(monkeypatch: pytest.MonkeyPatch, tags: dict[str, str]) -> None:
    """A stand-in for nltk (its data cannot be installed here): whitespace tokens with the final period split
    off, tags from `tags` (else "DT"), and a lemmatizer that drops a plural "s" (not "ss")."""
    import types

    nltk = types.ModuleType("nltk")
    nltk.__version__ = "3.9.1"  # type: ignore[attr-defined]
    nltk.data = types.SimpleNamespace(find=lambda path: path)  # type: ignore[attr-defined]
    nltk.word_tokenize = lambda text: text.replace(".", " .").split()  # type: ignore[attr-defined]
    nltk.pos_tag = lambda tokens: [(t, tags.get(t, "DT")) for t in tokens]  # type: ignore[attr-defined]
    stem = types.ModuleType("nltk.stem")

    class WordNetLemmatizer:
        def lemmatize(self, word: str) -> str:
            return word[:-1] if word.endswith("s") and not word.endswith("ss") else word

    stem.WordNetLemmatizer = WordNetLemmatizer  # type: ignore[attr-defined]
    nltk.stem = stem  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "nltk", nltk)
    monkeypatch.setitem(sys.modules, "nltk.stem", stem)


def test_nltk_normalizer_keeps_case_and_noun_tags(monkeypatch: pytest.MonkeyPatch, data: amber.AmberData) -> None:
    stub_nltk(monkeypatch, {"Dog": "NNP", "dogs": "NNS", "grass": "NN", "run": "VB"})
    nouns = amber.make_normalizer("nltk")
    # "Dog" (NNP) is kept as "Dog", which is not a word of V; "run" (a verb) is dropped; "dogs" -> "dog"
    assert nouns("Dog dogs run on grass.", data.vocabulary) == ["Dog", "dog", "grass"]
    assert amber.response_nouns("Dog dogs run on grass.", data, nouns) == ["dog", "grass"]
    fixed = amber.make_normalizer("nltk", lower=True)
    assert amber.response_nouns("Dog dogs run on grass.", data, fixed, quirks="fixed") == ["dog", "dog", "grass"]
    assert (nouns.version, nouns.comparable_to_official) == ("nltk-3.9.1", True)
