"""The conformance suite: what every supported family must do under vlmfix, checked on its tiny build.

For a family (`vlmfix.testing.ALL_FAMILIES`; those of `TORCHVISION_FAMILIES` beside torchvision and timm):
  - no method: tokens and scores bit-identical to plain `model.generate` (greedy, seeded sampling, beam
    search) on a left-padded batch whose rows differ in length (`check_no_method`);
  - every registered method (`vlmfix.decoding.method.METHODS`, so methods added later are covered) runs
    with its defaults (plus `REQUIRED_ARGS` where a method cannot run without some), reports, and each
    padded row's tokens equal that row decoded alone (`check_method`); a method may refuse a family by
    raising `UnsupportedModelError` when the session is built, and the refusal's reason is shown (on a family
    run on unpadded batches only, a padded prefill's `PaddedBatchError` counts as a refusal only for a method
    whose second prompt has another length by design, `OTHER_LENGTH_SECOND_PROMPT`);
  - spans: each row's image-token count equals the image features the model computes for the row's image
    (what the processor had to insert), and the instruction span
    holds the question and ends at the family's assistant marker (`check_spans`);
  - the model is restored exactly after each session, also after an exception: state dict, config,
    attention registries, hooks (`ModelSnapshot`);
  - the tiny build reads its image: a noise image and a grey one of the same size change the next-token
    logits (`check_image_matters`), else image-contrast methods would be checked on a model blind to images.

```
python -m vlmfix.testing.conformance --table          # family x method: ✓ or the reason (runs the checks)
python -m vlmfix.testing.conformance --list           # supported / refused / unhandled over the mapping
```
"""

from __future__ import annotations

import argparse
import inspect
import re
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import Tensor, nn
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

import vlmfix
from vlmfix.adapters import REFUSED, SUPPORTED_CLASSES, get_adapter
from vlmfix.decoding.method import METHODS, Method
from vlmfix.decoding.prompt_inputs import image_tokens_encoded
from vlmfix.errors import PaddedBatchError, UnsupportedModelError
from vlmfix.testing.tiny import ALL_FAMILIES, TinyVLM, build_tiny, random_image

# rows of different lengths, so the batch is left-padded
QUESTIONS = ("Describe this image in detail .", "is there a dog ?")
# rows of one length (images of one size too: `TinyVLM.inputs`), for a family run on unpadded batches only
# (`Adapter.left_padding_changes_rows`: MiniMax M3), whose every check but the refusal of a padded batch uses them
ONE_LENGTH_QUESTIONS = ("is there a cat ?", "is there a dog ?")
# two-stream methods whose second prompt has another length than the first by design (ICD's disturbed instruction,
# PAI's and M3ID's image-free prompts), so the engine left-pads one of the streams: on a family run on unpadded
# batches only they are refused (`PaddedBatchError` with `by_engine`); any other method that pads such a family's
# batch fails the check
OTHER_LENGTH_SECOND_PROMPT = frozenset({"icd", "pai", "m3id"})
MAX_NEW_TOKENS = 4
MODES: dict[str, dict[str, Any]] = {
    "greedy": dict(do_sample=False),
    "sampling": dict(do_sample=True, top_k=20, temperature=1.3),
    "beams": dict(do_sample=False, num_beams=2, num_return_sequences=2),
}
ArgsFactory = Callable[[TinyVLM, Path], dict[str, Any]]
# (family, mode) where plain `generate` itself fails in this transformers release, with the reason; the check
# then asserts that it still fails (a fixed release shows at once) and that vlmfix fails the same way
UPSTREAM_FAILURES: dict[tuple[str, str], str] = {
    ("fuyu", "beams"): "generate expands image features for the beams only from `pooler_output`, which Fuyu leaves "
                       "empty, so its prefill finds fewer features than image tokens (transformers 5.24 and 5.25)",
}


