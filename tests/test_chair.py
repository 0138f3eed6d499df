"""CHAIR: the spec's tagger-independent vectors (A11), metric arithmetic against an independent reference,
ground truth and its JSON cache, image selection, normalizer errors."""

from __future__ import annotations

import hashlib
import json
import random
import sys
import types

import pytest

from vlmfix.errors import UnknownNameError
from vlmfix.eval import chair
from vlmfix.eval.chair import build_inflections, inflections
from vlmfix.eval.chair.normalize import OperaNltkNormalizer
from vlmfix.eval.errors import EvalInputError, MissingGroundTruthError, NormalizerUnavailableError

# Spec A11: caption -> (mention list under `reference`, under `fixed`).
A11_VECTORS = [
    ("a toilet seat", ["toilet"], ["toilet"]),
    ("the seat of the toilet", ["toilet"], ["toilet"]),
    ("a hot dog", ["hot dog"], ["hot dog"]),
    ("a teddy bear", ["teddy bear"], ["teddy bear"]),
    ("a baby elephant", ["elephant"], ["elephant"]),
    ("a passenger train", ["train"], ["train"]),
    ("a bow tie", ["tie"], ["tie"]),
    ("train tracks", [], []),
    ("wine glasses", ["wine glass"], ["wine glass"]),
    ("a dog's bowl", ["dog", "bowl"], ["dog", "bowl"]),
    ("a dog. a cat", ["dog", "cat"], ["dog", "cat"]),
    ("a motor bike", [], ["motorcycle"]),
    ("an iPhone", [], ["cell phone"]),
    ("two men", [], ["person"]),
    ("two vases", [], ["vase"]),
    ("two smartphones", [], ["cell phone"]),
]

# The 80 COCO 2014 category names in category-id order (spec A1).
COCO_NODES = [
    "person",
    "bicycle",
    "car",
    "motorcycle",
    "airplane",
    "bus",
    "train",
    "truck",
    "boat",
    "traffic light",
    "fire hydrant",
    "stop sign",
    "parking meter",
    "bench",
    "bird",
    "cat",
    "dog",
    "horse",
    "sheep",
    "cow",
    "elephant",
    "bear",
    "zebra",
    "giraffe",
    "backpack",
    "umbrella",
    "handbag",
    "tie",
    "suitcase",
    "frisbee",
    "skis",
    "snowboard",
    "sports ball",
    "kite",
    "baseball bat",
    "baseball glove",
    "skateboard",
    "surfboard",
    "tennis racket",
    "bottle",
    "wine glass",
    "cup",
    "fork",
    "knife",
    "spoon",
    "bowl",
    "banana",
    "apple",
    "sandwich",
    "orange",
    "broccoli",
    "carrot",
    "hot dog",
    "pizza",
    "donut",
    "cake",
    "chair",
    "couch",
    "potted plant",
    "bed",
    "dining table",
    "toilet",
    "tv",
    "laptop",
    "mouse",
    "remote",
    "keyboard",
    "cell phone",
    "microwave",
    "oven",
    "toaster",
    "sink",
    "refrigerator",
    "book",
    "clock",
    "vase",
    "scissors",
    "teddy bear",
    "hair drier",
    "toothbrush",
]

A3_ABSENT_FROM_WORDNET = [
    "bikers",
    "coworkers",
    "firetrucks",
    "hairdryers",
    "longboards",
    "macbooks",
    "netbooks",
    "pitbulls",
    "riverboats",
    "sailboards",
    "shortboards",
    "skimboards",
    "smartphones",
    "stovetops",
    "teddybears",
    "bluejays",
    "paddleboats",
    "brindles",
    "lenovos",
]


@pytest.mark.parametrize("quirks", ["reference", "fixed"])
@pytest.mark.parametrize(("caption", "reference", "fixed"), A11_VECTORS)
def test_a11_mention_vectors(caption: str, reference: list[str], fixed: list[str], quirks: str) -> None:
    extractor = chair.make_extractor("simple", quirks)
    expected = reference if quirks == "reference" else fixed
    assert list(extractor(caption).nodes) == expected


def test_simple_does_not_lemmatize_verbs_documented_divergence() -> None:
    # opera_nltk gives [person, skis] when "skiing" is tagged VBG; simple never lemmatizes verbs.
    assert list(chair.make_extractor()("a man skiing down a slope").nodes) == ["person"]


