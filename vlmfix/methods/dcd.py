"""DCD: contrast the logits of the image seen through a positive and a negative trained projector.

Also the DCD checkpoint format (a projector `state_dict` in safetensors, with metadata that ties it to
its base model), shared with the trainer `vlmfix.training.dcd`.
"""

from __future__ import annotations

import copy
import hashlib
import json
import threading
import warnings
import weakref
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, cast

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from transformers import PreTrainedConfig

from vlmfix import validation
from vlmfix.adapters import get_adapter
from vlmfix.decoding.contrastive import (
    ContrastiveMethod,
    encode_images,
    negative_rows,
    require_engine,
)
from vlmfix.decoding.method import register_method
from vlmfix.errors import CheckpointError, UnsupportedModelError
from vlmfix.methods.contrast import check_alpha, check_beta, contrast_logits
from vlmfix.methods.dcd_lora import PREFIX as LORA_PREFIX
from vlmfix.methods.dcd_lora import LoraSpec, NegativeLora

if TYPE_CHECKING:
    from vlmfix.adapters import Adapter
    from vlmfix.decoding.session import Session

Side = Literal["pos", "neg"]
Variant = Literal["pos+neg", "neg_only", "pos_only"]
SIDES: tuple[Side, ...] = ("pos", "neg")
VARIANTS: tuple[Variant, ...] = ("pos+neg", "neg_only", "pos_only")
CHECKPOINT_FILES: dict[Side, str] = {"pos": "positive.safetensors", "neg": "negative.safetensors"}
FORMAT = "vlmfix-dcd-projector"
FORMAT_VERSION = "2"  # 2: metadata "side" (version 1 called it "stream")
# config entries that do not change what a projector computes (runtime switches, bookkeeping)
_CONFIG_NOISE = {"transformers_version", "dtype", "torch_dtype", "architectures", "name_or_path", "use_cache",
                 "output_attentions", "output_hidden_states", "return_dict", "attn_implementation"}


# ---------------------------------------------------------------------------------------------- checkpoints
def config_hash(model: nn.Module) -> str:
    """sha256 of the model class and its config (runtime switches and private entries left out)."""

    def clean(value: Any) -> Any:
        if isinstance(value, Mapping):
            return {str(k): clean(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))
                    if not str(k).startswith("_") and k not in _CONFIG_NOISE}
        if isinstance(value, (list, tuple)):
            return [clean(v) for v in value]
        return value

    config = cast(PreTrainedConfig, model.config)
    canonical = json.dumps([type(model).__name__, clean(config.to_dict())], sort_keys=True, default=str)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def base_model_id(model: nn.Module) -> str:
    return str(getattr(model.config, "_name_or_path", "") or getattr(model, "name_or_path", "") or type(model).__name__)


def save_projector(path: str | Path, state_dict: Mapping[str, Tensor], model: nn.Module, side: Side,
                   training: Mapping[str, Any] | None = None, lora: NegativeLora | None = None) -> Path:
    """Write one projector's weights with the metadata `load_projector` checks; `lora` (negative side
    only) adds the language-model adapters of the spec's `projector+lora_neg` fallback."""
    if side not in SIDES:
        raise ValueError(f"`side` must be 'pos' or 'neg', got {side!r}.")
    if lora is not None and side != "neg":
        raise ValueError("LoRA adapters belong to the negative projector only (side='neg').")
    projector = get_adapter(model).projector
    tensors = {name: t.detach().to("cpu").contiguous() for name, t in state_dict.items()}
    shapes = {name: list(t.shape) for name, t in tensors.items()}
    if lora is not None:
        tensors.update({name: t.contiguous() for name, t in lora.tensors().items()})
    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "side": side,
        "base_model": base_model_id(model),
        "config_hash": config_hash(model),
        "projector_class": type(projector).__name__,
        "shapes": json.dumps(shapes, sort_keys=True),
        "training": json.dumps(dict(training or {}), sort_keys=True, default=str),
    }
    if lora is not None:
        metadata["lora"] = json.dumps(lora.spec.as_dict(), sort_keys=True)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=metadata)
    return path


