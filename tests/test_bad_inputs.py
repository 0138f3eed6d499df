"""Bad input to the decoding API gets a clear error naming the problem, before any forward pass.

One table of the cases a bad-input sweep of the API found (issue 13, item 7), plus the same kinds for every
method: silent coercions (`bool('no')`, numbers given as strings, NaN and inf), wrong shapes of arguments
(`methods=VAR()`, `layers=5`), and arguments only the model can check (layers beyond its depth).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest

import vlmfix
from vlmfix import DCD, GIFT, OPERA, PAI, SID, VAR, VCD, VHR, AvisC, DoLa, DualStream

from .conftest import tiny_model

QUESTIONS = ["Describe this image.", "is there a dog in the picture ?"]

# (constructor call, the start of the message it must raise)
CONSTRUCTOR_CASES: list[tuple[Callable[[], Any], str]] = [
    (lambda: PAI(skip_first_token_boost="no"), r"`skip_first_token_boost` must be True or False, got 'no'"),
    (lambda: DualStream(skip_first_token_boost="no"), r"`skip_first_token_boost` must be True or False"),
    (lambda: PAI(cfg="False"), r"`cfg` must be True or False, got 'False'"),
    (lambda: PAI(plausibility="0.1"), r"`plausibility` must be a finite number in \(0, 1\], got '0.1' \(a str\)"),
    (lambda: PAI(alpha=math.nan), r"`alpha` must be a finite number >= 0, got nan"),
    (lambda: PAI(gamma=0.5), r"`gamma` must be a finite number >= 1, got 0.5"),
    (lambda: PAI(layers=[2, 2]), r"`layers` must be None or distinct 0-based layer indices"),
    (lambda: PAI(layers=[]), r"`layers` must be None or a non-empty list"),
    (lambda: DualStream(local_ratio="0.5"), r"`local_ratio` must be a finite number in \[0, 1\], got '0.5'"),
    (lambda: DualStream(summary_rule="iqr"), r"`summary_rule` must be one of 'tukey', 'topk_ratio', got 'iqr'"),
    (lambda: DualStream(local_layer=-1), r"`local_layer` must be an int >= 0, got -1"),
    (lambda: DualStream(selector=3), r"`selector` must be a callable \(model, inputs\) -> \(local, summary\)"),
    (lambda: VHR(layers=5), r"`layers` must be None or a non-empty list of 0-based layer indices, got 5 \(an int\)"),
    (lambda: VHR(alpha="2"), r"`alpha` must be a finite number > 0, got '2' \(a str\)"),
    (lambda: VHR(outlier_filter="yes"), r"`outlier_filter` must be True or False, got 'yes'"),
    (lambda: VHR(distance="l1"), r"`distance` must be one of 'l2', 'sq_l2', got 'l1'"),
    (lambda: VAR(p="0.6"), r"`p` must be a finite number in \[0, 1\], got '0.6' \(a str\)"),
    (lambda: VAR(decode_sinks="no"), r"`decode_sinks` must be True or False, got 'no'"),
    (lambda: VAR(sink_dims=[1, -3]), r"`sink_dims\[1\]` must be an int >= 0, got -3"),
    (lambda: VCD(image_mean=(math.nan, 0.4, 0.4)), r"`image_mean\[0\]` must be a finite number, got nan"),
    (lambda: VCD(image_std=(0.2, math.inf, 0.2)), r"`image_std\[1\]` must be a finite number > 0, got inf"),
    (lambda: VCD(image_std=(0.2, 0.0, 0.2)), r"`image_std\[1\]` must be a finite number > 0, got 0.0"),
    (lambda: VCD(image_mean=(0.5, 0.5)), r"`image_mean` must be a list of 3 per-channel floats, got \[0.5, 0.5\]"),
    (lambda: VCD(noise_step=500.0), r"`noise_step` must be an int in \[0, 1000\), got 500.0 \(a float\)"),
    (lambda: VCD(beta="0.1"), r"`beta` must be None or a finite number in \(0, 1\], got '0.1'"),
    (lambda: VCD(noise_space="raw"), r"`noise_space` must be one of 'normalized', 'pixel', got 'raw'"),
    (lambda: VCD(high_res_image_std=(0.2, 0, 0.2)), r"`high_res_image_std\[1\]` must be a finite number > 0, got 0"),
    (lambda: VCD(high_res_image_mean=0.5), r"`high_res_image_mean` must be a list of 3 per-channel floats, got 0.5"),
    (lambda: DCD(checkpoints=42), r"`checkpoints` must be a path \(str or Path\) or None, got 42 \(an int\)"),
    (lambda: DCD("out", alpha=math.inf), r"`alpha` must be a finite number >= 0, got inf"),
    (lambda: DCD("out", variant="both"), r"`variant` must be one of 'pos\+neg', 'neg_only', 'pos_only'"),
    (lambda: GIFT(alpha="5"), r"`alpha` must be None or a finite number >= 0, got '5' \(a str\)"),
    (lambda: GIFT(head_fraction=0), r"`head_fraction` must be a finite number in \(0, 1\], got 0"),
    (lambda: GIFT(saliency_layers=[]), r"`saliency_layers` must be None or a non-empty list"),
    (lambda: GIFT(ratio="mean"), r"`ratio` must be one of 'pooled', 'per_head', got 'mean'"),
    (lambda: GIFT(content_words="nouns"), r"`content_words` must be one of 'pos', 'spacy', 'rule', 'all'.*callable"),
    (lambda: SID(layer=0), r"`layer` must be an int >= 1, got 0"),
    (lambda: SID(keep="100"), r"`keep` must be None or an int >= 0, got '100' \(a str\)"),
    (lambda: AvisC(layer_gamma=1.5), r"`layer_gamma` must be a finite number in \(0, 1\], got 1.5"),
    (lambda: AvisC(lamb=math.inf), r"`lamb` must be a finite number, got inf"),
    (lambda: DoLa(), r"DoLa needs `layers`, the candidate premature layers: 'high'.*DoLa\(layers='high'\)"),
    (lambda: DoLa(layers="middle"), r"`layers` must be 'low', 'high' or a list of hidden indices, got 'middle'"),
    (lambda: DoLa(layers=3), r"`layers` must be a non-empty list of hidden indices, got 3 \(an int\)"),
    (lambda: DoLa(layers=[True]), r"`layers\[0\]` must be an int >= 0, got True \(a bool\)"),
    (lambda: DoLa(layers="high", relative_top="0.1"), r"`relative_top` must be a finite number in \(0, 1\], got '0.1'"),
    (lambda: OPERA(scale_factor="50"), r"`scale_factor` must be a finite number > 0, got '50' \(a str\)"),
    (lambda: OPERA(num_attn_candidates=0), r"`num_attn_candidates` must be an int >= 1, got 0"),
]


@pytest.mark.parametrize("make, message", CONSTRUCTOR_CASES, ids=[m for _, m in CONSTRUCTOR_CASES])
def test_constructors_refuse_with_a_named_message(make, message):
    with pytest.raises(ValueError, match=message):
        make()


@pytest.fixture
def counted():
    """A tiny model and the number of forward passes it ran (the errors below come before any)."""
    tiny = tiny_model("llava")
    calls: list[int] = []
    handle = tiny.model.register_forward_pre_hook(lambda *args: calls.append(1))
    yield tiny, calls
    handle.remove()


# (call on (model, inputs, processor), error type, message)
SESSION_CASES: list[tuple[Callable[..., Any], type, str]] = [
    (lambda m, i, p: vlmfix.generate(m, **i, methods=VHR(), max_new_tokens=1), ValueError,
     r"`methods` must be a list of vlmfix methods or method names, got VHR\(.*\) \(a VHR\); write methods=\[VHR"),
    (lambda m, i, p: vlmfix.generate(m, **i, methods="vhr", max_new_tokens=1), ValueError,
     r"`methods` must be a list.*write methods=\['vhr'\]"),
    (lambda m, i, p: vlmfix.generate(m, **i, methods=["vhrr"], max_new_tokens=1), vlmfix.UnknownNameError,
     r"Unknown method 'vhrr'. Available: avisc, dcd, dola, dual_stream, gift, icd, m3id, opera, pai, sid, var, vcd, "
     r"vhr"),
    (lambda m, i, p: vlmfix.generate(m, **i, methods=[OPERA()], max_new_tokens=1), ValueError,
     r"OPERA is a beam-search method; set num_beams >= 2 and do_sample=False"),
    (lambda m, i, p: vlmfix.generate(m, **i, tokenizer=42, max_new_tokens=1), ValueError,
     r"`tokenizer` must be the model's processor or tokenizer \(with encode and decode\), got 42 \(an int\)"),
    (lambda m, i, p: vlmfix.apply(m, [VHR()]), ValueError,
     r"vlmfix.apply takes the methods one by one, got a list; write vlmfix.apply\(model, \*methods\)"),
    (lambda m, i, p: vlmfix.apply(m, kernel="gpu"), ValueError, r"`kernel` must be one of 'auto', 'always', 'never'"),
    (lambda m, i, p: vlmfix.apply(m, VHR(layers=[1, 9])), ValueError,
     r"`layers` holds \[9\], but the language model has 4 layers \(0 .. 3\)"),
    (lambda m, i, p: vlmfix.apply(m, PAI(layers=[7])), ValueError, r"`layers` holds \[7\]"),
    (lambda m, i, p: vlmfix.apply(m, GIFT(fusion_layers=[5]), tokenizer=p), ValueError,
     r"`fusion_layers` holds \[5\]"),
    (lambda m, i, p: vlmfix.apply(m, VAR()), vlmfix.VlmfixError, r"VAR needs the sink dimensions of "
     r"LlavaForConditionalGeneration.*calibrate_sink_dims"),
    (lambda m, i, p: vlmfix.apply(m, VAR(sink_dims=[200])), ValueError, r"`sink_dims` holds dimension 200"),
    (lambda m, i, p: vlmfix.apply(m, SID(layer=7)), ValueError, r"`layer` holds \[7\]"),
    (lambda m, i, p: vlmfix.apply(m, GIFT()), ValueError, r"gift need the tokenizer.*pass tokenizer=processor"),
    (lambda m, i, p: vlmfix.apply(m, DoLa(layers=[1, 4])), ValueError,
     r"`layers` holds \[4\], but the language model has 4 layers: premature hidden indices run from 0"),
    (lambda m, i, p: vlmfix.generate(m, **i, methods=["dola"], max_new_tokens=1), ValueError, r"DoLa needs `layers`"),
    (lambda m, i, p: vlmfix.generate(m, **i, methods=[DoLa(layers="high"), VCD()], max_new_tokens=1), ValueError,
     r"dola cannot run in one call with the two-stream method vcd"),
    (lambda m, i, p: vlmfix.apply(object()), vlmfix.UnsupportedModelError,
     r"vlmfix has no adapter for object. Supported model classes: .*LlavaForConditionalGeneration"),
]


@pytest.mark.parametrize("call, error, message", SESSION_CASES, ids=[m[:40] for _, _, m in SESSION_CASES])
def test_session_arguments_are_refused_before_any_forward(counted, call, error, message):
    tiny, calls = counted
    with pytest.raises(error, match=message):
        call(tiny.model, tiny.inputs(QUESTIONS), tiny.processor)
    assert not calls, "the error came after a forward pass"
    assert tiny.model.config.text_config._attn_implementation == "sdpa"  # nothing installed stays behind