def dcd_checkpoints(tiny: TinyVLM, directory: Path) -> dict[str, Any]:
    """DCD needs trained projectors: write perturbed copies of the tiny model's projector."""
    from vlmfix.methods.dcd import save_projector

    projector = get_adapter(tiny.model).projector
    generator = torch.Generator().manual_seed(0)
    for name in ("positive", "negative"):
        state = {k: v + 0.05 * torch.randn(v.shape, generator=generator, dtype=v.dtype)
                 for k, v in projector.state_dict().items()}
        save_projector(directory / f"{name}.safetensors", state, tiny.model, "pos" if name == "positive" else "neg")
    return {"checkpoints": str(directory)}


# arguments a method cannot run without (its defaults otherwise); a callable builds them per model
REQUIRED_ARGS: dict[str, dict[str, Any] | ArgsFactory] = {
    # random weights have no published (or detectable) sink dimensions: name two, with a low threshold
    "var": {"sink_dims": [0, 1], "tau": 1.0},
    "dcd": dcd_checkpoints,
    "dola": {"layers": "high"},
}
# generate arguments a method needs beyond greedy decoding (OPERA owns a beam search)
GENERATE_ARGS: dict[str, dict[str, Any]] = {"opera": {"num_beams": 2}}


class ConformanceError(AssertionError):
    """A family breaks one of vlmfix's guarantees."""


# ---------------------------------------------------------------------------------------------- restoration
@dataclass
class ModelSnapshot:
    """What a session may touch and must give back: weights, config, attention registries, hooks."""

    state: dict[str, Tensor]
    config: str
    attn_implementations: list[str | None]
    attention_names: frozenset[str]
    mask_names: frozenset[str]
    hooks: int

    @classmethod
    def take(cls, model: nn.Module) -> ModelSnapshot:
        config: Any = model.config
        return cls(
            state={k: v.detach().clone() for k, v in model.state_dict().items()},
            config=config.to_json_string(use_diff=False),
            attn_implementations=[getattr(m.config, "_attn_implementation", None) for m in _config_owners(model)],
            attention_names=frozenset(AttentionInterface._global_mapping),
            mask_names=frozenset(ALL_MASK_ATTENTION_FUNCTIONS._global_mapping),
            hooks=_hook_count(model),
        )

    def check(self, model: nn.Module, when: str) -> None:
        after = ModelSnapshot.take(model)
        changed = [k for k, v in self.state.items() if not torch.equal(v, after.state[k])]
        problems = [
            f"weights changed: {changed[:3]}" if changed or self.state.keys() != after.state.keys() else "",
            "config changed" if self.config != after.config else "",
            f"attention implementations {self.attn_implementations} -> {after.attn_implementations}"
            if self.attn_implementations != after.attn_implementations else "",
            "attention registry changed" if self.attention_names != after.attention_names else "",
            "mask registry changed" if self.mask_names != after.mask_names else "",
            f"{after.hooks - self.hooks} hooks left on the model" if self.hooks != after.hooks else "",
        ]
        found = [p for p in problems if p]
        if found:
            raise ConformanceError(f"the model is not restored {when}: {'; '.join(found)}")


def _config_owners(model: nn.Module) -> list[Any]:
    return [m for m in model.modules() if hasattr(m, "config")]


def _hook_count(model: nn.Module) -> int:
    """Forward hooks and pre-hooks on the model's modules, except transformers' own output-capturing hooks
    (installed once, on the first forward that records hidden states, and kept on purpose)."""
    return sum(
        not getattr(hook, "__module__", "").startswith("transformers.")
        for m in model.modules()
        for hook in (*m._forward_hooks.values(), *m._forward_pre_hooks.values())
    )


# ---------------------------------------------------------------------------------------------- the checks
def questions_for(tiny: TinyVLM) -> tuple[str, ...]:
    """The batch's questions: of different lengths (a left-padded batch), or of one length for a family run on
    unpadded batches only."""
    return ONE_LENGTH_QUESTIONS if tiny.unpadded_only else QUESTIONS


