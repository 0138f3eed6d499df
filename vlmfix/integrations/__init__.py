"""Integrations with other evaluation harnesses: lmms-eval (`vlmfix.integrations.lmms_eval`, the `[lmms]` extra)."""
