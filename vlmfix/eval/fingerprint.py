"""The protocol fingerprint stored in every result file, and its stable hash ("Run fingerprint" in the spec).

Every choice that moves CHAIR or POPE numbers goes in: model id + revision; method + parameters;
decoding (mode, beams, temperature, top_p, top_k when set, seed, max_new_tokens, repetition_penalty); prompt
or preset + chat-template hash; library versions; execution (batch size, dtype, attention backend, device type, torch
threads: they change floating-point sums, so even greedy predictions can depend on them);
CHAIR: image-list hash, normalizer + table version, NLTK version, quirk mode, vocabulary sha256, ground-truth
cache key, comparable_to_opera; POPE: source, version, per-split sha256, parser, splits.

```python
fp = protocol_fingerprint(model_id="llava-hf/llava-1.5-7b-hf", model_revision=None, method="greedy",
                          method_params={}, decoding=Decoding(max_new_tokens=512),
                          prompt="Please describe this image in detail.",
                          chat_template=processor.chat_template,
                          chair=chair_protocol(extractor, images, ground_truth),
                          execution=Execution(batch_size=16, dtype="bfloat16", attn_implementation="sdpa",
                                              device="cuda"))
fingerprint_hash(fp)  # 64 hex digits; equal hashes mean the same protocol
```
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from importlib import metadata
from typing import Any

from vlmfix.eval._io import sha256_json, sha256_text
from vlmfix.eval.errors import EvalInputError
from vlmfix.validation import choice, number, optional_number, text

DECODING_MODES = ("greedy", "sample", "beam")
DEFAULT_LIBRARIES = ("vlmfix", "torch", "transformers")


@dataclass(frozen=True)
class Decoding:
    """Decoding settings of a run.

    Args:
        max_new_tokens: generation budget (CHAIR 512 / 64 are different regimes; never compare across them).
        mode: `greedy`, `sample` or `beam`.
        num_beams: beams (1 unless `beam`).
        temperature, top_p: sampling settings (None unless `sample`).
        seed: the run's random seed.
        repetition_penalty: generate's `repetition_penalty` (1.0: none; DoLa's benchmarks use 1.2).
        top_k: the top-k cut passed to `generate` when sampling (0: none, as VCD sampled); None when the run
            passes none, so transformers' default applies (top_k=50 in transformers 5, unless the model's
            generation_config sets another). Recorded only when not None (`to_json`), so the fingerprints of
            runs that pass no top_k keep their hash.
    """

    max_new_tokens: int
    mode: str = "greedy"
    num_beams: int = 1
    temperature: float | None = None
    top_p: float | None = None
    seed: int = 0
    repetition_penalty: float = 1.0
    top_k: int | None = None

    def __post_init__(self) -> None:
        with _as_eval_input_error():
            choice(self.mode, "mode", DECODING_MODES)
            number(self.max_new_tokens, "max_new_tokens", low=1, integer=True, meaning="the generation budget")
            number(self.num_beams, "num_beams", low=1, integer=True, meaning="the beam count (1 unless mode='beam')")
            optional_number(self.temperature, "temperature", low=0, low_open=True)
            optional_number(self.top_p, "top_p", low=0, high=1, low_open=True)
            number(self.seed, "seed", integer=True, meaning="the run's random seed")
            number(self.repetition_penalty, "repetition_penalty", low=0, low_open=True,
                   meaning="generate's repetition penalty (1.0: none)")
            optional_number(self.top_k, "top_k", low=0, integer=True,
                            meaning="the top-k cut when sampling (0: none; None: transformers' default)")
        if (self.mode == "beam") != (self.num_beams > 1):
            raise EvalInputError(
                f"`num_beams` must be > 1 exactly when mode='beam', got num_beams={self.num_beams!r} with "
                f"mode={self.mode!r}."
            )

    def to_json(self) -> dict[str, Any]:
        """The fingerprint's `decoding` block: every field, `top_k` only when set (earlier hashes stay valid)."""
        fields = asdict(self)
        if self.top_k is None:
            del fields["top_k"]
        return fields


