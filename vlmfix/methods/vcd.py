"""VCD: contrast each step's logits with those of a diffusion-noised copy of the image."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor

from vlmfix import validation
from vlmfix.decoding.contrastive import ContrastiveMethod, require_engine
from vlmfix.decoding.method import register_method
from vlmfix.methods.contrast import check_alpha, check_beta, contrast_logits

if TYPE_CHECKING:
    from vlmfix.decoding.session import Session

DIFFUSION_STEPS = 1000
# CLIP's normalisation (LLaVA-1.5 / LLaVA-NeXT processors); used by noise_space="pixel"
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# the high-resolution copy's normalisation by default: transformers 5.25's DeepseekVLHybridImageProcessor(Pil) sets
# high_res_image_mean / high_res_image_std to OPENAI_CLIP_MEAN / OPENAI_CLIP_STD on their own, whatever image_mean is
HIGH_RES_MEAN, HIGH_RES_STD = CLIP_MEAN, CLIP_STD

NoiseSpace = Literal["normalized", "pixel"]
# more views of the same images, normalised as `pixel_values` (DeepSeek-OCR-2's and Step 3.7's local tiles,
# [tiles, C, H, W]): noised with them, so no view of the negative stream's image stays clean
MORE_VIEWS = ("pixel_values_local",)
# second copies of the images for a second vision tower, normalised on their own (DeepSeek-VL hybrid's SAM input,
# [images, C, H, W] at a higher resolution): noised too, each with its own eps at its own size (VCD's docstring)
HIGH_RES_VIEWS = ("high_res_pixel_values",)


def noise_schedule(steps: int = DIFFUSION_STEPS) -> Tensor:
    """[steps] fp64 abar_t = prod_{s<=t} (1 - beta_s), beta = sigmoid(linspace(-6, 6)) * (5e-3 - 1e-5) + 1e-5."""
    betas = torch.sigmoid(torch.linspace(-6, 6, steps, dtype=torch.float64)) * (5e-3 - 1e-5) + 1e-5
    return torch.cumprod(1 - betas, dim=0)


def image_noise(shape: tuple[int, ...], seed: int) -> Tensor:
    """One image's eps ~ N(0, I): fp32 from a CPU `torch.Generator` seeded with `seed` (reproducible on every
    device). Images with several crops ([crops, C, H, W]) draw one crop after the other."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    if len(shape) == 4:
        return torch.stack([torch.randn(shape[1:], generator=generator) for _ in range(shape[0])])
    return torch.randn(shape, generator=generator)


def add_diffusion_noise(
    pixel_values: Tensor,
    noise_step: int,
    seed: int,
    *,
    image_grid_thw: Tensor | None = None,
    noise_space: NoiseSpace = "normalized",
    mean: tuple[float, ...] = CLIP_MEAN,
    std: tuple[float, ...] = CLIP_STD,
    extents: Sequence[tuple[int, int]] | None = None,
) -> Tensor:
    """sqrt(abar_t) * v + sqrt(1 - abar_t) * eps for every image of a processor's pixel tensor (a new tensor).

    Every image gets the eps of `image_noise(one image's shape, seed)`, so an image's noise does not depend
    on the rest of the batch (nor on beams): a batch of 2 equals two batches of 1.

    Args:
        pixel_values: LLaVA [images, C, H, W]; LLaVA-NeXT [images, crops, C, H, W]; Qwen2-VL flattened
            patches [patches, C * T * P * P] (then `image_grid_thw` [images, 3] splits them per image).
        noise_step: t in [0, 1000).
        seed: the eps generator's seed.
        noise_space: "normalized" noises the tensor as given; "pixel" undoes the processor's
            normalisation (`mean`, `std` per channel) first and applies it again after.
        extents: (height, width) of each image's own pixels where [images, C, H, W] pads every image to the
            batch's largest (Apertus 1.5): eps is drawn at that size and the padding gets none, so an image is
            noised alike alone or batched.
    """
    abar = noise_schedule()[noise_step]
    keep, spread = math.sqrt(abar), math.sqrt(1 - abar)
    values = pixel_values.float()
    if noise_space == "pixel":
        values = _channels(values, image_grid_thw, lambda x, m, s: x * s + m, mean, std)
    if extents is not None:  # [images, C, H, W] padded at the bottom and right
        if len(extents) != values.shape[0] or values.dim() != 4:
            raise ValueError(f"extents give {len(extents)} image sizes for pixel_values of shape "
                             f"{tuple(values.shape)}; pass one (height, width) per image of an [images, C, H, W] "
                             "tensor.")
        eps = torch.zeros_like(values)
        for i, (height, width) in enumerate(extents):
            eps[i, :, :height, :width] = image_noise((values.shape[1], height, width), seed).to(values.device)
        noised = keep * values + spread * eps
    elif image_grid_thw is None:  # one image per leading index
        eps = image_noise(tuple(values.shape[1:]), seed).to(values.device)
        noised = keep * values + spread * eps[None]
    else:
        counts = image_grid_thw.prod(dim=-1).tolist()
        if sum(counts) != values.shape[0]:
            raise ValueError(f"image_grid_thw gives {sum(counts)} patches, pixel_values has {values.shape[0]}.")
        blocks = [keep * part + spread * image_noise(tuple(part.shape), seed).to(values.device)
                  for part in values.split(counts)]
        noised = torch.cat(blocks)
    if noise_space == "pixel":
        noised = _channels(noised, image_grid_thw, lambda x, m, s: (x - m) / s, mean, std)
    return noised.to(pixel_values.dtype)


