"""Plain-PyTorch reference decoding shared by the PAI, GIFT and dual-stream tests.

A slow reference forward: the model runs without cache on the whole sequence; in the chosen layers,
every query row at a position >= `edit_from[b]` is recomputed here from the layer's own q/k/v
projections (RoPE applied by hand, fp32 softmax) with its probabilities produced by `edit_row`, and
fed to o_proj in place of the model's own row. A row recomputed this way is what an incremental
decode would have produced for that row, because each generated token was once "the last row" of
its own forward.

Also VCD's noised image written from the spec (`reference_noise`), shared by the VCD and Fuyu tests.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

import vlmfix

# edit_row(layer_idx, batch_row, z, allowed) -> probabilities; z: [heads, kv_len] scaled scores (no
# mask), allowed: [kv_len] bool (causal and padding); returns [heads, kv_len].
RowEdit = Callable[[int, int, Tensor, Tensor], Tensor]


def plain_softmax(z: Tensor, allowed: Tensor) -> Tensor:
    return torch.softmax(z.masked_fill(~allowed, -math.inf), dim=-1)


def _rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def reference_logits(model: Any, inputs: dict, layers: set[int], edit_row: RowEdit, edit_from: int) -> Tensor:
    """Logits [batch, seq, vocab] of one no-cache forward with the reference edit on rows >= edit_from."""
    adapter = vlmfix.get_adapter(model)
    captured: dict[int, dict[str, Any]] = {}
    handles = []
    padding = inputs["attention_mask"].bool()  # [batch, seq]

    def capture(layer_idx):
        def hook(module, args, kwargs):
            captured[layer_idx] = {
                "h": kwargs.get("hidden_states", args[0] if args else None),
                "pe": kwargs["position_embeddings"],
            }

        return hook

    def replace(layer_idx):
        attn = adapter.attn(layer_idx)

        def hook(module, args):
            x = args[0].clone()  # [batch, seq, heads * head_dim]
            h, (cos, sin) = captured[layer_idx]["h"], captured[layer_idx]["pe"]
            batch, seq, _ = h.shape
            hd = adapter.head_dim
            q = attn.q_proj(h).view(batch, seq, -1, hd).transpose(1, 2).float()
            k = attn.k_proj(h).view(batch, seq, -1, hd).transpose(1, 2).float()
            v = attn.v_proj(h).view(batch, seq, -1, hd).transpose(1, 2).float()
            cos, sin = cos[:, None].float(), sin[:, None].float()
            q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
            heads = q.shape[1]
            k = k.repeat_interleave(heads // k.shape[1], dim=1)
            v = v.repeat_interleave(heads // v.shape[1], dim=1)
            for b in range(batch):
                for i in range(edit_from, seq):
                    allowed = padding[b].clone()
                    allowed[i + 1 :] = False
                    z = torch.einsum("hd,hjd->hj", q[b, :, i], k[b]) * hd**-0.5  # [heads, seq]
                    p = edit_row(layer_idx, b, z, allowed)
                    x[b, i] = torch.einsum("hj,hjd->hd", p, v[b]).reshape(-1).to(x.dtype)
            return (x,)

        return hook

    try:
        for layer_idx in layers:
            handles.append(
                adapter.attn(layer_idx).register_forward_pre_hook(capture(layer_idx), with_kwargs=True)
            )
            handles.append(adapter.o_proj(layer_idx).register_forward_pre_hook(replace(layer_idx)))
        with torch.no_grad():
            return model(**inputs, use_cache=False).logits
    finally:
        for handle in handles:
            handle.remove()


def reference_greedy(
    model: Any, inputs: dict, layers: set[int], edit_row: RowEdit, steps: int, skip_first: bool = False
) -> tuple[Tensor, Tensor]:
    """Greedy decoding with the reference: (new tokens [batch, steps], logits [steps, batch, vocab]).

    Rows from the prompt's last one on are edited (from the first generated one with `skip_first`)."""
    current = {k: v for k, v in inputs.items()}
    prompt_len = inputs["input_ids"].shape[1]
    tokens, logits = [], []
    for _ in range(steps):
        step = reference_logits(model, current, layers, edit_row, prompt_len - 1 + int(skip_first))[:, -1]
        nxt = step.argmax(-1)
        tokens.append(nxt)
        logits.append(step)
        current["input_ids"] = torch.cat([current["input_ids"], nxt[:, None]], dim=1)
        current["attention_mask"] = torch.cat(
            [current["attention_mask"], torch.ones_like(nxt[:, None])], dim=1
        )
        if "mm_token_type_ids" in current:
            current["mm_token_type_ids"] = torch.cat(
                [current["mm_token_type_ids"], torch.zeros_like(nxt[:, None])], dim=1
            )
    return torch.stack(tokens, dim=1), torch.stack(logits)


def vlmfix_greedy(model: Any, inputs: dict, methods: list, steps: int, **kw: Any) -> tuple[Tensor, Tensor]:
    out = vlmfix.generate(
        model,
        **inputs,
        methods=methods,
        max_new_tokens=steps,
        min_new_tokens=steps,
        do_sample=False,
        return_dict_in_generate=True,
        output_logits=True,
        **kw,
    )
    prompt_len = inputs["input_ids"].shape[1]
    return out.sequences[:, prompt_len:], torch.stack(out.logits)


