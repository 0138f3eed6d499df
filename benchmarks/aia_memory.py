"""Time and peak memory of one training step with the AIA loss: vlmfix's answer-row recomputation
against the official approach (eager attention with `output_attentions=True`), as ratios in one run.

Variants (same weights, same batch, forward + backward of the whole step):
  1. NTP only, sdpa: the plain fine-tuning step (reference for the overheads).
  2. NTP + AIA, vlmfix: sdpa untouched; the observer recomputes softmax for the answer rows only.
  3. NTP + AIA, eager: the model switched to eager attention with `output_attentions=True`, and the
     intensities read off the full [batch, heads, seq, seq] maps of every layer.

Time is the median over interleaved repeats (1 2 3 1 2 3 ...). Peak memory is the highest total the
PyTorch allocator reaches during the step, above what it held before the step. On CPU it is read from
the profiler's memory events; on CUDA, from `torch.cuda.max_memory_allocated`.

    python -m benchmarks.aia_memory                               # LLaVA-shaped CPU model, 2 layers
    python -m benchmarks.aia_memory --layers 1 --repeats 1        # a quick look
    python -m benchmarks.aia_memory --device cuda --dtype bfloat16 --layers 8 --head-dim 128 --batch 4
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from transformers import PreTrainedModel

import vlmfix
from benchmarks.speed import llava_shaped
from vlmfix.testing import TinyVLM, random_image
from vlmfix.training.aia import AIALoss, huber, resolve_targets

ANSWER_WORDS = "a red car near a tree and a small dog on the left of the table ,".split()

Step = Callable[[], Tensor]  # runs forward + backward, returns the AIA intensities [layers, batch]


@dataclass(frozen=True)
class Result:
    label: str
    seconds: float
    peak_bytes: int


def training_batch(tiny: TinyVLM, batch: int, answer_tokens: int) -> tuple[dict, Tensor]:
    """`batch` rows of one image + a question + an answer of `answer_tokens` words, and its labels."""
    answer = " ".join(ANSWER_WORDS[i % len(ANSWER_WORDS)] for i in range(answer_tokens))
    texts = [tiny.prompt("describe this image .") + " " + answer for _ in range(batch)]
    images = [random_image(336, seed) for seed in range(batch)]
    inputs = dict(tiny.processor(text=texts, images=images, return_tensors="pt", padding=True))
    labels = torch.full_like(inputs["input_ids"], -100)
    labels[:, -answer_tokens:] = inputs["input_ids"][:, -answer_tokens:]
    return inputs, labels


def eager_intensity(attentions: Sequence[Tensor], image: Tensor, answer: Tensor) -> Tensor:
    """[layers, batch] intensities from full probability maps (the official code's route)."""
    values = []
    for probs in attentions:  # [batch, heads, seq, seq]
        on_image = (probs * image[:, None, None, :].to(probs.dtype)).sum(-1).mean(1)  # [batch, seq]
        values.append((on_image * answer).sum(-1) / answer.sum(-1))
    return torch.stack(values).float()


def make_steps(model: PreTrainedModel, inputs: dict, labels: Tensor, aia: AIALoss) -> dict[str, Step]:
    adapter = vlmfix.get_adapter(model)
    targets = resolve_targets(aia.targets, adapter.num_layers)
    target = torch.tensor(targets.target, device=labels.device)[:, None]
    delta = torch.tensor(targets.delta, device=labels.device)[:, None]
    image = inputs["input_ids"] == model.config.image_token_id
    answer = (labels != -100).float()

    def ntp_only() -> Tensor:
        model(**inputs, labels=labels, use_cache=False).loss.backward()
        return torch.zeros(())

    def vlmfix_aia() -> Tensor:
        with vlmfix.apply(model) as session, aia.observe(session) as record:
            out = model(**inputs, labels=labels, use_cache=False)
        (out.loss + aia.lambda_ * aia.loss(record)).backward()
        return record.stacked().detach()

    def eager_aia() -> Tensor:
        model.set_attn_implementation("eager")
        try:
            out = model(**inputs, labels=labels, use_cache=False, output_attentions=True)
            intensity = eager_intensity(out.attentions, image, answer)
            loss = huber(intensity - target, delta).mean()
            (out.loss + aia.lambda_ * loss).backward()
        finally:
            model.set_attn_implementation("sdpa")
        return intensity.detach()

    return {
        "NTP only (sdpa)": ntp_only,
        "NTP + AIA, vlmfix (answer rows)": vlmfix_aia,
        "NTP + AIA, eager output_attentions": eager_aia,
    }


def peak_bytes(step: Step, model: nn.Module, device: torch.device) -> int:
    """Highest allocator total during `step`, above the total held before it."""
    model.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    with tempfile.TemporaryDirectory() as tmp:
        trace = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(trace))
        events = json.loads(trace.read_text())["traceEvents"]
    memory = [e["args"] for e in events if e.get("name") == "[memory]" and e["args"].get("Device Type") == 0]
    if not memory:
        return 0
    # the profiler's running total does not restart per session: count from the total before the first event
    start = memory[0]["Total Allocated"] - memory[0]["Bytes"]
    return max(0, max(m["Total Allocated"] for m in memory) - start)