@dataclass(frozen=True)
class Execution:
    """How the predictions were computed, beyond the protocol: settings that can change a prediction.

    A prediction depends on its batch: left padding changes the floating-point sums of every row (so even
    greedy answers can flip), and `generate` samples a whole batch from one random generator. Per-item
    independence is not reachable through stock `generate`, so the batch size is part of the fingerprint and
    a run resumed with another batch size starts a new result (the same holds for dtype, attention backend
    and device type, which change the sums too).

    Args:
        batch_size: items per `generate` call (>= 1).
        dtype: the model's parameter dtype, e.g. "bfloat16"; None when unknown.
        attn_implementation: the attention backend, e.g. "sdpa"; None when unknown.
        device: the device type, e.g. "cuda" or "cpu"; None when unknown.
        threads: torch's CPU threads when the run sets them (a CPU matmul may split its sums by thread count);
            None: torch's default.
    """

    batch_size: int
    dtype: str | None = None
    attn_implementation: str | None = None
    device: str | None = None
    threads: int | None = None

    def __post_init__(self) -> None:
        with _as_eval_input_error():
            number(self.batch_size, "batch_size", low=1, integer=True, meaning="the items per generate call")
            optional_number(self.threads, "threads", low=1, integer=True, meaning="torch's CPU threads")
            for name in ("dtype", "attn_implementation", "device"):
                if getattr(self, name) is not None:
                    text(getattr(self, name), name)


@contextmanager
def _as_eval_input_error() -> Iterator[None]:
    """Raise the shared argument checks' `ValueError`s as this package's `EvalInputError`."""
    try:
        yield
    except ValueError as err:
        raise EvalInputError(str(err)) from None


def method_params(methods: Sequence[Any]) -> dict[str, Any]:
    """Each method's constructor parameters as plain JSON data ({name: {parameter: value}}; a value JSON cannot
    store is kept as its repr), as the benchmark app and the lmms-eval plugin record them."""
    return {m.name: {k: plain_json(v) for k, v in m.params().items()} for m in methods}


def plain_json(value: Any) -> Any:
    """`value` as JSON data: containers walked, anything JSON cannot store kept as its repr."""
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return [plain_json(v) for v in value]
    if isinstance(value, dict):
        return {str(k): plain_json(v) for k, v in value.items()}
    return repr(value)


def library_versions(names: Sequence[str] = DEFAULT_LIBRARIES) -> dict[str, str | None]:
    """Installed distribution versions (None when not installed)."""
    versions: dict[str, str | None] = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def chair_protocol(extractor: Any, images: Any, ground_truth: Any) -> dict[str, Any]:
    """The CHAIR fields, from a `MentionExtractor`, an `ImageSelection` and a `GroundTruth`."""
    normalizer = extractor.normalizer
    return {
        "image_list_hash": images.hash,
        "images": images.describe(),
        "normalizer": normalizer.version,
        "nltk_version": normalizer.nltk_version,
        "quirks": extractor.vocabulary.quirks,
        "vocabulary_sha256": extractor.vocabulary.sha256,
        "ground_truth_cache_key": ground_truth.cache_key,
        "comparable_to_opera": extractor.comparable_to_opera,
    }


