"""The run fingerprint: required fields, stable hash, validation."""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace

import pytest

from vlmfix.eval import Decoding, chair, chair_protocol, fingerprint_hash, pope_protocol, protocol_fingerprint
from vlmfix.eval.errors import EvalInputError
from vlmfix.eval.fingerprint import Execution


def _chair_fields() -> dict:
    extractor = chair.make_extractor()
    images = chair.images_from_list([3, 1, 2])
    gt = chair.GroundTruth({1: frozenset({"dog"})}, {"format": "test"}, "0123456789abcdef")
    return chair_protocol(extractor, images, gt)


def _fingerprint(**changes) -> dict:
    arguments = {
        "model_id": "llava-hf/llava-1.5-7b-hf",
        "model_revision": "abc123",
        "method": "vhr",
        "method_params": {"alpha": 0.5},
        "decoding": Decoding(max_new_tokens=512),
        "prompt": "Describe.",
        "chat_template": "{{ messages }}",
        "chair": _chair_fields(),
    }
    return protocol_fingerprint(**{**arguments, **changes})


def test_chair_fingerprint_records_the_protocol() -> None:
    fp = _fingerprint()
    assert fp["benchmark"] == "chair" and fp["pope"] is None
    assert fp["decoding"] == {
        "max_new_tokens": 512,
        "mode": "greedy",
        "num_beams": 1,
        "temperature": None,
        "top_p": None,
        "seed": 0,
        "repetition_penalty": 1.0,
    }
    assert fp["chat_template_sha256"] == hashlib.sha256(b"{{ messages }}").hexdigest()
    assert fp["chair"]["image_list_hash"] == hashlib.sha256(b"1,2,3").hexdigest()
    assert fp["chair"]["normalizer"] == f"simple@{chair.table_version()}"
    assert fp["chair"]["comparable_to_opera"] is False and fp["chair"]["quirks"] == "reference"
    assert fp["chair"]["ground_truth_cache_key"] == "0123456789abcdef"
    assert set(fp["libraries"]) == {"vlmfix", "torch", "transformers"}


def test_hash_is_canonical_and_changes_with_any_knob() -> None:
    fp = _fingerprint()
    reordered = json.loads(json.dumps(fp, sort_keys=True))
    reordered = dict(reversed(list(reordered.items())))
    expected = hashlib.sha256(json.dumps(fp, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    assert fingerprint_hash(fp) == fingerprint_hash(reordered) == expected
    assert fingerprint_hash(_fingerprint(decoding=Decoding(max_new_tokens=64))) != expected
    assert fingerprint_hash(_fingerprint(method_params={"alpha": 0.6})) != expected
    assert fingerprint_hash(_fingerprint(decoding=Decoding(max_new_tokens=512, repetition_penalty=1.2))) != expected


def test_top_k_is_recorded_only_when_set() -> None:
    """A run that passes no top_k keeps the decoding block, hence the hash, it had before `Decoding.top_k`."""
    unset = _fingerprint(decoding=Decoding(max_new_tokens=16, mode="sample", temperature=1.0, top_p=1.0))
    before = {"max_new_tokens": 16, "mode": "sample", "num_beams": 1, "temperature": 1.0, "top_p": 1.0, "seed": 0,
              "repetition_penalty": 1.0}  # the decoding block as it was before top_k existed
    assert unset["decoding"] == before
    expected = hashlib.sha256(json.dumps({**unset, "decoding": before}, sort_keys=True,
                                         separators=(",", ":")).encode()).hexdigest()
    assert fingerprint_hash(unset) == expected
    no_cut = _fingerprint(decoding=Decoding(max_new_tokens=16, mode="sample", temperature=1.0, top_p=1.0, top_k=0))
    fifty = _fingerprint(decoding=Decoding(max_new_tokens=16, mode="sample", temperature=1.0, top_p=1.0, top_k=50))
    assert no_cut["decoding"] == {**before, "top_k": 0} and fifty["decoding"]["top_k"] == 50
    # 0 (no cut) is not "unset" (transformers' default, 50), nor 50 set explicitly: three different protocols
    assert len({fingerprint_hash(fp) for fp in (unset, no_cut, fifty)}) == 3
    with pytest.raises(EvalInputError, match=r"`top_k` must be None or an int >= 0, got -1"):
        Decoding(max_new_tokens=10, mode="sample", top_k=-1)


def test_execution_settings_are_recorded_and_change_the_hash() -> None:
    """A prediction depends on its batch (left padding, one sampling generator per batch), so a run resumed
    with another batch size, dtype, attention backend or device must not land in the same result."""
    base = Execution(batch_size=8, dtype="float32", attn_implementation="sdpa", device="cpu")
    fp = _fingerprint(execution=base)
    assert fp["execution"] == {"batch_size": 8, "dtype": "float32", "attn_implementation": "sdpa", "device": "cpu",
                               "threads": None}
    assert _fingerprint()["execution"] is None
    hashes = {fingerprint_hash(_fingerprint(execution=e)) for e in (
        base, replace(base, batch_size=4), replace(base, dtype="bfloat16"),
        replace(base, attn_implementation="eager"), replace(base, device="cuda"), replace(base, threads=1))}
    assert len(hashes) == 6


def test_pope_fingerprint_fields() -> None:
    fields = pope_protocol("file", ["edebdda", "head"], {"random": "ab", "adversarial": "cd"}, "official")
    fp = _fingerprint(chair=None, pope=fields)
    assert fp["benchmark"] == "pope"
    assert fp["pope"] == {
        "source": "file",
        "version": ["edebdda", "head"],
        "split_sha256": {"adversarial": "cd", "random": "ab"},
        "parser": "official",
        "splits": ["adversarial", "random"],
    }


def test_fingerprint_errors() -> None:
    with pytest.raises(EvalInputError, match="exactly one of `chair`, `pope`, `amber`, `mme` and `hallusion`"):
        _fingerprint(chair=None)
    with pytest.raises(EvalInputError, match="value JSON cannot store"):
        _fingerprint(method_params={"layers": {1, 2}})
    with pytest.raises(EvalInputError, match="`num_beams` must be > 1 exactly when mode='beam'"):
        Decoding(max_new_tokens=10, mode="beam")
    with pytest.raises(EvalInputError, match="`mode` must be one of 'greedy', 'sample', 'beam', got 'nucleus'"):
        Decoding(max_new_tokens=10, mode="nucleus")
    with pytest.raises(EvalInputError, match="`max_new_tokens` must be an int >= 1, got 0"):
        Decoding(max_new_tokens=0)
    with pytest.raises(EvalInputError, match=r"`top_p` must be None or a finite number in \(0, 1\], got 1.5"):
        Decoding(max_new_tokens=10, mode="sample", temperature=1.0, top_p=1.5)
    with pytest.raises(EvalInputError, match=r"`batch_size` must be an int >= 1, got 0"):
        Execution(batch_size=0)
    with pytest.raises(EvalInputError, match=r"`batch_size` must be an int >= 1, got '8' \(a str\)"):
        Execution(batch_size="8")