def _channels(values: Tensor, grid: Tensor | None, fn: Any, mean: tuple[float, ...], std: tuple[float, ...]) -> Tensor:
    """Apply fn(x, mean, std) per colour channel (dim -3 of image layouts; the leading factor of Qwen's
    flattened patch dimension)."""
    m = torch.tensor(mean, dtype=values.dtype, device=values.device)
    s = torch.tensor(std, dtype=values.dtype, device=values.device)
    if grid is None:
        return fn(values, m[:, None, None], s[:, None, None])
    patches = values.view(values.shape[0], len(mean), -1)  # [patches, C, T * P * P]
    return fn(patches, m[:, None], s[:, None]).view_as(values)


@dataclass(frozen=True)
class VCDState:
    """Per call: the noised pixel tensors of the negative stream by input key (the caller's layout)."""

    noised: dict[str, Tensor]


@register_method
class VCD(ContrastiveMethod):
    """Visual Contrastive Decoding: score each token by (1 + alpha) * l - alpha * l', where l' comes from the
    same prompt with a diffusion-noised image, keeping only tokens plausible under the clean image.

    Both streams run as one batched forward per step (rows [clean; noised], separate cache rows); the
    contrast applies in every decoding mode (greedy, sampling, beams).

    Args:
        alpha (float, default 1.0): contrast strength, >= 0 (0 = plain decoding of the clean stream).
        beta (float | None, default 0.1): adaptive plausibility cutoff in (0, 1]: tokens with
            p(j | image) < beta * max p are removed; None switches it off.
        noise_step (int, default 500): diffusion step t in [0, 1000); t=500 gives 0.863 v + 0.505 eps.
        noise_seed (int, default 0): seed of eps (one generator per image, so runs are reproducible).
        noise_space ("normalized" | "pixel", default "normalized"): noise the processor's normalised
            tensor (as the official code) or the [0, 1] pixels (then `image_mean` / `image_std`).
        image_mean, image_std (3 floats, default CLIP's): the processor's normalisation, for "pixel".
        high_res_image_mean, high_res_image_std (3 floats, default CLIP's, as transformers' DeepSeek-VL hybrid
            image processor, independent of image_mean / image_std): the normalisation of a second tower's copy of
            the images (DeepSeek-VL hybrid's `high_res_pixel_values`; the processor's `high_res_image_mean` /
            `high_res_image_std`), for "pixel".

    Every copy of the image that the model reads is noised: `pixel_values`, local tiles (`pixel_values_local`)
    and a second tower's high-resolution copy (`high_res_pixel_values`), each at step `noise_step` with the same
    seed rule (a fresh generator seeded `noise_seed` per image). A high-resolution copy gets its own eps drawn at
    its own size, not the low-resolution eps resized: resizing white noise changes its variance (averaging pixels
    shrinks it), so a resized copy would not sit at step t of the schedule, and the towers normalise differently.
    Both draws start from the same seed, so the larger eps opens with the smaller one's numbers, in the same
    channel-major order but on pixels that do not correspond: the larger copy's rows are longer, so the smaller
    one's numbers wrap onto other pixels (at DeepSeek-VL hybrid's 384 and 1024 pixels all of them fall in the
    larger copy's first channel): no spatial pattern is shared. `report()["noised"]` lists
    the inputs noised.

    Paper: Leng et al., "Mitigating Object Hallucinations in Large Vision-Language Models through Visual
    Contrastive Decoding", CVPR 2024, arXiv 2311.16922, Sec. 3 (Eq. 3-5: contrast and plausibility).
    Departs from the official code: greedy and beams apply the contrast too (the code only patched
    sampling), the noise is seeded, and the negative stream keeps its own cache rows in the same batch. The
    official code noises LLaVA's one normalised tensor; with two towers, vlmfix noises each tower's tensor alike
    but separately (the towers' noises are unrelated, where noise on the picture before preprocessing would
    reach both towers as one pattern).

    Example (toy model):
        >>> import vlmfix, vlmfix.toy
        >>> model, processor, inputs = vlmfix.toy.load_example()
        >>> out = vlmfix.generate(model, **inputs, methods=[vlmfix.VCD(alpha=1.0)], max_new_tokens=20)
    """

    name = "vcd"
    needs_image = True

    def __init__(
        self,
        alpha: float = 1.0,
        beta: float | None = 0.1,
        noise_step: int = 500,
        noise_seed: int = 0,
        noise_space: NoiseSpace = "normalized",
        image_mean: tuple[float, float, float] = CLIP_MEAN,
        image_std: tuple[float, float, float] = CLIP_STD,
        high_res_image_mean: tuple[float, float, float] = HIGH_RES_MEAN,
        high_res_image_std: tuple[float, float, float] = HIGH_RES_STD,
    ) -> None:
        self.alpha = check_alpha(alpha)
        self.beta = check_beta(beta, "beta")
        self.noise_step = validation.number(noise_step, "noise_step", low=0, high=DIFFUSION_STEPS, high_open=True,
                                            integer=True, meaning="the diffusion step t of the noised image (500 "
                                            "is the paper's)")
        self.noise_seed = validation.number(noise_seed, "noise_seed", low=0, integer=True)
        self.noise_space = validation.choice(noise_space, "noise_space", ("normalized", "pixel"))

        def channel(low_open: bool) -> Any:
            return lambda value, name: validation.number(value, name, low=0 if low_open else None,
                                                         low_open=low_open)

        self.image_mean = validation.sequence(image_mean, "image_mean", channel(False), length=3,
                                              what="per-channel floats", meaning="the processor's image_mean")
        self.image_std = validation.sequence(image_std, "image_std", channel(True), length=3,
                                             what="per-channel floats > 0", meaning="the processor's image_std")
        self.high_res_image_mean = validation.sequence(
            high_res_image_mean, "high_res_image_mean", channel(False), length=3, what="per-channel floats",
            meaning="the processor's high_res_image_mean")
        self.high_res_image_std = validation.sequence(
            high_res_image_std, "high_res_image_std", channel(True), length=3, what="per-channel floats > 0",
            meaning="the processor's high_res_image_std")

    def prepare(self, session: Session) -> VCDState:
        require_engine(session, self)
        inputs = session.image_inputs
        if inputs.get("pixel_values") is None:
            raise ValueError("VCD needs pixel_values in the model inputs (the image it noises); pass the processor's "
                             "output to session.generate / vlmfix.generate.")
        grid = inputs.get("image_grid_thw")
        if grid is None and inputs["pixel_values"].dim() == 2:  # one run of patches for all images (Fuyu)
            caller_ids = session.call_inputs.get("input_ids", session.call_inputs.get("inputs"))  # [B0, S]
            grid = session.adapter.patch_grid(caller_ids) if isinstance(caller_ids, Tensor) else None
            if grid is not None and self.noise_space == "pixel":
                raise ValueError(f"noise_space='pixel' needs channel-first pixels or Qwen-style patches; "
                                 f"{type(session.model).__name__}'s patches are channel-last. Use "
                                 f"noise_space='normalized'.")
        extents = session.adapter.pixel_extents(inputs)
        noised = {key: add_diffusion_noise(inputs[key], self.noise_step, self.noise_seed,
                                           image_grid_thw=grid if key == "pixel_values" else None,
                                           noise_space=self.noise_space, mean=mean, std=std,
                                           extents=extents if key == "pixel_values" else None)
                  for key, (mean, std) in self._normalisations().items() if inputs.get(key) is not None}
        return VCDState(noised)

    def _normalisations(self) -> dict[str, tuple[tuple[float, ...], tuple[float, ...]]]:
        """(mean, std) of each image input VCD noises, by input key."""
        views = {key: (self.image_mean, self.image_std) for key in ("pixel_values", *MORE_VIEWS)}
        return {**views, **{key: (self.high_res_image_mean, self.high_res_image_std) for key in HIGH_RES_VIEWS}}

    def negative_inputs(self, session: Session, state: VCDState) -> dict[str, Any]:
        return {**session.inputs, **state.noised}

    def combine(self, state: VCDState, positive_logits: Tensor, negative_logits: Tensor, step: int) -> Tensor:
        return contrast_logits(positive_logits, negative_logits, self.alpha, self.beta)

    def report(self, state: VCDState) -> dict[str, Any]:
        abar = float(noise_schedule()[self.noise_step])
        return {"clean_weight": math.sqrt(abar), "noise_weight": math.sqrt(1 - abar), "noised": sorted(state.noised)}
