"""Train the toy LLaVA from scratch on captioning and yes/no questions.

Each step samples `batch_images` training images. Every image yields one caption row (a random prompt
variant and one of its reference captions) and `questions_per_image` yes/no rows (present and absent
categories, half each). The vision tower runs once per image; its projected features are copied into
the `<image>` slots of all the image's rows. The loss is the cross-entropy of the answer tokens
(answer + `</s>`), averaged per row and then over rows, so short yes/no answers weigh as much as captions.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F
from transformers import DynamicCache, LlavaForConditionalGeneration, PreTrainedConfig, PreTrainedTokenizerFast

from .captions import (
    CAPTION_PROMPT_WEIGHTS,
    CAPTION_PROMPTS,
    NO,
    QUESTION_SUFFIX_WEIGHTS,
    QUESTION_SUFFIXES,
    YES,
    question,
)
from .categories import CATEGORIES
from .dataset import ToyImage
from .model import IMAGE_MEAN, IMAGE_STD
from .tokenizer import IMAGE

IGNORE = -100


@dataclass(frozen=True)
class TrainSpec:
    """Optimisation settings of the toy."""

    steps: int = 450
    batch_images: int = 20  # 32 trained no better (benchmarks.toy_check) at 1.5x the time; see README, The toy model
    questions_per_image: int = 3
    learning_rate: float = 2e-3
    warmup_steps: int = 40
    weight_decay: float = 0.01
    patch_loss_weight: float = 1.0  # auxiliary per-patch category loss (see `train`)
    vision_steps: int = 200  # first stage: vision tower + projector on the per-patch loss alone
    vision_batch_images: int = 64
    threads: int = 1  # fixed, so the same seed gives the same weights; 1 stays fast on a shared CPU

    def __post_init__(self) -> None:
        for name in ("steps", "batch_images", "threads", "vision_batch_images"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}.")


def prompt_text(tokenizer: PreTrainedTokenizerFast, user_text: str) -> str:
    """The chat-template prompt of a one-image question, ending with the generation prompt."""
    conversation: list[dict[str, Any]] = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": user_text}]}
    ]
    return cast(str, tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True))


class RowEncoder:
    """Token ids of training rows: prompt ids (with `<image>` expanded) and answer ids (with `</s>`)."""

    def __init__(self, tokenizer: PreTrainedTokenizerFast, image_tokens: int) -> None:
        self.tokenizer = tokenizer
        self.image_tokens = image_tokens
        self.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE)
        self._prompt_cache: dict[str, list[int]] = {}
        self._answer_cache: dict[str, list[int]] = {}

    def prompt(self, user_text: str) -> list[int]:
        if user_text not in self._prompt_cache:
            ids = self.tokenizer(prompt_text(self.tokenizer, user_text)).input_ids
            expanded: list[int] = []
            for token in ids:
                expanded += [token] * (self.image_tokens if token == self.image_token_id else 1)
            self._prompt_cache[user_text] = expanded
        return self._prompt_cache[user_text]

    def answer(self, text: str) -> list[int]:
        if text not in self._answer_cache:
            ids = self.tokenizer(" " + text, add_special_tokens=False).input_ids
            self._answer_cache[text] = ids + [self.tokenizer.eos_token_id]
        return self._answer_cache[text]


def images_to_tensor(images: list[ToyImage]) -> torch.Tensor:
    """uint8 pixels of all images: [count, 3, H, W]."""
    return torch.from_numpy(np.stack([image.pixels for image in images])).permute(0, 3, 1, 2).contiguous()


def normalise(pixels: torch.Tensor) -> torch.Tensor:
    """The processor's normalisation of uint8 pixels [batch, 3, H, W] (rescale, then mean/std)."""
    mean = torch.tensor(IMAGE_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGE_STD).view(1, 3, 1, 1)
    return (pixels.float() / 255.0 - mean) / std


