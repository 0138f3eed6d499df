"""Tiny offline builds of the families whose image processor needs torchvision (no PIL backend).

Registered like `vlmfix.testing.tiny_families` (`BUILDERS`, `NESTED_IMAGES`), listed in
`vlmfix.testing.tiny.TORCHVISION_FAMILIES`; `build_tiny` checks that torchvision imports before it calls a
builder here, and their tests carry the `torchvision` marker (CI's second lane). Each builder imports
torchvision-backed classes inside its body, so this module imports without torchvision.
"""

from __future__ import annotations

from vlmfix.testing.tiny_families import Builder

BUILDERS: dict[str, Builder] = {}

# families whose processor takes one list of images per prompt
NESTED_IMAGES: frozenset[str] = frozenset()
