"""POPE: parser cases (B9), metric arithmetic against an independent reference, question files, the
lmms-lab/POPE local reader, and builder properties on synthetic COCO-format annotations."""

from __future__ import annotations

import json
import random
from collections import Counter

import pytest

from vlmfix.errors import UnknownNameError
from vlmfix.eval import pope
from vlmfix.eval.errors import EvalInputError

# Spec B9: answer -> (official, opera).
OFFICIAL_OPERA_CASES = [
    ("Yes", "yes", "yes"),
    ("No", "no", "no"),
    ("No, there is not.", "no", "no"),
    ("There is no dog in the image.", "no", "no"),
    ("NO", "yes", "no"),
    ("I don't see one", "yes", "no"),
    ("Yes. No.", "yes", "no"),
    ("no!", "yes", "yes"),
    ("", "yes", "yes"),
    ("No\n", "no", "no"),
]


@pytest.mark.parametrize(("answer", "official", "opera"), OFFICIAL_OPERA_CASES)
def test_official_and_opera_parsers(answer: str, official: str, opera: str) -> None:
    assert pope.parse_answer(answer) == official  # official is the default
    assert pope.parse_answer(answer, "opera") == opera


@pytest.mark.parametrize(
    ("label", "answer", "outcome"),
    [
        ("yes", "Yes, there is", "TP"),
        ("yes", "Yesterday", "TP"),
        ("no", "There is a snowboard", "TN"),
        ("no", "Yes", "FP"),
        ("yes", "No", "FN"),
    ],
)
def test_vcd_substring_outcomes(label: str, answer: str, outcome: str) -> None:
    predicted = pope.parse_answer(answer, "vcd_substring", label=label)
    expected = {"TP": "yes", "FN": "no", "TN": "no", "FP": "yes"}[outcome]
    assert predicted == expected


@pytest.mark.parametrize(
    ("parser", "answer", "expected"),
    [
        ("exact", "yes.", "unknown"),
        ("exact", " Yes ", "yes"),
        ("exact", "No", "no"),
        ("yesno_words", "Yes, it is.", "yes"),
        ("yesno_words", "no.", "no"),
        ("yesno_words", "yes and no", "unknown"),
        ("yesno_words", "maybe", "unknown"),
    ],
)
def test_exact_and_yesno_words_parsers(parser: str, answer: str, expected: str) -> None:
    assert pope.parse_answer(answer, parser) == expected


def test_parser_errors_name_the_options() -> None:
    with pytest.raises(
        UnknownNameError,
        match="Unknown yes/no answer parser .*'llava'. Available: amber_exact, exact, lmms_substring, "
        "mme_lmms, mme_official, official, opera, vcd_substring, vlmevalkit_yorn, yesno_words",
    ):
        pope.parse_answer("Yes", "llava")
    with pytest.raises(EvalInputError, match="'vcd_substring' decides by the question's label.*got None"):
        pope.parse_answer("Yes", "vcd_substring")


def _questions(labels: list[str], ids: list[int] | None = None) -> list[pope.PopeQuestion]:
    ids = ids or list(range(1, len(labels) + 1))
    return [
        pope.PopeQuestion(i, f"{i}.jpg", "Is there a dog in the image?", label)
        for i, label in zip(ids, labels)
    ]


def test_metric_arithmetic_case() -> None:
    questions = _questions(["yes", "no", "yes", "no", "yes", "no"])
    answers = dict(zip(range(1, 7), ["Yes", "Yes", "Yes", "Yes", "No", "No"]))
    scores = pope.score_pope(questions, answers, split="random")
    c = scores.counts
    assert (c.tp, c.fp, c.fn, c.tn) == (2, 2, 1, 1)
    assert scores.accuracy == pytest.approx(0.5)
    assert scores.precision == pytest.approx(0.5)
    assert scores.recall == pytest.approx(2 / 3)
    assert scores.f1 == pytest.approx(4 / 7)
    assert scores.yes_ratio == pytest.approx(2 / 3)  # from predictions, not labels (which give 1/2)
    assert scores.complete and scores.unknown_rate == 0.0


