"""`vlmfix.viz`: every picture draws from a real session and holds the report's values where they belong.

The expected panels are rebuilt here in plain code from the report and the processor's outputs (image counts,
`image_sizes` with transformers' own AnyRes helpers, `image_grid_thw`), then compared with the arrays read back
from the figure (`ax.images[-1].get_array()`, line data).
"""

from __future__ import annotations

from fractions import Fraction

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape, unpad_image  # noqa: E402

import vlmfix  # noqa: E402
import vlmfix.viz  # noqa: E402
from tests.conftest import tiny_model  # noqa: E402
from vlmfix.testing.conformance import REQUIRED_ARGS  # noqa: E402

GRID_FAMILIES = ["llava", "llava_next", "qwen2_vl", "qwen2_5_vl"]
QUESTIONS = ["Describe this image in detail .", "is there a dog ?"]


def run(tiny, *methods, images_per_row: int = 2, max_new_tokens: int = 3):
    inputs = tiny.inputs(QUESTIONS, images_per_row=images_per_row)
    with vlmfix.apply(tiny.model, *methods, tokenizer=tiny.processor, record=True) as session:
        out = session.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return session, inputs, out


def expected_grids(family: str, config, inputs, row: int, values: np.ndarray, images: int) -> dict:
    """{(image, kind): [rows, cols] values} for one row, from the processor's outputs (not vlmfix.viz)."""
    out, start = {}, 0
    for k in range(images):
        index = row * images + k
        if family == "llava":
            side = config.vision_config.image_size // config.vision_config.patch_size
            out[(k, "patches")] = values[start : start + side * side].reshape(side, side)
            start += side * side
        elif family in ("llava_next", "granite4_vision"):
            side = config.vision_config.image_size // config.vision_config.patch_size
            if family == "granite4_vision":  # its window Q-Former shrinks each view's side by downsample_rate
                side = int(side * Fraction(config.downsample_rate))
            size = inputs["image_sizes"][index]
            tiles_h, tiles_w = get_anyres_image_grid_shape(size, config.image_grid_pinpoints,
                                                           config.vision_config.image_size)
            kept = unpad_image(torch.zeros(1, tiles_h * side, tiles_w * side), size)
            rows, cols = kept.shape[1:]
            out[(k, "base")] = values[start : start + side * side].reshape(side, side)
            start += side * side
            tiles = values[start : start + rows * (cols + 1)].reshape(rows, cols + 1)
            out[(k, "tiles")], out[(k, "newlines")] = tiles[:, :cols], tiles[:, cols:]
            start += rows * (cols + 1)
        else:
            merge = config.vision_config.spatial_merge_size
            _, h, w = inputs["image_grid_thw"][index].tolist()
            out[(k, "merged")] = values[start : start + (h // merge) * (w // merge)].reshape(h // merge, w // merge)
            start += (h // merge) * (w // merge)
    assert start == len(values)
    return out


def panel(figure, gid: str):
    found = [ax for ax in figure.axes if ax.get_gid() == gid]
    assert len(found) == 1, (gid, [ax.get_gid() for ax in figure.axes])
    return found[0]


def check_image_map(figure, name: str, expected: dict) -> None:
    for (image, kind), values in expected.items():
        shown = np.ma.filled(panel(figure, f"{name}:{image}:{kind}").images[-1].get_array().astype(float), np.nan)
        np.testing.assert_allclose(shown, values, equal_nan=True)


def membership(indices, count: int) -> np.ndarray:
    out = np.zeros(count)
    out[list(indices)] = 1.0
    return out


@pytest.mark.parametrize("family", GRID_FAMILIES)
def test_image_maps_of_var_and_pai_on_every_grid(family: str):
    tiny = tiny_model(family)
    session, inputs, _ = run(tiny, vlmfix.VAR(**REQUIRED_ARGS["var"]), vlmfix.PAI(cfg=False))
    report, prompt = session.report(), session.prompt_record()
    image_ids = tiny.model.config.image_token_id
    for row in range(2):
        positions = (inputs["input_ids"][row] == image_ids).nonzero().flatten().tolist()
        assert prompt["image_positions"][row] == positions
        figure = session.plot(row=row)
        # VAR: share of its reported layers in which each image token is a visual sink
        per_layer = report["var"]["rows"][row]["visual_sinks"]
        sinks = np.array([sum(p in layer for layer in per_layer.values()) / len(per_layer) for p in positions])
        assert sinks.any(), "the tiny model should have visual sinks with tau=1"
        check_image_map(figure, "var.visual_sinks", expected_grids(family, tiny.model.config, inputs, row, sinks, 2))
        gain = np.asarray(report["pai"]["image_gain"][row])
        assert gain.shape == (len(positions),) and (gain > 1).any()
        check_image_map(figure, "pai.image_gain", expected_grids(family, tiny.model.config, inputs, row, gain, 2))


@pytest.mark.parametrize("name", ["gift", "dual_stream", "sid", "avisc"])
def test_image_maps_of_the_other_methods(name: str):
    tiny = tiny_model("llava_next")
    from vlmfix.decoding.method import METHODS

    method = METHODS.get(name)(**REQUIRED_ARGS.get(name, {}))
    session, inputs, _ = run(tiny, method, images_per_row=1)
    entry = session.report()[name]["rows"][0]
    count = int((inputs["input_ids"][0] == tiny.model.config.image_token_id).sum())
    expected = {
        "gift": {"gift.saliency": np.asarray(entry.get("saliency") or [0.0] * count, dtype=float)},
        "dual_stream": {"dual_stream.local": membership(entry.get("local_tokens", []), count),
                        "dual_stream.summary": membership(entry.get("summary_tokens", []), count)},
        "sid": {"sid.kept": membership(entry.get("kept_prefill") or [], count)},
        "avisc": {"avisc.kept": membership(entry.get("kept", []), count)},
    }[name]
    assert any(values.any() for values in expected.values()), f"{name} selected no image token: {entry}"
    figure = session.plot(row=0)
    for map_name, values in expected.items():
        check_image_map(figure, map_name, expected_grids("llava_next", tiny.model.config, inputs, 0, values, 1))


def test_head_maps_of_vhr_and_var():
    tiny = tiny_model("qwen2_vl")
    session, _, _ = run(tiny, vlmfix.VHR(), vlmfix.VAR(**REQUIRED_ARGS["var"]), images_per_row=1)
    report = session.report()
    for row in range(2):
        figure = session.plot(row=row)
        layers = report["vhr"]["rows"][row]["layers"]
        order = sorted(layers)
        vhd = np.array([layers[k]["vhd"] for k in order])
        scaled = np.zeros_like(vhd)
        for i, k in enumerate(order):
            scaled[i, layers[k]["heads"]] = 1
        assert scaled.any()
        np.testing.assert_allclose(panel(figure, "vhr.vhd").images[-1].get_array(), vhd)
        np.testing.assert_array_equal(panel(figure, "vhr.scaled").images[-1].get_array(), scaled)
        assert [int(t.get_text()) for t in panel(figure, "vhr.vhd").get_yticklabels()] == order
        heads = report["var"]["rows"][row]["image_centric_heads"]
        shares = np.array([heads[k] for k in sorted(heads)])
        assert shares.shape == (len(report["var"]["layers"]), tiny.model.config.text_config.num_attention_heads)
        np.testing.assert_allclose(panel(figure, "var.image_centric_heads").images[-1].get_array(), shares)


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl"])
def test_contrast_trace_of_vcd(family: str):
    tiny = tiny_model(family)
    session, inputs, out = run(tiny, vlmfix.VCD(), images_per_row=1, max_new_tokens=4)
    trace = session.report()["vcd"]["record"]["contrast"]["rows"]
    width = inputs["input_ids"].shape[1]
    with torch.no_grad():  # the positive stream's first step is the plain model on the prompt
        plain = tiny.model(**inputs).logits[:, -1].float().log_softmax(-1)
    for row in range(2):
        steps = trace[row]
        assert steps["tokens"] == out[row, width:].tolist()
        assert steps["greedy_tokens"][0] == int(plain[row].argmax())
        np.testing.assert_allclose(steps["chosen_positive"][0], float(plain[row, steps["tokens"][0]]), atol=1e-4)
        np.testing.assert_allclose(steps["greedy_positive"][0], float(plain[row].max()), atol=1e-4)
        assert all(g >= c - 1e-5 for g, c in zip(steps["greedy_positive"], steps["chosen_positive"]))
        ax = panel(session.plot(row=row), "vcd.trace")
        for key in ("chosen_positive", "chosen_negative", "greedy_positive", "greedy_negative"):
            line = next(line for line in ax.get_lines() if line.get_gid() == key)
            np.testing.assert_allclose(line.get_ydata(), steps[key])


def test_no_record_keeps_the_report_as_it_was_and_save_writes_files(tmp_path):
    tiny = tiny_model("llava")
    inputs = tiny.inputs(QUESTIONS)
    with vlmfix.apply(tiny.model, vlmfix.PAI(cfg=False), tokenizer=tiny.processor) as session:
        session.generate(**inputs, max_new_tokens=2, do_sample=False)
    assert "image_gain" not in session.report()["pai"] and "record" not in session.report()["pai"]
    with pytest.raises(ValueError, match="nothing to draw"):
        session.plot(row=0)
    session, _, _ = run(tiny, vlmfix.PAI(cfg=False), images_per_row=1)
    with pytest.raises(ValueError, match="`row` must be a batch row"):
        session.plot(row=5)
    figure = vlmfix.viz.plot(session, row=1, images=[np.zeros((48, 80, 3), dtype=np.uint8)])
    for suffix in ("png", "svg"):
        assert figure.save(tmp_path / f"row.{suffix}").stat().st_size > 0
    with pytest.raises(ValueError, match="suffix"):
        figure.save(tmp_path / "row.gif")
    with pytest.raises(ValueError, match="record"):
        vlmfix.apply(tiny.model, vlmfix.PAI(), record="yes")


@pytest.mark.slow
def test_toy_pictures_of_gift_vhr_and_pai(tmp_path):
    """The toy (LLaVA layout): GIFT's saliency and PAI's gain over its patch grid, VHR's head maps, PAI's trace;
    and the command line writes the picture."""
    from vlmfix.toy import load_example
    from vlmfix.viz.__main__ import main

    model, processor, inputs = load_example()
    with vlmfix.apply(model, vlmfix.GIFT(), vlmfix.VHR(), vlmfix.PAI(), tokenizer=processor, record=True) as session:
        out = session.generate(**inputs, max_new_tokens=6, do_sample=False)
    report = session.report()
    figure = session.plot(row=0)
    side = model.config.vision_config.image_size // model.config.vision_config.patch_size
    saliency = np.asarray(report["gift"]["rows"][0]["saliency"])
    check_image_map(figure, "gift.saliency", {(0, "patches"): saliency.reshape(side, side)})
    gain = np.asarray(report["pai"]["image_gain"][0])
    check_image_map(figure, "pai.image_gain", {(0, "patches"): gain.reshape(side, side)})
    layers = report["vhr"]["rows"][0]["layers"]
    np.testing.assert_allclose(panel(figure, "vhr.vhd").images[-1].get_array(),
                               np.array([layers[k]["vhd"] for k in sorted(layers)]))
    steps = report["pai"]["record"]["contrast"]["rows"][0]
    assert steps["tokens"] == out[0, inputs["input_ids"].shape[1] :].tolist()
    line = next(line for line in panel(figure, "pai.trace").get_lines() if line.get_gid() == "greedy_negative")
    np.testing.assert_allclose(line.get_ydata(), steps["greedy_negative"])
    assert main(["--out", str(tmp_path / "toy.png"), "--max-new-tokens", "4"]) == 0
    assert (tmp_path / "toy.png").stat().st_size > 0


def test_beams_and_a_bare_generate():
    """Rows expanded for beams take their prompt's images; after a bare model.generate the processor's output
    gives the grids (its image inputs never reach the session), and without it the error says so."""
    tiny = tiny_model("llava_next")
    inputs = tiny.inputs(QUESTIONS, images_per_row=2)
    with vlmfix.apply(tiny.model, vlmfix.PAI(cfg=False), tokenizer=tiny.processor, record=True) as session:
        session.generate(**inputs, max_new_tokens=2, do_sample=False, num_beams=2, num_return_sequences=2)
    gain = np.asarray(session.report()["pai"]["image_gain"][3])  # row 3: prompt 1's second beam
    check_image_map(session.plot(row=3), "pai.image_gain",
                    expected_grids("llava_next", tiny.model.config, inputs, 1, gain, 2))
    with vlmfix.apply(tiny.model, vlmfix.PAI(cfg=False), tokenizer=tiny.processor, record=True) as session:
        tiny.model.generate(**inputs, max_new_tokens=2, do_sample=False)
    with pytest.raises(ValueError, match="inputs=inputs"):
        session.plot(row=1)
    gain = np.asarray(session.report()["pai"]["image_gain"][1])
    check_image_map(session.plot(row=1, inputs=inputs), "pai.image_gain",
                    expected_grids("llava_next", tiny.model.config, inputs, 1, gain, 2))


def test_pai_gain_against_a_reference():
    """One boosted layer, one generated token: the gain is the prefill's last query's attention to each image key
    with the boost, z + alpha * |z| on image keys, over that without it, averaged over heads."""
    tiny = tiny_model("qwen2_vl")  # GQA: 4 query heads, 2 key/value heads
    inputs = tiny.inputs(QUESTIONS)
    alpha, layer = 0.5, 2
    seen = {}

    def grab(call):
        if call.layer_idx == layer:
            seen.update(query=call.query.detach().clone(), key=call.key.detach().clone(), scaling=call.scaling)

    with vlmfix.apply(tiny.model) as plain, plain.observing(grab), torch.no_grad():
        tiny.model(**inputs)
    with vlmfix.apply(tiny.model, vlmfix.PAI(alpha, layers=[layer], cfg=False), record=True) as session:
        session.generate(**inputs, max_new_tokens=1, do_sample=False)
    query = seen["query"][:, :, -1:].double()  # [batch, heads, 1, head_dim]
    key = seen["key"].double().repeat_interleave(query.shape[1] // seen["key"].shape[1], dim=1)
    z = query @ key.transpose(-1, -2) * seen["scaling"]  # [batch, heads, 1, seq]
    padding = inputs["attention_mask"][:, None, None, :] == 0
    image = (inputs["input_ids"] == tiny.model.config.image_token_id)[:, None, None, :]
    plain_p = z.masked_fill(padding, float("-inf")).softmax(-1)
    boosted_p = (z + alpha * z.abs() * image).masked_fill(padding, float("-inf")).softmax(-1)
    gain = (boosted_p / plain_p).mean(1)[:, 0]  # [batch, seq]
    for row in range(2):
        expected = gain[row][image[row, 0, 0]].numpy()
        np.testing.assert_allclose(session.report()["pai"]["image_gain"][row], expected, rtol=1e-4)


def test_pai_gain_is_one_on_image_keys_a_sliding_window_hides():
    """A boosted sliding-window layer (Gemma 4's layer 2, window 16): the image keys outside the prefill's last
    query's window keep their zero attention, gain 1 (not 0, which would drag the picture's means below 1); the
    keys inside it get the boost's ratio."""
    tiny = tiny_model("gemma4")
    config = tiny.model.config.text_config
    layer = 2
    assert config.layer_types[layer] == "sliding_attention"
    inputs = tiny.inputs(QUESTIONS)
    with vlmfix.apply(tiny.model, vlmfix.PAI(0.5, layers=[layer], cfg=False), record=True) as session:
        session.generate(**inputs, max_new_tokens=1, do_sample=False)
    last = inputs["input_ids"].shape[1] - 1  # the prefill's last query (left padding)
    for row in range(2):
        positions = (inputs["input_ids"][row] == tiny.model.config.image_token_id).nonzero().flatten()
        gain = torch.tensor(session.report()["pai"]["image_gain"][row], dtype=torch.float64)
        hidden = last - positions >= config.sliding_window
        assert hidden.any() and (gain[hidden] == 1).all()
        assert (~hidden).any(), f"row {row}: no image key inside the window, so the boosted side goes unchecked"
        assert (gain[~hidden] != 1).any()


def test_pai_gain_over_decode_steps_that_skip_the_first_token_against_a_reference():
    """skip_first_token_boost: the prompt's last row is not boosted, so the gain averages the two decode steps only,
    each the spec's z + alpha * |z| on image keys over the plain attention of that step's query (a no-cache plain
    forward of the prompt and the generated tokens gives layer 2's queries and keys: layers 0-1 are not boosted)."""
    from tests.reference_decoding import grown

    tiny = tiny_model("llava")
    inputs = tiny.inputs(QUESTIONS)
    alpha, layer, steps = 0.5, 2, 3
    pai = vlmfix.PAI(alpha, layers=[layer], cfg=False, skip_first_token_boost=True)
    with vlmfix.apply(tiny.model, pai, record=True) as session:
        out = session.generate(**inputs, max_new_tokens=steps, min_new_tokens=steps, do_sample=False)
    prompt_len = inputs["input_ids"].shape[1]
    seen = {}

    def grab(call):
        if call.layer_idx == layer:
            seen.update(query=call.query.detach().clone(), key=call.key.detach().clone(), scaling=call.scaling)

    with vlmfix.apply(tiny.model) as plain, plain.observing(grab), torch.no_grad():
        tiny.model(**grown(inputs, out[:, prompt_len : prompt_len + steps - 1]))
    heads = seen["query"].shape[1]
    key = seen["key"].double().repeat_interleave(heads // seen["key"].shape[1], dim=1)
    image = inputs["input_ids"] == tiny.model.config.image_token_id  # [batch, prompt_len]
    gains = []
    for position in (prompt_len, prompt_len + 1):  # the two decode steps' queries; the prefill's is not boosted
        query = seen["query"][:, :, position : position + 1].double()  # [batch, heads, 1, head_dim]
        z = query @ key[:, :, : position + 1].transpose(-1, -2) * seen["scaling"]  # [batch, heads, 1, position + 1]
        generated = torch.zeros(2, position + 1 - prompt_len, dtype=torch.bool)
        blocked = torch.cat([inputs["attention_mask"] == 0, generated], 1)[:, None, None, :]
        on_image = torch.cat([image, generated], 1)[:, None, None, :]
        plain_p = z.masked_fill(blocked, float("-inf")).softmax(-1)
        boosted_p = (z + alpha * z.abs() * on_image).masked_fill(blocked, float("-inf")).softmax(-1)
        gains.append((boosted_p / plain_p).mean(1)[:, 0, :prompt_len])  # [batch, prompt_len]
    gain = (gains[0] + gains[1]) / 2
    report = session.report()["pai"]
    assert report["first_token_boosted"] is False
    for row in range(2):
        expected = gain[row][image[row]].numpy()
        assert (np.abs(expected - 1) > 1e-3).any()  # the boost really moved attention at these steps
        np.testing.assert_allclose(report["image_gain"][row], expected, rtol=1e-4)


@pytest.mark.parametrize("method", [lambda: vlmfix.VCD(), lambda: vlmfix.PAI()])
def test_recording_changes_no_token(method):
    tiny = tiny_model("llava")
    inputs = tiny.inputs(QUESTIONS)
    outputs = []
    for record in (False, True):
        with vlmfix.apply(tiny.model, method(), tokenizer=tiny.processor, record=record) as session:
            outputs.append(session.generate(**inputs, max_new_tokens=4, do_sample=False))
    assert torch.equal(outputs[0], outputs[1])


def test_pai_gain_ignores_other_methods_analysis_passes():
    """Another method prepared after PAI (GIFT with alpha=0: its saliency pass, no edit) leaves PAI's gain as is."""
    tiny = tiny_model("llava")
    inputs = tiny.inputs(QUESTIONS)
    gains = []
    for methods in ([vlmfix.PAI(cfg=False)], [vlmfix.PAI(cfg=False), vlmfix.GIFT(alpha=0.0)]):
        with vlmfix.apply(tiny.model, *methods, tokenizer=tiny.processor, record=True) as session:
            session.generate(**inputs, max_new_tokens=1, do_sample=False)
        gains.append(session.report()["pai"]["image_gain"])
    np.testing.assert_allclose(gains[0], gains[1], rtol=1e-6)


def test_a_row_without_image_tokens_draws_its_head_maps_and_names_what_it_cannot_draw():
    """A row with no image token has no grid: its image-token maps have no panel (once a division by zero); the
    head maps still draw, and a row with image maps alone gets an error that says so."""
    from transformers import LlavaConfig

    prompt = {"family": "llava", "image_positions": [[]]}
    dual = {"rows": [{"local_tokens": [], "summary_tokens": []}]}
    vhd = [[0.1, 0.2], [0.3, 0.4]]
    vhr = {"rows": [{"layers": {"2": {"vhd": vhd[0], "heads": [1]}, "3": {"vhd": vhd[1], "heads": [0]}}}]}
    figure = vlmfix.viz.plot_report({"dual_stream": dual, "vhr": vhr}, prompt, LlavaConfig())
    assert not [ax for ax in figure.axes if (ax.get_gid() or "").startswith("dual_stream")]
    np.testing.assert_allclose(panel(figure, "vhr.vhd").images[-1].get_array(), np.array(vhd))
    np.testing.assert_allclose(panel(figure, "vhr.scaled").images[-1].get_array(), np.array([[0, 1], [1, 0]]))
    with pytest.raises(ValueError, match="row 0: it has 0 image tokens on no image grid, so its image-token maps "
                                         r"\(dual_stream.local, dual_stream.summary\) have no panel"):
        vlmfix.viz.plot_report({"dual_stream": dual}, prompt, LlavaConfig())


@pytest.mark.parametrize("skip_first", [False, True])
def test_pai_gain_recorder_counts_the_steps_the_edit_path_boosts(skip_first):
    """The recorder averages over the (layer, step) calls whose newest query the boost edits (the edit path's
    `row_mask`): every step, or with skip_first_token_boost the decode steps only (not the prompt's last row)."""
    tiny = tiny_model("llava")
    pai = vlmfix.PAI(0.5, layers=[1, 2, 3], cfg=False, skip_first_token_boost=skip_first)
    with vlmfix.apply(tiny.model, pai, record=True) as session:  # three boosted layers, three steps
        session.generate(**tiny.inputs(QUESTIONS), max_new_tokens=3, min_new_tokens=3, do_sample=False)
    recorder = session.states[0].recorder
    boosted_steps = 2 if skip_first else 3
    assert recorder.counts.tolist() == [3.0 * boosted_steps] * len(QUESTIONS)
    assert (np.abs(np.asarray(session.report()["pai"]["image_gain"][0]) - 1) > 1e-3).any()
