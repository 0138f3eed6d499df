"""DCD decoding: projector routing per stream, the contrast, variants, checkpoint checks."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

import vlmfix
from vlmfix.adapters import get_adapter
from vlmfix.decoding.edits import KeyBias
from vlmfix.methods.dcd import DCD, load_projector, save_projector
from vlmfix.methods.dcd_lora import LoraSpec, NegativeLora
from vlmfix.methods.vcd import VCD

from .conftest import PlannedEdits, tiny_model

QUESTIONS = ["describe this image .", "is there a dog on the table ?"]
CONF = Path(__file__).resolve().parents[1] / "conf" / "method"


def perturbed(model: torch.nn.Module, seed: int, scale: float = 0.05) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {k: v + scale * torch.randn(v.shape, generator=generator)
            for k, v in get_adapter(model).projector.state_dict().items()}


def checkpoints(tmp_path: Path, family: str) -> tuple[Path, dict, dict]:
    """A training-output directory with random positive / negative projectors for the tiny `family` model."""
    model = tiny_model(family).model
    positive, negative = perturbed(model, 1), perturbed(model, 2)
    save_projector(tmp_path / "positive.safetensors", positive, model, "pos")
    save_projector(tmp_path / "negative.safetensors", negative, model, "neg")
    return tmp_path, positive, negative


def with_projector(model: torch.nn.Module, state: dict) -> torch.nn.Module:
    """Reference: an independent copy of the model whose own projector holds `state`."""
    clone = copy.deepcopy(model)
    get_adapter(clone).projector.load_state_dict(state)
    return clone


def test_alpha_zero_decodes_through_the_positive_projector(family, tmp_path):
    tiny = tiny_model(family)
    directory, positive, _ = checkpoints(tmp_path, family)
    inputs = tiny.inputs(QUESTIONS)
    before = {k: v.clone() for k, v in inputs.items()}
    reference = with_projector(tiny.model, positive).generate(**inputs, max_new_tokens=6, do_sample=False)
    out = vlmfix.generate(tiny.model, **inputs, methods=[DCD(directory, alpha=0.0, apc_beta=None)], max_new_tokens=6,
                          do_sample=False)
    assert torch.equal(out, reference)
    pos_only = vlmfix.generate(tiny.model, **inputs, methods=[DCD(directory, variant="pos_only")], max_new_tokens=6,
                               do_sample=False)
    assert torch.equal(pos_only, reference)
    for key, value in before.items():
        assert torch.equal(inputs[key], value)


def test_neg_only_alpha_zero_is_greedy(tmp_path):
    tiny = tiny_model("qwen2_vl")
    directory, _, _ = checkpoints(tmp_path, "qwen2_vl")
    inputs = tiny.inputs(QUESTIONS)
    plain = tiny.model.generate(**inputs, max_new_tokens=6, do_sample=False)
    out = vlmfix.generate(tiny.model, **inputs, methods=[DCD(directory, variant="neg_only", alpha=0.0, apc_beta=None)],
                          max_new_tokens=6, do_sample=False)
    assert torch.equal(out, plain)


@pytest.mark.parametrize("family", ["llava_next", "qwen2_5_vl"])
def test_scores_equal_two_single_stream_runs(family, tmp_path):
    """(1 + a) l(P_pos) - a l(P_neg), cut by beta on l(P_pos), from two independent plain models."""
    tiny = tiny_model(family)
    directory, positive, negative = checkpoints(tmp_path, family)
    inputs = tiny.inputs(QUESTIONS[:1])  # one row: the plain reference needs no position bookkeeping
    out = vlmfix.generate(tiny.model, **inputs, methods=[DCD(directory, alpha=0.8, apc_beta=0.2)], max_new_tokens=4,
                          do_sample=False, return_dict_in_generate=True, output_logits=True)
    tokens = out.sequences[:, inputs["input_ids"].shape[1]:]
    models = with_projector(tiny.model, positive), with_projector(tiny.model, negative)
    for step, got in enumerate(out.logits):
        ids = torch.cat([inputs["input_ids"], tokens[:, :step]], dim=1)
        extra = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask", "mm_token_type_ids")}
        if "mm_token_type_ids" in inputs:
            extra["mm_token_type_ids"] = torch.cat(
                [inputs["mm_token_type_ids"], torch.zeros_like(tokens[:, :step])], dim=1)
        with torch.no_grad():
            l_w, l_l = (m(input_ids=ids, **extra).logits[:, -1] for m in models)
        want = 1.8 * l_w - 0.8 * l_l
        want[l_w < l_w.max(-1, keepdim=True).values + torch.log(torch.tensor(0.2))] = float("-inf")
        assert torch.equal(torch.isinf(got), torch.isinf(want))
        torch.testing.assert_close(got[~torch.isinf(want)], want[~torch.isinf(want)], atol=1e-4, rtol=1e-4)
        assert torch.equal(got.argmax(-1), tokens[:, step])


def lora_checkpoints(tmp_path: Path, model: torch.nn.Module) -> tuple[Path, dict, dict, dict]:
    """Like `checkpoints`, with random (non-zero) negative-stream LoRA adapters on q_proj and v_proj."""
    positive, negative = perturbed(model, 1), perturbed(model, 2)
    lora = NegativeLora(model, LoraSpec(rank=3, alpha=6.0))
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in lora.up.values():
            p.copy_(0.3 * torch.randn(p.shape, generator=generator))
    save_projector(tmp_path / "positive.safetensors", positive, model, "pos")
    save_projector(tmp_path / "negative.safetensors", negative, model, "neg", lora=lora)
    return tmp_path, positive, negative, lora.tensors()


def merged(model: torch.nn.Module, tensors: dict, scaling: float) -> torch.nn.Module:
    """Reference: the model with the adapters merged into its weights, W + s * up @ down."""
    language_model = get_adapter(model).language_model
    for name, module in language_model.named_modules():
        if f"lora.{name}.down" in tensors:
            with torch.no_grad():
                module.weight += scaling * tensors[f"lora.{name}.up"] @ tensors[f"lora.{name}.down"]
    return model


def test_negative_lora_acts_on_the_negative_stream_only(tmp_path):
    """Scores = (1 + a) l(P_pos, base LM) - a l(P_neg, LM with merged adapters), from two plain models."""
    tiny = tiny_model("llava")
    directory, positive, negative, tensors = lora_checkpoints(tmp_path, tiny.model)
    inputs = tiny.inputs(QUESTIONS[:1])
    method = DCD(directory, alpha=0.8, apc_beta=None)
    out = vlmfix.generate(tiny.model, **inputs, methods=[method], max_new_tokens=4, do_sample=False,
                          return_dict_in_generate=True, output_logits=True)
    tokens = out.sequences[:, inputs["input_ids"].shape[1]:]
    base = with_projector(tiny.model, positive)
    adapted = merged(with_projector(tiny.model, negative), tensors, 2.0)
    for step, got in enumerate(out.logits):
        ids = torch.cat([inputs["input_ids"], tokens[:, :step]], dim=1)
        with torch.no_grad():
            l_w = base(input_ids=ids, pixel_values=inputs["pixel_values"]).logits[:, -1]
            l_l = adapted(input_ids=ids, pixel_values=inputs["pixel_values"]).logits[:, -1]
        torch.testing.assert_close(got, 1.8 * l_w - 0.8 * l_l, atol=1e-4, rtol=1e-4)
    assert method.negative_lora(tiny.model).spec == LoraSpec(rank=3, alpha=6.0)


def test_negative_lora_stays_out_of_other_passes_and_leaves_no_hook(tmp_path):
    """With alpha 0 the output is the positive stream's, so it must not change when the negative stream has
    adapters, also with VHR, whose extra analysis pass runs 2B rows through the same model (VHR comes
    second, so DCD's hooks are already on during that pass)."""
    tiny = tiny_model("llava")
    inputs = tiny.inputs(QUESTIONS)
    with_lora, _, _, _ = lora_checkpoints(tmp_path / "lora", tiny.model)
    plain, _, _ = checkpoints(tmp_path / "plain", "llava")
    with torch.no_grad():
        logits_before = tiny.model(**inputs).logits
    outs = [vlmfix.generate(tiny.model, **inputs, methods=[DCD(d, alpha=0.0, apc_beta=None), vlmfix.VHR()],
                            max_new_tokens=5, do_sample=False) for d in (with_lora, plain)]
    assert torch.equal(outs[0], outs[1])
    with torch.no_grad():
        torch.testing.assert_close(tiny.model(**inputs).logits, logits_before, atol=0, rtol=0)


def test_loading_the_adapters_leaves_seeded_sampling_alone(tmp_path):
    """The adapters load inside the first generate call; that must not draw from the random generator."""
    tiny = tiny_model("llava")
    directory, _, _, _ = lora_checkpoints(tmp_path, tiny.model)
    inputs = tiny.inputs(QUESTIONS)
    method = DCD(directory, alpha=0.5)
    outs = []
    for _ in range(2):  # the first call loads the checkpoints, the second reuses them
        torch.manual_seed(0)
        outs.append(vlmfix.generate(tiny.model, **inputs, methods=[method], max_new_tokens=6, do_sample=True))
    assert torch.equal(outs[0], outs[1])


def test_foreign_lora_tensors_are_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    from vlmfix.methods.dcd import load_negative_lora, read_metadata

    tiny = tiny_model("llava")
    directory, _, _, _ = lora_checkpoints(tmp_path, tiny.model)
    path = directory / "negative.safetensors"
    metadata = {k: v for k, v in read_metadata(path).items() if k != "lora"}
    save_file(load_file(str(path)), str(tmp_path / "foreign.safetensors"), metadata=metadata)
    with pytest.raises(vlmfix.CheckpointError, match="holds LoRA tensors but no 'lora' metadata"):
        load_negative_lora(tmp_path / "foreign.safetensors", tiny.model)


def test_pos_only_runs_one_stream(tmp_path):
    tiny = tiny_model("llava")
    directory, _, _ = checkpoints(tmp_path, "llava")
    inputs = tiny.inputs(QUESTIONS)
    rows: list[int] = []
    handle = tiny.model.get_input_embeddings().register_forward_pre_hook(lambda m, args: rows.append(args[0].shape[0]))
    try:
        vlmfix.generate(tiny.model, **inputs, methods=[DCD(positive=directory / "positive.safetensors",
                                                           variant="pos_only")], max_new_tokens=3)
        assert set(rows) == {2}
        rows.clear()
        vlmfix.generate(tiny.model, **inputs, methods=[DCD(directory)], max_new_tokens=3)
        assert set(rows) == {4}
    finally:
        handle.remove()


def test_composes_with_an_edit_and_beams(tmp_path):
    tiny = tiny_model("qwen2_vl")
    directory, _, _ = checkpoints(tmp_path, "qwen2_vl")
    inputs = tiny.inputs(QUESTIONS)
    seen: list[tuple[int, int | None]] = []

    def bias(session, layer):
        seen.append((layer, session.edited_rows))
        return [KeyBias(bias=session.spans.image[:, None].float())]

    out = vlmfix.generate(tiny.model, **inputs, methods=[PlannedEdits(bias, layers=[1]), DCD(directory)],
                          num_beams=2, max_new_tokens=4)
    assert out.shape[0] == 2
    assert {layer for layer, _ in seen} == {1} and seen[-1][1] == 4  # B = 2 prompts x 2 beams


def test_bad_settings_and_checkpoints(tmp_path):
    with pytest.raises(ValueError, match=r"`variant` must be one of 'pos\+neg', 'neg_only', 'pos_only', got 'both'"):
        DCD(tmp_path, variant="both")
    with pytest.raises(ValueError, match=r"needs the negative.safetensors checkpoint"):
        DCD(positive=tmp_path / "p.safetensors")
    with pytest.raises(ValueError, match=r"`apc_beta` must be None or a finite number in \(0, 1\], got 0"):
        DCD(tmp_path, apc_beta=0)
    tiny = tiny_model("llava")
    inputs = tiny.inputs(QUESTIONS)
    with pytest.raises(vlmfix.CheckpointError, match="No DCD projector checkpoint at .*negative.safetensors.*"
                                                     "python -m vlmfix.training.dcd"):
        vlmfix.generate(tiny.model, **inputs, methods=[DCD(tmp_path / "missing", variant="neg_only")],
                        max_new_tokens=2)
    # trained for another model (here: the tiny Qwen2-VL) -> refused, naming that base model
    directory, _, _ = checkpoints(tmp_path / "qwen", "qwen2_vl")
    with pytest.raises(vlmfix.CheckpointError, match="was trained for base model .*Qwen2VL.*config hash"):
        vlmfix.generate(tiny.model, **inputs, methods=[DCD(directory)], max_new_tokens=2)


def test_registry_and_configs(tmp_path):
    assert vlmfix.methods.get("dcd") is DCD and vlmfix.methods.get("vcd") is VCD
    for name, cls in (("vcd", VCD), ("dcd", DCD)):
        cfg = OmegaConf.to_container(OmegaConf.load(CONF / f"{name}.yaml"), resolve=True)
        assert cfg.pop("_target_") == f"vlmfix.{cls.__name__}"
        method = cls(**cfg)
        if cls is VCD:  # every knob is in the yaml (the high-res copy's normalisation included)
            assert set(cfg) == set(method.params())
        as_yaml = {k: list(v) if isinstance(v, tuple) else v for k, v in method.params().items()}  # YAML: lists
        assert {k: v for k, v in as_yaml.items() if k in cfg} == {
            k: (str(v) if k == "checkpoints" else v) for k, v in cfg.items()}


def test_a_version_one_checkpoint_still_loads(tmp_path):
    """Format 1 stored the side under "stream"; such files load, and their side is still checked."""
    from safetensors.torch import load_file, save_file

    from vlmfix.methods.dcd import read_metadata

    model = tiny_model("llava").model
    state = {k: v.clone() for k, v in vlmfix.get_adapter(model).projector.state_dict().items()}
    path = save_projector(tmp_path / "negative.safetensors", state, model, "neg")
    metadata = {k: v for k, v in read_metadata(path).items() if k != "side"}
    save_file(load_file(str(path)), str(path), metadata={**metadata, "format_version": "1", "stream": "neg"})
    assert read_metadata(path)["side"] == "neg"
    assert load_projector(path, model, "neg").keys() == state.keys()
    with pytest.raises(vlmfix.CheckpointError, match=r"holds the 'neg' projector, but the 'pos' one"):
        load_projector(path, model, "pos")