def test_metric_arithmetic_case() -> None:
    captions = [chair.Caption(1, "a dog and a dog and a cat"), chair.Caption(2, "a table")]
    report = chair.score_chair(captions, {1: {"dog"}, 2: {"dining table"}}, chair.make_extractor())
    m = report.overall
    assert m.CHAIRs == pytest.approx(1 / 2)
    assert m.CHAIRi == pytest.approx(1 / 4)
    assert (m.n_mentions, m.n_hallucinated, m.n_captions) == (4, 1, 2)
    assert m.Recall == pytest.approx(2 / 2)
    assert m.Precision == pytest.approx(2 / 3)
    assert m.F1 == pytest.approx(0.8)
    assert m.Len == pytest.approx(5.0)  # 8 and 2 tokens
    assert [len(s.mentions.words) for s in report.sentences] == [8, 2]


def _reference_metrics(mentions: list[list[str]], gts: list[set[str]]) -> dict[str, float | None]:
    """Spec A6 written out directly on mention lists and ground-truth sets."""
    bad = [[m for m in ms if m not in gt] for ms, gt in zip(mentions, gts)]
    n_mentions = sum(len(ms) for ms in mentions)
    found = sum(len(set(ms) & gt) for ms, gt in zip(mentions, gts))
    recall = found / sum(len(gt) for gt in gts) if sum(len(gt) for gt in gts) else None
    precision = found / sum(len(set(ms)) for ms in mentions) if n_mentions else None
    f1 = None
    if precision is not None and recall is not None:
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "CHAIRs": sum(bool(b) for b in bad) / len(mentions),
        "CHAIRi": sum(len(b) for b in bad) / n_mentions if n_mentions else None,
        "Recall": recall,
        "Precision": precision,
        "F1": f1,
    }


@pytest.mark.parametrize("seed", range(5))
def test_metrics_match_independent_reference_on_random_captions(seed: int) -> None:
    rng = random.Random(seed)
    nodes = ["dog", "cat", "horse", "cup", "book", "clock", "pizza", "bench"]  # one-token node words
    captions, mentions, gts = [], [], []
    for image_id in range(12):
        objects = [rng.choice(nodes) for _ in range(rng.randint(0, 5))]
        filler = ["near", "the", "big"]
        captions.append(
            chair.Caption(image_id, " and ".join(f"{rng.choice(filler)} {o}" for o in objects) + ".")
        )
        mentions.append(objects)
        gts.append(set(rng.sample(nodes, rng.randint(1, 4))))
    report = chair.score_chair(captions, dict(enumerate(gts)), chair.make_extractor())
    assert [list(s.mentions.nodes) for s in report.sentences] == mentions
    for key, value in _reference_metrics(mentions, gts).items():
        assert getattr(report.overall, key) == pytest.approx(value)


def test_no_mentions_gives_null_chair_i_and_warns() -> None:
    with pytest.warns(UserWarning, match="CHAIR_i and Precision are undefined"):
        report = chair.score_chair([chair.Caption(1, "a sunny day.")], {1: {"dog"}}, chair.make_extractor())
    assert report.overall.CHAIRi is None and report.overall.Precision is None
    assert report.overall.CHAIRs == 0.0 and report.overall.Recall == 0.0


def test_unknown_image_id_raises_before_scoring_or_counts_as_empty() -> None:
    captions = [chair.Caption(1, "a dog"), chair.Caption(99, "a dog and a cat")]
    with pytest.raises(
        MissingGroundTruthError, match="image_id 99 has no CHAIR ground truth.*on_missing_gt='empty'"
    ):
        chair.score_chair(captions, {1: {"dog"}}, chair.make_extractor())
    report = chair.score_chair(captions, {1: {"dog"}}, chair.make_extractor(), on_missing_gt="empty")
    assert report.overall.n_hallucinated == 2 and report.overall.CHAIRs == pytest.approx(1 / 2)
    with pytest.raises(
        EvalInputError, match="`on_missing_gt` must be one of 'error', 'empty', got 'skip'; With 'error'"
    ):
        chair.score_chair(captions, {1: {"dog"}}, chair.make_extractor(), on_missing_gt="skip")


