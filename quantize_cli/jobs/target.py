"""Schemes chosen by measurement: ``--target-sqnr`` (each tensor gets the cheapest scheme
whose SQNR reaches a target) and ``--target-bits`` (the checkpoint gets the schemes of
least total squared error within an average number of bits per weight).

Both measure every candidate scheme of every tensor they decide (reading its data once
per candidate; the page cache serves the repeats), writing nothing.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from ..core import ErrorStats, Scheme
from ..errors import InputError, located
from ..formats import Deployment, ModelFormat
from ..storage.checkpoint import Checkpoint
from ..storage.reader import SafetensorsReader
from ..storage.stream import TensorChunks
from .calibration import Calibration, CalibrationStatistics, calibration_of
from .plan import TensorPlan
from .reports import Progress
from .source import Source, SourceStream
from .tensor import quantized_chunks

#: The bits --target-bits chooses among.
TARGET_BITS = (4, 8)


@dataclass(frozen=True)
class Candidate:
    """One way to store a tensor and what it costs: ``scheme`` None keeps it as it is."""

    scheme: Scheme | None
    output_bytes: int
    # The error the choice is made by: of the weight's round trip, or, with calibration,
    # of the layer's output (signal and error energies); empty (exact) when kept.
    stats: ErrorStats


def measure(source: Source, plans: dict[str, list[TensorPlan]], schemes: Sequence[Scheme],
            fmt: ModelFormat, deployment: Deployment, chunk_bytes: int, progress: Progress,
            enough_db: float | None = None,
            statistics: CalibrationStatistics | None = None) -> dict[str, list[Candidate]]:
    """The candidates of every tensor of ``plans`` that qz selects and no ``--rule``
    decides: keeping it in its dtype first, then each of ``schemes`` the format can store
    for it, with the error each gives; with ``enough_db``, the schemes after the first
    that reaches it are not measured. With calibration ``statistics``, a calibrated
    layer's candidates are quantized for its output, and measured by its output error.
    Every value read is counted in ``progress``."""
    decided = {name: [plan for plan in shard_plans if _open(plan)]
               for name, shard_plans in plans.items()}
    progress.start(sum(plan.entry.nbytes for shard_plans in decided.values()
                       for plan in shard_plans) * len(schemes), "measuring")
    candidates = {}
    for shard in source.shards:
        measured = decided[shard.path.name]
        layout = [(plan.entry, schemes[0].row_view_shape(plan.entry.shape), 1)
                  for plan in measured]
        with SafetensorsReader(shard.path) as reader, \
                SourceStream(shard, reader, layout, chunk_bytes) as stream:
            for plan in measured:
                candidates[plan.name] = _candidates(stream, plan, schemes, fmt, deployment,
                                                    progress, enough_db,
                                                    calibration_of(statistics, plan.entry))
    return candidates


def _open(plan: TensorPlan) -> bool:
    """Whether a target decides the plan: selected, and not decided by a --rule."""
    return plan.selected and plan.rule is None


def _candidates(stream: SourceStream, plan: TensorPlan, schemes: Sequence[Scheme],
                fmt: ModelFormat, deployment: Deployment, progress: Progress,
                enough_db: float | None, calibration: Calibration | None) -> list[Candidate]:
    entry = plan.entry
    found = [Candidate(None, entry.nbytes, ErrorStats())]
    views: dict[tuple[tuple[int, int], int], TensorChunks] = {}
    for number, scheme in enumerate(schemes):
        if enough_db is not None and found[-1].scheme is not None \
                and found[-1].stats.sqnr_db >= enough_db:
            progress.advance(entry.nbytes * (len(schemes) - number), entry.name)
            break
        if scheme.shape_problem(entry.shape) or fmt.keep_reason(entry, scheme, deployment):
            progress.advance(entry.nbytes, entry.name)
            continue
        layout = fmt.layout_for(scheme)
        view = (scheme.row_view_shape(entry.shape), layout.row_multiple(scheme))
        if view not in views:
            views[view] = stream.rows(entry, *view)
        stats = ErrorStats()
        for _, rows, result in quantized_chunks(views[view], scheme, layout, with_stats=True,
                                                calibration=calibration):
            assert result.stats is not None
            measured = result.stats if result.output is None else ErrorStats(
                count=result.stats.count, signal_energy=result.output.signal,
                error_energy=result.output.error)
            stats = stats.merge(measured)
            progress.advance(rows.size * entry.nbytes // entry.numel, entry.name)
        found.append(Candidate(scheme, plan.with_scheme(scheme, "", fmt).output_bytes, stats))
    return found


def _where(scheme: Scheme | None) -> str:
    """A candidate in a reason: its granularity, and its bits below 8."""
    if scheme is None:
        return "kept"
    where = f"block {scheme.block_size}" if scheme.granularity == "block" else scheme.granularity
    return where if scheme.bits == 8 else f"int{scheme.bits} {where}"


def _trail(candidates: Sequence[Candidate], target_db: float) -> str:
    """What each candidate reached against the target, for the reason column."""
    parts = []
    for candidate in candidates[1:]:
        sqnr = candidate.stats.sqnr_db
        measured = "exact" if math.isinf(sqnr) else f"{sqnr:.1f} dB"
        where = _where(candidate.scheme)
        parts.append(f"{where} {measured} {'≥' if sqnr >= target_db else '<'} {target_db:g}")
    return "; ".join(parts)


def _units(names: Sequence[str], fmt: ModelFormat) -> dict[str, list[str]]:
    """The tensors a target decides together: the layers a runtime fuses (which must
    share a scheme), each other tensor alone."""
    units: dict[str, list[str]] = {}
    for name in names:
        units.setdefault(fmt.fused_with(name) or name, []).append(name)
    return units


def _joint(found: Sequence[Sequence[Candidate]]) -> list[list[Candidate]]:
    """For each scheme that every member of a unit can take (keeping first), the
    members' candidates with it."""
    return [[next(c for c in member if c.scheme == candidate.scheme) for member in found]
            for candidate in found[0]
            if all(any(c.scheme == candidate.scheme for c in member) for member in found)]