def _reference_scores(labels: list[str], predictions: list[str]) -> dict[str, float]:
    """Spec B6 directly, with unknown counted as wrong."""
    tp = sum(lab == "yes" and p == "yes" for lab, p in zip(labels, predictions))
    tn = sum(lab == "no" and p == "no" for lab, p in zip(labels, predictions))
    fp = sum(lab == "no" and p != "no" for lab, p in zip(labels, predictions))
    fn = sum(lab == "yes" and p != "yes" for lab, p in zip(labels, predictions))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    return {
        "accuracy": (tp + tn) / len(labels),
        "precision": precision,
        "recall": recall,
        "f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
        "yes_ratio": predictions.count("yes") / len(labels),
        "unknown_rate": predictions.count("unknown") / len(labels),
    }


@pytest.mark.parametrize("seed", range(5))
def test_scores_match_independent_reference_with_unknowns(seed: int) -> None:
    rng = random.Random(seed)
    labels = [rng.choice(["yes", "no"]) for _ in range(40)]
    raw = [
        rng.choice(["yes", "no", "Yes.", "maybe"]) for _ in labels
    ]  # "Yes." and "maybe" are unknown for exact
    predictions = [r if r in ("yes", "no") else "unknown" for r in raw]
    scores = pope.score_pope(_questions(labels), dict(enumerate(raw, start=1)), parser="exact")
    for key, value in _reference_scores(labels, predictions).items():
        assert getattr(scores, key) == pytest.approx(value), key
    assert scores.counts.unknown == predictions.count("unknown")


def test_answers_join_by_id_not_position_and_partial_runs_say_so() -> None:
    questions = _questions(["yes", "no", "yes", "no"], ids=[10, 3, 7, 42])  # ids with gaps, not sorted
    answers = {42: "No", 10: "Yes", 3: "Yes"}  # 7 unanswered, different order
    with pytest.warns(UserWarning, match="1 of 4 questions have no answer"):
        scores = pope.score_pope(questions, answers, split="random")
    assert (scores.counts.tp, scores.counts.fp, scores.counts.tn, scores.counts.fn) == (1, 1, 1, 0)
    assert not scores.complete and scores.n_missing == 1 and scores.to_json()["complete"] is False
    with pytest.raises(EvalInputError, match=r"question_id\(s\) \[99\] have no question in split 'random'"):
        pope.score_pope(questions, {99: "Yes"}, split="random")


def test_zero_denominators_give_zero_and_warn() -> None:
    with pytest.warns(UserWarning) as record:
        scores = pope.score_pope(_questions(["no", "no"]), {1: "No", 2: "No"})
    assert [str(w.message) for w in record] == [
        "POPE: no 'yes' predictions, precision set to 0",
        "POPE: no 'yes' labels, recall set to 0",
        "POPE: precision + recall is 0, F1 set to 0",
    ]
    assert (scores.precision, scores.recall, scores.f1, scores.accuracy) == (0.0, 0.0, 0.0, 1.0)


def test_summary_means_and_pooled_counts() -> None:
    a = pope.score_pope(_questions(["yes", "no"]), {1: "Yes", 2: "Yes"}, split="random")
    b = pope.score_pope(
        _questions(["yes", "no", "yes", "no"]), {1: "Yes", 2: "No", 3: "No", 4: "No"}, split="popular"
    )
    summary = pope.summarize_pope([a, b])
    assert summary.mean_f1 == pytest.approx((a.f1 + b.f1) / 2)
    assert summary.mean_accuracy == pytest.approx((0.5 + 0.75) / 2)
    pooled = summary.pooled
    assert (pooled.counts.tp, pooled.counts.fp, pooled.counts.tn, pooled.counts.fn) == (2, 1, 2, 1)
    assert pooled.accuracy == pytest.approx(4 / 6) and pooled.n_questions == 6
    with pytest.raises(EvalInputError, match="different parsers"):
        pope.summarize_pope([a, pope.score_pope(_questions(["yes"]), {1: "yes"}, parser="exact")])