def assert_batch_rows_equal_rows_alone(tiny: Any, batch: dict, methods: list, steps: int = 3, **kw: Any) -> None:
    """Each row of `batch` (built from QUESTIONS) decodes the logits it decodes alone (image seed = row),
    -inf where alone it is -inf (the refinement's cutoff)."""
    _, logits = vlmfix_greedy(tiny.model, batch, methods, steps=steps, **kw)
    for i, q in enumerate(QUESTIONS):
        _, alone = vlmfix_greedy(tiny.model, tiny.inputs([q], seed=i), methods, steps=steps, **kw)
        finite = torch.isfinite(alone[:, 0])
        assert torch.equal(finite, torch.isfinite(logits[:, i]))
        torch.testing.assert_close(logits[:, i][finite], alone[:, 0][finite], atol=1e-4, rtol=1e-4)


def image_free_logits(model: Any, inputs: dict) -> Tensor:
    """Next-token logits [batch, vocab] of the same prompts without image tokens (and Qwen's vision
    start/end), re-left-padded, with plain attention: PAI's image-free stream, built by hand."""
    config = model.config
    drop = {
        config.image_token_id,
        getattr(config, "vision_start_token_id", -1),
        getattr(config, "vision_end_token_id", -1),
    }
    rows = [
        ids[(m == 1) & ~torch.isin(ids, torch.tensor(sorted(drop)))]
        for ids, m in zip(inputs["input_ids"], inputs["attention_mask"])
    ]
    width = max(len(r) for r in rows)
    pad = model.generation_config.pad_token_id
    ids = torch.stack([torch.cat([r.new_full((width - len(r),), pad), r]) for r in rows])
    mask = torch.stack(
        [torch.cat([torch.zeros(width - len(r), dtype=torch.long), torch.ones_like(r)]) for r in rows]
    )
    kwargs: dict[str, Any] = {"input_ids": ids, "attention_mask": mask}
    if "mm_token_type_ids" in inputs:  # Qwen: text-only rows, M-RoPE positions from the mask
        kwargs["mm_token_type_ids"] = torch.zeros_like(ids)
    else:
        kwargs["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        return model(**kwargs).logits[:, -1]


def refined_reference(positive: Tensor, negative: Tensor, gamma: float, cutoff: float = 0.1) -> Tensor:
    """The spec's rule written out: gamma * (log p_img - log p_noimg) + log p_noimg, -inf below the cutoff."""
    log_img, log_free = positive.log_softmax(-1), negative.log_softmax(-1)
    want = gamma * (log_img - log_free) + log_free
    want[log_img < math.log(cutoff) + log_img.max(-1, keepdim=True).values] = -math.inf
    return want


def grown(inputs: dict, tokens: Tensor) -> dict:
    """The prompt batch followed by `tokens` [batch, n] (mask and Qwen token types extended)."""
    out = {
        **inputs,
        "input_ids": torch.cat([inputs["input_ids"], tokens], 1),
        "attention_mask": torch.cat([inputs["attention_mask"], torch.ones_like(tokens)], 1),
    }
    if "mm_token_type_ids" in inputs:
        out["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"], torch.zeros_like(tokens)], 1)
    return out


def snapshot(inputs: dict) -> dict:
    return {k: v.clone() for k, v in inputs.items() if isinstance(v, Tensor)}


def assert_unchanged(inputs: dict, before: dict) -> None:
    for k, v in before.items():
        assert torch.equal(inputs[k], v), f"input {k} was modified in place"


def image_positions(tiny, inputs) -> Tensor:
    return inputs["input_ids"] == tiny.model.config.image_token_id  # [batch, seq]



QUESTIONS = ["describe this image .", "is there a dog on the table ?"]
def keys_of(mask: Tensor, kv_len: int) -> Tensor:
    """A prompt key set [seq] extended to kv_len keys (generated tokens belong to no set)."""
    return torch.cat([mask, mask.new_zeros(kv_len - mask.shape[0])])


def reference_abar(t: int) -> float:
    """prod_{s<=t} (1 - beta_s), beta_s = sigmoid(-6 + 12 s / 999) * (5e-3 - 1e-5) + 1e-5, in plain Python."""
    product = 1.0
    for s in range(t + 1):
        x = -6 + 12 * s / 999
        product *= 1 - (1 / (1 + math.exp(-x)) * (5e-3 - 1e-5) + 1e-5)
    return product


def reference_noise(pixels: Tensor, t: int, seed: int, patches_per_image: list[int] | None = None) -> Tensor:
    """sqrt(abar_t) x + sqrt(1 - abar_t) eps for every image, its eps from a fresh CPU generator seeded `seed`:
    LLaVA [images, C, H, W]: eps = randn(C, H, W); LLaVA-NeXT [images, crops, C, H, W]: one randn(C, H, W) per
    crop, one after the other; flattened patches [patches, D] (Qwen2-VL, Fuyu) split into `patches_per_image`
    runs: eps = randn(run, D) per run."""
    abar = reference_abar(t)
    images = list(pixels) if patches_per_image is None else list(pixels.split(patches_per_image))
    noised = []
    for image in images:
        generator = torch.Generator().manual_seed(seed)
        if image.dim() == 4:  # [crops, C, H, W]
            eps = torch.stack([torch.randn(image.shape[1:], generator=generator) for _ in range(image.shape[0])])
        else:  # [C, H, W] or [run, D]
            eps = torch.randn(image.shape, generator=generator)
        noised.append(math.sqrt(abar) * image + math.sqrt(1 - abar) * eps)
    return torch.stack(noised) if patches_per_image is None else torch.cat(noised)