def test_per_caption_output_is_an_opera_superset_with_pre_merge_indices() -> None:
    report = chair.score_chair(
        [chair.Caption(7, "A hot dog and a cat.")], {7: {"cat", "dog"}}, chair.make_extractor()
    )
    row = report.to_json({"benchmark": "chair"})["sentences"][0]
    opera_keys = {
        "image_id",
        "caption",
        "mscoco_hallucinated_words",
        "mscoco_gt_words",
        "mscoco_generated_words",
        "hallucination_idxs",
        "words",
        "metrics",
    }
    assert opera_keys <= set(row)
    assert row["words"] == ["a", "hot dog", "and", "a", "cat", "."]
    assert row["mscoco_generated_words"] == ["hot dog", "cat"]
    assert row["mscoco_hallucinated_words"] == [["hot dog", "hot dog"]]
    assert row["hallucination_idxs"] == [1]  # "hot" is token 1 of the pre-merge list
    assert row["mscoco_gt_words"] == ["cat", "dog"]
    assert row["metrics"] == {
        "CHAIRs": 1,
        "CHAIRi": 0.5,
        "Recall": 0.5,
        "Precision": 0.5,
        "F1": 0.5,
        "Len": 6,
    }


def test_repeated_sentence_rate_and_mean_words() -> None:
    captions = [chair.Caption(1, "A dog sits. A dog sits! A cat."), chair.Caption(2, "A dog sits.")]
    overall = chair.score_chair(captions, {1: {"dog"}, 2: {"dog"}}, chair.make_extractor()).overall
    assert overall.repeated_sentence_rate == pytest.approx(1 / 4)  # one repeat among four sentences
    assert overall.mean_words == pytest.approx((8 + 3) / 2)


def test_write_chair_scored_round_trips(tmp_path) -> None:
    report = chair.score_chair([chair.Caption(1, "a dog")], {1: {"dog"}}, chair.make_extractor())
    path = tmp_path / "chair_scored.json"
    chair.write_chair_scored(path, report, {"normalizer": "simple@1"})
    document = json.loads(path.read_text())
    assert document["overall_metrics"]["CHAIRs"] == 0.0 and document["fingerprint"] == {
        "normalizer": "simple@1"
    }


@pytest.mark.parametrize(
    ("text", "tokens"),
    [
        ("a dog. a cat", ["a", "dog", ".", "a", "cat"]),
        ("a dog's bowl", ["a", "dog", "'s", "bowl"]),
        ("don't", ["do", "n't"]),
        ("a t-shirt, 3.5 feet", ["a", "t-shirt", ",", "3.5", "feet"]),
        ("mr. smith e.g. st. etc. the end.", ["mr.", "smith", "e.g.", "st.", "etc.", "the", "end", "."]),
        ('"cats" (two)!', ['"', "cats", '"', "(", "two", ")", "!"]),
        ("1,000 dogs; wait...", ["1,000", "dogs", ";", "wait", "..."]),
    ],
)
def test_simple_tokenizer_follows_treebank_conventions(text: str, tokens: list[str]) -> None:
    assert chair.tokenize(text) == tokens


def test_vocabulary_data_matches_the_spec() -> None:
    vocab = chair.load_vocabulary()
    assert list(vocab.node_words) == COCO_NODES
    raw = chair.vocabulary._raw_vocabulary()
    entries = [entry for line in raw["synonyms"] for entry in line]
    assert (len(entries), len(set(entries))) == (416, 403)
    assert {" motor bike", " cheesecake", "iPhone"} <= set(vocab.synonyms)
    fixed = chair.load_vocabulary("fixed")
    assert (fixed.node_of("motor bike"), fixed.node_of("cheesecake"), fixed.node_of("iphone")) == (
        "motorcycle",
        "cake",
        "cell phone",
    )
    assert vocab.double_words["bow tie"] == "tie" and vocab.double_words["baby cub"] == "cub"
    assert vocab.sha256 != fixed.sha256


def test_inflection_table_keeps_wordnet_misses_out_of_reference_mode() -> None:
    reference, fixed = chair.inflection_table("reference"), chair.inflection_table("fixed")
    misses = {"men": "man", "vases": "vase", **{form: form[:-1] for form in A3_ABSENT_FROM_WORDNET}}
    assert not set(misses) & set(reference)
    assert {form: fixed[form] for form in misses} == misses
    assert (reference["dogs"], reference["glasses"], reference["knives"], reference["mice"]) == (
        "dog",
        "glass",
        "knife",
        "mouse",
    )


def test_committed_inflection_table_holds_exactly_the_rule_pairs() -> None:
    raw = inflections._raw_table()
    vocab = chair.vocabulary._raw_vocabulary()
    words = inflections.base_words([e for line in vocab["synonyms"] for e in line], vocab["double_words"])
    derived = inflections.derive_table(words, lemmatize=None)["forms"]
    assert {**raw["forms"], **raw["fixed_only"]} == derived


