"""MME hallucination subset (spec B2-B3): acc / acc+ / score counted by hand on a few images written here,
pairing by image (not line position), parsers, and the folder / split / parquet loaders giving the same rows."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from PIL import Image

from vlmfix.eval import mme
from vlmfix.eval.errors import EvalInputError

Q_YES = "Is there a dog in this image? Please answer yes or no."
Q_NO = "Is there a cat in this image? Please answer yes or no."


def png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4), (200, 10, 10)).save(buffer, format="PNG")
    return buffer.getvalue()


def write_flat(root: Path, subtask: str = "existence", stems: tuple[str, ...] = ("a", "b")) -> Path:
    folder = root / "MME_Benchmark" / subtask
    folder.mkdir(parents=True, exist_ok=True)
    for stem in stems:
        (folder / f"{stem}.jpg").write_bytes(png())
        (folder / f"{stem}.txt").write_text(f"{Q_YES}\tYes\n{Q_NO}\tNo\n")
    return root


def write_split(root: Path, subtask: str = "existence", stems: tuple[str, ...] = ("a", "b")) -> Path:
    folder = root / subtask
    (folder / "images").mkdir(parents=True)
    (folder / "questions_answers_YN").mkdir()
    for stem in stems:
        (folder / "images" / f"{stem}.jpg").write_bytes(png())
        (folder / "questions_answers_YN" / f"{stem}.txt").write_text(f"{Q_YES}\tYes\n{Q_NO}\tNo\n")
    return root


def answers_ab(questions: list[mme.MmeQuestion]) -> dict[int, str]:
    """Image a: (Yes, "Yes"), (No, "No, there is not."); image b: (Yes, "Not sure"), (No, "There is a cat.")."""
    text = {("a.jpg", "yes"): "Yes", ("a.jpg", "no"): "No, there is not.", ("b.jpg", "yes"): "Not sure",
            ("b.jpg", "no"): "There is a cat."}
    return {q.key: text[(q.image, q.answer)] for q in questions}


def test_metrics_counted_by_hand(tmp_path: Path) -> None:
    questions = mme.load_mme_folder(write_flat(tmp_path), subtasks=["existence"])
    scores = mme.score_mme(questions, answers_ab(questions))
    existence = scores.subtasks["existence"]
    # a: both right; b: "Not sure" -> no (wrong), "There is a cat." -> other (wrong)
    # acc 2/4, acc+ 1/2, score 50 + 50 = 100, other 1/4; predicted yes: only "Yes" -> 1/4
    assert (existence.acc, existence.acc_plus, existence.score) == (0.5, 0.5, 100.0)
    assert (existence.other_rate, existence.yes_ratio) == (0.25, 0.25)
    assert scores.total == 100.0


def test_lmms_parser_and_total_over_subtasks(tmp_path: Path) -> None:
    root = write_flat(write_flat(tmp_path), "color", ("c",))
    questions = mme.load_mme_folder(root, subtasks=["existence", "color"])
    answers = answers_ab([q for q in questions if q.subtask == "existence"])
    answers.update({q.key: "Y" if q.answer == "yes" else "n." for q in questions if q.subtask == "color"})
    official = mme.score_mme(questions, answers)
    lmms = mme.score_mme(questions, answers, parser="mme_lmms")
    # color under mme_official: "Y" -> other (wrong), "n." -> prefix "n." has no "no" -> other: acc 0, acc+ 0
    assert official.subtasks["color"].score == 0.0
    # under mme_lmms: "Y" -> yes, "n." -> "n" -> no: acc 1, acc+ 1 -> 200; total 100 + 200
    assert lmms.subtasks["color"].score == 200.0
    assert lmms.total == 300.0


def test_pairs_are_by_image_not_by_line(tmp_path: Path) -> None:
    questions = mme.load_mme_folder(write_flat(tmp_path), subtasks=["existence"])
    # answers in reverse order: the pairing must still follow the images
    reordered = dict(reversed(list(answers_ab(questions).items())))
    assert mme.score_mme(questions, reordered).subtasks["existence"].acc_plus == 0.5


def test_layouts_give_the_same_rows(tmp_path: Path) -> None:
    flat = mme.load_mme_folder(write_flat(tmp_path / "flat"), subtasks=["existence"])
    split = mme.load_mme_folder(write_split(tmp_path / "split"), subtasks=["existence"])
    key = lambda q: (q.key, q.subtask, q.image, q.question, q.answer)  # noqa: E731
    assert list(map(key, flat)) == list(map(key, split))
    assert mme.content_sha256(flat) == mme.content_sha256(split)


def test_parquet_copy_gives_the_same_rows_and_score(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = mme.load_mme_folder(write_flat(tmp_path / "flat"), subtasks=["existence"])
    rows = [{"question_id": f"existence/{q.image}", "question": q.question, "answer": q.answer.capitalize(),
             "category": q.subtask, "image": {"bytes": png(), "path": q.image}} for q in reversed(folder)]
    rows.append({"question_id": "artwork/x.jpg", "question": "Q?", "answer": "Yes", "category": "artwork",
                 "image": {"bytes": png(), "path": "x.jpg"}})
    (tmp_path / "hf").mkdir()
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "hf" / "test-00000-of-00001.parquet")
    hf = mme.load_mme_hf(tmp_path / "hf", subtasks=["existence"], image_dir=tmp_path / "images")
    key = lambda q: (q.key, q.subtask, q.image, q.question, q.answer)  # noqa: E731
    assert list(map(key, hf)) == list(map(key, folder))
    assert all(q.image_path is not None and q.image_path.is_file() for q in hf)
    assert mme.score_mme(hf, answers_ab(hf)) == mme.score_mme(folder, answers_ab(folder))


def test_three_lines_and_missing_folders_are_refused(tmp_path: Path) -> None:
    root = write_flat(tmp_path)
    (root / "MME_Benchmark" / "existence" / "a.txt").write_text(f"{Q_YES}\tYes\n{Q_NO}\tNo\n{Q_NO}\tNo\n")
    with pytest.raises(EvalInputError, match="a.txt' has 3 lines; each image has exactly two"):
        mme.load_mme_folder(root, subtasks=["existence"])
    with pytest.raises(EvalInputError, match=r"MME subtask folder .*count' does not exist"):
        mme.load_mme_folder(root, subtasks=["count"])


def test_prompt_modes() -> None:
    assert mme.prompt_text(Q_YES) == Q_YES
    assert mme.prompt_text(Q_YES, "lmms", "\nAnswer the question using a single word or phrase.") == (
        "Is there a dog in this image?\nAnswer the question using a single word or phrase.")