def seconds(step: Step, model: nn.Module, device: torch.device) -> float:
    model.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def measure(
    steps: dict[str, Step],
    model: nn.Module,
    device: torch.device,
    repeats: int,
    progress: Callable[[str], None] = print,
) -> list[Result]:
    for step in steps.values():  # warm-up
        seconds(step, model, device)
    samples: dict[str, list[float]] = {label: [] for label in steps}
    for r in range(repeats):
        for label, step in steps.items():
            samples[label].append(seconds(step, model, device))
        progress(f"  repeat {r + 1}/{repeats} done")
    peaks = {label: peak_bytes(step, model, device) for label, step in steps.items()}
    return [Result(label, statistics.median(samples[label]), peaks[label]) for label in steps]


def main(argv: Sequence[str] | None = None) -> list[Result]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--head-dim", type=int, default=32)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--answer-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    device = torch.device(args.device)
    tiny = llava_shaped(args.layers, args.heads, args.head_dim)
    model = tiny.model.to(device=device, dtype=getattr(torch, args.dtype)).train()
    inputs, labels = training_batch(tiny, args.batch, args.answer_tokens)
    inputs = {
        k: (v.to(device=device, dtype=model.dtype) if torch.is_floating_point(v) else v.to(device))
        for k, v in inputs.items()
    }
    labels = labels.to(device)
    seq = inputs["input_ids"].shape[1]
    image_tokens = int(inputs["input_ids"][0].eq(model.config.image_token_id).sum())
    print(
        f"LLaVA-shaped model on {device} ({args.dtype}): {args.layers} layers x {args.heads} heads x "
        f"head_dim {args.head_dim}; batch {args.batch} x {seq} tokens ({image_tokens} image, "
        f"{args.answer_tokens} answer); "
        f"{torch.get_num_threads()} threads, {args.repeats} repeats; full model trainable"
    )
    aia = AIALoss(targets="r4", lambda_=10.0)
    steps = make_steps(model, inputs, labels, aia)
    ours, eager = steps["NTP + AIA, vlmfix (answer rows)"](), steps["NTP + AIA, eager output_attentions"]()
    print(f"intensities agree: max |vlmfix - eager| = {float((ours - eager).abs().max()):.2e}")
    results = measure(steps, model, device, args.repeats)
    base, fast, slow = results
    print(
        "\n| variant | s / step | time vs NTP only | peak MB in step | memory vs NTP only |"
        "\n|---|---|---|---|---|"
    )
    for r in results:
        print(
            f"| {r.label} | {r.seconds:.3f} | {r.seconds / base.seconds:.2f}x | {r.peak_bytes / 2**20:.0f} | "
            f"{r.peak_bytes / base.peak_bytes:.2f}x |"
        )
    extra_fast, extra_slow = fast.peak_bytes - base.peak_bytes, slow.peak_bytes - base.peak_bytes
    print(
        f"\neager / vlmfix: time {slow.seconds / fast.seconds:.2f}x, "
        f"peak memory {slow.peak_bytes / fast.peak_bytes:.2f}x; "
        f"memory added by the AIA term over NTP only: vlmfix {extra_fast / 2**20:.1f} MB, eager "
        f"{extra_slow / 2**20:.1f} MB ({extra_slow / max(extra_fast, 1):.0f}x)"
    )
    return results


if __name__ == "__main__":
    main()
