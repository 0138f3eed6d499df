"""HallusionBench judge-free scoring (spec C2-C5): aAcc / fAcc / qAcc / easy / hard counted by hand on the
spec's six rows, the `unknown_no_visual` knob, text-only rows counted apart, and the loader."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vlmfix.eval import hallusion
from vlmfix.eval.errors import EvalInputError

# (category, subcategory, set, figure, question, visual_input, gt, answer)
ROWS = [
    ("VD", "illusion", "0", "0", "0", "1", "1", "Yes"),                                   # r1 right
    ("VD", "illusion", "0", "0", "1", "1", "0", "No"),                                    # r2 right
    ("VD", "illusion", "0", "1", "0", "2", "0", "Yes"),                                   # r3 wrong
    ("VD", "illusion", "0", "1", "1", "2", "1", "Yes"),                                   # r4 right
    ("VS", "chart", "0", "0", "0", "0", "1", "I cannot tell without more information."),  # r5 unknown, no image
    ("VS", "chart", "0", "1", "0", "1", "0", "No, it is not."),                           # r6 right
]


def write_bench(root: Path) -> Path:
    rows = []
    for category, sub, set_id, fig, q, vi, gt, _ in ROWS:
        no_image = category == "VS" and fig == "0"
        rows.append({"category": category, "subcategory": sub, "visual_input": vi, "set_id": set_id,
                     "figure_id": fig, "question_id": q, "sample_note": "", "question": f"Q {set_id} {fig} {q}?",
                     "gt_answer_details": "", "gt_answer": gt,
                     "filename": None if no_image else f"./{category}/{sub}/{set_id}_{fig}.png"})
    root.mkdir(parents=True, exist_ok=True)
    (root / "HallusionBench.json").write_text(json.dumps(rows))
    return root


def answers() -> dict[int, str]:
    return {index: row[-1] for index, row in enumerate(ROWS)}


def test_metrics_counted_by_hand(tmp_path: Path) -> None:
    questions = hallusion.load_hallusion(write_bench(tmp_path))
    scores = hallusion.score_hallusion(questions, answers())
    assert scores.aacc == pytest.approx(5 / 6)  # only r3 wrong; r5's unknown is right (VS, no image)
    assert scores.facc == pytest.approx(2 / 3)  # VD fig 0 yes, VD fig 1 no (r3), VS fig 1 yes; VS fig 0 skipped
    assert scores.qacc == pytest.approx(2 / 3)  # VD q0 {r1, r3} no, VD q1 {r2, r4} yes, VS q0 {r5, r6} yes
    assert scores.easy_aacc == 1.0              # vi != 2: {r1}, {r2}, {r5, r6} all right
    assert scores.hard_aacc == 0.5              # vi == 2: {r3} wrong, {r4} right
    assert scores.unknown_rate == pytest.approx(1 / 6)
    assert scores.yes_ratio == pytest.approx(3 / 6)  # r1, r3, r4
    assert scores.n_text_only == 1
    assert scores.text_only_aacc == 1.0 and scores.image_aacc == pytest.approx(4 / 5)
    assert scores.by_category["VD"]["aAcc"] == 0.75 and scores.by_category["VS"]["unknown_rate"] == 0.5
    assert scores.by_subcategory == {"VD_illusion": 0.75, "VS_chart": 1.0}


def test_unknown_no_visual_wrong(tmp_path: Path) -> None:
    questions = hallusion.load_hallusion(write_bench(tmp_path))
    scores = hallusion.score_hallusion(questions, answers(), unknown_no_visual="wrong")
    assert scores.aacc == pytest.approx(4 / 6)
    assert scores.qacc == pytest.approx(1 / 3)  # VS q0 now fails too
    assert scores.facc == pytest.approx(2 / 3)  # r5 is in the skipped figure


def test_unknown_elsewhere_is_wrong(tmp_path: Path) -> None:
    questions = hallusion.load_hallusion(write_bench(tmp_path))
    scores = hallusion.score_hallusion(questions, {**answers(), 0: "Maybe"})  # r1 becomes unknown, has an image
    assert scores.aacc == pytest.approx(4 / 6)


def test_image_paths_and_loader_errors(tmp_path: Path) -> None:
    questions = hallusion.load_hallusion(write_bench(tmp_path))
    assert questions[0].image_path == tmp_path / "hallusion_bench" / "VD" / "illusion" / "0_0.png"
    assert questions[4].image_path is None
    with pytest.raises(EvalInputError, match=r"missing' does not exist; expected HallusionBench.json and"):
        hallusion.load_hallusion(tmp_path / "missing")
    (tmp_path / "bad.json").write_text(json.dumps([{"category": "VD"}]))
    with pytest.raises(EvalInputError, match="entry 0 needs the fields category, subcategory"):
        hallusion.load_hallusion(tmp_path / "bad.json")


def test_readme_filename_form_is_accepted(tmp_path: Path) -> None:
    rows = json.loads((write_bench(tmp_path) / "HallusionBench.json").read_text())
    rows[0]["filename"] = "./hallusion_bench/VD/illusion/0_0.png"
    (tmp_path / "HallusionBench.json").write_text(json.dumps(rows))
    questions = hallusion.load_hallusion(tmp_path)
    assert questions[0].image_path == tmp_path / "hallusion_bench" / "VD" / "illusion" / "0_0.png"


def test_parquet_copy_gives_the_same_questions_and_writes_images(tmp_path: Path) -> None:
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    folder = hallusion.load_hallusion(write_bench(tmp_path / "json"))
    rows = json.loads((tmp_path / "json" / "HallusionBench.json").read_text())
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buffer, format="PNG")
    for row in rows:
        row["image"] = {"bytes": buffer.getvalue(), "path": None} if row["filename"] else None
    (tmp_path / "hf").mkdir()
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "hf" / "image-00000.parquet")
    hf = hallusion.load_hallusion_hf(tmp_path / "hf", image_dir=tmp_path / "images")
    fields = lambda q: (q.key, q.category, q.set_id, q.figure_id, q.question_id, q.gt_answer)  # noqa: E731
    assert list(map(fields, hf)) == list(map(fields, folder))
    assert hf[0].image_path == tmp_path / "images" / "VD" / "illusion" / "0_0.png" and hf[0].image_path.is_file()
    assert hf[4].image_path is None
    assert hallusion.score_hallusion(hf, answers()).to_json() == hallusion.score_hallusion(folder, answers()).to_json()