def sample_rows(image: ToyImage, rng: np.random.Generator, questions: int) -> list[tuple[str, str]]:
    """(user text, answer) rows of one image: one caption row, then `questions` yes/no rows."""
    prompt = CAPTION_PROMPTS[int(rng.choice(len(CAPTION_PROMPTS), p=CAPTION_PROMPT_WEIGHTS))]
    rows = [(prompt, image.captions[int(rng.integers(len(image.captions)))])]
    present = list(image.scene.names)
    absent = [c.name for c in CATEGORIES if c.name not in present]
    for index in range(questions):
        positive = index % 2 == 0
        pool = present if positive else absent
        name = pool[int(rng.integers(len(pool)))]
        suffix = QUESTION_SUFFIXES[int(rng.choice(len(QUESTION_SUFFIXES), p=QUESTION_SUFFIX_WEIGHTS))]
        rows.append((question(name) + suffix, YES if positive else NO))
    return rows


def collate(encoder: RowEncoder, rows: list[tuple[str, str]], pad_id: int):
    """Right-padded ids, attention mask and labels of `rows`: each [rows, seq_len]."""
    sequences = [(encoder.prompt(user), encoder.answer(answer)) for user, answer in rows]
    length = max(len(p) + len(a) for p, a in sequences)
    input_ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), length), IGNORE, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
    for row, (prompt_ids, answer_ids) in enumerate(sequences):
        ids = prompt_ids + answer_ids
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, len(prompt_ids) : len(ids)] = torch.tensor(answer_ids)
        attention_mask[row, : len(ids)] = 1
    return input_ids, attention_mask, labels


def _cache_keyword(language_model: torch.nn.Module) -> str:
    """The name of the KV-cache argument (`past_key_values` became `cache` in transformers 5.x)."""
    return "cache" if "cache" in inspect.signature(language_model.forward).parameters else "past_key_values"


def image_features(model: LlavaForConditionalGeneration, pixel_values: torch.Tensor) -> torch.Tensor:
    """Projected image features, as the stock forward computes them: [images, image_tokens, text_hidden]."""
    features = model.model.get_image_features(
        pixel_values,  # [images, 3, H, W]
        vision_feature_layer=model.config.vision_feature_layer,
        vision_feature_select_strategy=model.config.vision_feature_select_strategy,
    ).pooler_output
    return torch.stack(list(features))


def answer_loss(
    model: LlavaForConditionalGeneration,
    features: torch.Tensor,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    labels: torch.Tensor,
) -> torch.Tensor:
    """Mean over rows of each row's mean answer-token cross-entropy, sharing each image's prefix.

    features: [images, image_tokens, text_hidden] from `image_features`; input_ids, attention_mask,
    labels: [rows, seq_len], where the rows of image i are rows i*k .. i*k+k-1 (k = rows // images) and
    every row starts with the same prefix (`<s> USER : <image> x image_tokens`). The prefix runs once per
    image; its KV cache is repeated for the image's k rows, which then run only their own tokens. This
    equals the stock forward on every full row (see the tests) at about half the cost.
    """
    images, rows = features.shape[0], input_ids.shape[0]
    repeats = rows // images
    is_image = input_ids[0] == model.config.image_token_id  # [seq_len]
    prefix_len = int(is_image.nonzero().max()) + 1
    shared = torch.equal(input_ids[:, :prefix_len], input_ids[:1, :prefix_len].expand(rows, -1))
    if rows != images * repeats or not shared:
        raise ValueError(
            f"answer_loss needs the same number of rows per image and one shared prefix, got {rows} rows "
            f"for {images} images; build rows with sample_rows and collate."
        )
    language_model = model.model.language_model
    embed = model.get_input_embeddings()
    prefix = embed(input_ids[:images, :prefix_len])  # [images, prefix_len, text_hidden]
    prefix = prefix.masked_scatter(is_image[:prefix_len][None, :, None].expand_as(prefix), features)
    cache = DynamicCache(config=language_model.config)
    language_model(inputs_embeds=prefix, use_cache=True, **{_cache_keyword(language_model): cache})
    cache.batch_repeat_interleave(repeats)  # [images, ...] -> [rows, ...]

    suffix_ids = input_ids[:, prefix_len:]  # [rows, suffix_len]
    suffix_len = suffix_ids.shape[1]
    hidden = language_model(
        inputs_embeds=embed(suffix_ids),
        attention_mask=attention_mask,  # [rows, prefix_len + suffix_len]
        position_ids=torch.arange(prefix_len, prefix_len + suffix_len)[None].expand(rows, -1),
        use_cache=True,
        **{_cache_keyword(language_model): cache},
    ).last_hidden_state  # [rows, suffix_len, text_hidden]
    logits = model.lm_head(hidden[:, :-1])  # [rows, suffix_len - 1, vocab]
    targets = labels[:, prefix_len + 1 :]  # the answers never start inside the prefix
    token_loss = F.cross_entropy(logits.transpose(1, 2), targets, ignore_index=IGNORE, reduction="none")
    counts = (targets != IGNORE).sum(dim=1).clamp(min=1)
    return (token_loss.sum(dim=1) / counts).mean()