def check_no_method(tiny: TinyVLM, mode: str) -> None:
    """No method: tokens and scores bit-identical to plain `generate` under `mode`, through both entry points
    (on rows of one length for a family run on unpadded batches only, which must refuse a padded batch)."""
    if tiny.unpadded_only:
        check_padded_batch_refused(tiny)
    inputs = tiny.inputs(list(questions_for(tiny)))
    if bool((inputs["attention_mask"] == 0).any()) == tiny.unpadded_only:
        raise ConformanceError("the conformance batch must be left-padded (rows of different lengths)"
                               if not tiny.unpadded_only else "the conformance batch's rows must have one length")
    kwargs = dict(max_new_tokens=MAX_NEW_TOKENS, return_dict_in_generate=True, output_scores=True, **MODES[mode])
    runs: dict[str, Callable[[], Any]] = {
        "vlmfix.generate": lambda: vlmfix.generate(tiny.model, **inputs, **kwargs),
        "vlmfix.apply": lambda: _generate_in_apply(tiny, inputs, kwargs),
    }
    if (tiny.family, mode) in UPSTREAM_FAILURES:
        _check_same_failure(tiny, mode, inputs, kwargs, runs)
        return
    torch.manual_seed(7)
    reference = tiny.model.generate(**inputs, **kwargs)
    for name, run in runs.items():
        torch.manual_seed(7)
        out = run()
        if not torch.equal(reference.sequences, out.sequences):
            raise ConformanceError(f"{name} without methods changed the tokens under {mode}")
        if len(reference.scores) != len(out.scores) or not all(
            torch.equal(a, b) for a, b in zip(reference.scores, out.scores)
        ):
            raise ConformanceError(f"{name} without methods changed the scores under {mode}")


def check_padded_batch_refused(tiny: TinyVLM) -> None:
    """A family run on unpadded batches only: a left-padded batch raises `PaddedBatchError` naming the cause
    and the fix before any forward, through both entry points, with or without a method."""
    inputs = tiny.inputs(list(QUESTIONS))
    if not bool((inputs["attention_mask"] == 0).any()):
        raise ConformanceError("the refusal check's batch must be left-padded (rows of different lengths)")
    runs: dict[str, Callable[[], Any]] = {
        "vlmfix.generate": lambda: vlmfix.generate(tiny.model, **inputs, max_new_tokens=1),
        "vlmfix.apply": lambda: _generate_in_apply(tiny, inputs, dict(max_new_tokens=1)),
        "a method": lambda: vlmfix.generate(tiny.model, **inputs, methods=["vhr"], max_new_tokens=1),
    }
    calls: list[str] = []  # forwards of the language model
    handle = get_adapter(tiny.model).language_model.register_forward_pre_hook(lambda *_: calls.append("lm"))
    try:
        failures = {name: _failure(run) for name, run in runs.items()}
    finally:
        handle.remove()
    for name, failure in failures.items():
        if failure is None or not failure.startswith("PaddedBatchError") or "batch size 1" not in failure:
            raise ConformanceError(f"{name} ran a left-padded batch of {tiny.family}, which the model itself does "
                                   f"not keep row-independent ({failure})")
    if calls:
        raise ConformanceError(f"vlmfix refused a left-padded batch of {tiny.family} only after a forward")


def _failure(run: Callable[[], Any]) -> str | None:
    try:
        run()
    except Exception as error:  # the failure itself is what the check compares
        return f"{type(error).__name__}: {error}"
    return None


def _check_same_failure(tiny: TinyVLM, mode: str, inputs: dict[str, Any], kwargs: dict[str, Any],
                        runs: dict[str, Callable[[], Any]]) -> None:
    """Plain generate fails under `mode` (`UPSTREAM_FAILURES`); each vlmfix entry point must fail the same way."""
    reference = _failure(lambda: tiny.model.generate(**inputs, **kwargs))
    if reference is None:
        raise ConformanceError(f"plain generate now runs {tiny.family} under {mode}: remove its UPSTREAM_FAILURES "
                               f"entry ({UPSTREAM_FAILURES[(tiny.family, mode)]})")
    for name, run in runs.items():
        if _failure(run) != reference:
            raise ConformanceError(f"{name} without methods does not fail as plain generate does under {mode} "
                                   f"({reference})")


def _generate_in_apply(tiny: TinyVLM, inputs: dict[str, Any], kwargs: dict[str, Any]) -> Any:
    with vlmfix.apply(tiny.model):
        return tiny.model.generate(**inputs, **kwargs)


