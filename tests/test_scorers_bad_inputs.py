"""CHAIR and POPE scorers on bad inputs (issue #13): each case either raises one clear `EvalInputError`
(naming the id, file or value and the fix) before any scoring, or gives the documented result, checked
against a reference computation written here."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from vlmfix.eval import chair, pope
from vlmfix.eval.errors import EvalInputError

NOT_UTF8 = r"is not UTF-8: byte 0xe9 at line {line}, column {column}.*iconv -f latin1 -t utf-8"


def _write_latin1(path: Path, text: str) -> Path:
    path.write_bytes(text.encode("latin-1"))
    return path


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def _instances(images: list[int], categories: dict[int, str], annotations: list[tuple[int, int]]) -> dict:
    return {
        "images": [{"id": i, "file_name": f"{i}.jpg"} for i in images],
        "categories": [{"id": cid, "name": name} for cid, name in categories.items()],
        "annotations": [
            {"id": n, "image_id": i, "category_id": c, "area": 1.0, "bbox": [0, 0, 1, 1], "iscrowd": 0}
            for n, (i, c) in enumerate(annotations, start=1)
        ],
    }


def _chair_metrics(mentions: list[list[str]], gts: list[set[str]]) -> tuple[float, float]:
    """CHAIR_s and CHAIR_i straight from spec A6."""
    bad = [[m for m in ms if m not in gt] for ms, gt in zip(mentions, gts)]
    return sum(bool(b) for b in bad) / len(bad), sum(map(len, bad)) / sum(map(len, mentions))


def _pope_counts(labels: list[str], predictions: list[str]) -> tuple[int, int, int, int]:
    """(TP, FP, TN, FN) straight from spec B6."""
    pairs = list(zip(labels, predictions))
    return (
        sum(lab == "yes" and p == "yes" for lab, p in pairs),
        sum(lab == "no" and p != "no" for lab, p in pairs),
        sum(lab == "no" and p == "no" for lab, p in pairs),
        sum(lab == "yes" and p != "yes" for lab, p in pairs),
    )


def _question(question_id, label: str = "yes", **fields) -> pope.PopeQuestion:
    return pope.PopeQuestion(question_id, fields.get("image", "a.jpg"), "Is there a dog in the image?", label)


# ------------------------------------------------------------------ 1. duplicate CHAIR image ids


def test_chair_refuses_duplicate_image_ids_naming_them() -> None:
    captions = [chair.Caption(i, "a dog") for i in (2, 1, 2, 3, 1)]
    with pytest.raises(EvalInputError, match=r"image_id\(s\) \[1, 2\] appear more than once.*one caption per"):
        chair.score_chair(captions, {1: ["dog"], 2: ["dog"], 3: ["dog"]}, chair.make_extractor())


def test_chair_duplicate_ids_count_after_id_normalisation(tmp_path) -> None:
    path = _jsonl(tmp_path / "caps.jsonl", [{"image_id": 1, "caption": "a dog"}, {"image_id": "1", "caption": "a cat"}])
    with pytest.raises(EvalInputError, match=r"image_id\(s\) \[1\] appear more than once"):
        chair.score_chair(chair.read_captions(path), {1: ["dog"]}, chair.make_extractor())


# ------------------------------------------------------------------ 2. POPE labels other than yes/no


@pytest.mark.parametrize("label", ["Yes", "NO", "yes ", "", "unknown", None, 1, True])
def test_pope_question_with_label_other_than_yes_no_is_refused(label) -> None:
    with pytest.raises(EvalInputError, match=rf"question_id 4 has label {label!r}.*'yes' or 'no'"):
        pope.score_pope([_question(4, label)], {4: "Yes"})


def test_pope_count_outcomes_refuses_bad_labels_and_predictions() -> None:
    with pytest.raises(EvalInputError, match=r"label 'Yes' at position 1.*'yes' or 'no'"):
        pope.count_outcomes(["no", "Yes"], ["no", "yes"])
    with pytest.raises(EvalInputError, match=r"prediction 'maybe' at position 0.*'yes', 'no' or 'unknown'"):
        pope.count_outcomes(["no"], ["maybe"])


def test_pope_question_file_label_error_names_file_record_and_id(tmp_path) -> None:
    path = _jsonl(
        tmp_path / "q.jsonl",
        [
            {"question_id": 1, "image": "a.jpg", "text": "Is there?", "label": "yes"},
            {"question_id": 2, "image": "a.jpg", "text": "Is there?", "label": "Y"},
        ],
    )
    with pytest.raises(EvalInputError, match=r"q.jsonl', record 2: question_id 2 has label 'Y'"):
        pope.read_questions(path)


# ------------------------------------------------------------------ 3. captions and answers that are not strings


@pytest.mark.parametrize("caption", [None, 5, float("nan"), ["a dog"], b"a dog"])
def test_chair_caption_that_is_not_a_string_names_the_image_id(caption) -> None:
    kind = type(caption).__name__
    with pytest.raises(
        EvalInputError, match=rf"caption of image_id 7 must be a string, got .* \(an? {kind}\).*'' to score"
    ):
        chair.score_chair([chair.Caption(7, caption)], {7: ["dog"]}, chair.make_extractor())


def test_empty_caption_is_scored_as_a_caption_without_mentions() -> None:
    with pytest.warns(UserWarning, match="CHAIR_i and Precision are undefined"):
        report = chair.score_chair([chair.Caption(7, "")], {7: ["dog"]}, chair.make_extractor())
    assert (report.overall.n_captions, report.overall.n_mentions, report.overall.CHAIRs) == (1, 0, 0.0)
    assert report.overall.Recall == 0 / 1


def test_read_captions_refuses_null_instead_of_scoring_the_text_none(tmp_path) -> None:
    path = _jsonl(tmp_path / "caps.jsonl", [{"image_id": 1, "caption": "a dog"}, {"image_id": 3, "caption": None}])
    with pytest.raises(
        EvalInputError, match=r"caps.jsonl', record 2: caption of image_id 3 must be a string, got None"
    ):
        chair.read_captions(path)


@pytest.mark.parametrize("answer", [None, 1, float("nan"), ["Yes"]])
def test_pope_answer_that_is_not_a_string_names_the_question_ids(answer) -> None:
    questions = [_question(1), _question(2, "no"), _question(3)]
    with pytest.raises(EvalInputError, match=r"answers of question_id\(s\) \[2, 3\] are not strings"):
        pope.score_pope(questions, {1: "Yes", 2: answer, 3: answer})


def test_read_answers_refuses_null_text(tmp_path) -> None:
    path = _jsonl(tmp_path / "answers.jsonl", [{"question_id": 1, "text": "No"}, {"question_id": 2, "text": None}])
    with pytest.raises(EvalInputError, match=r"answers.jsonl', record 2: the answer to question_id 2 must be a string"):
        pope.read_answers(path)


def test_parse_answer_refuses_non_strings() -> None:
    with pytest.raises(EvalInputError, match=r"yes/no answers must be strings, got None \(a NoneType\)"):
        pope.parse_answer(None)


# ------------------------------------------------------------------ 4. string vs int ids


def test_chair_digit_string_image_id_is_the_int_id() -> None:
    extractor = chair.make_extractor()
    report = chair.score_chair([chair.Caption("1", "a dog and a cat")], {1: ["dog"]}, extractor)
    assert report.sentences[0].image_id == 1 and chair.Caption("1", "x") == chair.Caption(1, "x")
    chair_s, chair_i = _chair_metrics([["dog", "cat"]], [{"dog"}])
    assert (report.overall.CHAIRs, report.overall.CHAIRi) == (pytest.approx(chair_s), pytest.approx(chair_i))
    by_string_keys = chair.score_chair([chair.Caption(1, "a dog and a cat")], {"1": ["dog"]}, extractor)
    assert by_string_keys.overall == report.overall


@pytest.mark.parametrize(
    ("image_id", "kind"),
    [
        (1.5, "float"),
        ("1.5", "str"),
        ("x", "str"),
        (None, "NoneType"),
        (True, "bool"),
        (float("nan"), "float"),
        (math.inf, "float"),
        ("-3", "str"),
        (" 1", "str"),
        ([1], "list"),
    ],
)
def test_chair_refuses_ids_that_are_not_ints_or_digit_strings(image_id, kind) -> None:
    with pytest.raises(
        EvalInputError, match=rf"`image_id` must be an int or a string of digits, got .* \(an? {kind}\)"
    ):
        chair.Caption(image_id, "a dog")


def test_integral_float_ids_are_ints_as_pandas_writes_them() -> None:
    assert chair.Caption(3.0, "a dog").image_id == 3 and type(chair.Caption(3.0, "a dog").image_id) is int


def test_read_captions_names_file_and_record_of_a_bad_id(tmp_path) -> None:
    path = _jsonl(tmp_path / "caps.jsonl", [{"image_id": 1.5, "caption": "a dog"}])
    with pytest.raises(EvalInputError, match=r"caps.jsonl', record 1: `image_id` must be .*got 1.5 \(a float\)"):
        chair.read_captions(path)


def test_pope_digit_string_ids_join_with_int_ids() -> None:
    labels = ["yes", "no", "yes"]
    raw = {"1": "Yes", 2: "Yes", "3": "No"}  # question 2 is a false positive, question 3 a false negative
    questions = [_question(str(i), label) for i, label in zip((1, 2, 3), labels)]
    scores = pope.score_pope(questions, raw)
    counts = scores.counts
    assert (counts.tp, counts.fp, counts.tn, counts.fn) == _pope_counts(labels, ["yes", "yes", "no"])
    assert [q.question_id for q in questions] == [1, 2, 3]


def test_pope_refuses_the_same_id_as_int_and_string() -> None:
    with pytest.raises(EvalInputError, match=r"question_id 1 appears more than once in `answers` \(as 1 and '1'\)"):
        pope.score_pope([_question(1)], {1: "Yes", "1": "No"})


def test_pope_refuses_non_integer_question_ids(tmp_path) -> None:
    with pytest.raises(
        EvalInputError, match=r"`question_id` must be an int or a string of digits, got 1.5 \(a float\)"
    ):
        _question(1.5)
    path = _jsonl(tmp_path / "q.jsonl", [{"question_id": 2.5, "image": "a.jpg", "text": "Is there?", "label": "no"}])
    with pytest.raises(EvalInputError, match=r"q.jsonl', record 1: `question_id` must be .*got 2.5 \(a float\)"):
        pope.read_questions(path)
    answers = _jsonl(tmp_path / "a.jsonl", [{"question_id": "two", "text": "No"}])
    with pytest.raises(EvalInputError, match=r"a.jsonl', record 1: `question_id` must be .*got 'two' \(a str\)"):
        pope.read_answers(answers)
    with pytest.raises(EvalInputError, match=r"`answers`: `question_id` must be .*got 1.5 \(a float\)"):
        pope.score_pope([_question(1)], {1.5: "Yes"})


# ------------------------------------------------------------------ 5. files that are not UTF-8


def _latin1_readers(tmp_path: Path) -> dict:
    """Reader name -> (file text with one non-ASCII character, the call that reads the file)."""
    caption_row = '{"image_id": 1, "caption": "a caf\u00e9 with a dog"}\n'
    question_row = '{"question_id": 1, "image": "caf\u00e9.jpg", "text": "Is there?", "label": "yes"}\n'
    instances = json.dumps(_instances([1], {18: "dog"}, [(1, 18)])).replace('"1.jpg"', '"caf\u00e9.jpg"')
    coco_captions = json.dumps(
        {"images": [{"id": 1}], "annotations": [{"id": 1, "image_id": 1, "caption": "caf\u00e9"}]},
        ensure_ascii=False,
    )
    good_instances = tmp_path / "good_instances.json"
    good_instances.write_text(json.dumps(_instances([1], {18: "dog"}, [(1, 18)])))
    extractor = chair.make_extractor()
    return {
        "captions": (caption_row, chair.read_captions),
        "caption log": (caption_row, chair.images_from_caption_log),
        "questions": (question_row, pope.read_questions),
        "answers": ('{"question_id": 1, "text": "Oui, caf\u00e9"}\n', pope.read_answers),
        "image list": ("1\n2\ncaf\u00e9\n", chair.read_image_list),
        "ground-truth map": (
            '{"1": ["dog"],\n "2": ["caf\u00e9"]}',
            lambda p: chair.ground_truth_from_json(p, vocabulary=chair.load_vocabulary()),
        ),
        "instances (CHAIR)": (instances, lambda p: chair.ground_truth_from_coco([p], extractor=extractor)),
        "instances (image ids)": (instances, chair.image_ids_from_coco),
        "captions (CHAIR)": (
            coco_captions,
            lambda p: chair.ground_truth_from_coco([good_instances], [p], extractor=extractor),
        ),
        "instances (POPE build)": (instances, pope.object_lists_from_coco),
    }


@pytest.mark.parametrize(
    "reader",
    [
        "captions",
        "caption log",
        "questions",
        "answers",
        "image list",
        "ground-truth map",
        "instances (CHAIR)",
        "instances (image ids)",
        "captions (CHAIR)",
        "instances (POPE build)",
    ],
)
def test_latin1_file_is_refused_naming_the_file_and_the_byte(tmp_path, reader) -> None:
    text, read = _latin1_readers(tmp_path)[reader]
    offset = text.index("\u00e9")
    line, column = text[:offset].count("\n") + 1, offset - (text.rfind("\n", 0, offset) + 1) + 1
    path = _write_latin1(tmp_path / "latin1.json", text)
    with pytest.raises(EvalInputError, match=r"'[^']*latin1.json' " + NOT_UTF8.format(line=line, column=column)):
        read(path)


def test_utf8_with_byte_order_mark_reads_as_utf8(tmp_path) -> None:
    path = tmp_path / "caps.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + '{"image_id": 1, "caption": "a caf\u00e9"}\n'.encode())
    assert chair.read_captions(path) == [chair.Caption(1, "a caf\u00e9")]
    array = tmp_path / "q.json"
    array.write_bytes(
        b"\xef\xbb\xbf" + json.dumps([{"question_id": 1, "image": "a.jpg", "text": "t", "label": "no"}]).encode()
    )
    assert pope.read_questions(array) == [pope.PopeQuestion(1, "a.jpg", "t", "no")]


# ------------------------------------------------------------------ empty files and empty inputs


@pytest.mark.parametrize("content", ["", "  \n\n", "[]", "[\n]\n"])
@pytest.mark.parametrize(
    "read",
    [chair.read_captions, pope.read_questions, pope.read_answers, chair.images_from_caption_log],
    ids=["captions", "questions", "answers", "caption log"],
)
def test_empty_record_files_are_refused_naming_the_file(tmp_path, content, read) -> None:
    path = tmp_path / "empty.jsonl"
    path.write_text(content)
    with pytest.raises(EvalInputError, match=r"'[^']*empty.jsonl' holds no records"):
        read(path)


@pytest.mark.parametrize(
    "read",
    [
        chair.image_ids_from_coco,
        chair.read_image_list,
        lambda p: chair.ground_truth_from_json(p, vocabulary=chair.load_vocabulary()),
        lambda p: chair.ground_truth_from_coco([p], extractor=chair.make_extractor()),
        lambda p: pope.object_lists_from_coco(p),
    ],
    ids=["image ids", "image list", "ground-truth map", "CHAIR instances", "POPE instances"],
)
def test_empty_json_files_are_refused_naming_the_file(tmp_path, read) -> None:
    path = tmp_path / "empty.json"
    path.write_text(" \n")
    with pytest.raises(EvalInputError, match=r"'[^']*empty.json' is empty"):
        read(path)


def test_broken_json_names_file_line_and_column(tmp_path) -> None:
    path = tmp_path / "instances.json"
    path.write_text('{"images": [\n  {"id": 1,}\n]}')
    with pytest.raises(EvalInputError, match=r"'[^']*instances.json' is not valid JSON \(line 2, column 12"):
        chair.image_ids_from_coco(path)


def test_pope_with_no_questions_or_no_answers_is_refused() -> None:
    with pytest.raises(EvalInputError, match="`questions` is empty"):
        pope.score_pope([], {})
    with pytest.raises(EvalInputError, match=r"none of the 2 questions of split 'random' has an answer"):
        pope.score_pope([_question(1), _question(2, "no")], {}, split="random")


# ------------------------------------------------------------------ containers of the wrong kind


@pytest.mark.parametrize(
    ("captions", "message"),
    [
        ("a dog", r"`captions` must be a list of chair.Caption, got 'a dog' \(a str\)"),
        ({1: "a dog"}, r"`captions` must be a list of chair.Caption, got a dict.*Caption\(image_id, caption\)"),
        (None, r"`captions` must be a list of chair.Caption, got None \(a NoneType\)"),
        ([{"image_id": 1, "caption": "a dog"}], r"`captions\[0\]` must be a chair.Caption, got a dict"),
    ],
)
def test_chair_captions_that_are_not_a_list_of_captions(captions, message) -> None:
    with pytest.raises(EvalInputError, match=message):
        chair.score_chair(captions, {1: ["dog"]}, chair.make_extractor())


def test_a_single_caption_is_refused_not_iterated() -> None:
    with pytest.raises(EvalInputError, match=r"got one Caption; wrap it in a list"):
        chair.score_chair(chair.Caption(1, "a dog"), {1: ["dog"]}, chair.make_extractor())


def test_chair_extractor_must_be_a_mention_extractor() -> None:
    with pytest.raises(EvalInputError, match=r"`extractor` must be a chair.MentionExtractor.*make_extractor"):
        chair.score_chair([chair.Caption(1, "a dog")], {1: ["dog"]}, chair.normalize.get_normalizer("simple"))


@pytest.mark.parametrize(
    ("questions", "message"),
    [
        (pope.QuestionFile((), "0" * 64, None, (), "q.jsonl"), r"got a QuestionFile; pass its `.questions`"),
        ([{"question_id": 1, "label": "yes"}], r"`questions\[0\]` must be a pope.PopeQuestion, got a dict"),
        ("q.jsonl", r"`questions` must be a list of pope.PopeQuestion, got 'q.jsonl' \(a str\)"),
    ],
)
def test_pope_questions_of_the_wrong_kind(questions, message) -> None:
    with pytest.raises(EvalInputError, match=message):
        pope.score_pope(questions, {1: "Yes"})


def test_pope_answers_must_be_a_mapping() -> None:
    with pytest.raises(EvalInputError, match=r"`answers` must be a mapping question_id -> answer, got a list"):
        pope.score_pope([_question(1)], ["Yes"])


@pytest.mark.parametrize(("field", "value"), [("image", None), ("text", None), ("text", ""), ("image", 3)])
def test_pope_question_image_and_text_must_be_strings(field, value) -> None:
    fields = {"question_id": 1, "image": "a.jpg", "text": "Is there?", "label": "yes", field: value}
    with pytest.raises(EvalInputError, match=rf"question_id 1: `{field}` must be a non-empty string"):
        pope.PopeQuestion(**fields)


# ------------------------------------------------------------------ ground truth that cannot match


def test_plain_ground_truth_value_must_be_a_list_of_node_words() -> None:
    extractor = chair.make_extractor()
    with pytest.raises(EvalInputError, match=r"ground truth of image_id 1 must be a list of node words, got 'dog'"):
        chair.score_chair([chair.Caption(1, "a dog")], {1: "dog"}, extractor)
    with pytest.raises(EvalInputError, match=r"image_id 1: \['table'\] are not node words.*'dining table'"):
        chair.score_chair([chair.Caption(1, "a table")], {1: ["table"]}, extractor)
    with pytest.raises(EvalInputError, match=r"image_id 1 appears more than once in `ground_truth` \(as 1 and '1'\)"):
        chair.score_chair([chair.Caption(1, "a dog")], {1: ["dog"], "1": []}, extractor)


def test_ground_truth_built_with_another_extractor_is_refused(tmp_path) -> None:
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(_instances([1], {18: "dog"}, [(1, 18)])))
    gt = chair.ground_truth_from_coco([path], extractor=chair.make_extractor(quirks="fixed"))
    with pytest.raises(EvalInputError, match=r"ground truth was built with quirks 'fixed'.*quirks 'reference'"):
        chair.score_chair([chair.Caption(1, "two men")], gt, chair.make_extractor())


@pytest.mark.parametrize(
    ("document", "message"),
    [
        (
            '{"1": ["dog"], "01": ["cat"]}',
            r"image_id 1 appears more than once in ground-truth map '[^']*gt.json' \(as '1' and '01'\)",
        ),
        (
            '{"1": ["dog"], "1": ["cat"]}',
            r"image_id 1 appears more than once in ground-truth map '[^']*gt.json' \(as '1' and '1'\)",
        ),
        ('{"1": "dog"}', r"image 1 must be a list of node words, got 'dog'"),
        ('{"1": null}', r"image 1 must be a list of node words, got None"),
        ('{"x": ["dog"]}', r"`image_id` must be an int or a string of digits, got 'x'"),
    ],
)
def test_ground_truth_map_defects(tmp_path, document, message) -> None:
    path = tmp_path / "gt.json"
    path.write_text(document)
    with pytest.raises(EvalInputError, match=message):
        chair.ground_truth_from_json(path, vocabulary=chair.load_vocabulary())


def test_unreadable_ground_truth_cache_is_rebuilt(tmp_path) -> None:
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(_instances([1], {18: "dog"}, [(1, 18)])))
    extractor = chair.make_extractor()
    gt = chair.ground_truth_from_coco([path], extractor=extractor, cache_dir=tmp_path / "cache")
    cache = tmp_path / "cache" / f"chair_gt_{gt.cache_key}.json"
    for broken in (b"caf\xe9", b"[1, 2]"):
        cache.write_bytes(broken)
        with pytest.warns(UserWarning, match="rebuilding it"):
            rebuilt = chair.ground_truth_from_coco([path], extractor=extractor, cache_dir=tmp_path / "cache")
        assert dict(rebuilt.objects) == {1: {"dog"}}


# ------------------------------------------------------------------ malformed COCO annotation files


def test_annotation_with_unknown_category_is_refused(tmp_path) -> None:
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(_instances([1], {18: "dog"}, [(1, 18), (1, 99)])))
    message = r"annotation 2 of '[^']*instances.json' has category_id 99, which is not in its categories"
    with pytest.raises(EvalInputError, match=message):
        chair.ground_truth_from_coco([path], extractor=chair.make_extractor())
    with pytest.raises(EvalInputError, match=message):
        pope.object_lists_from_coco(path)


def test_reference_caption_that_is_not_a_string_is_refused(tmp_path) -> None:
    instances = tmp_path / "instances.json"
    instances.write_text(json.dumps(_instances([1], {18: "dog"}, [(1, 18)])))
    captions = tmp_path / "captions.json"
    captions.write_text(json.dumps({"images": [{"id": 1}], "annotations": [{"id": 5, "image_id": 1, "caption": None}]}))
    with pytest.raises(
        EvalInputError, match=r"caption annotation 5 of '[^']*captions.json' must be a string, got None"
    ):
        chair.ground_truth_from_coco([instances], [captions], extractor=chair.make_extractor())


def test_pope_build_refuses_annotations_of_unlisted_images(tmp_path) -> None:
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(_instances([1], {18: "dog"}, [(1, 18), (7, 18)])))
    with pytest.raises(
        EvalInputError, match=r"annotation 2 of '[^']*instances.json' is about image_id 7, which is not"
    ):
        pope.object_lists_from_coco(path)


@pytest.mark.parametrize("area", [float("nan"), float("inf"), -1.0, "big", None])
def test_pope_build_refuses_areas_that_are_not_finite_non_negative_numbers(tmp_path, area) -> None:
    document = _instances([1], {18: "dog", 17: "cat"}, [(1, 18), (1, 17)])
    document["annotations"][1]["area"] = area
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(document))
    with pytest.raises(
        EvalInputError, match=r"annotation 2 of '[^']*instances.json': `area` must be a finite number >= 0"
    ):
        pope.object_lists_from_coco(path, "area")


# ------------------------------------------------------------------ numbers that must be ints


@pytest.mark.parametrize("seed", ["0", 1.5, float("nan"), None, True])
def test_sample_images_seed_must_be_an_int(seed) -> None:
    with pytest.raises(EvalInputError, match=r"`seed` must be an int"):
        chair.sample_images(range(1, 20), n=5, seed=seed)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"seed": "0"}, r"`seed` must be an int, got '0' \(a str\)"),
        ({"n_images": True}, r"`n_images` must be an int >= 1, got True \(a bool\)"),
        ({"n_images": float("inf")}, r"`n_images` must be an int >= 1, got inf"),
        ({"min_objects": 2}, r"`min_objects` must be an int >= 3, got 2"),
        ({"splits": "random"}, r"`splits` must be a non-empty list of split names, got 'random' \(a str\)"),
        ({"splits": ("random", "random")}, r"`splits` must be distinct split names"),
        ({"template": "Is there {article} {object} on the {place}?"}, r"`template` must name its fields"),
        ({"display_names": {"tv": None}}, r"`display_names\['tv'\]` must be a non-empty string"),
    ],
)
def test_build_config_refuses_bad_values(options, message) -> None:
    with pytest.raises(EvalInputError, match=message):
        pope.PopeBuildConfig(**options)


def test_build_config_keeps_a_list_of_splits_as_a_tuple() -> None:
    assert pope.PopeBuildConfig(splits=["random"]).splits == ("random",)
