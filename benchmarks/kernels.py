"""Decode-step attention with a VAR edit, through the paths vlmfix runs: grouped kernel vs SDPA vs PyTorch.

One `triton.testing.perf_report` over kv_len = 1k .. 32k keys, in GB/s, for a LLaVA-1.5-7B-like layer
(32 heads, MHA) and a Qwen2-VL-7B-like layer (28 query heads, 4 kv heads), head_dim 128, bf16, batch 1.
Providers:
  kernel        the grouped op alone (`grouped_decode_attention_triton`): one pass over the keys, no edit
  kernel+var    `vlmfix.decoding.grouped.grouped_decode_output` with VAR's `Transfer` edit: what an edited
                decode step of the library runs on CUDA (key groups from the session's cache, the op,
                the edit vocabulary's closed form), host work included
  sdpa          torch scaled_dot_product_attention with a 1-token query (the unedited layer)
  materialised  `vlmfix.decoding.edits.edited_attention` with the same edit: the PyTorch edit path

All providers are scored against the same bytes-moved floor (`decode_bytes`), so GB/s compares times.
Times are medians of `triton.testing.do_bench` (host launch work included, as a decode loop pays it).

Usage: python -m benchmarks.kernels [--save-path DIR]. Needs CUDA and triton; otherwise it prints why and
exits 0.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from vlmfix.decoding.edits import Transfer, edited_attention
from vlmfix.decoding.grouped import KeyGroupCache, grouped_decode_output
from vlmfix.kernels import grouped_decode_attention_triton

VAR_KNOBS: dict[str, Any] = {"fraction": 0.6, "min_gate_mass": 0.2, "min_receiver_share": 0.5}
LAYERS = {"llava15_7b_mha": (32, 32), "qwen2vl_7b_gqa": (28, 4)}  # (heads, kv_heads)
HEAD_DIM = 128
KV_LENS = [1024 * 2**i for i in range(6)]  # 1k .. 32k
PROVIDERS = ["kernel", "kernel+var", "sdpa", "materialised"]
IMAGE_START, IMAGE_TOKENS = 5, 576


def decode_bytes(batch: int, heads: int, kv_heads: int, kv_len: int, head_dim: int, dtype: torch.dtype,
                 groups: int = 4) -> int:
    """Fewest bytes one decode step must move: K and V once, q, the group ids, the fp32 group outputs."""
    item = torch.finfo(dtype).bits // 8
    kv = 2 * batch * kv_heads * kv_len * head_dim * item
    query = batch * heads * head_dim * item
    group_ids = batch * kv_len * 4
    outputs = batch * heads * groups * (head_dim + 1) * 4
    return kv + query + group_ids + outputs


def var_edit(kv_len: int, device: torch.device | str) -> Transfer:
    """VAR's edit for a prompt of kv_len - 1 keys: a text sink at 0, 576 image tokens (10% sinks), text."""
    prompt = kv_len - 1  # the newest key is the generated token
    image = torch.zeros(1, prompt, dtype=torch.bool, device=device)
    image[0, IMAGE_START : IMAGE_START + IMAGE_TOKENS] = True
    sinks = torch.zeros_like(image)
    sinks[0, 0] = True
    sinks[0, IMAGE_START : IMAGE_START + IMAGE_TOKENS : 10] = True
    return Transfer(source=sinks, receivers=image & ~sinks, gate_keys=image, require_gate_source=True,
                    **VAR_KNOBS)


def make_inputs(heads: int, kv_heads: int, kv_len: int, dtype: torch.dtype, device: torch.device | str) -> dict:
    """One decode step at batch 1: query [1, heads, 1, d], key/value [1, kv_heads, kv_len, d], VAR's edit."""
    gen = torch.Generator(device=device).manual_seed(0)
    shape = (1, kv_heads, kv_len, HEAD_DIM)
    return {
        "query": torch.randn(1, heads, 1, HEAD_DIM, device=device, generator=gen, dtype=dtype),
        "key": torch.randn(shape, device=device, generator=gen, dtype=dtype),
        "value": torch.randn(shape, device=device, generator=gen, dtype=dtype),
        "edit": var_edit(kv_len, device),
        "cache": KeyGroupCache(),  # the session's per-prompt key groups, warmed by the first call
    }