ROWS = [
    {"question_id": 1, "image": "a.jpg", "text": "Is there a dog in the image?", "label": "yes"},
    {"question_id": 2, "image": "a.jpg", "text": "Is there a cat in the image?", "label": "no"},
]


def test_reader_sniffs_jsonl_in_json_file_and_json_arrays(tmp_path) -> None:
    jsonl = tmp_path / "coco_pope_random.json"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in ROWS) + "\n")
    array = tmp_path / "gqa_pope_random.json"
    array.write_text("  \n" + json.dumps(ROWS))
    expected = [
        pope.PopeQuestion(1, "a.jpg", ROWS[0]["text"], "yes"),
        pope.PopeQuestion(2, "a.jpg", ROWS[1]["text"], "no"),
    ]
    assert pope.read_questions(jsonl) == pope.read_questions(array) == expected
    with pytest.warns(UserWarning, match="not one of the pinned released files"):
        loaded = pope.load_question_file(jsonl, split="random")
    assert loaded.versions == () and loaded.split == "random"


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([ROWS[0], ROWS[0]], r"duplicate question_id\(s\) \[1\]"),
        ([{**ROWS[0], "label": "Yes"}], "label 'Yes'; labels must be 'yes' or 'no'"),
        ([{"question_id": 1, "image": "a.jpg", "label": "no"}], r"lacks the field\(s\) text"),
    ],
)
def test_reader_rejects_bad_files(tmp_path, rows, message) -> None:
    path = tmp_path / "q.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(EvalInputError, match=message):
        pope.read_questions(path)


def test_pinned_hashes_classify_released_files() -> None:
    # Spec B2: split and versions of every pinned sha256.
    expected = {
        "c16b65d2df6d70bb0814c8a4375833d39cdb09928fd936d3fc546491efa37f35": ("random", ("e3e3926",)),
        "5b16653023bf4f64d57eb0d168259de6627f5cde7538b85ebed3cc33034aa6cc": ("popular", ("e3e3926",)),
        "1d8f0906a9b50c05640f6f23abfac97523be2a1bed28f7eadc63b811699b2d26": ("adversarial", ("e3e3926",)),
        "ac25245170b975a5bdf9080b23fd431dfe6be458bc038259c1f4f09a6bef7994": ("random", ("edebdda", "head")),
        "72c1a8ad45d0c13514f5f22598261df41d3b533854d29682e924db50ed8aa753": ("popular", ("edebdda", "head")),
        "207273ac3b7fdd04df206c6809b77a4e7f60360a730ade6b7e32804e8dd5602f": ("adversarial", ("edebdda",)),
        "420b3407db1fa9f1187a805dca41cb7b97fd91504e6c2179706188c107fb8ef8": ("adversarial", ("head",)),
    }
    assert {sha: (f.split, f.versions) for sha, f in pope.PINNED_FILES.items()} == expected


def test_write_then_read_round_trip_and_answers_file(tmp_path) -> None:
    questions = [
        pope.PopeQuestion(1, "a.jpg", "Is there an apple in the image?", "yes", image_id=5, object="apple")
    ]
    pope.write_questions(tmp_path / "q.jsonl", questions)
    assert pope.read_questions(tmp_path / "q.jsonl") == questions
    answers = tmp_path / "answers.jsonl"
    answers.write_text('{"question_id": 1, "text": "Yes"}\n{"question_id": 1, "text": "No"}\n')
    with pytest.raises(EvalInputError, match="answers question_id 1 twice"):
        pope.read_answers(answers)


# ---------------------------------------------------------------- builder

CATEGORY_IDS = {
    "person": 1,
    "bicycle": 2,
    "car": 3,
    "dog": 18,
    "cat": 17,
    "couch": 63,
    "tv": 72,
    "frisbee": 34,
    "apple": 53,
    "bottle": 44,
    "cup": 47,
    "book": 84,
    "clock": 85,
    "chair": 62,
}


