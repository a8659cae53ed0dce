"""``--target-sqnr``: give each tensor the cheapest scheme whose measured SQNR reaches a
target, or leave it in its dtype."""

from __future__ import annotations

import math

from ..core.scheme import Method, Scheme
from ..core.stats import ErrorStats
from ..formats import Codec
from ..storage.checkpoint import Checkpoint
from ..storage.reader import SafetensorsReader
from ..storage.stream import ShardStream, TensorChunks
from .plan import TensorPlan
from .tensor import quantized_chunks

#: The schemes --target-sqnr tries, from the smallest output to the largest.
LADDER: tuple[tuple[str, int | None], ...] = (
    ("tensor", None), ("channel", None), ("block", 128), ("block", 64), ("block", 32))


def choose_for_target(
    checkpoint: Checkpoint, plans: dict[str, list[TensorPlan]], method: Method,
    target_db: float, codec: Codec, chunk_bytes: int,
) -> dict[str, list[TensorPlan]]:
    """The plans with each quantized tensor's scheme replaced by the cheapest one of
    :data:`LADDER` that reaches ``target_db``; a tensor that reaches it with none is
    copied. The reason lists what every candidate tried reached."""
    chosen = {}
    for shard in checkpoint.shards:
        shard_plans = plans[shard.path.name]
        measured = [plan for plan in shard_plans if plan.quantized]
        # The first candidate's row view: the one read ahead.
        first = Scheme(method, *LADDER[0])  # type: ignore[arg-type]
        layout = [(plan.entry, first.row_view_shape(plan.entry.shape), 1) for plan in measured]
        with SafetensorsReader(shard.path) as reader, \
                ShardStream(reader, layout, chunk_bytes) as stream:
            chosen[shard.path.name] = [
                _choose(stream, plan, method, target_db, codec) if plan.quantized else plan
                for plan in shard_plans]
    return chosen


def _choose(stream: ShardStream, plan: TensorPlan, method: Method, target_db: float,
            codec: Codec) -> TensorPlan:
    tried = []
    views: dict[tuple[int, int], TensorChunks] = {}
    for granularity, block in LADDER:
        scheme = Scheme(method, granularity, block)  # type: ignore[arg-type]
        row_shape = scheme.row_view_shape(plan.entry.shape)
        if row_shape not in views:
            views[row_shape] = stream.rows(plan.entry, row_shape, codec.row_multiple(scheme))
        sqnr = _measure(views[row_shape], scheme, codec).sqnr_db
        reached = sqnr >= target_db
        label = granularity if block is None else f"block {block}"
        measured = "exact" if math.isinf(sqnr) else f"{sqnr:.1f} dB"
        tried.append(f"{label} {measured} {'≥' if reached else '<'} {target_db:g}")
        if reached:
            return plan.with_scheme(scheme, "; ".join(tried), codec)
    return plan.with_scheme(None, "no scheme reaches the target: " + "; ".join(tried), codec)


def _measure(chunks: TensorChunks, scheme: Scheme, codec: Codec) -> ErrorStats:
    """The error statistics ``scheme`` would give the tensor, writing nothing."""
    stats = ErrorStats()
    for _, _, result in quantized_chunks(chunks, scheme, codec, with_stats=True):
        assert result.stats is not None
        stats = stats.merge(result.stats)
    return stats