def check_spans(tiny: TinyVLM, images_per_row: int = 1) -> None:
    """Each row's image tokens are the ones the processor inserted (for all its images); its instruction
    holds the question and ends right before the family's assistant marker (or, where the prompt ends with the
    question, at the prompt's end)."""
    inputs = tiny.inputs(list(QUESTIONS), images_per_row=images_per_row)
    adapter = get_adapter(tiny.model)
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    spans = adapter.spans(ids, mask, tiny.tokenizer)
    inserted = torch.tensor([image_features(tiny, tiny.inputs([q], seed=row, images_per_row=images_per_row))
                             for row, q in enumerate(QUESTIONS)])
    if not torch.equal(spans.image.sum(dim=1), inserted) or not bool((inserted > 0).all()):
        raise ConformanceError(f"image spans hold {spans.image.sum(dim=1).tolist()} tokens per row; the processor "
                               f"inserted {inserted.tolist()} placeholders (one per image feature)")
    markers = adapter.marker_ids(tiny.tokenizer)
    for row, question in enumerate(QUESTIONS):
        positions = spans.instruction[row].nonzero().flatten().tolist()
        if not positions or positions != list(range(positions[0], positions[-1] + 1)):
            raise ConformanceError(f"row {row}: the instruction span {positions} is not one run of tokens")
        words = tiny.tokenizer.encode(question, add_special_tokens=False)
        held = ids[row, positions].tolist()
        if not any(held[i : i + len(words)] == words for i in range(len(held) - len(words) + 1)):
            raise ConformanceError(f"row {row}: the instruction span does not hold the question {question!r}")
        after = ids[row, positions[-1] + 1 :].tolist()
        at_marker = any(after[: len(m)] == m for m in markers)
        if tiny.prompt(question, True, images_per_row).endswith(question):  # no assistant turn (DeepSeek-OCR's)
            if after and not at_marker:  # the processor may still add one (PaliGemma's "\n", Fuyu's <0x04>)
                raise ConformanceError(f"row {row}: the prompt ends with the question, but the instruction span is "
                                       f"followed by {tiny.tokenizer.decode(after[:4])!r}")
        elif not at_marker:
            raise ConformanceError(f"row {row}: the instruction span does not end at an assistant marker "
                                   f"{adapter.assistant_markers}; it is followed by "
                                   f"{tiny.tokenizer.decode(after[:4])!r}")


@torch.no_grad()
def image_features(tiny: TinyVLM, inputs: dict[str, Any]) -> int:
    """How many image feature vectors the model computes for a prompt's images (all tiles): the number of
    placeholders the processor must have inserted for them."""
    encoder = tiny.model.base_model.get_image_features  # as generate and the contrastive engine call it
    accepted = set(inspect.signature(encoder).parameters) - {"kwargs", "input_ids"}
    output = encoder(**{k: v for k, v in inputs.items() if k in accepted}, return_dict=True)
    return image_tokens_encoded(output)


# the least largest logit change that two different images must cause at the first generated position (random
# weights at 0.02 give about 1e-2 and more; a build that ignores its image gives 0 or rounding noise, about 1e-7)
IMAGE_EFFECT_THRESHOLD = 1e-4


@torch.no_grad()
def image_effect(tiny: TinyVLM, size: int = 48) -> float:
    """The largest change of the next-token logits (first generated position) when the prompt's noise image
    (`random_image`) is replaced by a uniform grey one of the same size, so the prompt's tokens stay the same."""
    question = QUESTIONS[1]
    noise = tiny.inputs([question], image=random_image(size, seed=0))
    grey = tiny.inputs([question], image=Image.new("RGB", (size, size), (128, 128, 128)))
    if not torch.equal(noise["input_ids"], grey["input_ids"]):
        raise ConformanceError("two images of the same size gave different prompts; the image check compares "
                               "logits over the same tokens")
    logits = [tiny.model(**inputs).logits[:, -1].float() for inputs in (noise, grey)]
    return float((logits[0] - logits[1]).abs().max())


