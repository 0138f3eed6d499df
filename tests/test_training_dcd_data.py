"""DCD preference data in every source format and layout the trainer reads, and the errors bad data gets."""

from __future__ import annotations

import io
import json
from pathlib import Path

import datasets
import pytest
import torch
import transformers
from safetensors.torch import load_file

from vlmfix.testing import build_tiny, random_image
from vlmfix.training.config import ConfigError
from vlmfix.training.dcd_config import DCDTrainConfig
from vlmfix.training.dcd_data import Example, PreferenceDataError, StoredImage, load_preferences
from vlmfix.training.dcd_loop import train_dcd

ROWS = [
    ("describe this image .", "a dog on the table .", "a dog and a cat on the table ."),
    ("what is in the picture ?", "a red car .", "a red car and a bus ."),
    ("what is this ?", "a cup near a fork .", "a cup near a knife and a fork ."),
]
FORMATS = ("jsonl", "json", "parquet", "saved", "saved_dict", "folder")


def pictures(directory: Path) -> list:
    """One RGB picture per row, also written as images/<i>.png under `directory`."""
    (directory / "images").mkdir(parents=True, exist_ok=True)
    images = [random_image(40 + 8 * i, seed=i).convert("RGB") for i in range(len(ROWS))]
    for i, image in enumerate(images):
        image.save(directory / "images" / f"{i}.png")
    return images


def write(directory: Path, fmt: str, records: list[dict], features: datasets.Features | None = None) -> Path:
    """`records` in one source format under `directory`; returns what `data=` names."""
    if fmt == "jsonl":
        path = directory / "prefs.jsonl"
        path.write_text("\n".join(json.dumps(r) for r in records) + "\n", encoding="utf-8")
        return path
    if fmt == "json":
        path = directory / "prefs.json"
        path.write_text(json.dumps(records), encoding="utf-8")
        return path
    table = datasets.Dataset.from_list(records, features=features)
    other = datasets.Dataset.from_list(records[:1], features=features)  # a second split the trainer must skip
    if fmt == "parquet":
        table.to_parquet(str(directory / "prefs.parquet"))
        return directory / "prefs.parquet"
    if fmt == "saved":
        table.save_to_disk(str(directory / "saved"))
        return directory / "saved"
    if fmt == "saved_dict":
        datasets.DatasetDict({"test": other, "train": table}).save_to_disk(str(directory / "saved_dict"))
        return directory / "saved_dict"
    (directory / "folder" / "data").mkdir(parents=True)
    table.to_parquet(str(directory / "folder" / "data" / "train-00000-of-00001.parquet"))
    other.to_parquet(str(directory / "folder" / "data" / "test-00000-of-00001.parquet"))
    return directory / "folder"


def texts(examples: tuple[Example, ...]) -> list[tuple[str, str]]:
    return [(e.prompt, e.response) for e in examples]


def pixels(examples: tuple[Example, ...]) -> list[bytes]:
    return [e.open_image().tobytes() for e in examples]


# ---------------------------------------------------------------------------------------------- formats
@pytest.mark.parametrize("fmt", FORMATS)
def test_every_source_format_gives_the_same_examples(tmp_path, fmt):
    images = pictures(tmp_path)
    records = [{"image": f"images/{i}.png", "prompt": p, "chosen": c, "rejected": r}
               for i, (p, c, r) in enumerate(ROWS)]
    source = write(tmp_path, fmt, records)
    # a file's relative image paths start at its directory; a dataset directory's at image_root
    data = load_preferences(source, image_root=tmp_path if source.is_dir() else None)
    assert data.layout == "prompt" and data.rows == len(ROWS)
    assert texts(data.positive) == [(p, c) for p, c, _ in ROWS]
    assert texts(data.negative) == [(p, r) for p, _, r in ROWS]
    assert pixels(data.positive) == pixels(data.negative) == [image.tobytes() for image in images]
    reference = load_preferences(write(tmp_path, "jsonl", records))
    assert data.fingerprint == reference.fingerprint  # same rows and images, whatever the container
    where = {"jsonl": ", line 2", "saved_dict": " [train], row 1", "folder": " [train], row 1"}.get(fmt, ", row 1")
    assert data.negative[1].where == f"{source}{where}"


