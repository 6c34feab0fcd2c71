"""The essay's published cost table, quoted beside the measured one (never computed)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# ------------------------------------------------------------------------------------- the essay's table


@dataclass(frozen=True)
class EssayRow:
    """One row of the essay's table, as published (a citation: rounded numbers, not ours)."""

    resolution: int  # px per side
    tokens: int  # (resolution / 16)^2
    attention_entries: float  # tokens^2, as the essay rounds it
    relative_cost: float  # attention entries relative to 224 px


ESSAY_PATCH_SIZE = 16  # the essay's patch size (quoted)

# QUOTED from the essay, not computed: "38K / 332K / 1M / 16.8M" entries, "1x / 8.7x / 26x / 440x" cost.
ESSAY_TABLE: tuple[EssayRow, ...] = (
    EssayRow(224, 196, 38e3, 1.0),
    EssayRow(384, 576, 332e3, 8.7),
    EssayRow(512, 1024, 1e6, 26.0),
    EssayRow(1024, 4096, 16.8e6, 440.0),
)


def essay_rows() -> list[dict[str, Any]]:
    """The essay's rows beside the exact numbers: tokens = (res/16)^2, entries = tokens^2, cost vs 224 px.

    Keys ending in `_essay` are the essay's (rounded) numbers; the others are computed here. Like the essay,
    this counts one head and no class token.
    """
    base = (224 // ESSAY_PATCH_SIZE) ** 4
    rows = []
    for row in ESSAY_TABLE:
        tokens = (row.resolution // ESSAY_PATCH_SIZE) ** 2
        rows.append(
            {
                "resolution": row.resolution,
                "patch_size": ESSAY_PATCH_SIZE,
                "tokens_essay": row.tokens,
                "tokens": tokens,
                "attention_entries_essay": row.attention_entries,
                "attention_entries": tokens**2,
                "relative_cost_essay": row.relative_cost,
                "relative_cost": tokens**2 / base,
            }
        )
    return rows