def _write_coco(path, object_lists: dict[int, list[str]], categories=None) -> None:
    """A COCO-format instances file whose annotation order gives exactly these object lists."""
    categories = categories or sorted(CATEGORY_IDS)
    annotations = []
    for image_id, names in object_lists.items():
        for name in names:
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": CATEGORY_IDS[name],
                    "area": 10.0,
                    "bbox": [0, 0, 1, 1],
                    "iscrowd": 0,
                }
            )
    path.write_text(
        json.dumps(
            {
                "images": [{"id": i, "file_name": f"img_{i}.jpg"} for i in object_lists],
                "categories": [{"id": CATEGORY_IDS[n], "name": n} for n in categories],
                "annotations": annotations,
            }
        )
    )


SPEC_LISTS = {
    1: ["person", "dog", "car"],
    2: ["person", "cat", "couch"],
    3: ["person", "dog", "frisbee"],
    4: ["cat", "couch", "tv"],
}  # A, B, C, D of spec B9


def _negatives(questions) -> dict[int, list[str]]:
    result: dict[int, list[str]] = {}
    for q in questions:
        if q.label == "no":
            result.setdefault(q.image_id, []).append(q.object)
    return result


def test_builder_popular_and_adversarial_follow_the_spec_example(tmp_path) -> None:
    _write_coco(tmp_path / "inst.json", SPEC_LISTS)
    build = pope.build_pope(
        tmp_path / "inst.json", tmp_path / "out", name="toy", config=pope.PopeBuildConfig(n_images=4)
    )
    assert build.meta["freq"] == {
        "person": 3,
        "cat": 2,
        "couch": 2,
        "dog": 2,
        "car": 1,
        "frisbee": 1,
        "tv": 1,
    }
    popular = _negatives(pope.read_questions(build.files["popular"]))
    assert popular == {
        1: ["cat", "couch", "frisbee"],
        2: ["dog", "car", "frisbee"],
        3: ["cat", "couch", "car"],
        4: ["person", "dog", "car"],
    }
    adversarial = _negatives(pope.read_questions(build.files["adversarial"]))
    assert adversarial[1][:2] == ["cat", "frisbee"] and adversarial[1][2] in {"couch", "tv"}
    assert adversarial[2][:2] == ["dog", "tv"] and adversarial[2][2] in {"car", "frisbee"}


def _random_lists(seed: int, n_images: int = 30) -> dict[int, list[str]]:
    rng = random.Random(seed)
    names = sorted(CATEGORY_IDS)
    return {100 + i: rng.sample(names, rng.randint(1, 6)) for i in range(n_images)}


@pytest.mark.parametrize("seed", [0, 1])
def test_builder_properties_on_random_annotations(tmp_path, seed: int) -> None:
    lists = _random_lists(seed)
    _write_coco(tmp_path / "inst.json", lists)
    config = pope.PopeBuildConfig(n_images=12, seed=seed)
    build = pope.build_pope(tmp_path / "inst.json", tmp_path / "out", config=config)
    eligible = sorted(i for i, names in lists.items() if len(names) >= 3)
    chosen = random.Random(seed).sample(eligible, 12)
    freq = Counter(name for i in chosen for name in lists[i])
    cooc = {o: Counter(p for i in chosen if o in lists[i] for p in lists[i] if p != o) for o in freq}
    popular_rank = sorted(freq, key=lambda o: (-freq[o], o))
    for split, path in build.files.items():
        questions = pope.read_questions(path)
        assert [q.question_id for q in questions] == list(range(1, 6 * 12 + 1))
        by_image: dict[int, list[pope.PopeQuestion]] = {}
        for q in questions:
            by_image.setdefault(q.image_id, []).append(q)
        assert list(by_image) == chosen  # sampled order
        for image_id, rows in by_image.items():
            truth = lists[image_id]
            assert [q.label for q in rows] == ["yes", "no"] * 3  # 3 yes + 3 no, alternating
            assert [q.object for q in rows[0::2]] == truth[:3]  # the first three objects, in annotation order
            negatives = [q.object for q in rows[1::2]]
            assert (
                not set(negatives) & set(truth) and len(set(negatives)) == 3
            )  # absent from the ground truth
            assert all(q.image == f"img_{image_id}.jpg" for q in rows)
            asked: list[str] = []
            for positive, negative in zip(truth[:3], negatives):
                if split == "popular":
                    ranking = popular_rank
                elif split == "adversarial":  # most co-occurring with this positive first
                    ranking = sorted(cooc[positive], key=lambda o: (-cooc[positive][o], o))
                else:
                    ranking = []
                first = next((o for o in ranking if o not in truth and o not in asked), None)
                assert negative == first if first is not None else negative in freq
                asked.append(negative)