def run_kernel(query: Tensor, key: Tensor, value: Tensor, edit: Transfer, cache: KeyGroupCache) -> Tensor:
    ids = torch.zeros(1, key.shape[2], dtype=torch.int32, device=key.device)
    return grouped_decode_attention_triton(query[:, :, 0], key, value, ids, 1, HEAD_DIM**-0.5).value.sum(2)


def run_kernel_var(query: Tensor, key: Tensor, value: Tensor, edit: Transfer, cache: KeyGroupCache) -> Tensor:
    out = grouped_decode_output(query, key, value, None, HEAD_DIM**-0.5, [edit], cache)
    assert out is not None  # VAR's transfer is an edit the kernel serves
    return out


def run_sdpa(query: Tensor, key: Tensor, value: Tensor, edit: Transfer, cache: KeyGroupCache) -> Tensor:
    """The untouched decode step: no padding at batch 1, so no mask (as transformers calls it)."""
    return torch.nn.functional.scaled_dot_product_attention(query, key, value, scale=HEAD_DIM**-0.5,
                                                            enable_gqa=True)


def run_materialised(query: Tensor, key: Tensor, value: Tensor, edit: Transfer, cache: KeyGroupCache) -> Tensor:
    return edited_attention(query, key, value, None, HEAD_DIM**-0.5, [edit])


RUNNERS: dict[str, Callable[..., Tensor]] = {
    "kernel": run_kernel, "kernel+var": run_kernel_var, "sdpa": run_sdpa, "materialised": run_materialised,
}


def time_ms(triton, provider: str, inputs: dict) -> float:
    """Median time of one decode step (host work included)."""
    runner = RUNNERS[provider]
    if provider == "kernel+var" and runner(**inputs) is None:
        raise RuntimeError("grouped_decode_output declined VAR's edit; the benchmark would time nothing.")
    return triton.testing.do_bench(lambda: runner(**inputs), return_mode="median")


def build_report(triton):
    benchmarks = [
        triton.testing.Benchmark(
            x_names=["kv_len"], x_vals=KV_LENS,
            line_arg="provider", line_vals=PROVIDERS, line_names=PROVIDERS,
            styles=[("blue", "-"), ("blue", "--"), ("green", "-"), ("red", "-")], ylabel="GB/s",
            plot_name=f"grouped-decode-{layer}-bf16", args={"heads": heads, "kv_heads": kv_heads},
        )
        for layer, (heads, kv_heads) in LAYERS.items()
    ]

    @triton.testing.perf_report(benchmarks)
    def grouped_decode_bandwidth(kv_len: int, provider: str, heads: int, kv_heads: int):
        ms = time_ms(triton, provider, make_inputs(heads, kv_heads, kv_len, torch.bfloat16, "cuda"))
        gbytes = decode_bytes(1, heads, kv_heads, kv_len, HEAD_DIM, torch.bfloat16) * 1e-9
        return gbytes / (ms * 1e-3)

    return grouped_decode_bandwidth


def print_targets(triton, kv_len: int = 4096) -> None:
    """Issue 9's targets at 4k keys: kernel <= 1.2x SDPA decode time, >= 3x faster than materialised."""
    for layer, (heads, kv_heads) in LAYERS.items():
        inputs = make_inputs(heads, kv_heads, kv_len, torch.bfloat16, "cuda")
        ms = {provider: time_ms(triton, provider, inputs) for provider in PROVIDERS}
        print(
            f"{layer} kv_len={kv_len}: " + ", ".join(f"{name} {t * 1e3:.1f} us" for name, t in ms.items())
            + f" | kernel/sdpa = {ms['kernel'] / ms['sdpa']:.2f} (target <= 1.2)"
            + f" | materialised/(kernel+var) = {ms['materialised'] / ms['kernel+var']:.2f} (target >= 3)"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--save-path", default="", help="folder for the CSV and plots (default: print only)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("benchmarks/kernels.py: no CUDA GPU found; the decode-kernel benchmark needs one. Nothing run.")
        return 0
    try:
        import triton
        import triton.testing
    except ImportError:
        print("benchmarks/kernels.py: triton is not installed (pip install 'vlmfix[kernels]'). Nothing run.")
        return 0
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    build_report(triton).run(print_data=True, save_path=args.save_path, show_plots=False)
    print_targets(triton)
    return 0


if __name__ == "__main__":
    sys.exit(main())
