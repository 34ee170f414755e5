"""What the blocks of a plan cost by a latency table: the one place that says which
entry (or sidecar value) prices a block, shared by the latency prediction and the
solver."""

from __future__ import annotations

from .chain import repeats_activation
from .plan import PlanBlock
from .tables import Table, TableError, format_key


def _node_activation(table: Table, node: int) -> tuple[str | None, bool]:
    """(activation, whether it follows a residual add) of chain node ``node``, read
    from the row of the single conv that ends there (node 0, the input: none)."""
    if node <= 0:
        return None, False
    for r in table.rows:
        if r["start"] == node - 1 and r["end"] == node and r["kept_convs"]:
            return (r.get("activation") or None), bool(r.get("skips"))
    return None, False


def drop_repeats_activation(table: Table, conv: int) -> bool:
    """Whether dropping conv ``conv`` leaves only an activation that repeats the one
    before it (no residual add at its node, the same idempotent activation at the
    node before, which every block of the dropping methods keeps): the deploy
    network omits it, so the drop costs nothing."""
    act, owns_add = _node_activation(table, conv)
    previous, _ = _node_activation(table, conv - 1)
    return not owns_add and repeats_activation(previous, act)


def block_latency_ms(
    table: Table, block: PlanBlock, *, missing_dropped_ms: float | None = None
) -> float:
    """What ``block`` of a plan costs by ``table``: its option's entry (the merged conv
    in context: the residual adds it owns, its end activation), the entry without
    activation for a block that removes it (``latency_noact_ms``), and for a block
    that keeps no conv, its empty option's row or the ``dropped_ms`` of its conv
    (``missing_dropped_ms`` where the table has neither; by default that is an error),
    nothing where what is left is a repeated activation
    (:func:`drop_repeats_activation`)."""
    if not block.kept_convs:
        try:
            row = table.row(block.key)
        except KeyError:
            row = None
        if row is not None and not row["kept_convs"]:
            return float(row["latency_ms"])
        dropped = table.meta.get("dropped_ms") or {}
        if block.length == 1 and drop_repeats_activation(table, block.end):
            # tables measured before the deploy network omitted the repeat timed it
            return 0.0
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