def test_same_seed_gives_byte_identical_files_and_text_articles(tmp_path) -> None:
    lists = _random_lists(3)
    _write_coco(tmp_path / "inst.json", lists)
    config = pope.PopeBuildConfig(n_images=10, seed=7)
    first = pope.build_pope(tmp_path / "inst.json", tmp_path / "a", config=config)
    second = pope.build_pope(tmp_path / "inst.json", tmp_path / "b", config=config, compat_names=True)
    for split in pope.SPLITS:
        assert first.files[split].read_bytes() == second.files[split].read_bytes()
        assert second.files[split].name == f"coco_pope_{split}.json"
    other = pope.build_pope(
        tmp_path / "inst.json", tmp_path / "c", config=pope.PopeBuildConfig(n_images=10, seed=8)
    )
    assert other.files["random"].read_bytes() != first.files["random"].read_bytes()
    for q in pope.read_questions(first.files["random"]):  # only the article follows the name
        assert q.text == f"Is there {'an' if q.object[0] in 'aeiou' else 'a'} {q.object} in the image?"
    assert (
        pope.question_text("tv", display_names={"tv": "television"}) == "Is there a television in the image?"
    )
    meta = json.loads((tmp_path / "a" / "meta.json").read_text())
    assert meta["config"]["seed"] == 7 and meta["counts"]["random"] == {"questions": 60, "yes": 30, "no": 30}


def test_small_vocabulary_and_too_few_images_raise(tmp_path) -> None:
    four = ["person", "dog", "cat", "car"]
    _write_coco(
        tmp_path / "inst.json", {1: ["person", "dog", "cat"], 2: ["dog", "cat", "car"]}, categories=four
    )
    with pytest.raises(EvalInputError, match="leaving 1 < 3 candidates for negative questions"):
        pope.build_pope(tmp_path / "inst.json", tmp_path / "out", config=pope.PopeBuildConfig(n_images=2))
    assert not (tmp_path / "out").exists()  # nothing written before the check
    with pytest.raises(EvalInputError, match="only 2 images have >= 3 objects, but n_images=5"):
        pope.build_pope(tmp_path / "inst.json", tmp_path / "out", config=pope.PopeBuildConfig(n_images=5))


def test_build_config_is_validated() -> None:
    with pytest.raises(EvalInputError, match="`template` must name its fields"):
        pope.PopeBuildConfig(template="Is there a {} in the image?")
    with pytest.raises(
        EvalInputError, match="`positive_order` must be one of 'annotation', 'area', 'shuffled', got 'random'"
    ):
        pope.PopeBuildConfig(positive_order="random")
    with pytest.raises(
        EvalInputError, match=r"`splits\[0\]` must be one of 'random', 'popular', 'adversarial', got 'hard'"
    ):
        pope.PopeBuildConfig(splits=("hard",))
    with pytest.raises(EvalInputError, match="`splits` must be a non-empty list of split names, got \\[\\]"):
        pope.PopeBuildConfig(splits=())


