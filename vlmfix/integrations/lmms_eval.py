"""vlmfix as an lmms-eval model: any supported Hugging Face VLM, decoded with vlmfix methods, in lmms-eval's harness.

```
pip install "vlmfix[lmms]"      # registers the model `vlmfix` through the `lmms_eval.models` entry point
lmms-eval --model vlmfix --model_args pretrained=/models/llava-1.5-7b-hf,methods=var --tasks pope --batch_size 8
python -m vlmfix.integrations.lmms_eval write-tasks --out tasks/ --toy toy_fast    # a local task scored by vlmfix
```

Model arguments (`--model_args k=v,...`; lmms-eval splits on commas, so method options use `:`):
`pretrained` (a checkpoint directory, a hub id in the local hub cache, `toy` or `toy_fast`), `methods`
(`var;pai:alpha=0.5:cfg=False`, names of `vlmfix.methods`), `methods_config` (a YAML file of Hydra method
nodes, added after `methods`), `dtype`, `attn_implementation`, `device`, `batch_size` (`max_batch_size` is
ignored), `report_path` (each batch's method report appended as a JSON line), `seed`, `local_files_only`,
`trust_remote_code`.

`generate_until` groups the requests by their generation kwargs, keeps lmms-eval's request order inside a group,
and decodes left-padded batches of `batch_size` through `vlmfix.apply(model, *methods)` around `generate`, with
the benchmark app's prompts (`vlmfix.eval.generation.chat_prompt`) and per-batch seeds, so a task's answers equal
the app's runner on the same items and batch size. Requests without an image are decoded by plain `generate`
with no method (the methods act on image tokens), as the app does. Stop strings (`until`) cut the decoded text.

Tasks written by `write-tasks` (POPE, AMBER, MME, HallusionBench; `vlmfix.integrations.lmms_tasks`) report vlmfix's
protocol fingerprint as their `vlmfix_fingerprint` metric: this model records its half (checkpoint, methods and
their parameters, chat template, execution, seed) when built, and each task's generation kwargs when answering.

Log-likelihood requests are refused: the contrastive and beam-search methods act inside `generate` (a second
stream, their own decoding loop), so a forward-only likelihood would silently score the model without them.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms
from tqdm import tqdm

import vlmfix
from vlmfix.decoding.method import Method
from vlmfix.decoding.session import Session
from vlmfix.eval.fingerprint import Execution, method_params
from vlmfix.eval.generation import chat_prompt
from vlmfix.integrations.lmms_tasks import RUN, ModelRecord
from vlmfix.integrations.model_args import (
    TOYS,
    cut_at_stops,
    generation_settings,
    load_vlm,
    methods_from_config,
    parse_methods,
)
from vlmfix.validation import number, text

NO_LIKELIHOOD = (
    "vlmfix does not score log-likelihoods: its contrastive and beam-search methods act inside `generate` (a second "
    "image-free or distorted stream, their own decoding loop), so a forward-only likelihood would score the model "
    "without them. Run tasks whose output_type is generate_until (pope, mme, hallusion_bench_image, amber_g, "
    "coco_cap_chair are)."
)


class VlmfixLMM(lmms):
    """lmms-eval's `vlmfix` model: `generate_until` through vlmfix methods, batched, left-padded.

    Args:
        pretrained: a checkpoint directory, a hub id in the local hub cache, or `toy` / `toy_fast` (vlmfix's toy VLM).
        methods: method names joined by `;` or `+`, each with optional `:key=value` options, e.g. `var;pai:alpha=0.5`.
        methods_config: a YAML file of Hydra method nodes (`_target_: vlmfix.PAI` + arguments), added after `methods`.
        dtype: float32, float16 or bfloat16; None: float32 for the toy, bfloat16 otherwise.
        attn_implementation: the model's attention backend (sdpa by default).
        device: auto (cuda when available), cpu, cuda or cuda:<index>.
        batch_size: requests per `generate` call (a positive int; lmms-eval's `auto` is not supported).
        report_path: a JSON Lines file; each batch appends its methods' report (`Session.report()`).
        seed: each batch is seeded with `seed * 100003 + batch index` (the app's rule; matters when sampling).
        local_files_only, trust_remote_code: passed to `from_pretrained` (nothing is downloaded by default).

    Example:
        >>> lm = VlmfixLMM(pretrained="toy_fast", methods="pai:alpha=0.5", device="cpu")  # doctest: +SKIP
    """

    is_simple = True

    def __init__(
        self,
        pretrained: str,
        methods: str | None = None,
        methods_config: str | None = None,
        dtype: str | None = None,
        attn_implementation: str = "sdpa",
        device: str | None = None,
        batch_size: int | str = 1,
        max_batch_size: int | None = None,
        report_path: str | None = None,
        seed: int = 0,
        local_files_only: bool = True,
        trust_remote_code: bool = False,
        **unknown: Any,
    ) -> None:
        super().__init__()
        if unknown:
            raise ValueError(f"unknown vlmfix model argument(s) {', '.join(sorted(unknown))}; it knows pretrained, "
                             "methods, methods_config, dtype, attn_implementation, device, batch_size, report_path, "
                             "seed, local_files_only, trust_remote_code.")
        self.batch_size = _batch_size(batch_size)
        self.seed = number(seed, "seed", low=0, integer=True)
        self.report_path = None if report_path is None else Path(text(report_path, "report_path")).expanduser()
        self.methods: list[Method] = parse_methods(methods)
        if methods_config is not None:
            self.methods += methods_from_config(methods_config)
        self.model, self.processor = load_vlm(pretrained, dtype, attn_implementation, device, local_files_only,
                                              trust_remote_code)
        Session(self.model, self.methods, tokenizer=self.processor)  # each method's check of this model, now
        self.device = next(self.model.parameters()).device
        self._batch_index = 0
        RUN.record_model(self.fingerprint_fields(pretrained))  # the model half of the tasks' vlmfix fingerprint

    # ------------------------------------------------------------------ lmms-eval's interface
    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        raise NotImplementedError(NO_LIKELIHOOD)

    def generate_until_multi_round(self, requests: list[Instance]) -> list[str]:
        raise NotImplementedError("vlmfix does not run multi-round generation: each method plans on one prompt "
                                  "with its image; run single-round generate_until tasks.")

    def generate_until(self, requests: list[Instance]) -> list[str]:
        """One answer per request, in request order (args: context, gen_kwargs, doc_to_visual, doc_id, task, split)."""
        answers: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for index, request in enumerate(requests):
            groups.setdefault(json.dumps(request.args[1], sort_keys=True, default=str), []).append(index)
        bar = tqdm(total=len(requests), desc="vlmfix responding", disable=self.rank != 0)
        for indices in groups.values():
            settings = generation_settings(dict(requests[indices[0]].args[1]))
            for task in {requests[i].args[4] for i in indices}:
                RUN.record_decoding(task, settings.kwargs)
            if settings.ignored:
                print(f"vlmfix: ignoring generation_kwargs {', '.join(settings.ignored)} (not decoding settings it "
                      "knows)", file=sys.stderr)
            prompts = [self._prompt(requests[i]) for i in indices]
            with_image = [(i, p) for i, p in zip(indices, prompts) if p[1] is not None]
            text_only = [(i, p) for i, p in zip(indices, prompts) if p[1] is None]  # batched after, as the app does
            for part in (with_image, text_only):
                for start in range(0, len(part), self.batch_size):
                    batch = part[start : start + self.batch_size]
                    texts = self._generate([p for _, p in batch], settings.kwargs)
                    for (i, _), generated in zip(batch, texts):
                        answers[i] = cut_at_stops(generated, settings.stops)
                        self.cache_hook.add_partial("generate_until", (requests[i].args[0], requests[i].args[1]),
                                                    answers[i])
                    bar.update(len(batch))
        bar.close()
        return [answer if answer is not None else "" for answer in answers]

    # ------------------------------------------------------------------ helpers
    def fingerprint_fields(self, pretrained: str) -> ModelRecord:
        """The model half of vlmfix's fingerprint, recorded as the benchmark app records it."""
        parameter = next(self.model.parameters())
        if pretrained in TOYS:  # as benchmarks.models.load_toy names it
            from vlmfix.toy import build_toy

            fast = pretrained == "toy_fast"
            source = f"vlmfix-toy{'-fast' if fast else ''}"
            revision: str | None = build_toy(fast=fast, progress=False).settings_hash
        else:
            source, revision = pretrained, getattr(self.model.config, "_commit_hash", None)
        label = "+".join(m.name for m in self.methods) or "greedy"
        execution = Execution(batch_size=self.batch_size, dtype=str(parameter.dtype).removeprefix("torch."),
                              attn_implementation=getattr(self.model.config, "_attn_implementation", None),
                              device=parameter.device.type)
        return ModelRecord(source, revision, label, method_params(self.methods),
                           getattr(self.processor, "chat_template", None), execution, self.seed)

    def _prompt(self, request: Instance) -> tuple[str, Any]:
        """(context, image or None) of one request; more than one image is refused."""
        context, _, doc_to_visual, doc_id, task, split = request.args[:6]
        visuals = doc_to_visual(self.task_dict[task][split][doc_id]) if doc_to_visual is not None else []
        visuals = [v for v in (visuals or []) if v is not None]
        if len(visuals) > 1:
            raise ValueError(f"task {task!r} doc {doc_id} has {len(visuals)} images; vlmfix's methods plan on one "
                             "image per prompt. Run single-image tasks.")
        return str(context), visuals[0] if visuals else None

    def _generate(self, prompts: Sequence[tuple[str, Any]], kwargs: dict[str, Any]) -> list[str]:
        """Decode one left-padded batch: images through the methods, text-only by plain generate."""
        torch.manual_seed(self.seed * 100_003 + self._batch_index)
        self._batch_index += 1
        texts = [chat_prompt(self.processor, context, image=image is not None) for context, image in prompts]
        images = [image.convert("RGB") for _, image in prompts if image is not None]
        if images:
            inputs = self.processor(images=images, text=texts, padding=True, return_tensors="pt").to(self.device)
            with torch.inference_mode(), vlmfix.apply(self.model, *self.methods, tokenizer=self.processor) as session:
                out = session.generate(**inputs, **kwargs)
            self._write_report(session.report())
        else:
            inputs = self.processor(text=texts, padding=True, return_tensors="pt").to(self.device)
            with torch.inference_mode():
                out = self.model.generate(**inputs, **kwargs)
        return self.processor.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)

    def _write_report(self, report: dict[str, Any]) -> None:
        if self.report_path is None:
            return
        self.report_path.parent.mkdir(parents=True, exist_ok=True)
        with self.report_path.open("a") as f:
            f.write(json.dumps({"batch": self._batch_index - 1, "report": report}, default=str) + "\n")


def _batch_size(value: Any) -> int:
    """lmms-eval passes the CLI's --batch_size as text; `auto` is refused."""
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, str):
        raise ValueError(f"`batch_size` must be a positive int, got {value!r}; vlmfix does not search batch sizes "
                         "(--batch_size auto): pass --batch_size 8.")
    return number(value, "batch_size", low=1, integer=True, meaning="the requests per generate call")


# ------------------------------------------------------------------ python -m vlmfix.integrations.lmms_eval
def main(argv: Sequence[str] | None = None) -> None:
    """`write-tasks --out DIR --benchmark pope|amber|mme|hallusionbench (--toy toy_fast | --data DIR | ...)`"""
    from vlmfix.integrations.lmms_cli import main as cli_main

    cli_main(argv)


if __name__ == "__main__":
    main()
