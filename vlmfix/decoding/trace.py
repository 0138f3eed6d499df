"""The contrast's per-token record (`record=True`): how each stream scored the token chosen and the token the
positive stream alone would have chosen greedily, for the pictures of `vlmfix.viz`."""

from __future__ import annotations

from typing import Any

from torch import Tensor


class ContrastTrace:
    """Per step and batch row: the chosen token, the positive stream's greedy (argmax) token, and both streams'
    log-probabilities of each. Rows are generate's rows at each step (with beams, the beams of that step)."""

    def __init__(self) -> None:
        # per step, kept on the device until `report()` (no host sync while decoding)
        self.chosen: list[Tensor] = []  # [batch] each
        self.greedy: list[Tensor] = []
        self.chosen_logprobs: list[tuple[Tensor, Tensor]] = []  # (positive, negative), [batch] each
        self.greedy_logprobs: list[tuple[Tensor, Tensor]] = []
        self._pending: tuple[Tensor, Tensor] | None = None  # the last step's log-probs, until its token is known

    def step(self, positive: Tensor, negative: Tensor) -> None:
        """Record one step from both streams' raw next-token logits ([batch, vocab] each)."""
        pos, neg = positive.float().log_softmax(-1), negative.float().log_softmax(-1)
        greedy = positive.argmax(-1, keepdim=True)  # [batch, 1]
        self.greedy.append(greedy[:, 0])
        self.greedy_logprobs.append((pos.gather(-1, greedy)[:, 0], neg.gather(-1, greedy)[:, 0]))
        self._pending = (pos, neg)

    def resolve(self, tokens: Tensor | None) -> None:
        """The token chosen at the pending step ([batch]), read from the next forward's input or the output."""
        if self._pending is None or tokens is None:
            return
        pos, neg = self._pending
        index = tokens.to(pos.device).long()[:, None]  # [batch, 1]
        self.chosen.append(index[:, 0])
        self.chosen_logprobs.append((pos.gather(-1, index)[:, 0], neg.gather(-1, index)[:, 0]))
        self._pending = None

    def report(self) -> dict[str, Any]:
        """{"rows": per row, lists over steps: tokens, greedy_tokens, and the positive / negative log-probs of
        each}; a step whose token never came back (none here) is left out."""
        steps = len(self.chosen)
        batch = len(self.greedy[0]) if self.greedy else 0

        def per_row(values: list[list[Any]]) -> list[list[Any]]:  # steps x [batch] -> [batch][steps]
            return [[v[b] for v in values] for b in range(batch)]

        columns = {
            "tokens": [t.tolist() for t in self.chosen],
            "greedy_tokens": [t.tolist() for t in self.greedy[:steps]],
            "chosen_positive": [p.tolist() for p, _ in self.chosen_logprobs],
            "chosen_negative": [n.tolist() for _, n in self.chosen_logprobs],
            "greedy_positive": [p.tolist() for p, _ in self.greedy_logprobs[:steps]],
            "greedy_negative": [n.tolist() for _, n in self.greedy_logprobs[:steps]],
        }
        by_row = {name: per_row(values) for name, values in columns.items()}
        return {"rows": [{name: by_row[name][b] for name in columns} for b in range(batch)]}
