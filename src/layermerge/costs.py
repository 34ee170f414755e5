"""What the blocks of a plan cost by a latency table: the one place that says which
entry (or sidecar value) prices a block, shared by the latency prediction and the
solver."""

from __future__ import annotations

from .plan import PlanBlock
from .tables import Table, TableError, format_key


def block_latency_ms(
    table: Table, block: PlanBlock, *, missing_dropped_ms: float | None = None
) -> float:
    """What ``block`` of a plan costs by ``table``: its option's entry (the merged conv
    in context: the residual adds it owns, its end activation), the entry without
    activation for a block that removes it (``latency_noact_ms``), and for a block
    that keeps no conv, its empty option's row or the ``dropped_ms`` of its conv
    (``missing_dropped_ms`` where the table has neither; by default that is an error)."""
    if not block.kept_convs:
        try:
            row = table.row(block.key)
        except KeyError:
            row = None
        if row is not None and not row["kept_convs"]:
            return float(row["latency_ms"])
        dropped = table.meta.get("dropped_ms") or {}
        if block.length == 1 and str(block.end) in dropped:
            return float(dropped[str(block.end)])
        if missing_dropped_ms is not None:
            return missing_dropped_ms
        raise TableError(
            f"{table.name} has no cost for dropping the convs of block "
            f"({block.start}, {block.end}); measure the whole table (dropped_ms)"
        )
    try:
        row = table.row(block.key)
    except KeyError:
        raise TableError(
            f"{table.name} has no entry for the plan's block {format_key(block.key)}; "
            "measure the whole search space"
        ) from None
    if block.activation:
        return float(row["latency_ms"])
    value = row.get("latency_noact_ms")
    if value is None:
        raise TableError(
            f"{table.name} has no entry without activation for block "
            f"{format_key(block.key)} (measured only for options keeping all their convs)"
        )
    return float(value)
