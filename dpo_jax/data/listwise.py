"""Listwise preference rows: one prompt, K >= 2 responses and a score per response (higher is better).

Accepted schemas (`parse_listwise_row` detects which from the keys):

| schema         | keys                                   | scores                                      |
| -------------- | -------------------------------------- | ------------------------------------------- |
| `ultrafeedback`| instruction, completions: [{response,  | the `score_field` of each completion        |
|                | overall_score, fine-grained_score, ..}]|                                             |
| `scored`       | prompt, responses: [str], scores: [num]| as given                                    |
| `ranking`      | prompt, ranking: [str, best first]     | K - 1, K - 2, ..., 0 (distinct, best first) |

UltraFeedback (openbmb/UltraFeedback) gives each completion two scores: `overall_score`, the 1-10
rating of GPT-4's critique, and `fine-grained_score`, the mean of the four 1-5 aspect ratings
(helpfulness, honesty, instruction-following, truthfulness). The default score is `overall_score`,
falling back to `fine-grained_score` where a completion lacks it: HuggingFaceH4/ultrafeedback_binarized
(the Zephyr data) picks its chosen response by `overall_score` (its `score_chosen` values are on the
1-10 scale). `score_field="fine-grained_score"` uses the aspect mean instead (Argilla's
re-binarization, which found `overall_score` unreliable on some rows).

Equal scores are ties; the listwise losses treat tied responses as unordered
(`dpo_jax.losses.listwise`). A malformed row raises `FormatError` naming the source, the row (0-based)
and the field (`completions[2].overall_score`).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple, Optional

from dpo_jax.data.formats import LISTWISE_COLUMNS, FormatError

SCHEMAS = ("ultrafeedback", "scored", "ranking")  # one per column of LISTWISE_COLUMNS
DEFAULT_SCORE_FIELDS = ("overall_score", "fine-grained_score")  # the first present is used


class ListRow(NamedTuple):
    """A parsed row: the prompt, K >= 2 responses, and their float scores (higher is better)."""

    prompt: str
    responses: tuple[str, ...]
    scores: tuple[float, ...]


def detect_schema(row: Mapping[str, Any]) -> Optional[str]:
    """The schema whose keys the row has (its column of `formats.LISTWISE_COLUMNS`: completions,
    responses, ranking, in that order of precedence), or None."""
    column = next((c for c in LISTWISE_COLUMNS if c in row), None)
    return None if column is None else SCHEMAS[LISTWISE_COLUMNS.index(column)]


def _err(detail: str, field: Optional[str], index: Optional[int], source: Optional[str]) -> FormatError:
    return FormatError(detail, field=field, row=index, source=source)


def _text(value: Any, field: str, index, source) -> str:
    if value is None:
        raise _err("is missing (null)", field, index, source)
    if not isinstance(value, str):
        raise _err(f"must be a string, got {type(value).__name__}", field, index, source)
    if not value.strip():
        raise _err("is empty", field, index, source)
    return value


def _score(value: Any, field: str, index, source) -> float:
    """A finite float; numeric strings ("8.5") are accepted, booleans and "N/A" are not."""
    if value is None:
        raise _err("is missing (null)", field, index, source)
    out = None
    if isinstance(value, (numbers.Real, str)) and not isinstance(value, bool):
        try:
            out = float(value)
        except ValueError:
            pass
    if out is None:
        raise _err(f"must be a number, got {value!r}", field, index, source)
    if not math.isfinite(out):
        raise _err(f"must be a finite number, got {value!r}", field, index, source)
    return out


def _list(value: Any, field: str, index, source) -> Sequence:
    if value is None:
        raise _err("is missing (null)", field, index, source)
    if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Sequence):
        raise _err(f"must be a list, got {type(value).__name__}", field, index, source)
    if len(value) < 2:
        raise _err(f"must hold at least 2 responses, got {len(value)}", field, index, source)
    return value


def _get(row: Mapping[str, Any], key: str, index, source) -> Any:
    if key not in row:
        raise _err(f"is missing (the row has {sorted(row)})", key, index, source)
    return row[key]


def parse_listwise_row(row: Mapping[str, Any], index: Optional[int] = None, source: Optional[str] = None,
                       score_field: Optional[str] = None) -> ListRow:
    """(prompt, responses, scores) of one row of any schema in `SCHEMAS` (module doc).

    `score_field` (ultrafeedback only): the completion key holding the score; None takes the first
    of `DEFAULT_SCORE_FIELDS` present in each completion. Raises `FormatError` naming `source`, the
    row `index` and the field when the row is malformed: a missing or null field, a non-string or
    empty text, fewer than 2 responses, a non-numeric or non-finite score, scores and responses of
    different lengths.
    """
    if not isinstance(row, Mapping):
        raise _err(f"is not a mapping but {type(row).__name__}", None, index, source)
    schema = detect_schema(row)
    if schema is None:
        raise _err(f"fits no listwise schema: it has keys {sorted(row)}; expected 'instruction' + 'completions' "
                   "(UltraFeedback), 'prompt' + 'responses' + 'scores', or 'prompt' + 'ranking'", None, index, source)
    if schema == "ultrafeedback":
        prompt = _text(_get(row, "instruction", index, source), "instruction", index, source)
        completions = _list(row["completions"], "completions", index, source)
        responses, scores = [], []
        for i, comp in enumerate(completions):
            where = f"completions[{i}]"
            if not isinstance(comp, Mapping):
                raise _err(f"must be a mapping with a 'response', got {type(comp).__name__}", where, index, source)
            responses.append(_text(comp.get("response"), f"{where}.response", index, source))
            keys = (score_field,) if score_field is not None else DEFAULT_SCORE_FIELDS
            key = next((k for k in keys if comp.get(k) is not None), None)
            if key is None:
                raise _err(f"has no score: none of {list(keys)} is present", where, index, source)
            scores.append(_score(comp[key], f"{where}.{key}", index, source))
    elif schema == "scored":
        prompt = _text(_get(row, "prompt", index, source), "prompt", index, source)
        raw = _list(row["responses"], "responses", index, source)
        responses = [_text(r, f"responses[{i}]", index, source) for i, r in enumerate(raw)]
        raw_scores = _get(row, "scores", index, source)
        if isinstance(raw_scores, (str, bytes, Mapping)) or not isinstance(raw_scores, Sequence):
            raise _err(f"must be a list of numbers, got {type(raw_scores).__name__}", "scores", index, source)
        if len(raw_scores) != len(responses):
            raise _err(f"has {len(raw_scores)} entries for {len(responses)} responses", "scores", index, source)
        scores = [_score(s, f"scores[{i}]", index, source) for i, s in enumerate(raw_scores)]
    else:
        prompt = _text(_get(row, "prompt", index, source), "prompt", index, source)
        raw = _list(row["ranking"], "ranking", index, source)
        responses = [_text(r, f"ranking[{i}]", index, source) for i, r in enumerate(raw)]
        scores = [float(len(responses) - 1 - i) for i in range(len(responses))]
    return ListRow(prompt, tuple(responses), tuple(scores))