def check_image_matters(tiny: TinyVLM) -> None:
    """Two different images must give different next-token logits: a tiny build that ignores its image (a
    zero-initialised projection, a vanishing tower) makes every image-contrast method's result meaningless."""
    effect = image_effect(tiny)
    if not effect > IMAGE_EFFECT_THRESHOLD:
        raise ConformanceError(f"the tiny {tiny.family} build ignores its image: a noise image and a grey one change "
                               f"the next-token logits by {effect:.2e} at most (need > {IMAGE_EFFECT_THRESHOLD:.0e}); "
                               "give its zero- or near-zero-initialised weights random values after building")


@dataclass(frozen=True)
class MethodOutcome:
    """A method on a family: ran (with its report's applied counters) or refused (with the reason)."""

    refused: str | None = None
    applied: dict[str, int] | None = None

    @property
    def cell(self) -> str:
        if self.refused is not None:
            return self.refused
        return "✓" if self.applied and any(self.applied.values()) else "✓ (edited nothing)"


def build_method(name: str, tiny: TinyVLM, directory: Path) -> Method:
    """The registered method `name` with its defaults and `REQUIRED_ARGS`."""
    required = REQUIRED_ARGS.get(name, {})
    kwargs = required(tiny, directory) if callable(required) else dict(required)
    return METHODS.get(name)(**kwargs)


def method_refusal(name: str, tiny: TinyVLM) -> str | None:
    """The reason `name` refuses this family (None when it runs): no projector for DCD, or the method's
    own check raising `UnsupportedModelError`."""
    adapter = get_adapter(tiny.model)
    if name == "dcd" and not adapter.has_projector:
        return "no image projector"
    return None


def check_method(tiny: TinyVLM, name: str) -> MethodOutcome:
    """Run method `name` on a padded batch and on each row alone; each row's tokens must agree, the session
    must report, and the model must be restored."""
    refusal = method_refusal(name, tiny)
    if refusal is not None:
        return MethodOutcome(refused=refusal)
    with tempfile.TemporaryDirectory() as directory:
        method = build_method(name, tiny, Path(directory))
        try:
            vlmfix.apply(tiny.model, method, tokenizer=tiny.processor)  # checks the model, installs nothing
        except UnsupportedModelError as error:
            return MethodOutcome(refused=str(error))
        questions = questions_for(tiny)
        batch = tiny.inputs(list(questions))
        try:
            together, report = _run_method(tiny, method, batch)
        except PaddedBatchError as error:  # a family run on unpadded batches only, and the prefill was padded
            if not (error.by_engine and name in OTHER_LENGTH_SECOND_PROMPT):
                raise ConformanceError(f"{name} left-padded the one-length batch of {tiny.family}, which runs on "
                                       f"unpadded batches only ({error})") from error
            return MethodOutcome(refused=str(error))
        except UnsupportedModelError as error:  # refused when it saw the family's prompt layout
            return MethodOutcome(refused=str(error))
        entry = report.get(method.name)
        if not isinstance(entry, dict) or entry.get("prepared") is False or "applied" not in entry:
            raise ConformanceError(f"{name} did not report on the batch: {entry!r}")
        for row, question in enumerate(questions):
            alone_inputs = tiny.inputs([question], seed=row)
            alone, _ = _run_method(tiny, method, alone_inputs)
            if new_tokens(tiny, together, batch, row) != new_tokens(tiny, alone, alone_inputs, 0):
                raise ConformanceError(f"{name}: row {row} of the padded batch differs from the row decoded alone")
        _check_restored_after_error(tiny, method)
    return MethodOutcome(applied=dict(entry["applied"]))


def _run_method(tiny: TinyVLM, method: Method, inputs: dict[str, Any]) -> tuple[Tensor, dict[str, Any]]:
    snapshot = ModelSnapshot.take(tiny.model)
    with vlmfix.apply(tiny.model, method, tokenizer=tiny.processor) as session:
        out = session.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False,
                               **GENERATE_ARGS.get(method.name, {}))
    snapshot.check(tiny.model, f"after a session with {method.name}")
    return out, session.report()