def read_metadata(path: str | Path) -> dict[str, str]:
    """The metadata of a DCD checkpoint; CheckpointError when it is missing, corrupt or not one."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"No DCD projector checkpoint at {path}. Train one with `python -m vlmfix.training.dcd "
                              f"model=<model dir> data=<preference jsonl> output_dir={path.parent}`.")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(f"{path} is not a readable safetensors file ({error}); it may be truncated. "
                              "Train or copy the checkpoint again.") from error
    if metadata.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a vlmfix DCD projector checkpoint (metadata format "
                              f"{metadata.get('format')!r}, expected {FORMAT!r}).")
    version = metadata.get("format_version")
    if version == "1":  # the same layout, with the side stored as "stream"
        metadata = {**metadata, "side": metadata.get("stream", ""), "format_version": FORMAT_VERSION}
    elif version != FORMAT_VERSION:
        raise CheckpointError(f"{path} has DCD checkpoint format version {version!r}; this vlmfix reads versions 1 "
                              f"and {FORMAT_VERSION}.")
    return metadata


def load_projector(path: str | Path, model: nn.Module, side: Side | None = None) -> dict[str, Tensor]:
    """A projector state_dict for `model`, after checking that the checkpoint was trained for it."""
    metadata = read_metadata(path)
    expected = f"base model {metadata.get('base_model')!r} (config hash {metadata.get('config_hash', '')[:12]})"
    if side is not None and metadata.get("side") != side:
        raise CheckpointError(f"{path} holds the {metadata.get('side')!r} projector, but the {side!r} one was "
                              f"asked for. Pass the {CHECKPOINT_FILES[side]} file of the training run.")
    projector = get_adapter(model).projector
    if metadata.get("config_hash") != config_hash(model) or metadata.get("projector_class") != type(projector).__name__:
        raise CheckpointError(
            f"{path} was trained for {expected}, but this model is {base_model_id(model)!r} (config hash "
            f"{config_hash(model)[:12]}). Load the model the projector was trained on, or train one for this model."
        )
    _check_toy_build(path, metadata, model)
    state = {k: v for k, v in _read_tensors(path).items() if not k.startswith(LORA_PREFIX)}
    wanted = {name: tuple(t.shape) for name, t in projector.state_dict().items()}
    found = {name: tuple(t.shape) for name, t in state.items()}
    if wanted != found:
        raise CheckpointError(
            f"{path} does not fit the projector of this model: expected {wanted}, found {found}. It was trained for "
            f"{expected}."
        )
    return state


def load_negative_lora(path: str | Path, model: nn.Module) -> NegativeLora | None:
    """The negative-stream LoRA a checkpoint holds (trainable="projector+lora_neg"), else None."""
    metadata = read_metadata(path)
    tensors = {k: v for k, v in _read_tensors(path).items() if k.startswith(LORA_PREFIX)}
    if "lora" not in metadata:
        if tensors:
            raise CheckpointError(f"{path} holds LoRA tensors but no 'lora' metadata (rank, alpha, targets); it was "
                                  "not written by vlmfix's DCD trainer. Train it again.")
        return None
    spec = LoraSpec(**json.loads(metadata["lora"]))
    return NegativeLora.from_tensors(model, spec, tensors, source=str(path))


def _read_tensors(path: str | Path) -> dict[str, Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(f"{path} could not be read ({error}); train or copy the checkpoint again.") from error


def _check_toy_build(path: Path | str, metadata: Mapping[str, str], model: nn.Module) -> None:
    """A toy rebuilt with other settings keeps its config (and config hash) but not its weights: refuse
    projectors trained on another build of it."""
    from vlmfix.toy.build import model_settings_hash

    source = getattr(model.config, "_name_or_path", "") or ""
    current = model_settings_hash(source) if source else None
    if current is None:
        return  # not a toy model directory
    try:
        trained_on = json.loads(metadata.get("training") or "{}").get("toy_settings_hash")
    except ValueError:
        trained_on = None
    if trained_on is None:
        warnings.warn(f"{path} records no toy build, so vlmfix cannot check that it was trained on the toy at "
                      f"{source}; if DCD misbehaves, train the projectors again.", stacklevel=3)
    elif trained_on != current:
        raise CheckpointError(
            f"{path} was trained on the toy build with settings {trained_on[:12]}, but the model at {source} is the "
            f"build with settings {current[:12]}. Train the projectors again: python -m vlmfix.training.dcd "
            f"--config conf/train/dcd.yaml output_dir={Path(path).parent}."
        )


def projector_copy(model: nn.Module, state_dict: Mapping[str, Tensor]) -> nn.Module:
    """A frozen copy of the model's projector holding `state_dict` (same device and dtype)."""
    projector = get_adapter(model).projector
    clone = copy.deepcopy(projector)
    reference = next(projector.parameters())
    clone.load_state_dict({k: v.to(reference.device, reference.dtype) for k, v in state_dict.items()})
    return clone.eval().requires_grad_(False)


