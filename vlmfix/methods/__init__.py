"""The decoding methods, one module each, and the registry by name.

`vlmfix.methods.get("vhr")` returns the class, `vlmfix.methods.names()` lists them. The engine they run
on (session, attention function, edit vocabulary, two-stream engine) is `vlmfix.decoding`; the modules
here beside the methods are what several methods share:

- `contrast`: the logit-contrast rules of the two-stream methods (VCD, DCD, PAI's refinement);
- `image_boost`: PAI's image-key boost (z + a|z|) and its layer band, used by PAI and DualStream;
- `image_free`: the image-free refinement stream of PAI and DualStream;
- `newest_row`: edits of the newest query row that depend on that row's own attention;
- `content_words`: informative words of an instruction (GIFT);
- `vision_attention`: per-image-token scores from the vision tower's attention (DualStream);
- `dcd_lora`: DCD's negative-side LoRA adapters;
- `image_selection`: image tokens chosen from the language model's own attention (SID, AvisC).
- `opera_rules`: OPERA's column scores and rollback rule (its beam search is `vlmfix.decoding.opera`).
"""

from __future__ import annotations

from vlmfix.decoding.method import METHODS, Method
from vlmfix.methods.avisc import AvisC
from vlmfix.methods.dcd import DCD
from vlmfix.methods.dola import DoLa
from vlmfix.methods.dual_stream import DualStream
from vlmfix.methods.gift import GIFT
from vlmfix.methods.icd import ICD
from vlmfix.methods.m3id import M3ID
from vlmfix.methods.opera import OPERA
from vlmfix.methods.pai import PAI
from vlmfix.methods.sid import SID
from vlmfix.methods.var import VAR
from vlmfix.methods.vcd import VCD
from vlmfix.methods.vhr import VHR


def get(name: str) -> type[Method]:
    """The method class registered as `name`; the error lists the available names."""
    return METHODS.get(name)


def names() -> list[str]:
    return METHODS.names()


def create(name: str, **params: object) -> Method:
    """An instance of the method `name` with `params` (validated by its constructor)."""
    return get(name)(**params)


__all__ = [
    "DCD", "GIFT", "ICD", "M3ID", "OPERA", "PAI", "SID", "AvisC", "VAR", "VCD", "VHR", "DoLa", "DualStream",
    "create", "get", "names",
]
