"""Tiny, offline, real-architecture VLMs for tests, demos and benchmarks.

Every family vlmfix supports can be built here in seconds with random weights, a word-level
tokenizer made with the `tokenizers` library, an image processor, a processor and a chat template,
none of it downloaded. The models round-trip through `save_pretrained` / `from_pretrained`.

```python
from vlmfix.testing import build_tiny
tiny = build_tiny("llava")
inputs = tiny.inputs(["Describe this image.", "Is there a dog?"])
out = tiny.model.generate(**inputs, max_new_tokens=8)
```
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import torch
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    BaseImageProcessor,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextProcessor,
    LlavaProcessor,
    PreTrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    ProcessorMixin,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLProcessor,
)
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

Family = str  # a family name of `ALL_FAMILIES`
# the reference families that the method tests run on
FAMILIES: tuple[Family, ...] = ("llava", "llava_next", "qwen2_vl", "qwen2_5_vl")
# families whose tiny build needs torchvision (image processors with no PIL backend) or timm (vision towers), built
# in vlmfix/testing/tiny_torchvision.py and tiny_timm_and_torchvision.py; their tests carry the `torchvision`
# marker (CI's second lane, README)
TORCHVISION_FAMILIES: tuple[Family, ...] = ("unlimited_ocr", "muse_glimmer", "muse_spark", "gemma4_unified",
                                            "perception_lm", "fast_vlm", "molmo2", "step3p7", "kimi_k25", "apertus1p5",
                                            "minimax_m3_vl", "llama4")
# every family with a tiny build (the conformance suite runs on all of them); the others are built in
# vlmfix/testing/tiny_families.py, tiny_feature_families.py and tiny_sparse_families.py
ALL_FAMILIES: tuple[Family, ...] = (
    *FAMILIES,
    "llava_onevision",
    "qwen3_vl",
    "qwen3_vl_moe",
    "gemma3",
    "internvl",
    "aya_vision",
    "idefics3",
    "smolvlm",
    "glm4v",
    "glm4v_moe",
    "glm46v",
    "paligemma",
    "mistral3",
    "vipllava",
    "lighton_ocr",
    "exaone4_5",
    "idefics2",
    "deepseek_vl",
    "cohere2_vision",
    "llava_next_video",
    "video_llava",
    "glm_ocr",
    "got_ocr2",
    "cohere_compass",
    "cosmos3_edge",
    "video_llama_3",
    "paddleocr_vl",
    "granite_docling",
    "hunyuan_vl",
    "ovis2",
    "qianfan_ocr",
    "hyperclovax_vision_v2",
    "gemma4",
    "qwen2_5_omni_thinker",
    "ernie4_5_vl_moe",
    "aria",
    "deepseek_vl_hybrid",
    "fuyu",
    "granite4_vision",
    "deepseek_ocr2",
    "mistral_large4",
    "dots3_note",
    "hy_v4_vl",
    "llava_onevision1_5",
    "ovis2_5",
    *TORCHVISION_FAMILIES,
)

WORDS = (
    "a an the is there in on of and with this that image picture photo describe what where how many "
    "dog cat person car bus frisbee knife fork cup table chair bird sky tree red blue green yellow "
    "small large left right near yes no it are two three one some , . ? : \n"
).split(" ")

LLAVA_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}USER: "
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}<image>\n"
    "{% else %}{{ item['text'] }}{% endif %}{% endfor %} "
    "{% else %}ASSISTANT: {% for item in message['content'] %}{{ item['text'] }}{% endfor %}</s>"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
QWEN_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% else %}{{ item['text'] }}{% endif %}{% endfor %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
LLAVA_SPECIALS = ("<pad>", "<s>", "</s>", "<unk>", "<image>", "USER", "ASSISTANT")
QWEN_SPECIALS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|image_pad|>", "<|video_pad|>", "<unk>", "user", "assistant", "system",
)


def word_tokenizer(specials: tuple[str, ...], words: tuple[str, ...] | list[str] = WORDS) -> Tokenizer:
    """A word-level tokenizer: special tokens first, then each word, splitting on spaces and punctuation."""
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys([*specials, *words]))}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()]
    )
    tokenizer.add_special_tokens([t for t in specials if t.startswith("<")])
    return tokenizer


def _fast_tokenizer(family: Family) -> PreTrainedTokenizerFast:
    if family.startswith("llava"):
        tok = PreTrainedTokenizerFast(
            tokenizer_object=word_tokenizer(LLAVA_SPECIALS), bos_token="<s>", eos_token="</s>",
            unk_token="<unk>", pad_token="<pad>", padding_side="left",
        )
    else:
        tok = PreTrainedTokenizerFast(
            tokenizer_object=word_tokenizer(QWEN_SPECIALS), eos_token="<|im_end|>", unk_token="<unk>",
            pad_token="<|endoftext|>", padding_side="left",
        )
    return tok


def _llama_text_config(vocab_size: int, layers: int, heads: int, kv_heads: int, head_dim: int) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=heads * head_dim, intermediate_size=2 * heads * head_dim,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
        head_dim=head_dim, max_position_embeddings=2048, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )


def _clip_config(image_size: int, patch_size: int) -> CLIPVisionConfig:
    return CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        image_size=image_size, patch_size=patch_size, projection_dim=32,
    )


class ImageOnlyQwen2VLProcessor(Qwen2VLProcessor):
    """`Qwen2VLProcessor` without its video processor, which needs torchvision (not installable beside
    the CPU torch build used here). Images are processed exactly as by the stock class."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        tokenizer.image_token = "<|image_pad|>"
        tokenizer.video_token = "<|video_pad|>"
        self.video_processor = None
        super(Qwen2VLProcessor, self).__init__(image_processor, tokenizer, chat_template=chat_template)
        self.image_token, self.video_token = tokenizer.image_token, tokenizer.video_token
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)