@pytest.mark.parametrize("fmt", ["parquet", "saved", "saved_dict", "folder", "in_memory"])
def test_rlaif_v_fields_with_images_stored_in_the_data(tmp_path, fmt):
    """RLAIF-V's question/chosen/rejected and its image column (datasets' Image feature: PIL images, stored as
    {"bytes", "path"})."""
    images = pictures(tmp_path)
    records = [{"ds_name": "toy", "image": image, "question": p, "chosen": c, "rejected": r, "idx": i}
               for i, (image, (p, c, r)) in enumerate(zip(images, ROWS))]
    source = datasets.Dataset.from_list(records) if fmt == "in_memory" else write(tmp_path, fmt, records)
    assert isinstance(datasets.Dataset.from_list(records).features["image"], datasets.Image)
    data = load_preferences(source)
    assert data.layout == "rlaif_v"
    assert texts(data.positive) == [(p, c) for p, c, _ in ROWS] and texts(data.negative) == [(p, r) for p, _, r in ROWS]
    assert all(isinstance(e.image, StoredImage) for e in data.positive)
    assert pixels(data.positive) == [image.tobytes() for image in images]


def test_rlaif_v_image_as_a_path_or_a_bytes_path_dict(tmp_path):
    images = pictures(tmp_path)
    values = ["images/0.png", {"bytes": None, "path": "images/1.png"}, {"path": str(tmp_path / "images" / "2.png")}]
    records = [{"image": v, "question": p, "chosen": c, "rejected": r} for v, (p, c, r) in zip(values, ROWS)]
    data = load_preferences(write(tmp_path, "jsonl", records))
    assert data.layout == "rlaif_v" and [e.image for e in data.negative] == [tmp_path / "images" / f"{i}.png"
                                                                           for i in range(3)]
    assert pixels(data.negative) == [image.tobytes() for image in images]


VLFEEDBACK = [  # (prompt, [(response, Visual Faithfulness rating), ...])
    ("q0", [("a0", "5"), ("b0", "1"), ("c0", "3")]),
    ("q1", [("a1", "4"), ("b1", "N/A"), ("c1", "2")]),  # 4 and 2 are neither side; N/A is no rating
    ("q2", [("a2", "4.5"), ("b2", 5), ("c2", "1.5")]),
]


def vlfeedback_records(dict_of_lists: bool) -> list[dict]:
    records = []
    for i, (prompt, completions) in enumerate(VLFEEDBACK):
        items = [{"annotations": {"Helpfulness": {"Rating": "3", "Rationale": "-"},
                                  "Visual Faithfulness": {"Rating": str(rating), "Rationale": "-"}},
                  "model": f"m{j}", "response": response} for j, (response, rating) in enumerate(completions)]
        if dict_of_lists:  # how datasets gives the Hub dataset's Sequence-of-struct column
            items = {key: [item[key] for item in items] for key in items[0]}
        records.append({"id": str(i), "prompt": prompt, "img_path": f"images/{i}.png", "completions": items})
    return records


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_vlfeedback_ratings_decide_the_side(tmp_path, fmt):
    """Visual Faithfulness > 4 positive, < 2 negative, the rest unused; responses are not paired."""
    images = pictures(tmp_path)
    annotation = {"Helpfulness": {"Rating": datasets.Value("string"), "Rationale": datasets.Value("string")},
                  "Visual Faithfulness": {"Rating": datasets.Value("string"), "Rationale": datasets.Value("string")}}
    features = datasets.Features({  # the Hub dataset's card
        "id": datasets.Value("string"), "prompt": datasets.Value("string"), "img_path": datasets.Value("string"),
        "completions": datasets.Sequence({"annotations": annotation, "model": datasets.Value("string"),
                                          "response": datasets.Value("string")}),
    })
    records = vlfeedback_records(dict_of_lists=fmt == "parquet")
    source = write(tmp_path, fmt, records, features if fmt == "parquet" else None)
    data = load_preferences(source)
    assert data.layout == "vlfeedback" and data.rows == 3
    assert texts(data.positive) == [("q0", "a0"), ("q2", "a2"), ("q2", "b2")]
    assert texts(data.negative) == [("q0", "b0"), ("q2", "c2")]
    row = "line 3" if fmt == "jsonl" else "row 2"
    assert [e.where for e in data.negative] == [f"{source}, {row.replace('3', '1').replace('2', '0')}, completion 1",
                                                f"{source}, {row}, completion 2"]
    assert pixels(data.negative) == [images[0].tobytes(), images[2].tobytes()]
    first = load_preferences(source, max_rows=1)
    assert texts(first.positive) == [("q0", "a0")] and texts(first.negative) == [("q0", "b0")]