def patch_labels(images: list[ToyImage], patch_size: int, min_share: float = 0.25) -> torch.Tensor:
    """Class of each image patch: the category covering most of it (1 + index in CATEGORIES), or 0
    (background) when objects cover less than `min_share` of it. Returns [images, patches] long."""
    maps = np.stack([image.label_map for image in images])  # [images, H, W] uint8
    count, height, width = maps.shape
    rows, cols = np.mgrid[0:height, 0:width]
    patch = (rows // patch_size) * (width // patch_size) + cols // patch_size  # [H, W] patch index
    patches, classes = (height // patch_size) * (width // patch_size), len(CATEGORIES) + 1
    slot = (np.arange(count)[:, None, None] * patches + patch) * classes + maps  # [images, H, W]
    votes = np.bincount(slot.ravel(), minlength=count * patches * classes).reshape(count, patches, classes)
    best = votes[..., 1:].argmax(axis=-1) + 1
    covered = votes[..., 1:].sum(axis=-1) >= min_share * patch_size * patch_size
    return torch.from_numpy(np.where(covered, best, 0).astype(np.int64))


class PatchHead(torch.nn.Module):
    """Training-only classifier of image tokens: background, or one of CATEGORIES.

    A category's class vector is the mean decoder input embedding of the words of its name, so the
    per-patch loss pulls an object's image tokens toward the embedding of its name: the decoder can
    then name (or find) an object by matching words to image tokens, which it learns quickly.
    """

    name_ids: torch.Tensor  # buffers
    name_weights: torch.Tensor

    def __init__(self, model: LlavaForConditionalGeneration, tokenizer: PreTrainedTokenizerFast) -> None:
        super().__init__()
        hidden = cast(PreTrainedConfig, model.config.text_config).hidden_size  # a config once LlavaConfig is built
        words = [tokenizer(" " + c.name, add_special_tokens=False).input_ids for c in CATEGORIES]
        width = max(map(len, words))
        ids = torch.tensor([w + [w[-1]] * (width - len(w)) for w in words])  # [categories, width]
        weights = torch.tensor([[1.0 / len(w) if i < len(w) else 0.0 for i in range(width)] for w in words])
        self.register_buffer("name_ids", ids, persistent=False)
        self.register_buffer("name_weights", weights, persistent=False)
        self.background = torch.nn.Parameter(torch.randn(1, hidden) * 0.02)
        self.scale = torch.nn.Parameter(torch.tensor(10.0))
        self.bias = torch.nn.Parameter(torch.zeros(len(CATEGORIES) + 1))

    def forward(self, features: torch.Tensor, embedding_weight: torch.Tensor) -> torch.Tensor:
        """features: [images, tokens, hidden]; embedding_weight: [vocab, hidden] -> [images, tokens, 1 + categories]."""
        names = (embedding_weight[self.name_ids] * self.name_weights[..., None]).sum(dim=1)  # [categories, hidden]
        classes = torch.cat([self.background, names], dim=0)  # [1 + categories, hidden]
        cosine = F.normalize(features, dim=-1) @ F.normalize(classes, dim=-1).T
        return self.scale * cosine + self.bias


def train(
    model: LlavaForConditionalGeneration,
    tokenizer: PreTrainedTokenizerFast,
    images: list[ToyImage],
    spec: TrainSpec,
    *,
    image_tokens: int,
    seed: int,
    on_step: Callable[[int, float], None] | None = None,
) -> list[float]:
    """Train `model` in place on `images`; returns the loss of every step (both stages).

    A temporary linear head reads each projected image token and predicts the category under its patch
    (`patch_labels`). Stage 1 (`spec.vision_steps`) trains the vision tower and projector on that loss
    alone, which is cheap and gives the decoder readable image tokens from the start; stage 2
    (`spec.steps`) trains everything on the answer loss plus `spec.patch_loss_weight` x the patch loss.
    The head is discarded after training.
    """
    rng = np.random.default_rng([seed, 2])
    encoder = RowEncoder(tokenizer, image_tokens)
    pixels = images_to_tensor(images)  # [images, 3, H, W] uint8
    vision_config = cast(PreTrainedConfig, model.config.vision_config)  # a config once LlavaConfig is built
    targets = patch_labels(images, vision_config.patch_size)  # [images, image_tokens]
    patch_head = PatchHead(model, tokenizer)
    parameters = [*model.named_parameters(), *(("patch_head." + n, p) for n, p in patch_head.named_parameters())]
    no_decay = [p for n, p in parameters if p.ndim < 2 or "embed" in n]
    decay = [p for n, p in parameters if not (p.ndim < 2 or "embed" in n)]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": spec.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=spec.learning_rate, betas=(0.9, 0.98),
    )

    def schedule(step: int) -> float:  # linear warm-up, then cosine decay to 5%
        if step < spec.warmup_steps:
            return (step + 1) / spec.warmup_steps
        progress = (step - spec.warmup_steps) / max(1, spec.steps - spec.warmup_steps)
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    model.train()
    losses = _train_vision(model, patch_head, pixels, targets, spec, rng, on_step)
    for step in range(spec.steps):
        chosen = rng.choice(len(images), size=min(spec.batch_images, len(images)), replace=False)
        rows = [row for index in chosen for row in sample_rows(images[int(index)], rng, spec.questions_per_image)]
        input_ids, attention_mask, labels = collate(encoder, rows, tokenizer.pad_token_id)
        features = image_features(model, normalise(pixels[torch.from_numpy(chosen)]))
        loss = answer_loss(model, features, input_ids, attention_mask, labels)
        if spec.patch_loss_weight:
            patch_logits = patch_head(features, model.get_input_embeddings().weight)  # [images, tokens, classes]
            patch_loss = F.cross_entropy(patch_logits.transpose(1, 2), targets[torch.from_numpy(chosen)])
            loss = loss + spec.patch_loss_weight * patch_loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for _, p in parameters], 1.0)
        optimizer.step()
        scheduler.step()
        losses.append(loss.detach().item())
        if on_step is not None:
            on_step(spec.vision_steps + step, losses[-1])
    model.eval()
    return losses