def _together(group: Sequence[Candidate]) -> Candidate:
    """A unit's members with one scheme, as one candidate: their bytes and errors."""
    return Candidate(group[0].scheme, sum(c.output_bytes for c in group),
                     ErrorStats.total(c.stats for c in group))


def choose_for_sqnr(plans: dict[str, list[TensorPlan]], candidates: dict[str, list[Candidate]],
                    target_db: float, fmt: ModelFormat) -> dict[str, list[TensorPlan]]:
    """Each measured tensor with the cheapest candidate that reaches ``target_db`` (the
    ladder's order breaks ties), layers a runtime fuses with the cheapest that all of them
    reach; kept as it is if none does."""
    chosen: dict[str, Candidate | None] = {}
    for names in _units(list(candidates), fmt).values():
        joint = _joint([candidates[name] for name in names])
        reaching = [group for group in joint[1:]
                    if all(c.stats.sqnr_db >= target_db for c in group)]
        best = min(reaching, key=lambda group: _together(group).output_bytes) if reaching \
            else None  # min keeps the first of ties
        for number, name in enumerate(names):
            chosen[name] = None if best is None else best[number]

    units = _units(list(candidates), fmt)
    alone = {name for names in units.values() if len(names) == 1 for name in names}

    def choose(plan: TensorPlan, found: list[Candidate]) -> TensorPlan:
        trail = _trail(found, target_db)
        pick = chosen[plan.name]
        if pick is None:
            why = ("no scheme reaches the target" if plan.name in alone else
                   "no scheme reaches the target in every layer it is fused with")
            return plan.with_scheme(None, f"{why}: {trail}", fmt)
        return plan.with_scheme(pick.scheme, trail, fmt)

    return _replace(plans, candidates, choose)


def choose_for_bits(checkpoint: Checkpoint, plans: dict[str, list[TensorPlan]],
                    candidates: dict[str, list[Candidate]], target_bits: float,
                    target_db: float | None, fmt: ModelFormat) -> dict[str, list[TensorPlan]]:
    """The candidates of least total squared error whose output averages at most
    ``target_bits`` per weight over the tensors qz selects (ruled ones and those the format
    keeps in float included, at what they cost); with ``target_db``, only candidates that
    reach it. Layers a runtime fuses get one scheme together.

    The choice solves this multiple-choice knapsack by dynamic programming over the
    budget in 2^15 steps (each candidate's bytes rounded up to whole steps, so the answer
    always fits), then spends what the rounding left on the upgrades that remove the most
    error per byte. It is never worse than giving every tensor one same scheme that fits.

    Raises:
        InputError: even the smallest candidates exceed ``target_bits``.
    """
    every = [plan for shard_plans in plans.values() for plan in shard_plans if plan.selected]
    elements = sum(plan.entry.numel for plan in every)
    budget = math.floor(target_bits * elements / 8)
    units = _units(list(candidates), fmt)
    groups = {key: [group for number, group in enumerate(_joint([candidates[name]
                                                                  for name in names]))
                    if number == 0 or target_db is None
                    or all(c.stats.sqnr_db >= target_db for c in group)]
              for key, names in units.items()}
    allowed = {key: [_together(group) for group in found] for key, found in groups.items()}
    fixed = sum(plan.output_bytes for plan in every if plan.name not in candidates)
    smallest = fixed + sum(min(c.output_bytes for c in found) for found in allowed.values())
    if smallest > budget:
        raise InputError(
            located(checkpoint.source, None, f"cannot be stored in {target_bits:g} bits per "
                    f"weight: the smallest schemes the format allows"
                    + ("" if target_db is None else f" that reach {target_db:g} dB")
                    + f" need {8 * smallest / elements:.3f} bits per weight"),
            hint="raise --target-bits" + ("" if target_db is None else " or lower --target-sqnr"))
    picks = _fill(_knapsack(allowed, budget - fixed), allowed, budget - fixed)
    for uniform in _uniform_picks(allowed):
        if _bytes(uniform) <= budget - fixed and _error(uniform) < _error(picks):
            picks = uniform
    chosen = {name: next(group for group in groups[key] if group[0].scheme
                         == picks[key].scheme)[number]
              for key, names in units.items() for number, name in enumerate(names)}

    def choose(plan: TensorPlan, found: list[Candidate]) -> TensorPlan:
        pick = chosen[plan.name]
        bits = 8 * pick.output_bytes / plan.entry.numel
        sqnr = pick.stats.sqnr_db
        reason = (f"--target-bits {target_bits:g}: {bits:.2f} bits/weight, "
                  + ("exact" if math.isinf(sqnr) else f"{sqnr:.1f} dB"))
        return plan.with_scheme(pick.scheme, reason, fmt)

    return _replace(plans, candidates, choose)