@dataclass
class TinyVLM:
    """A tiny model with its processor; `inputs()` builds a left-padded, processor-made batch."""

    family: Family
    model: Any
    processor: Any
    nested_images: bool = False  # the processor takes one list of images per prompt (Gemma 3)

    @property
    def tokenizer(self) -> PreTrainedTokenizerFast:
        return self.processor.tokenizer

    def prompt(self, question: str, with_image: bool = True, images: int = 1) -> str:
        if self.processor.chat_template is None:  # the processor writes the prompt itself (Fuyu)
            return question
        content = ([{"type": "image"}] * images if with_image else []) + [{"type": "text", "text": question}]
        return self.processor.apply_chat_template(
            [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
        )

    @property
    def unpadded_only(self) -> bool:
        """Whether vlmfix runs this family on unpadded batches only (`Adapter.left_padding_changes_rows`): its
        rows then get images of one size, so prompts of one token length make a batch without padding."""
        from vlmfix.adapters import get_adapter

        return get_adapter(self.model).left_padding_changes_rows

    def inputs(self, questions: list[str], *, with_image: bool | list[bool] = True, seed: int = 0,
               images_per_row: int = 1, image: Image.Image | None = None) -> dict:
        """Row i gets image number `seed + i` (so a row built alone with `seed=i` has the same image), of 48, 64 or
        80 pixels a side (48 for a family run on unpadded batches only); with `images_per_row` > 1 its k-th further
        image is number `seed + i + 1000 k`; every image is `image` where one is given."""
        flags = with_image if isinstance(with_image, list) else [with_image] * len(questions)
        prompts = [self.prompt(q, f, images_per_row) for q, f in zip(questions, flags)]
        sizes = [48 if self.unpadded_only else 48 + 16 * ((seed + i) % 3) for i in range(len(flags))]
        rows = [[image or random_image(sizes[i], seed + i + 1000 * k) for k in range(images_per_row)]
                for i, f in enumerate(flags) if f]
        kwargs: dict[str, Any] = {"text": prompts, "return_tensors": "pt", "padding": True}
        if rows:
            kwargs["images"] = rows if self.nested_images else [image for row in rows for image in row]
        # a generation prompt has no training labels (PaliGemma's processor returns some)
        return {k: self._widened(v) for k, v in self.processor(**kwargs).items() if k != "labels"}

    def _widened(self, value: Any) -> Any:
        """`value` in the model's dtype where it is a floating tensor of lower precision (Llama 4's processor
        computes pixels in bfloat16, which its float32 vision tower cannot take); anything else as it is."""
        dtype = self.model.dtype
        if (isinstance(value, torch.Tensor) and value.is_floating_point()
                and torch.finfo(value.dtype).bits < torch.finfo(dtype).bits):
            return value.to(dtype)
        return value


def random_image(size: int, seed: int) -> Image.Image:
    """A deterministic RGB noise image of `size` x `size` pixels."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


def require_torchvision(what: str) -> None:
    """Raise a `RuntimeError` naming the fix when torchvision or timm cannot be imported (`what` needs them)."""
    missing = [name for name in ("torchvision", "timm") if importlib.util.find_spec(name) is None]
    if missing:
        raise RuntimeError(
            f"{what} needs {' and '.join(missing)}, not installed here: the image processors of "
            f"`TORCHVISION_FAMILIES` have no PIL backend, and some of their vision towers are timm models. Run these "
            "tests in an environment with both (`pip install torch==2.14.1 torchvision==0.29.1 timm`, then "
            "`pip install -e \".[all]\"`; CI's second lane in .ci/run), or deselect them with -m \"not torchvision\"."
        )


def build_tiny(
    family: Family,
    *,
    layers: int = 4,
    heads: int = 4,
    kv_heads: int = 2,
    head_dim: int = 16,
    attn_implementation: str = "sdpa",
    image_size: int = 32,
    patch_size: int = 8,
    seed: int = 0,
    options: dict[str, Any] | None = None,
) -> TinyVLM:
    """Build a tiny random-weight model of `family` with an offline tokenizer and processor.

    Args:
        family: one of `ALL_FAMILIES`.
        layers, heads, kv_heads, head_dim: language-model shape (kv_heads < heads gives GQA).
        attn_implementation: "sdpa" or "eager", set on the whole model as `from_pretrained` would.
        image_size, patch_size: LLaVA-1.5's vision tower input (image tokens = (size / patch)^2;
            336 / 14 gives LLaVA-1.5's 576).
        seed: weight initialisation seed.
        options: keyword options of the family's builder in `vlmfix.testing.tiny_families` beyond the
            language-model shape, where it has them (Qwen3-VL: `image_side`, `patch_size`, `vision_depth`,
            `deepstack_layers`; Gemma 3: `image_size`, `patch_size`, `tokens_per_image`, `sliding_window`,
            `global_every`), e.g. benchmark-sized images; the reference families take `image_size` /
            `patch_size` above instead.
    """
    if family not in ALL_FAMILIES:
        raise ValueError(f"Unknown family {family!r}. Available: {', '.join(ALL_FAMILIES)}")
    torch.manual_seed(seed)
    if family in TORCHVISION_FAMILIES:
        require_torchvision(f"the tiny {family} build")
    if family not in FAMILIES:
        from vlmfix.testing import (
            tiny_families,
            tiny_feature_families,
            tiny_sparse_families,
            tiny_timm_and_torchvision,
            tiny_torchvision,
        )
        from vlmfix.testing.tiny_families import Shape

        modules = (tiny_torchvision, tiny_timm_and_torchvision, tiny_feature_families, tiny_sparse_families,
                   tiny_families)
        module = next(m for m in modules if family in m.BUILDERS)
        built, built_processor = module.BUILDERS[family](Shape(layers, heads, kv_heads, head_dim), **(options or {}))
        tiny = TinyVLM(family=family, model=built, processor=built_processor,
                       nested_images=family in module.NESTED_IMAGES)
        return _finish(tiny, attn_implementation)
    if options:
        raise ValueError(f"build_tiny's `options` serve the families built in vlmfix.testing.tiny_families, not "
                         f"{family!r}; set its image_size / patch_size instead.")
    tokenizer = _fast_tokenizer(family)
    vocab = len(tokenizer)
    config: PreTrainedConfig
    model: PreTrainedModel
    image_processor: BaseImageProcessor
    processor: ProcessorMixin
    if family == "llava":
        tokenizer.image_token = "<image>"
        config = LlavaConfig(
            vision_config=_clip_config(image_size, patch_size),
            text_config=_llama_text_config(vocab, layers, heads, kv_heads, head_dim),
            image_token_index=cast(int, tokenizer.convert_tokens_to_ids("<image>")), vision_feature_layer=-2,
            vision_feature_select_strategy="default", projector_hidden_act="gelu",
        )
        model = LlavaForConditionalGeneration(config)
        image_processor = CLIPImageProcessorPil(
            size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
        )
        processor = LlavaProcessor(
            image_processor=image_processor, tokenizer=tokenizer, patch_size=patch_size,
            vision_feature_select_strategy="default", chat_template=LLAVA_TEMPLATE, num_additional_image_tokens=1,
        )
    elif family == "llava_next":
        config = LlavaNextConfig(
            vision_config=_clip_config(32, 8), text_config=_llama_text_config(vocab, layers, heads, kv_heads, head_dim),
            image_token_index=cast(int, tokenizer.convert_tokens_to_ids("<image>")), vision_feature_layer=-2,
            vision_feature_select_strategy="default", image_grid_pinpoints=[[32, 32], [32, 64], [64, 32], [64, 64]],
        )
        model = LlavaNextForConditionalGeneration(config)
        image_processor = LlavaNextImageProcessorPil(
            size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
            image_grid_pinpoints=[[32, 32], [32, 64], [64, 32], [64, 64]],
        )
        processor = LlavaNextProcessor(
            image_processor=image_processor, tokenizer=tokenizer, patch_size=8,
            vision_feature_select_strategy="default", chat_template=LLAVA_TEMPLATE, num_additional_image_tokens=1,
        )
    else:
        ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIALS}
        text: dict[str, Any] = dict(
            vocab_size=vocab, hidden_size=heads * head_dim, intermediate_size=2 * heads * head_dim,
            num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
            max_position_embeddings=2048, bos_token_id=None,
            rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0},
            pad_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
        )
        vision: dict[str, Any] = dict(depth=2, embed_dim=32, hidden_size=32, num_heads=4, patch_size=8,
                                      spatial_merge_size=2, temporal_patch_size=2, in_channels=3)
        common: dict[str, Any] = dict(
            image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
            vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        )
        if family == "qwen2_vl":
            vision.update(mlp_ratio=2, hidden_size=heads * head_dim)
            config = Qwen2VLConfig(text_config=text, vision_config=vision, **common)
            model = Qwen2VLForConditionalGeneration(config)
        else:
            vision.update(intermediate_size=64, out_hidden_size=heads * head_dim, fullatt_block_indexes=[1],
                          window_size=32)
            config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, **common)
            model = Qwen2_5_VLForConditionalGeneration(config)
        image_processor = Qwen2VLImageProcessorPil(
            min_pixels=32 * 32, max_pixels=64 * 64, patch_size=8, merge_size=2, temporal_patch_size=2
        )
        processor = ImageOnlyQwen2VLProcessor(
            image_processor=image_processor, tokenizer=tokenizer, chat_template=QWEN_TEMPLATE
        )
    return _finish(TinyVLM(family=family, model=model, processor=processor), attn_implementation)


def _attention_request(model: PreTrainedModel, attn_implementation: str) -> str | dict[str, str]:
    """`attn_implementation` for the whole model; for the model and its language model only (`text_config`) where a
    sub-model refuses it: Apertus 1.5's VQ image tokenizer has no SDPA path (its attention block is its own), so
    transformers 5.24 raises on `from_pretrained(..., attn_implementation="sdpa")` and on the same string here."""
    if attn_implementation == "sdpa" and not model._supports_sdpa:
        return "eager"  # what from_pretrained picks by default for a model with no SDPA path (HY V4 VL)
    refusing = [m for m in model.modules() if isinstance(m, PreTrainedModel) and m.config is not model.config
                and attn_implementation == "sdpa" and m._can_set_attn_implementation() and not m._supports_sdpa]
    return {"": attn_implementation, "text_config": attn_implementation} if refusing else attn_implementation


def _finish(tiny: TinyVLM, attn_implementation: str) -> TinyVLM:
    """Set the attention implementation (as `from_pretrained` would), the generation ids, eval mode."""
    model = tiny.model
    model.set_attn_implementation(_attention_request(model, attn_implementation))
    model.generation_config.pad_token_id = tiny.tokenizer.pad_token_id
    model.generation_config.eos_token_id = tiny.tokenizer.eos_token_id
    model.eval()
    return tiny