def _wordnet_available() -> bool:
    try:
        import nltk

        nltk.data.find("corpora/wordnet")
        return True
    except (ImportError, LookupError):
        return False


@pytest.mark.skipif(
    not _wordnet_available(), reason="needs nltk with WordNet data (optional; never downloaded)"
)
def test_inflection_table_rederives_from_wordnet() -> None:
    document = build_inflections.build_table_document(version=inflections.table_version())
    raw = inflections._raw_table()
    assert (document["forms"], document["fixed_only"]) == (raw["forms"], raw["fixed_only"])


def _coco_files(tmp_path, categories, images, annotations, captions=None):
    instances = {
        "images": [{"id": i, "file_name": f"{i}.jpg"} for i in images],
        "categories": [{"id": cid, "name": name} for cid, name in categories],
        "annotations": [
            {"id": n, "image_id": i, "category_id": c, "area": 1.0, "bbox": [0, 0, 1, 1], "iscrowd": 0}
            for n, (i, c) in enumerate(annotations, start=1)
        ],
    }
    inst = tmp_path / "instances.json"
    inst.write_text(json.dumps(instances))
    if captions is None:
        return inst, None
    caps = tmp_path / "captions.json"
    caps.write_text(
        json.dumps(
            {
                "images": instances["images"],
                "annotations": [
                    {"id": n, "image_id": i, "caption": text} for n, (i, text) in enumerate(captions, start=1)
                ],
            }
        )
    )
    return inst, caps


def test_ground_truth_unites_instances_and_caption_mentions_and_caches_as_json(tmp_path, monkeypatch) -> None:
    inst, caps = _coco_files(
        tmp_path,
        [(1, "person"), (18, "dog"), (67, "dining table")],
        [10, 11, 12],
        [(10, 18), (10, 1), (11, 67)],
        [(10, "Two men at a table."), (11, "A cat on the desk."), (12, "Nothing here.")],
    )
    extractor = chair.make_extractor()
    gt = chair.ground_truth_from_coco([inst], [caps], extractor=extractor, cache_dir=tmp_path / "cache")
    assert dict(gt.objects) == {10: {"dog", "person", "dining table"}, 11: {"dining table", "cat"}, 12: set()}
    cache_files = list((tmp_path / "cache").glob("chair_gt_*.json"))
    assert [p.name for p in cache_files] == [f"chair_gt_{gt.cache_key}.json"]
    cached = json.loads(cache_files[0].read_text())  # JSON, not a pickle
    assert cached["objects"]["10"] == ["dining table", "dog", "person"]
    # A second build reads the cache: building from the files again would fail.
    monkeypatch.setattr(chair.ground_truth, "_objects_from_coco", lambda *a: pytest.fail("cache not used"))
    again = chair.ground_truth_from_coco([inst], [caps], extractor=extractor, cache_dir=tmp_path / "cache")
    assert dict(again.objects) == dict(gt.objects) and again.cache_key == gt.cache_key
    # Another quirk mode is another header, so another key ("two men" -> person under fixed).
    monkeypatch.undo()
    fixed = chair.ground_truth_from_coco(
        [inst], [caps], extractor=chair.make_extractor(quirks="fixed"), cache_dir=tmp_path / "cache"
    )
    assert fixed.cache_key != gt.cache_key and len(list((tmp_path / "cache").glob("*.json"))) == 2


def test_ground_truth_cache_with_another_header_is_rebuilt(tmp_path) -> None:
    inst, _ = _coco_files(tmp_path, [(18, "dog")], [1], [(1, 18)])
    extractor = chair.make_extractor()
    gt = chair.ground_truth_from_coco([inst], extractor=extractor, cache_dir=tmp_path)
    path = tmp_path / f"chair_gt_{gt.cache_key}.json"
    document = json.loads(path.read_text())
    document["header"]["quirks"] = "tampered"
    document["objects"]["1"] = ["cat"]
    path.write_text(json.dumps(document))
    with pytest.warns(UserWarning, match="has another header; rebuilding"):
        rebuilt = chair.ground_truth_from_coco([inst], extractor=extractor, cache_dir=tmp_path)
    assert dict(rebuilt.objects) == {1: {"dog"}}
    assert json.loads(path.read_text())["objects"]["1"] == ["dog"]