def _check_restored_after_error(tiny: TinyVLM, method: Method) -> None:
    snapshot = ModelSnapshot.take(tiny.model)
    try:
        with vlmfix.apply(tiny.model, method, tokenizer=tiny.processor):
            raise KeyboardInterrupt  # an interruption inside the block
    except KeyboardInterrupt:
        pass
    snapshot.check(tiny.model, f"after an exception inside vlmfix.apply with {method.name}")


def new_tokens(tiny: TinyVLM, sequences: Tensor, inputs: dict[str, Any], row: int) -> list[int]:
    """The new tokens of `row`, up to and including the first end-of-sequence token."""
    tokens = sequences[row, inputs["input_ids"].shape[1] :].tolist()
    eos = tiny.model.generation_config.eos_token_id
    eos_ids = set(eos) if isinstance(eos, list) else {eos}
    stop = next((i for i, t in enumerate(tokens) if t in eos_ids), None)
    return tokens if stop is None else tokens[: stop + 1]


# ---------------------------------------------------------------------------------------------- reports
def method_table(families: Sequence[str] = ALL_FAMILIES, methods: Sequence[str] | None = None) -> str:
    """A markdown table family x method: ✓ (every conformance check passes), or a numbered note giving the
    method's refusal or the failure, with the notes under the table."""
    names = list(METHODS.names()) if methods is None else list(methods)
    notes: list[str] = []
    lines = ["| family | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for family in families:
        cells = []
        for name in names:
            tiny = build_tiny(family)
            try:
                outcome = check_method(tiny, name)
                # one note per reason: the family's own name in it reads "this family"
                reason = None if outcome.refused is None else re.sub(rf"\b{family}\b", "this family", outcome.refused)
                note = None if reason is None else f"{name} refuses: {reason}"
                cell = outcome.cell
            except Exception as error:  # shown in the table, not raised: the table reports every cell
                note, cell = f"{name} FAILS: {type(error).__name__}: {error}", "FAILS"
            if note is not None:
                if note not in notes:
                    notes.append(note)
                cell = f"{'✗' if cell != 'FAILS' else 'FAILS'} [{notes.index(note) + 1}]"
            cells.append(cell)
        lines.append(f"| {family} | " + " | ".join(cells) + " |")
    lines += ["", *(f"[{i}] {note}" for i, note in enumerate(notes, 1))]
    return "\n".join(lines)


def mapping_counts() -> dict[str, list[str]]:
    """The classes of transformers' image-text-to-text mapping, by how vlmfix handles them."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    groups: dict[str, list[str]] = {"supported": [], "refused": [], "pending": [], "unhandled": []}
    for model_type, name in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES.items():
        entry = f"{model_type} ({name})"
        if name in SUPPORTED_CLASSES:
            groups["supported"].append(entry)
        elif name in REFUSED:
            groups["refused" if REFUSED[name].verified_impossible else "pending"].append(entry)
        else:
            groups["unhandled"].append(entry)
    return groups


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vlmfix.testing.conformance", description=__doc__.split("\n")[0])
    parser.add_argument("--table", action="store_true", help="run the method checks; print family x method")
    parser.add_argument("--list", action="store_true", help="count the mapping's classes by how vlmfix handles them")
    parser.add_argument("--families", nargs="*", default=list(ALL_FAMILIES),
                        choices=ALL_FAMILIES, help="families to check (those of TORCHVISION_FAMILIES need torchvision "
                                                   "and timm installed)")
    args = parser.parse_args(argv)
    if args.list or not args.table:
        groups = mapping_counts()
        total = sum(len(v) for v in groups.values())
        print(f"{total} classes in transformers' image-text-to-text mapping: " + ", ".join(
            f"{len(v)} {k}" for k, v in groups.items()))
        for key in ("supported", "refused", "pending", "unhandled"):
            for entry in groups[key]:
                name = entry.split(" (")[1].rstrip(")")
                reason = REFUSED[name].reason if name in REFUSED and name not in SUPPORTED_CLASSES else ""
                print(f"  {key:9} {entry}{': ' + reason if reason else ''}")
        if groups["unhandled"]:
            return 1
    if args.table:
        print(method_table(args.families))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