def test_area_order_and_caption_objects(tmp_path) -> None:
    from vlmfix.eval.chair import make_extractor

    instances = {
        "images": [{"id": 1, "file_name": "1.jpg"}],
        "categories": [{"id": 18, "name": "dog"}, {"id": 17, "name": "cat"}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 18, "area": 5.0},
            {"id": 2, "image_id": 1, "category_id": 17, "area": 3.0},
            {"id": 3, "image_id": 1, "category_id": 17, "area": 4.0},
        ],
    }
    (tmp_path / "inst.json").write_text(json.dumps(instances))
    (tmp_path / "caps.json").write_text(
        json.dumps(
            {
                "images": instances["images"],
                "annotations": [{"id": 1, "image_id": 1, "caption": "A cat, a frisbee and a man."}],
            }
        )
    )
    assert pope.object_lists_from_coco(tmp_path / "inst.json").objects[1] == ("dog", "cat")
    assert pope.object_lists_from_coco(tmp_path / "inst.json", "area").objects[1] == ("cat", "dog")  # 7 > 5
    with_captions = pope.object_lists_from_coco(
        tmp_path / "inst.json", captions_path=tmp_path / "caps.json", extractor=make_extractor()
    )
    assert with_captions.objects[1] == ("dog", "cat", "frisbee", "person")


# ---------------------------------------------------------------- lmms-lab/POPE local copy


def _write_hf_copy(folder) -> None:
    import datasets
    from PIL import Image

    rows = {
        "id": ["0", "1", "2"],
        "question_id": ["1", "2", "1"],
        "question": [
            "Is there a dog in the image?",
            "Is there a cat in the image?",
            "Is there a tv in the image?",
        ],
        "answer": ["yes", "no", "no"],
        "image_source": ["COCO_val2014_000000000001"] * 2 + ["COCO_val2014_2"],
        "image": [Image.new("RGB", (4 + i, 3)) for i in range(3)],
        "category": ["random", "random", "popular"],
    }
    features = datasets.Features(
        {key: datasets.Value("string") for key in rows if key != "image"} | {"image": datasets.Image()}
    )
    folder.mkdir()
    datasets.Dataset.from_dict(rows, features=features).to_parquet(
        str(folder / "test-00000-of-00001.parquet")
    )


def test_hf_copy_reader_maps_the_schema_offline(tmp_path) -> None:
    _write_hf_copy(tmp_path / "POPE")
    pinned = pope.QuestionFile(
        (
            pope.PopeQuestion(2, "COCO_val2014_000000000001.jpg", "Is there a cat in the image?", "no"),
            pope.PopeQuestion(1, "COCO_val2014_000000000001.jpg", "Is there a dog in the image?", "yes"),
        ),
        "0" * 64,
        "random",
        ("head",),
        "pinned.jsonl",
    )
    split = pope.load_hf_pope(tmp_path / "POPE", "random", pinned=[pinned], cache_dir=tmp_path / "cache")
    assert split.questions == (
        pope.PopeQuestion(1, "COCO_val2014_000000000001.jpg", "Is there a dog in the image?", "yes"),
        pope.PopeQuestion(2, "COCO_val2014_000000000001.jpg", "Is there a cat in the image?", "no"),
    )
    assert split.versions == ("head",)
    assert split.image(2).size == (5, 3)  # decoded lazily, row 1
    popular = pope.load_hf_pope(tmp_path / "POPE", "popular", cache_dir=tmp_path / "cache")
    assert [q.image for q in popular.questions] == ["COCO_val2014_2.jpg"] and popular.versions == ()
    with pytest.raises(EvalInputError, match="has no rows of split 'adversarial'; its categories are"):
        pope.load_hf_pope(tmp_path / "POPE", "adversarial", cache_dir=tmp_path / "cache")


def test_hf_reader_refuses_hub_ids() -> None:
    with pytest.raises(
        EvalInputError, match="'lmms-lab/POPE' is not a local file or folder.*never downloads"
    ):
        pope.load_hf_pope("lmms-lab/POPE", "random")
