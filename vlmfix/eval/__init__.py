"""Benchmark scoring and data loading: CHAIR (`vlmfix.eval.chair`), POPE (`vlmfix.eval.pope`) and the run
fingerprint (`vlmfix.eval.fingerprint`). No model code; offline; caches are JSON with a content hash."""

from vlmfix.eval import amber, chair, hallusion, mme, pope, yesno
from vlmfix.eval.errors import EvalInputError, MissingGroundTruthError, NormalizerUnavailableError
from vlmfix.eval.fingerprint import (
    Decoding,
    amber_protocol,
    chair_protocol,
    fingerprint_hash,
    hallusion_protocol,
    library_versions,
    mme_protocol,
    pope_protocol,
    protocol_fingerprint,
)

__all__ = [
    "Decoding",
    "EvalInputError",
    "MissingGroundTruthError",
    "NormalizerUnavailableError",
    "amber",
    "amber_protocol",
    "chair",
    "chair_protocol",
    "fingerprint_hash",
    "hallusion",
    "hallusion_protocol",
    "library_versions",
    "mme",
    "mme_protocol",
    "pope",
    "pope_protocol",
    "protocol_fingerprint",
    "yesno",
]
