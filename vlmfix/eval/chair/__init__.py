"""CHAIR (Rohrbach et al., EMNLP 2018): object hallucination in image captions, every protocol knob explicit.

```python
from vlmfix.eval import chair
extractor = chair.make_extractor(normalizer="simple", quirks="reference")
gt = chair.ground_truth_from_coco([inst_train, inst_val], [caps_train, caps_val], extractor=extractor,
                                  cache_dir=".cache/chair")
images = chair.sample_images(chair.image_ids_from_coco(inst_val), n=500, seed=0)
report = chair.score_chair(chair.read_captions("captions.jsonl"), gt, extractor)
chair.write_chair_scored("chair_scored.json", report, fingerprint)
```

`simple` numbers are not byte-comparable with OPERA's scorer (`extractor.comparable_to_opera`); use
`normalizer="opera_nltk"` with `quirks="reference"` for that.
"""

from vlmfix.eval.chair.ground_truth import GroundTruth, ground_truth_from_coco, ground_truth_from_json
from vlmfix.eval.chair.images import (
    PRESET_HASHES,
    ImageSelection,
    image_ids_from_coco,
    image_list_hash,
    images_from_caption_log,
    images_from_list,
    pinned_list_names,
    pinned_list_path,
    read_image_list,
    read_pinned_list,
    sample_images,
)
from vlmfix.eval.chair.inflections import inflection_table, table_version
from vlmfix.eval.chair.mentions import CaptionMentions, MentionExtractor, make_extractor, merge_double_words
from vlmfix.eval.chair.normalize import (
    NORMALIZERS,
    Normalizer,
    OperaNltkNormalizer,
    SimpleNormalizer,
    get_normalizer,
    require_nltk,
)
from vlmfix.eval.chair.score import (
    Caption,
    CaptionScore,
    ChairMetrics,
    ChairReport,
    corpus_metrics,
    read_captions,
    score_caption,
    score_chair,
    split_sentences,
    write_chair_scored,
)
from vlmfix.eval.chair.tokenize import tokenize
from vlmfix.eval.chair.vocabulary import QUIRK_MODES, ChairVocabulary, load_vocabulary

__all__ = [
    "NORMALIZERS",
    "PRESET_HASHES",
    "QUIRK_MODES",
    "Caption",
    "CaptionMentions",
    "CaptionScore",
    "ChairMetrics",
    "ChairReport",
    "ChairVocabulary",
    "GroundTruth",
    "ImageSelection",
    "MentionExtractor",
    "Normalizer",
    "OperaNltkNormalizer",
    "SimpleNormalizer",
    "corpus_metrics",
    "get_normalizer",
    "ground_truth_from_coco",
    "ground_truth_from_json",
    "image_ids_from_coco",
    "image_list_hash",
    "images_from_caption_log",
    "images_from_list",
    "inflection_table",
    "load_vocabulary",
    "make_extractor",
    "merge_double_words",
    "pinned_list_names",
    "pinned_list_path",
    "read_captions",
    "read_image_list",
    "read_pinned_list",
    "require_nltk",
    "sample_images",
    "score_caption",
    "score_chair",
    "split_sentences",
    "table_version",
    "tokenize",
    "write_chair_scored",
]