def _train_vision(
    model: LlavaForConditionalGeneration,
    patch_head: PatchHead,
    pixels: torch.Tensor,
    targets: torch.Tensor,
    spec: TrainSpec,
    rng: np.random.Generator,
    on_step: Callable[[int, float], None] | None,
) -> list[float]:
    """Stage 1: the vision tower, projector and patch head on the per-patch loss; returns the losses.

    pixels: [images, 3, H, W] uint8; targets: [images, image_tokens] patch classes.
    """
    parameters = [
        *model.model.vision_tower.parameters(), *model.model.multi_modal_projector.parameters(),
        *patch_head.parameters(),
    ]
    optimizer = torch.optim.AdamW(parameters, lr=spec.learning_rate, betas=(0.9, 0.98), weight_decay=0.0)
    warmup = max(1, spec.warmup_steps // 2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup))
    losses = []
    for step in range(spec.vision_steps):
        chosen = torch.from_numpy(rng.choice(len(pixels), size=min(spec.vision_batch_images, len(pixels)),
                                             replace=False))
        features = image_features(model, normalise(pixels[chosen]))  # [images, image_tokens, hidden]
        embedding = cast(torch.nn.Embedding, model.get_input_embeddings())
        logits = patch_head(features, embedding.weight.detach())  # [images, tokens, classes]
        loss = F.cross_entropy(logits.transpose(1, 2), targets[chosen])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        scheduler.step()
        losses.append(loss.detach().item())
        if on_step is not None:
            on_step(step, losses[-1])
    return losses
