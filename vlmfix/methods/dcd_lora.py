"""DCD's fallback (spec D2, `trainable="projector+lora_neg"`): low-rank adapters on the language model
that act on the negative stream only.

When a negative projector alone cannot pull the two streams' logits apart, the negative stream also
gets LoRA deltas on chosen linear layers of the language model: y = W x + (alpha / rank) * up(down(x)).
The deltas are applied by forward hooks to the rows the caller names (during DCD decoding: the
negative half of the batched [positive; negative] forward), so the positive stream and the model's own
weights are untouched and both streams still share one forward.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn

from vlmfix.adapters import get_adapter
from vlmfix.errors import CheckpointError

PREFIX = "lora."
# rows(): the batch rows to adapt in the forward running now; None = none of them
RowSelector = Callable[[], slice | None]


@dataclass(frozen=True)
class LoraSpec:
    """Shape of the negative-stream adapters: `rank`, scale `alpha / rank`, and the names of the
    language model's linear layers they adapt (matched on the last component: "q_proj", "v_proj")."""

    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = ("q_proj", "v_proj")

    def __post_init__(self) -> None:
        object.__setattr__(self, "targets", tuple(self.targets))
        if not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"`lora_rank` must be an int >= 1, got {self.rank!r}.")
        if not self.alpha > 0:
            raise ValueError(f"`lora_alpha` must be > 0, got {self.alpha!r}.")
        if not self.targets:
            raise ValueError("`lora_targets` must name at least one linear layer (e.g. ['q_proj', 'v_proj']).")

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def as_dict(self) -> dict:
        return asdict(self)


def target_layers(model: nn.Module, targets: Sequence[str]) -> dict[str, nn.Linear]:
    """The language model's linear layers whose name ends with one of `targets`, by qualified name."""
    language_model = get_adapter(model).language_model
    found = {name: module for name, module in language_model.named_modules()
             if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in targets}
    if not found:
        names = sorted({n.rsplit(".", 1)[-1] for n, m in language_model.named_modules() if isinstance(m, nn.Linear)})
        raise ValueError(f"no linear layer of the language model is named {list(targets)}; its linear layers are "
                         f"named {names}.")
    return found


class NegativeLora(nn.Module):
    """LoRA factors for the target layers of `model`, each on its layer's device: `down` [rank, in]
    (Kaiming-uniform) and `up` [out, rank] (zeros, so a fresh adapter changes nothing), in fp32 for
    training. `init=False` (loading) leaves them uninitialised in the layer's dtype, so decoding casts
    nothing, and draws nothing from the random generators."""

    def __init__(self, model: nn.Module, spec: LoraSpec, *, init: bool = True) -> None:
        super().__init__()
        self.spec = spec
        self.layers = target_layers(model, spec.targets)
        self.down = nn.ParameterDict()
        self.up = nn.ParameterDict()
        for name, layer in self.layers.items():
            key, device = _key(name), layer.weight.device
            dtype = torch.float32 if init else layer.weight.dtype
            down = torch.empty(spec.rank, layer.in_features, device=device, dtype=dtype)
            if init:
                nn.init.kaiming_uniform_(down, a=math.sqrt(5))
            self.down[key] = nn.Parameter(down)
            self.up[key] = nn.Parameter(torch.zeros(layer.out_features, spec.rank, device=device, dtype=dtype))

    def delta(self, name: str, x: Tensor) -> Tensor:
        """(alpha / rank) * up(down(x)) for the layer `name`; x: [..., in] -> [..., out]."""
        key = _key(name)
        down = self.down[key].to(x.device, x.dtype)  # no-op unless the model moved since loading
        up = self.up[key].to(x.device, x.dtype)
        return nn.functional.linear(nn.functional.linear(x, down), up) * self.spec.scaling

    def hooks(self, rows: RowSelector) -> list[tuple[nn.Linear, Callable[..., Tensor | None]]]:
        """(layer, forward hook) pairs adding the deltas to the rows `rows()` selects (None: no row)."""

        def make(name: str) -> Callable[..., Tensor | None]:
            def hook(module: nn.Module, args: tuple, output: Tensor) -> Tensor | None:
                selected = rows()
                if selected is None:
                    return None
                x = args[0]  # [batch, seq, in]
                out = output.clone()
                out[selected] = out[selected] + self.delta(name, x[selected])
                return out

            return hook

        return [(layer, make(name)) for name, layer in self.layers.items()]

    @contextmanager
    def attached(self, rows: RowSelector) -> Iterator[None]:
        """Inside the block the deltas act on the rows `rows()` selects."""
        handles = [layer.register_forward_hook(hook) for layer, hook in self.hooks(rows)]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def tensors(self) -> dict[str, Tensor]:
        """The factors as flat checkpoint tensors: lora.<layer>.down / lora.<layer>.up."""
        out = {}
        for name in self.layers:
            out[f"{PREFIX}{name}.down"] = self.down[_key(name)].detach().to("cpu").clone()
            out[f"{PREFIX}{name}.up"] = self.up[_key(name)].detach().to("cpu").clone()
        return out

    @classmethod
    def from_tensors(cls, model: nn.Module, spec: LoraSpec, tensors: Mapping[str, Tensor],
                     source: str = "the checkpoint") -> NegativeLora:
        """Rebuild the adapters for `model` from `tensors()`; CheckpointError when they do not fit it."""
        lora = cls(model, spec, init=False)
        wanted = {f"{PREFIX}{n}.{part}": tuple(getattr(lora, part)[_key(n)].shape)
                  for n in lora.layers for part in ("down", "up")}
        found = {k: tuple(v.shape) for k, v in tensors.items()}
        if wanted != found:
            missing = sorted(set(wanted) - set(found))[:3]
            extra = sorted(set(found) - set(wanted))[:3]
            bad = sorted(k for k in set(wanted) & set(found) if wanted[k] != found[k])[:3]
            raise CheckpointError(
                f"the negative-stream LoRA in {source} does not fit this model's language model (missing "
                f"{missing}, unexpected {extra}, wrong shapes {bad}); train it for this model."
            )
        with torch.no_grad():
            for name in lora.layers:
                lora.down[_key(name)].copy_(tensors[f"{PREFIX}{name}.down"])
                lora.up[_key(name)].copy_(tensors[f"{PREFIX}{name}.up"])
        return lora.requires_grad_(False)


def _key(name: str) -> str:
    return name.replace(".", "__")  # ParameterDict keys cannot hold dots
