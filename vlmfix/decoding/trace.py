"""The contrast's per-token record (`record=True`): how each stream scored the token chosen and the token the
positive stream alone would have chosen greedily, for the pictures of `vlmfix.viz`."""

from __future__ import annotations

from typing import Any

from torch import Tensor


class ContrastTrace:
    """Per step and batch row: the chosen token, the positive stream's greedy (argmax) token, and both streams'
    log-probabilities of each. Rows are generate's rows at each step (with beams, the beams of that step)."""

    def __init__(self) -> None:
        self.chosen: list[list[int]] = []  # [steps][batch]
        self.greedy: list[list[int]] = []
        self.chosen_logprobs: list[tuple[list[float], list[float]]] = []  # per step: (positive, negative)
        self.greedy_logprobs: list[tuple[list[float], list[float]]] = []
        self._pending: tuple[Tensor, Tensor] | None = None  # the last step's log-probs, until its token is known

    def step(self, positive: Tensor, negative: Tensor) -> None:
        """Record one step from both streams' raw next-token logits ([batch, vocab] each)."""
        self.resolve(None)
        pos, neg = positive.float().log_softmax(-1), negative.float().log_softmax(-1)
        greedy = positive.argmax(-1, keepdim=True)  # [batch, 1]
        self.greedy.append(greedy[:, 0].tolist())
        self.greedy_logprobs.append((pos.gather(-1, greedy)[:, 0].tolist(), neg.gather(-1, greedy)[:, 0].tolist()))
        self._pending = (pos, neg)

    def resolve(self, tokens: Tensor | None) -> None:
        """The token chosen at the pending step ([batch]), read from the next forward's input or the output."""
        if self._pending is None or tokens is None:
            return
        pos, neg = self._pending
        index = tokens.to(pos.device).long()[:, None]  # [batch, 1]
        self.chosen.append(index[:, 0].tolist())
        self.chosen_logprobs.append((pos.gather(-1, index)[:, 0].tolist(), neg.gather(-1, index)[:, 0].tolist()))
        self._pending = None

    def report(self) -> dict[str, Any]:
        """{"rows": per row, lists over steps: tokens, greedy_tokens, and the positive / negative log-probs of
        each}; a step whose token never came back (none here) is left out."""
        steps = len(self.chosen)
        batch = len(self.greedy[0]) if self.greedy else 0
        rows = []
        for b in range(batch):
            rows.append({
                "tokens": [self.chosen[t][b] for t in range(steps)],
                "greedy_tokens": [self.greedy[t][b] for t in range(steps)],
                "chosen_positive": [self.chosen_logprobs[t][0][b] for t in range(steps)],
                "chosen_negative": [self.chosen_logprobs[t][1][b] for t in range(steps)],
                "greedy_positive": [self.greedy_logprobs[t][0][b] for t in range(steps)],
                "greedy_negative": [self.greedy_logprobs[t][1][b] for t in range(steps)],
            })
        return {"rows": rows}