def test_the_same_rows_train_the_same_weights_from_jsonl_and_parquet(tmp_path):
    """Format independence end to end: PNG paths in JSON Lines and images stored in a RLAIF-V Parquet file."""
    tiny = build_tiny("llava")
    tiny.model.save_pretrained(tmp_path / "model")
    tiny.processor.save_pretrained(tmp_path / "model")
    images = pictures(tmp_path)
    jsonl = write(tmp_path, "jsonl", [{"image": f"images/{i}.png", "prompt": p, "chosen": c, "rejected": r}
                                      for i, (p, c, r) in enumerate(ROWS)])
    parquet = write(tmp_path, "parquet", [{"image": image, "question": p, "chosen": c, "rejected": r}
                                          for image, (p, c, r) in zip(images, ROWS)])
    weights = []
    for name, data in (("a", jsonl), ("b", parquet)):
        config = DCDTrainConfig(model=str(tmp_path / "model"), data=str(data), output_dir=str(tmp_path / name),
                                projectors=("neg",), batch_size=2, gradient_accumulation_steps=1, max_steps=2,
                                learning_rate=1e-2)
        weights.append(load_file(str(train_dcd(config)["neg"])))
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


# ---------------------------------------------------------------------------------------------- bad data
def test_bad_sources_name_the_problem(tmp_path):
    pictures(tmp_path)
    (tmp_path / "prefs.csv").write_text("image,prompt\n", encoding="utf-8")
    with pytest.raises(PreferenceDataError, match=r"prefs.csv: unsupported file type '.csv'; give a .jsonl, .json or "
                                                  r".parquet file"):
        load_preferences(tmp_path / "prefs.csv")
    (tmp_path / "broken.json").write_text('[{"image": "images/0.png",\n "prompt": }]', encoding="utf-8")
    with pytest.raises(PreferenceDataError, match=r"broken.json: not valid JSON \(Expecting value, line 2\)"):
        load_preferences(tmp_path / "broken.json")
    no_image = write(tmp_path, "jsonl", [{"prompt": "p", "chosen": "c", "rejected": "r"}])
    with pytest.raises(PreferenceDataError, match=r"has no image column \(one of image, img_path, image_path\)"):
        load_preferences(no_image)
    other = write(tmp_path, "parquet", [{"image": "images/0.png", "text": "t", "label": 1}])
    with pytest.raises(PreferenceDataError, match=r"has none of the supported layouts \(columns: \['image', 'label', "
                                                  r"'text'\]\); give image, prompt, chosen, rejected \(vlmfix\); or "
                                                  r"image, question, chosen, rejected \(RLAIF-V\); or prompt, "
                                                  r"completions, img_path or image \(VLFeedback\)"):
        load_preferences(other)
    saved = write(tmp_path, "saved_dict", [{"image": "images/0.png", "prompt": "p", "chosen": "c", "rejected": "r"}])
    with pytest.raises(PreferenceDataError, match=r"saved_dict has no split 'validation'; its splits: \['test', "
                                                  r"'train'\] \(set data_split\)"):
        load_preferences(saved, split="validation")
    (tmp_path / "empty_folder").mkdir()
    with pytest.raises(PreferenceDataError, match=r"empty_folder: datasets cannot read a 'train' split from this "
                                                  r"folder"):
        load_preferences(tmp_path / "empty_folder")


