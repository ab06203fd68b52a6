"""Listwise rows -> list examples: `listwise.parse_listwise_row`, then `tokenize.PairTokenizer`'s rules.

A row (UltraFeedback's completions with ratings, `prompt` + `responses` + `scores`, or `prompt` +
`ranking`; `dpo_jax.data.listwise`) becomes ``{"prompt_ids", "response_ids", "scores"}``
(`data/list_layouts.py`): the prompt and each response tokenized as a pair's are (EOS appended,
the prompt cut at the shortest common prefix of every prompt + response, truncation to
`max_length` per sequence), the responses in row order with their scores.

Drops, counted by reason (`formats.DropCounter`; `strict=True` raises `formats.RowError` instead):
  list_malformed              a value the listwise schema rejects (null, empty text, a non-numeric
                              score, fewer than 2 responses, ...; strict names the field)
  list_longer_than_list_size  more responses than the batch's K slots (`data.list_size`)
  list_all_tied               every score equal: no order to learn (the loss is 0 with no gradient)
and the tokenizer's own (`response_ids_empty`, `prompt_fills_max_length`, ...). A row that fits no
listwise schema raises `formats.FormatError` naming the row and its keys, as a missing column does.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

import numpy as np

from dpo_jax.data import listwise
from dpo_jax.data.formats import DropCounter, FormatError, RowError
from dpo_jax.data.tokenize import Dropped, PairTokenizer

DROP_LIST_MALFORMED = "list_malformed"
DROP_LIST_TOO_MANY = "list_longer_than_list_size"
DROP_LIST_ALL_TIED = "list_all_tied"


class ListRowTokenizer:
    """Callable raw row -> list example | None (dropped; see the module doc). Picklable."""

    def __init__(self, tokenizer: Any, list_size: int, *, max_length: Optional[int] = None,
                 max_prompt_length: Optional[int] = None, truncation_mode: str = "keep_start",
                 score_field: Optional[str] = None, strict: bool = False):
        if not isinstance(list_size, int) or list_size < 2:
            raise ValueError(f"list_size={list_size!r}: expected an int >= 2 (responses per list)")
        self.list_size, self.score_field, self.strict = list_size, score_field, strict
        self.drops = DropCounter()
        self.tokenize = PairTokenizer(tokenizer, max_length=max_length, max_prompt_length=max_prompt_length,
                                      truncation_mode=truncation_mode, drops=self.drops)

    def _drop(self, reason: str, field: Optional[str], detail: str, index: Optional[int]) -> None:
        if self.strict:
            raise RowError(detail, field, reason, index)
        self.drops.drop(reason, index)

    def __call__(self, row: Mapping[str, Any], index: Optional[int] = None) -> Optional[dict]:
        self.drops.seen += 1
        try:
            parsed = listwise.parse_listwise_row(row, index, score_field=self.score_field)
        except FormatError:
            if self.strict or (isinstance(row, Mapping) and listwise.detect_schema(row) is None):
                raise  # strict, or a row of no listwise schema: the error names the field or the keys
            self.drops.drop(DROP_LIST_MALFORMED, index)
            return None
        k = len(parsed.responses)
        if k > self.list_size:
            self._drop(DROP_LIST_TOO_MANY, None, f"has {k} responses, more than data.list_size={self.list_size}",
                       index)
            return None
        if len(set(parsed.scores)) == 1:
            self._drop(DROP_LIST_ALL_TIED, None, f"scores {list(parsed.scores)} are all equal: nothing to rank",
                       index)
            return None
        try:
            prompt_ids, response_ids = self.tokenize.encode(parsed.prompt, parsed.responses, False,
                                                            ("response",) * k)
        except Dropped as d:
            self._drop(d.reason, d.field, d.detail, index)
            return None
        self.drops.kept += 1
        return {"prompt_ids": np.asarray(prompt_ids, np.int32),
                "response_ids": tuple(np.asarray(r, np.int32) for r in response_ids),
                "scores": np.asarray(parsed.scores, np.float32)}