def test_category_outside_vocabulary_points_to_extra(tmp_path) -> None:
    inst, _ = _coco_files(tmp_path, [(1, "dog"), (2, "glyph")], [1], [(1, 2)])
    with pytest.raises(EvalInputError, match="'glyph'.*chair.vocabulary.extra"):
        chair.ground_truth_from_coco([inst], extractor=chair.make_extractor())
    extractor = chair.make_extractor(extra={"glyph": ["glyphs", "toy glyph"]})
    assert dict(chair.ground_truth_from_coco([inst], extractor=extractor).objects) == {1: {"glyph"}}
    assert list(extractor("two toy glyph and a glyphs").nodes) == ["glyph", "glyph"]
    with pytest.raises(EvalInputError, match="must be lists of paths"):
        chair.ground_truth_from_coco(str(inst), extractor=extractor)


def test_vocabulary_extra_is_validated() -> None:
    with pytest.raises(EvalInputError, match="'Glyph'.*lower-case"):
        chair.load_vocabulary(extra={"Glyph": []})
    with pytest.raises(EvalInputError, match="'puppy' is already a synonym of 'dog'"):
        chair.load_vocabulary(extra={"glyph": ["puppy"]})
    with pytest.raises(EvalInputError, match="must be a list of synonyms"):
        chair.load_vocabulary(extra={"glyph": "glyphs"})


def test_ground_truth_from_json_map(tmp_path) -> None:
    path = tmp_path / "gt.json"
    path.write_text(json.dumps({"5": ["dog", "dining table"], "6": []}))
    gt = chair.ground_truth_from_json(path, vocabulary=chair.load_vocabulary())
    assert dict(gt.objects) == {5: {"dog", "dining table"}, 6: set()}
    path.write_text(json.dumps({"5": ["table"]}))
    with pytest.raises(EvalInputError, match=r"image 5: \['table'\] are not node words"):
        chair.ground_truth_from_json(path, vocabulary=chair.load_vocabulary())


def test_image_sampling_and_hash_follow_the_spec(tmp_path) -> None:
    pool = list(range(100, 0, -3))
    selection = chair.sample_images(pool, n=10, seed=0)
    assert list(selection.image_ids) == random.Random(0).sample(sorted(pool), 10)
    expected_hash = hashlib.sha256(",".join(map(str, sorted(selection.image_ids))).encode()).hexdigest()
    assert selection.hash == expected_hash == chair.image_list_hash(reversed(selection.image_ids))
    assert chair.sample_images(pool, n=10, seed=1).image_ids != selection.image_ids
    inst, _ = _coco_files(tmp_path, [(1, "dog")], [30, 10, 20], [])
    assert chair.image_ids_from_coco(inst) == [10, 20, 30]
    with pytest.raises(EvalInputError, match=r"`n` must be an int in \[1, 34\]"):
        chair.sample_images(pool, n=35)


def test_image_lists_keep_order_and_reject_duplicates(tmp_path) -> None:
    (tmp_path / "ids.json").write_text("[5, 3, 9]")
    (tmp_path / "ids.txt").write_text("5\n3\n9\n")
    assert chair.read_image_list(tmp_path / "ids.json").image_ids == (5, 3, 9)
    assert chair.read_image_list(tmp_path / "ids.txt").image_ids == (5, 3, 9)
    with pytest.raises(EvalInputError, match=r"image ids \[3\] appear more than once"):
        chair.images_from_list([5, 3, 3])
    log = tmp_path / "greedy.jsonl"
    log.write_text("".join(json.dumps({"image_id": i, "caption": "x"}) + "\n" for i in (4, 2)))
    assert chair.images_from_caption_log(log).image_ids == (4, 2)
    with pytest.raises(EvalInputError, match="not the 'opera_llava15_500' hash b438763b"):
        chair.images_from_caption_log(log, preset="opera_llava15_500")


def test_unknown_normalizer_and_quirks_names_are_refused() -> None:
    with pytest.raises(
        UnknownNameError, match="Unknown CHAIR normalizer .*'nltk'. Available: opera_nltk, simple"
    ):
        chair.get_normalizer("nltk")
    with pytest.raises(EvalInputError, match="`quirks` must be one of reference, fixed, got 'strict'"):
        chair.make_extractor(quirks="strict")


def test_opera_nltk_without_nltk_says_pip_install(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "nltk", None)  # import nltk -> ImportError
    with pytest.raises(NormalizerUnavailableError, match="pip install nltk.*chair.normalizer=simple"):
        chair.get_normalizer("opera_nltk")