@contextmanager
def projector_replaced(model: nn.Module, replacement: nn.Module) -> Iterator[None]:
    """Inside the block the model's projector slot returns `replacement(input)` instead of its own output,
    for the calling thread's forwards only."""
    thread = threading.get_ident()

    def replace(module: nn.Module, args: tuple, kwargs: dict, output: Tensor) -> Tensor | None:
        # the projector's own arguments (Idefics2's connector also takes the patch attention mask)
        return replacement(*args, **kwargs) if threading.get_ident() == thread else None

    handle = get_adapter(model).projector.register_forward_hook(replace, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


# ---------------------------------------------------------------------------------------------- method
@dataclass
class DCDState:
    """Per call: the projectors in use and the image features each stream gets (filled at the prefill)."""

    projectors: dict[Side, nn.Module]
    lora: NegativeLora | None = None  # the negative stream's language-model adapters, if trained
    features: dict[Side, dict[str, Any]] = field(default_factory=dict)


@register_method
class DCD(ContrastiveMethod):
    """Decoupling Contrastive Decoding: score tokens by (1 + alpha) * l_w - alpha * l_l, where l_w sees the image
    through the positive projector (or the original one) and l_l through a negative projector trained on
    hallucinated (rejected) responses, keeping tokens plausible under the positive stream.

    Both streams share the prompt and the generated tokens and run as one batched forward per step (rows
    [positive; negative], separate cache rows). Train the projectors with `python -m vlmfix.training.dcd`.
    A negative checkpoint trained with `trainable=projector+lora_neg` (the spec's fallback) also carries LoRA
    adapters for the language model; they act on the negative rows of that forward only.

    Args:
        checkpoints (str | Path | None): a training output directory holding `positive.safetensors` and/or
            `negative.safetensors`.
        positive, negative (str | Path | None): explicit checkpoint files (override `checkpoints`).
        variant ("pos+neg" | "neg_only" | "pos_only", default "pos+neg"): which projectors are used:
            pos+neg = P_pos vs P_neg; neg_only = the model's own projector vs P_neg (cheapest to train);
            pos_only = plain decoding through P_pos (one stream; a vlmfix reading of the ablation).
        alpha (float, default 1.0): contrast strength, >= 0.
        apc_beta (float | None, default 0.1): plausibility cutoff on the positive stream, (0, 1]; None = off.

    Paper: Chen et al., "Decoupling Contrastive Decoding: Robust Hallucination Mitigation in Multimodal Large
    Language Models", arXiv 2504.08809 (Sec. 3: decoupled positive/negative projections, contrastive decoding).
    Departs from the official code: only the abstract-level recipe is known; the defaults (NLL per projector,
    APC beta 0.1) are vlmfix's reconstruction (see the spec's [R] tags), and the vision tower runs once per
    replaced projector at the prefill (transformers encodes images before the first forward).

    Example (the fast toy; train its projectors first with
    `python -m vlmfix.training.dcd model=toy_fast output_dir=outputs/dcd/toy_fast`):
        >>> import vlmfix, vlmfix.toy
        >>> model, processor, inputs = vlmfix.toy.load_example()
        >>> dcd = vlmfix.DCD("outputs/dcd/toy_fast")
        >>> out = vlmfix.generate(model, **inputs, methods=[dcd], max_new_tokens=20)
    """

    name = "dcd"
    needs_image = True

    def __init__(
        self,
        checkpoints: str | Path | None = None,
        *,
        positive: str | Path | None = None,
        negative: str | Path | None = None,
        variant: Variant = "pos+neg",
        alpha: float = 1.0,
        apc_beta: float | None = 0.1,
    ) -> None:
        validation.choice(variant, "variant", VARIANTS, "which projectors are contrasted")
        for arg, value in (("checkpoints", checkpoints), ("positive", positive), ("negative", negative)):
            if value is not None and not isinstance(value, (str, Path)):
                raise ValueError(f"`{arg}` must be a path (str or Path) or None, got {validation.with_type(value)}.")
        sides: dict[str, tuple[Side, ...]] = {"pos+neg": ("pos", "neg"), "neg_only": ("neg",), "pos_only": ("pos",)}
        needed = sides[variant]
        files: dict[Side, str | None] = {}
        for side, given in zip(SIDES, (positive, negative)):
            if given is None and checkpoints is not None:
                given = Path(checkpoints) / CHECKPOINT_FILES[side]
            files[side] = str(given) if given is not None else None
        missing = [s for s in needed if files[s] is None]
        if missing:
            raise ValueError(
                f"DCD(variant={variant!r}) needs the {' and '.join(CHECKPOINT_FILES[s] for s in missing)} "
                f"checkpoint: pass checkpoints=<training output dir> or "
                f"{' / '.join('positive=' if s == 'pos' else 'negative=' for s in missing)}<file>. Train them "
                f"with `python -m vlmfix.training.dcd`."
            )
        self.checkpoints = str(checkpoints) if checkpoints is not None else None
        self.positive = files["pos"] if "pos" in needed else None
        self.negative = files["neg"] if "neg" in needed else None
        self.variant = variant
        self.alpha = check_alpha(alpha)
        self.apc_beta = check_beta(apc_beta, "apc_beta")
        # loaded projectors, reused across calls: model's projector -> {side: frozen copy}
        self._loaded: weakref.WeakKeyDictionary[nn.Module, dict[Side, nn.Module]] = weakref.WeakKeyDictionary()
        self._lora: weakref.WeakKeyDictionary[nn.Module, NegativeLora | None] = weakref.WeakKeyDictionary()

    def check(self, adapter: Adapter) -> None:
        try:
            _ = adapter.projector
        except AttributeError as error:  # the adapter's lookup names what the model has instead
            raise UnsupportedModelError(f"DCD trains and swaps an image projector, and {error}") from None

    def projectors(self, model: nn.Module) -> dict[Side, nn.Module]:
        """The frozen positive / negative projectors for `model`, loaded (and checked) once."""
        slot = get_adapter(model).projector
        if slot not in self._loaded:
            files: dict[Side, str | None] = {"pos": self.positive, "neg": self.negative}
            self._loaded[slot] = {
                side: projector_copy(model, load_projector(path, model, side))
                for side, path in files.items() if path is not None
            }
        return self._loaded[slot]

    def negative_lora(self, model: nn.Module) -> NegativeLora | None:
        """The negative checkpoint's language-model adapters (trainable="projector+lora_neg"), or None."""
        slot = get_adapter(model).projector
        if slot not in self._lora:
            self._lora[slot] = load_negative_lora(self.negative, model) if self.negative else None
        return self._lora[slot]

    def prepare(self, session: Session) -> DCDState:
        require_engine(session, self)
        projectors = self.projectors(session.model)  # first: the checkpoints' base-model checks
        lora = self.negative_lora(session.model)
        if lora is not None:  # on the negative rows of the engine's two-stream forwards only
            for layer, hook in lora.hooks(lambda: negative_rows(session)):
                session.hook_for_prompt(layer, hook, after=True)
        return DCDState(projectors, lora)

    def _features(self, session: Session, state: DCDState, side: Side) -> dict[str, Any]:
        if side not in state.features:
            with projector_replaced(session.model, state.projectors[side]):
                state.features[side] = encode_images(session, {})
        return state.features[side]

    def positive_inputs(self, session: Session, state: DCDState) -> dict[str, Any] | None:
        if "pos" not in state.projectors:
            return None  # neg_only: the model's own projector, as generate encoded it
        return {"mm_encoder_outputs": self._features(session, state, "pos")}

    def negative_inputs(self, session: Session, state: DCDState) -> dict[str, Any]:
        return {**session.inputs, "mm_encoder_outputs": self._features(session, state, "neg")}

    def two_streams(self, state: DCDState) -> bool:
        return self.variant != "pos_only"

    def combine(self, state: DCDState, positive_logits: Tensor, negative_logits: Tensor, step: int) -> Tensor:
        return contrast_logits(positive_logits, negative_logits, self.alpha, self.apc_beta)

    def report(self, state: DCDState) -> dict[str, Any]:
        lora = state.lora.spec.as_dict() if state.lora is not None else None
        return {"variant": self.variant, "projectors": sorted(state.projectors), "negative_lora": lora}
