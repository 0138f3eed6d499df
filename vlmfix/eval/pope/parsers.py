"""POPE's answer parsers: the shared yes/no registry `vlmfix.eval.yesno` (spec Part 0), under the names POPE
always used (`official`, `opera`, `vcd_substring`, `exact`, `yesno_words`). Kept as an import path."""

from vlmfix.eval.yesno import NO, PARSERS, UNKNOWN, YES, AnswerParser, get_parser, parse_answer

__all__ = ["NO", "PARSERS", "UNKNOWN", "YES", "AnswerParser", "get_parser", "parse_answer"]