def pope_protocol(
    source: str,
    version: str | Sequence[str] | None,
    split_sha256: Mapping[str, str],
    parser: str,
    dataset: str | None = None,
    content_sha256: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """The POPE fields: source (`file`, `hf` or `built`), version(s), sha256 per split, parser, splits run;
    for a question file also its dataset (coco / aokvqa / gqa) and per-split content hash (keys only when
    given, so earlier fingerprints keep their hash)."""
    versions = [version] if isinstance(version, str) else list(version or [])
    fields: dict[str, Any] = {
        "source": source,
        "version": versions,
        "split_sha256": dict(sorted(split_sha256.items())),
        "parser": parser,
        "splits": sorted(split_sha256),
    }
    if dataset is not None:
        fields["dataset"] = dataset
    if content_sha256 is not None:
        fields["content_sha256"] = dict(sorted(content_sha256.items()))
    return fields


def amber_protocol(data: Any, *, parts: Sequence[str], parser: str, normalizer: Any, similarity: Any,
                   threshold: float, quirks: str, n_images: int, subset: bool) -> dict[str, Any]:
    """The AMBER fields (spec "Run fingerprint additions"): file hashes, parts, parser, normalizer (+ NLTK
    version), similarity backend (+ spaCy / model versions or table sha256), threshold, quirks, image count,
    and whether the numbers are comparable to the official script's."""
    described = similarity.describe()
    return {
        "sha256": dict(sorted(data.sha256.items())),
        "parts": list(parts),
        "parser": parser,
        "normalizer": normalizer.version,
        "nltk_version": normalizer.nltk_version,
        "similarity": described,
        "threshold": threshold,
        "quirks": quirks,
        "n_images": n_images,
        "subset": subset,
        "comparable_to_official": bool(normalizer.comparable_to_official and described["comparable_to_official"]
                                       and quirks == "reference" and parser == "amber_exact" and threshold == 0.8),
    }


def mme_protocol(source: str, content_sha256: Mapping[str, str], parser: str, prompt: str) -> dict[str, Any]:
    """The MME fields: source (`folder` / `hf`), per-subtask content hash, parser, prompt mode."""
    return {"source": source, "content_sha256": dict(sorted(content_sha256.items())), "parser": parser,
            "prompt": prompt, "subtasks": sorted(content_sha256)}


def hallusion_protocol(hashes: Mapping[str, str | None], parser: str, unknown_no_visual: str,
                       include_text_only: bool) -> dict[str, Any]:
    """The HallusionBench fields: file and content hash, the rule judge, `unknown_no_visual`,
    `include_text_only`; never comparable to the GPT-judged leaderboard."""
    return {**dict(sorted(hashes.items())), "parser": parser, "judge": f"rule:{parser}",
            "unknown_no_visual": unknown_no_visual, "include_text_only": include_text_only,
            "comparable_to_leaderboard": False}


def protocol_fingerprint(
    *,
    model_id: str,
    model_revision: str | None,
    method: str,
    method_params: Mapping[str, Any],
    decoding: Decoding,
    prompt: str,
    chat_template: str | None,
    chair: Mapping[str, Any] | None = None,
    pope: Mapping[str, Any] | None = None,
    amber: Mapping[str, Any] | None = None,
    mme: Mapping[str, Any] | None = None,
    hallusion: Mapping[str, Any] | None = None,
    execution: Execution | None = None,
    libraries: Sequence[str] = DEFAULT_LIBRARIES,
) -> dict[str, Any]:
    """Build the fingerprint dict of one run (exactly one benchmark section: `chair`, `pope`, `amber`, `mme` or
    `hallusion`; the last three appear as keys only when set, so CHAIR / POPE hashes are unchanged).

    Args:
        model_id, model_revision: the checkpoint (hub id or local path) and its revision / commit, if known.
        method, method_params: the method name and its constructor parameters (JSON-serialisable).
        decoding: the `Decoding` settings.
        prompt: the prompt text or preset name.
        chat_template: the chat template used (hashed), or None when there is none.
        chair / pope / amber / mme / hallusion: that benchmark's `*_protocol(...)`.
        execution: the `Execution` settings (batch size, dtype, ...); None when not known (recorded as null).
        libraries: distributions whose versions are recorded.
    """
    sections = {"chair": chair, "pope": pope, "amber": amber, "mme": mme, "hallusion": hallusion}
    given = [name for name, section in sections.items() if section is not None]
    if len(given) != 1:
        raise EvalInputError(
            "pass exactly one of `chair`, `pope`, `amber`, `mme` and `hallusion` to protocol_fingerprint (one "
            f"benchmark per run), got {given or 'none'}."
        )
    fingerprint = {
        "benchmark": given[0],
        "model": {"id": model_id, "revision": model_revision},
        "method": {"name": method, "params": dict(method_params)},
        "decoding": decoding.to_json(),
        "prompt": prompt,
        "chat_template_sha256": sha256_text(chat_template) if chat_template is not None else None,
        "libraries": library_versions(libraries),
        "chair": dict(chair) if chair is not None else None,
        "pope": dict(pope) if pope is not None else None,
        "execution": asdict(execution) if execution is not None else None,
    }
    for name in ("amber", "mme", "hallusion"):
        if sections[name] is not None:
            fingerprint[name] = dict(sections[name] or {})
    fingerprint_hash(fingerprint)  # fails now, not when the results are written, if a value is not JSON
    return fingerprint


def fingerprint_hash(fingerprint: Mapping[str, Any]) -> str:
    """sha256 of the canonical JSON of a fingerprint (sorted keys; key order and spacing never matter)."""
    try:
        return sha256_json(fingerprint)
    except TypeError as err:
        raise EvalInputError(
            f"the fingerprint holds a value JSON cannot store ({err}); pass method_params as plain numbers, "
            "strings, lists and dicts."
        ) from err
