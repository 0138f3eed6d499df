"""The decoding pipeline: sessions, the attention hook, the edit vocabulary and the methods."""

from vlmfix.decoding.edits import Edit, FusionReweight, HeadScale, KeyBias, Reweight, Transfer
from vlmfix.decoding.generate import generate
from vlmfix.decoding.method import METHODS, Method, register_method
from vlmfix.decoding.session import Session, apply

__all__ = [
    "Edit", "FusionReweight", "HeadScale", "KeyBias", "Reweight", "Transfer",
    "generate", "METHODS", "Method", "register_method", "Session", "apply",
]