def test_bad_stored_or_truncated_images_name_the_row(tmp_path):
    image = io.BytesIO()
    random_image(64, seed=0).save(image, format="PNG")
    rows = [{"image": {"bytes": image.getvalue(), "path": None}, "question": "q", "chosen": "c", "rejected": "r"},
            {"image": {"bytes": b"not an image", "path": None}, "question": "q", "chosen": "c", "rejected": "r"}]
    with pytest.raises(PreferenceDataError, match=r"prefs.parquet, row 1: image stored in the row is not an image file "
                                                  r"\(cannot identify image file"):
        load_preferences(write(tmp_path, "parquet", rows))
    # a PNG cut short has a readable header: it fails when a batch decodes it, naming the row
    rows[1]["image"] = {"bytes": image.getvalue()[: len(image.getvalue()) // 2], "path": None}
    data = load_preferences(write(tmp_path, "parquet", rows))
    assert data.positive[0].open_image().size == (64, 64)
    with pytest.raises(PreferenceDataError, match=r"prefs.parquet, row 1: its image cannot be decoded \(.*truncated"):
        data.positive[1].open_image()


def test_bad_vlfeedback_records_name_the_record(tmp_path):
    pictures(tmp_path)
    records = vlfeedback_records(dict_of_lists=False)
    records[2]["completions"][1]["response"] = ""
    with pytest.raises(PreferenceDataError, match=r"prefs.jsonl, line 3, completion 1: `response` must be a non-empty "
                                                  r"string, got ''; every row needs a response"):
        load_preferences(write(tmp_path, "jsonl", records))
    records = vlfeedback_records(dict_of_lists=False)
    records[0]["completions"] = "a0"
    records = [records[0]]
    with pytest.raises(PreferenceDataError, match=r"line 1: `completions` must be a list of objects with a response "
                                                  r"and annotations, got 'a0'"):
        load_preferences(write(tmp_path, "jsonl", records))


def test_missing_side_and_missing_data_fail_before_the_model_loads(tmp_path, monkeypatch):
    tiny = build_tiny("llava")
    tiny.model.save_pretrained(tmp_path / "model")
    tiny.processor.save_pretrained(tmp_path / "model")

    def no_loading(*args, **kwargs):
        raise AssertionError("the model loaded before the data was checked")

    monkeypatch.setattr(transformers.AutoModelForImageTextToText, "from_pretrained", no_loading)
    pictures(tmp_path)
    records = vlfeedback_records(dict_of_lists=False)[1:2]  # rated 4, N/A and 2: no example on either side
    config = DCDTrainConfig(model=str(tmp_path / "model"), data=str(write(tmp_path, "jsonl", records)),
                            output_dir=str(tmp_path / "out"))
    with pytest.raises(PreferenceDataError, match=r"prefs.jsonl gives no 'pos' examples \(chosen responses; layout "
                                                  r"vlfeedback\)"):
        train_dcd(config)
    with pytest.raises(ConfigError, match=r"`data` '.*nope.jsonl' does not exist; give preference data"):
        train_dcd(DCDTrainConfig(model=str(tmp_path / "model"), data=str(tmp_path / "nope.jsonl")))
    records = [{"image": "images/9.png", "prompt": "p", "chosen": "c", "rejected": "r"}]
    with pytest.raises(PreferenceDataError, match=r"line 1: image 'images/9.png' not found \(looked at .*/9.png\)"):
        train_dcd(DCDTrainConfig(model=str(tmp_path / "model"), data=str(write(tmp_path, "jsonl", records))))
