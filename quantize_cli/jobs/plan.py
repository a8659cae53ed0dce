"""Decide, from the header alone, what happens to each tensor and what the output holds.

Nothing here reads tensor data, so a plan (and ``--dry-run``) is instant even for a
checkpoint of hundreds of GB, and the output header is known before any data is read.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from fnmatch import fnmatchcase
from pathlib import Path

from ..core.scheme import ACTIVATIONS, Scheme
from ..errors import InputError, SchemeError, located
from ..formats import (
    PRESETS,
    Deployment,
    ModelFormat,
    QuantizedWeight,
    StoredTensor,
    scheme_for,
)
from ..storage.dtypes import DTYPE_BITS, FLOAT_DTYPES
from ..storage.header import Header, TensorEntry
from ..storage.writer import PlannedTensor
from .provenance import granularity_options
from .rules import Rule, rule_for

#: Tensors smaller than this stay in their dtype by default (DESIGN §3): the scale and
#: zero point would eat most of the saving, and such tensors are usually sensitive.
MIN_ELEMENTS = 1024
#: A model run on one GPU, with no config.json to consult.
ONE_GPU = Deployment()


#: The granularities the targets and the advice about kept tensors try, from the fewest
#: scales to the most.
LADDER: tuple[tuple[str, int | None], ...] = (
    ("tensor", None), ("channel", None), ("block", 128), ("block", 64), ("block", 32))

@dataclass(frozen=True)
class TensorPlan:
    """The decision for one input tensor: quantize with ``scheme`` into ``outputs``, or
    copy it (``scheme`` None, ``outputs`` the tensor itself)."""

    entry: TensorEntry
    scheme: Scheme | None
    reason: str
    outputs: tuple[PlannedTensor, ...]
    selected: bool = False  # chosen by the selection rules (before --rule and the format)
    rule: str | None = None  # the --rule that decided it
    format_kept: bool = False  # chosen, but kept in its dtype by a rule of the format

    @property
    def name(self) -> str:
        return self.entry.name

    @property
    def quantized(self) -> bool:
        return self.scheme is not None

    @property
    def output_bytes(self) -> int:
        return sum(math.prod(t.shape) * DTYPE_BITS[t.dtype] // 8 for t in self.outputs)

    def as_quantized_weight(self) -> QuantizedWeight:
        assert self.scheme is not None
        return QuantizedWeight(self.entry, self.scheme)

    def with_scheme(self, scheme: Scheme | None, reason: str, fmt: ModelFormat,
                    format_kept: bool = False) -> TensorPlan:
        """The same tensor with another decision (e.g. one chosen by --target-sqnr)."""
        return replace(self, scheme=scheme, reason=reason, format_kept=format_kept,
                       outputs=_outputs(self.entry, scheme, fmt))


def _outputs(entry: TensorEntry, scheme: Scheme | None,
             fmt: ModelFormat) -> tuple[PlannedTensor, ...]:
    if scheme is None:
        return (PlannedTensor(entry.name, entry.dtype, entry.shape),)
    return tuple(fmt.stored_tensors(entry, scheme))


def select(
    entry: TensorEntry, include: Sequence[str] = (), exclude: Sequence[str] = ()
) -> tuple[bool, str]:
    """Whether a tensor is quantized, and why (DESIGN §3).

    Without ``include`` patterns, floating tensors with ≥ 2 dimensions and ≥ 1024 elements
    are quantized. With them, exactly the floating tensors matching one are (1-D and small
    ones too). ``exclude`` always wins. Integer, bool, other float formats, scalars and
    empty tensors are always copied byte for byte.

    >>> select(TensorEntry("model.norm.weight", "BF16", (4096,), 0, 8192))
    (False, '1-D tensor')
    """
    if entry.dtype not in FLOAT_DTYPES:
        kind = "bool" if entry.dtype == "BOOL" else (
            "float format qz does not quantize" if entry.dtype.startswith("F") else "integer")
        return False, f"{kind} dtype {entry.dtype}"
    if len(entry.shape) == 0:
        return False, "scalar"
    if entry.numel == 0:
        return False, "empty tensor"
    excluded = next((p for p in exclude if fnmatchcase(entry.name, p)), None)
    if excluded is not None:
        return False, f"matches --exclude {excluded!r}"
    if include:
        included = next((p for p in include if fnmatchcase(entry.name, p)), None)
        if included is None:
            return False, "matches no --include pattern"
        return True, f"matches --include {included!r}"
    if len(entry.shape) < 2:
        return False, "1-D tensor"
    if entry.numel < MIN_ELEMENTS:
        return False, f"fewer than {MIN_ELEMENTS} elements"
    return True, f"{entry.dtype}, {len(entry.shape)}-D"


def plan_tensor(entry: TensorEntry, scheme: Scheme, fmt: ModelFormat,
                include: Sequence[str] = (), exclude: Sequence[str] = (),
                deployment: Deployment = ONE_GPU, rules: Sequence[Rule] = ()) -> TensorPlan:
    """Decide one tensor: the selection rules, the ``--rule`` that matches its name (the
    last), then what the format can store.

    >>> from quantize_cli.formats import format_named
    >>> plan = plan_tensor(TensorEntry("w", "F32", (64, 128), 0, 32768), Scheme(),
    ...                    format_named("qz"))
    >>> [tensor.name for tensor in plan.outputs], plan.output_bytes
    (['w', 'w_scale'], 8448)
    """
    selected, reason = select(entry, include, exclude)
    chosen = selected
    rule = rule_for(entry.name, rules) if selected else None
    if rule is not None:
        chosen, reason = rule.scheme is not None, f"--rule {rule.text}"
        scheme = rule.scheme or scheme
    kept = (scheme.shape_problem(entry.shape) or fmt.keep_reason(entry, scheme, deployment)
            if chosen else None)
    if kept is not None:
        chosen, reason = False, kept
    chosen_scheme = scheme if chosen else None
    return TensorPlan(entry, chosen_scheme, reason, _outputs(entry, chosen_scheme, fmt),
                      selected, rule.text if rule else None, kept is not None)


def plan_shard(header: Header, path: str | Path, scheme: Scheme, fmt: ModelFormat,
               include: Sequence[str] = (), exclude: Sequence[str] = (),
               deployment: Deployment = ONE_GPU, rules: Sequence[Rule] = ()
               ) -> list[TensorPlan]:
    """Decide every tensor of a file, and refuse output names that would collide.

    Raises:
        InputError: a name the format would write for a quantized tensor already exists.
    """
    plans = [plan_tensor(entry, scheme, fmt, include, exclude, deployment, rules)
             for entry in header.tensors]
    check_collisions(plans, header, path)
    return plans


def keep_fused_together(plans: dict[str, list[TensorPlan]],
                        fmt: ModelFormat) -> dict[str, list[TensorPlan]]:
    """Layers a runtime fuses (q/k/v, gate/up) run as one, with one scheme: when the
    format keeps one of them in its dtype (a kernel's shape rule), the others stay too,
    wherever their shards are. Layers a --rule decided are left for the format's check,
    which refuses a rule that splits them.

    >>> from quantize_cli.formats import format_named
    >>> q, k = (plan_tensor(TensorEntry(f"l.attn.{n}_proj.weight", "F32", shape, 0, 0),
    ...                     Scheme(), format_named("compressed-tensors"))
    ...         for n, shape in (("q", (128, 128)), ("k", (32, 128))))
    >>> settled = keep_fused_together({"m": [q, k]}, format_named("compressed-tensors"))
    >>> settled["m"][0].reason
    "kept for vLLM: fused with l.attn.k_proj.weight, which is kept for vLLM: shape 32×128: \
vLLM's weight-only kernel needs 128 input features a multiple of 128 and 32 output features a \
multiple of 64"
    """
    kept: dict[str, TensorPlan] = {}
    for shard_plans in plans.values():
        for plan in shard_plans:
            key = fmt.fused_with(plan.name)
            if key is not None and plan.selected and plan.rule is None and not plan.quantized:
                kept.setdefault(key, plan)

    def settle(plan: TensorPlan) -> TensorPlan:
        key = fmt.fused_with(plan.name)
        cause = kept.get(key) if key is not None else None
        if cause is None or not plan.quantized or plan.rule is not None:
            return plan
        return plan.with_scheme(None, f"kept for vLLM: fused with {cause.name}, which is "
                                f"{cause.reason}", fmt, format_kept=True)

    return {name: [settle(plan) for plan in shard_plans] for name, shard_plans in plans.items()}


def check_collisions(plans: Sequence[TensorPlan], header: Header, path: str | Path) -> None:
    """Refuse a plan whose quantized tensors would be stored under an existing name."""
    for plan in plans:
        for stored in plan.outputs:
            if isinstance(stored, StoredTensor) and stored.name != plan.name \
                    and stored.name in header:
                raise InputError(
                    located(path, stored.name, f"collides with the name qz would give the "
                            f"{stored.role.replace('_', ' ')} of {plan.name!r}"),
                    hint=f"leave {plan.name!r} as it is with --exclude",
                )


def check_patterns(source: Path, plans: Sequence[TensorPlan], include: Sequence[str],
                   exclude: Sequence[str], rules: Sequence[Rule]) -> list[str]:
    """Refuse a pattern that cannot be what was meant: an --include that matches no
    tensor name (nothing would be quantized as asked), a --rule that only later rules or
    unselected tensors see. An --exclude or a --rule that matches no tensor is a warning,
    returned: scripts run one command over many models (``--exclude 'lm_head*'`` on a
    model whose head is tied).

    Raises:
        InputError: naming the pattern, and what it matched if anything.
    """
    names = [plan.name for plan in plans]
    hint = ("patterns are globs matched against whole tensor names ('*' matches dots "
            "too); qz inspect lists the names")
    warnings = []
    for option, patterns in (("--include", include), ("--exclude", exclude)):
        for pattern in patterns:
            if not any(fnmatchcase(name, pattern) for name in names):
                if option == "--exclude":
                    warnings.append(f"--exclude {pattern!r} matches no tensor")
                    continue
                raise InputError(located(source, None, f"{option} {pattern!r} matches no "
                                         "tensor"), hint=hint)
    for rule in rules:
        if any(plan.rule == rule.text for plan in plans):
            continue
        matched = [plan for plan in plans if rule.matches(plan.name)]
        rule_hint = hint
        if not matched:
            warnings.append(f"--rule {rule.text!r} matches no tensor")
            continue
        if any(plan.selected for plan in matched):
            why = "is overridden by later rules for every tensor it matches"
        else:
            why = (f"matches only tensors qz does not quantize ({matched[0].name}: "
                   f"{matched[0].reason})")
            rule_hint = "rules change how selected tensors are quantized; --include selects"
        raise InputError(located(source, None, f"--rule {rule.text!r} {why}"), hint=rule_hint)
    return warnings


def candidate_schemes(base: Scheme, fmt: ModelFormat, bit_widths: Sequence[int]) -> list[Scheme]:
    """The schemes of :data:`LADDER` at each of ``bit_widths`` (``base``'s method) that
    the format can store, cheapest first within each width.

    >>> from quantize_cli.formats import format_named
    >>> [s.describe() for s in candidate_schemes(Scheme(), format_named("mlx"), [4])]
    ['int4 absmax block 128, mse clip', 'int4 absmax block 64, mse clip', \
'int4 absmax block 32, mse clip']
    """
    schemes = []
    for bits in bit_widths:
        for granularity, block_size in LADDER:
            try:  # a width the method has not (FP8 at 4 bits), a format's refusal
                scheme = base.varied(granularity=granularity,  # type: ignore[arg-type]
                                     block_size=block_size, bits=bits)
                fmt.check_scheme(scheme)
            except SchemeError:
                continue
            if scheme not in schemes:
                schemes.append(scheme)
    return schemes


@dataclass(frozen=True)
class KeptByFormat:
    """The selected tensors a format keeps in their dtype (its kernels' shape rules, its
    output head), and the granularities that would quantize the most of them."""

    kept: tuple[TensorPlan, ...]
    selected: int
    options: tuple[str, ...] = ()  # e.g. ("--per-channel", "--block 64")
    quantizable: int = 0  # how many of ``kept`` each of ``options`` quantizes

    @property
    def advice(self) -> str | None:
        """The options that would quantize more, and how many they would."""
        if not self.options:
            return None
        how_many = "all" if self.quantizable == len(self.kept) else str(self.quantizable)
        verb = "quantizes" if len(self.options) == 1 else "quantize"
        return f"{' or '.join(self.options)} {verb} {how_many} of them"

    def reasons(self, listed: int = 3) -> str:
        """Why they were kept, one reason at a time with a tensor it applies to."""
        by_reason: dict[str, list[str]] = {}
        for plan in self.kept:
            by_reason.setdefault(plan.reason, []).append(plan.name)
        parts = [f"{names[0]}{f' and {len(names) - 1} more' if len(names) > 1 else ''} "
                 f"({reason})" for reason, names in list(by_reason.items())[:listed]]
        if len(by_reason) > listed:
            parts.append(f"{len(by_reason) - listed} other reasons (--dry-run lists them)")
        return "; ".join(parts)

    def note(self, fmt: ModelFormat) -> str | None:
        """What the summary says: when a granularity would quantize more, or when the
        format keeps most of what was selected."""
        if not self.options and 2 * len(self.kept) <= self.selected:
            return None
        note = (f"{len(self.kept)} of {self.selected} selected tensors kept in their dtype "
                f"for {fmt.name}: {self.reasons(1)}")
        return f"{note}; {self.advice}" if self.advice else note


def kept_by_format(plans: dict[str, list[TensorPlan]], scheme: Scheme, fmt: ModelFormat,
                   include: Sequence[str] = (), exclude: Sequence[str] = (),
                   deployment: Deployment = ONE_GPU,
                   rules: Sequence[Rule] = ()) -> KeptByFormat:
    """The selected tensors ``fmt`` keeps in their dtype, and which other granularities
    of ``scheme`` the format can store would quantize the most of them (planned again
    from the headers, fused layers included).

    >>> from quantize_cli.formats import format_named
    >>> ct = format_named("compressed-tensors")
    >>> entry = TensorEntry("l.mlp.down_proj.weight", "F32", (576, 576), 0, 0)
    >>> w8a16 = Scheme("absmax", "channel")
    >>> fp8_blocks = Scheme("fp8", "block", 128, activations="fp8")
    >>> kept_by_format({"m": [plan_tensor(entry, w8a16, ct)]}, w8a16, ct).advice
    '--activations int8 or --scheme FP8_DYNAMIC quantize all of them'
    >>> kept_by_format({"m": [plan_tensor(entry, fp8_blocks, ct)]}, fp8_blocks, ct).advice
    '--per-channel or --scheme W8A8 quantize all of them'
    """
    every = [plan for shard_plans in plans.values() for plan in shard_plans]
    kept = tuple(plan for plan in every if plan.format_kept)
    selected = sum(plan.selected for plan in every)
    if not kept:
        return KeptByFormat(kept, selected)
    counts: dict[str, int] = {}
    for option, candidate in _alternatives(scheme, fmt):
        replanned = keep_fused_together(
            {shard: [plan_tensor(plan.entry, candidate, fmt, include, exclude, deployment,
                                 rules) for plan in shard_plans]
             for shard, shard_plans in plans.items()}, fmt)
        quantized = {plan.name for shard_plans in replanned.values()
                     for plan in shard_plans if plan.quantized}
        counts[option] = sum(plan.name in quantized for plan in kept)
    most = max(counts.values(), default=0)
    if most == 0:
        return KeptByFormat(kept, selected)
    # One value per row is the coarsest choice that helps; one value per tensor is only
    # offered when nothing finer helps as much.
    options = [option for option, count in counts.items() if count == most]
    finer = [option for option in options if option != "--per-tensor"]
    return KeptByFormat(kept, selected, tuple((finer or options)[:2]), most)


def _alternatives(scheme: Scheme, fmt: ModelFormat) -> list[tuple[str, Scheme]]:
    """The schemes one option away from ``scheme`` that ``fmt`` can store: its other
    granularities, the activations a runtime could quantize with it, and the presets of
    as many bits."""
    alternatives = [(" ".join(granularity_options(other.granularity, other.block_size)), other)
                    for other in candidate_schemes(scheme, fmt, [scheme.bits])
                    if other != scheme]
    options = [*(f"--activations {name}" for name in ACTIVATIONS if name != scheme.activations),
               *(f"--scheme {name}" for name in PRESETS)]
    for option in options:
        flag, value = option.split()
        try:
            other = (scheme_for(fmt, preset_name=value) if flag == "--scheme"
                     else scheme.varied(activations=value))  # type: ignore[arg-type]
            fmt.check_scheme(other)
        except SchemeError:
            continue
        if other.bits == scheme.bits and other not in [scheme, *dict(alternatives).values()]:
            alternatives.append((option, other))
    return alternatives