#: The budget's resolution in the dynamic programme: ample for hundreds of tensors (the
#: rounding costs each at most 1/32768 of the budget, and _fill spends it again).
BUDGET_STEPS = 1 << 15


def _knapsack(allowed: dict[str, list[Candidate]], capacity: int) -> dict[str, Candidate]:
    """One candidate per unit, of least total error with total bytes ≤ ``capacity``."""
    unit = max(1, -(-capacity // BUDGET_STEPS))
    size = capacity // unit + 1
    # least[b]: the least error of the tensors so far within b units (none: 0 anywhere).
    least = np.zeros(size)
    picked = np.zeros((len(allowed), size), dtype=np.int16)
    for number, found in enumerate(allowed.values()):
        best = np.full(size, np.inf)
        for index, candidate in enumerate(found):
            weight = -(-candidate.output_bytes // unit)
            if weight >= size:
                continue
            total = np.full(size, np.inf)
            total[weight:] = least[:size - weight] + candidate.stats.error_energy
            better = total < best
            best[better] = total[better]
            picked[number][better] = index
        least = best
    picks = {}
    remaining = size - 1
    for number, (name, found) in reversed(list(enumerate(allowed.items()))):
        candidate = found[picked[number][remaining]]
        picks[name] = candidate
        remaining -= -(-candidate.output_bytes // unit)
    return picks


def _fill(picks: dict[str, Candidate], allowed: dict[str, list[Candidate]],
          capacity: int) -> dict[str, Candidate]:
    """``picks`` with upgrades that still fit, the most error removed per byte first."""
    picks = dict(picks)
    while True:
        spare = capacity - _bytes(picks)
        upgrades = [((now.stats.error_energy - c.stats.error_energy)
                     / max(c.output_bytes - now.output_bytes, 1), name, c)
                    for name, now in picks.items() for c in allowed[name]
                    if c.stats.error_energy < now.stats.error_energy
                    and c.output_bytes - now.output_bytes <= spare]
        if not upgrades:
            return picks
        _, name, chosen = max(upgrades, key=lambda upgrade: upgrade[0])
        picks[name] = chosen


def _uniform_picks(allowed: dict[str, list[Candidate]]) -> list[dict[str, Candidate]]:
    """For each scheme measured, every tensor with it (kept where it was not allowed)."""
    schemes = dict.fromkeys(c.scheme for found in allowed.values() for c in found
                            if c.scheme is not None)  # in order: the choice is reproducible
    return [{name: next((c for c in found if c.scheme == scheme), found[0])
             for name, found in allowed.items()} for scheme in schemes]


def _bytes(picks: dict[str, Candidate]) -> int:
    return sum(c.output_bytes for c in picks.values())


def _error(picks: dict[str, Candidate]) -> float:
    return sum(c.stats.error_energy for c in picks.values())


def _replace(plans: dict[str, list[TensorPlan]], candidates: dict[str, list[Candidate]],
             choose: Callable[[TensorPlan, list[Candidate]], TensorPlan]
             ) -> dict[str, list[TensorPlan]]:
    """The plans with the choices made; a tensor the format keeps whatever the scheme
    (its only candidate is to stay as it is) keeps its plan and the format's reason."""
    return {name: [choose(plan, candidates[plan.name])
                   if len(candidates.get(plan.name, ())) > 1 else plan
                   for plan in shard_plans]
            for name, shard_plans in plans.items()}