def _fake_nltk(version: str, present: set[str]) -> types.ModuleType:
    module = types.ModuleType("nltk")
    module.__version__ = version

    def find(path: str) -> str:
        if path not in present:
            raise LookupError(path)
        return path

    module.data = types.SimpleNamespace(find=find)
    return module


@pytest.mark.parametrize(
    ("version", "present", "missing"),
    [
        ("3.9.1", {"corpora/wordnet.zip"}, "punkt_tab, averaged_perceptron_tagger_eng \\(NLTK 3.9.1\\)"),
        ("3.8.1", {"tokenizers/punkt"}, "averaged_perceptron_tagger, wordnet \\(NLTK 3.8.1\\)"),
    ],
)
def test_opera_nltk_with_missing_data_names_packages_and_command(
    monkeypatch, version, present, missing
) -> None:
    monkeypatch.setitem(sys.modules, "nltk", _fake_nltk(version, present))
    with pytest.raises(
        NormalizerUnavailableError, match=f"not installed: {missing}.*python -m nltk.downloader .*NLTK_DATA"
    ):
        chair.get_normalizer("opera_nltk")


def test_opera_nltk_pipeline_maps_tags_and_applies_fixed_overrides(monkeypatch) -> None:
    """Reference step 2 with a stub tagger and lemmatizer: Penn tag -> WordNet POS, fixed-mode overrides."""
    paths = {path for _, path in chair.normalize.NLTK_RESOURCES}
    nltk = _fake_nltk("3.9.1", paths)
    tags = {"men": "NNS", "skiing": "VBG", "vases": "NNS", "red": "JJ", "fast": "RB", "on": "IN"}
    nltk.word_tokenize = str.split
    nltk.pos_tag = lambda tokens: [(t, tags.get(t, "NN")) for t in tokens]
    lemmas = {("skiing", "v"): "ski", ("vases", "n"): "vas", ("men", "n"): "men"}
    seen: list[tuple[str, str]] = []

    class Lemmatizer:
        def lemmatize(self, token: str, pos: str) -> str:
            seen.append((token, pos))
            return lemmas.get((token, pos), token)

    monkeypatch.setitem(sys.modules, "nltk", nltk)
    monkeypatch.setitem(sys.modules, "nltk.stem", types.SimpleNamespace(WordNetLemmatizer=Lemmatizer))
    reference = OperaNltkNormalizer("reference")
    assert reference("Men skiing on red vases fast") == ["men", "ski", "on", "red", "vas", "fast"]
    assert seen[:6] == [
        ("men", "n"),
        ("skiing", "v"),
        ("on", "n"),
        ("red", "a"),
        ("vases", "n"),
        ("fast", "r"),
    ]
    assert OperaNltkNormalizer("fixed")("men on vases") == ["man", "on", "vase"]
    assert reference.version == "opera_nltk@nltk-3.9.1" and reference.comparable_to_opera
    assert chair.MentionExtractor(chair.load_vocabulary(), reference).comparable_to_opera
    assert not chair.make_extractor().comparable_to_opera


def test_opera_nltk_tokenizes_each_caption_once_when_spans_are_recorded(monkeypatch) -> None:
    """The extractor's mentions and their character spans come from one `word_tokenize` call per caption."""
    nltk = _fake_nltk("3.9.1", {path for _, path in chair.normalize.NLTK_RESOURCES})
    calls: list[str] = []

    def word_tokenize(text: str) -> list[str]:
        calls.append(text)
        return text.replace(".", " .").split()

    nltk.word_tokenize = word_tokenize
    nltk.pos_tag = lambda tokens: [(t, "NN") for t in tokens]
    lemmatizer = types.SimpleNamespace(lemmatize=lambda token, pos: token.removesuffix("s"))
    monkeypatch.setitem(sys.modules, "nltk", nltk)
    monkeypatch.setitem(sys.modules, "nltk.stem", types.SimpleNamespace(WordNetLemmatizer=lambda: lemmatizer))
    extract = chair.MentionExtractor(chair.load_vocabulary(), OperaNltkNormalizer("reference"))
    caption = "Two Dogs near a Hot Dog."
    mentions = extract(caption)
    assert calls == [caption.lower()]
    assert mentions.nodes == ("dog", "hot dog")
    assert [caption[a:b] for a, b in mentions.spans] == ["Dogs", "Hot Dog"]
    assert extract("A blue sky.").spans == () and len(calls) == 2  # no mention: one call, no spans
