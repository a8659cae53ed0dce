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

from ..core.scheme import Scheme
from ..errors import InputError, located
from ..formats import Deployment, ModelFormat, QuantizedWeight, StoredTensor
from ..storage.dtypes import DTYPE_BITS, FLOAT_DTYPES
from ..storage.header import Header, TensorEntry
from ..storage.writer import PlannedTensor
from .rules import Rule, rule_for

#: Tensors smaller than this stay in their dtype by default (DESIGN §3): the scale and
#: zero point would eat most of the saving, and such tensors are usually sensitive.
MIN_ELEMENTS = 1024
#: A model run on one GPU, with no config.json to consult.
ONE_GPU = Deployment()


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

    def with_scheme(self, scheme: Scheme | None, reason: str, fmt: ModelFormat) -> TensorPlan:
        """The same tensor with another decision (e.g. one chosen by --target-sqnr)."""
        return replace(self, scheme=scheme, reason=reason,
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
    if chosen:
        kept = fmt.keep_reason(entry, scheme, deployment)
        if kept is not None:
            chosen, reason = False, kept
    chosen_scheme = scheme if chosen else None
    return TensorPlan(entry, chosen_scheme, reason, _outputs(entry, chosen_scheme, fmt),
                      selected, rule.text if rule else None)


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
vLLM's kernel needs 128 input features a multiple of 128 and 32 output features a \
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
                                f"{cause.reason}", fmt)

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
                   exclude: Sequence[str], rules: Sequence[Rule]) -> None:
    """Refuse a pattern that does nothing, which is almost always a typo: an --include or
    --exclude that matches no tensor name, a --rule that decides no tensor.

    Raises:
        InputError: naming the pattern, and what it matched if anything.
    """
    names = [plan.name for plan in plans]
    hint = ("patterns are globs matched against whole tensor names ('*' matches dots "
            "too); qz inspect lists the names")
    for option, patterns in (("--include", include), ("--exclude", exclude)):
        for pattern in patterns:
            if not any(fnmatchcase(name, pattern) for name in names):
                raise InputError(located(source, None, f"{option} {pattern!r} matches no "
                                         "tensor"), hint=hint)
    for rule in rules:
        if any(plan.rule == rule.text for plan in plans):
            continue
        matched = [plan for plan in plans if rule.matches(plan.name)]
        rule_hint = hint
        if not matched:
            why = "matches no tensor"
        elif any(plan.selected for plan in matched):
            why = "is overridden by later rules for every tensor it matches"
        else:
            why = (f"matches only tensors qz does not quantize ({matched[0].name}: "
                   f"{matched[0].reason})")
            rule_hint = "rules change how selected tensors are quantized; --include selects"
        raise InputError(located(source, None, f"--rule {rule.text!r} {why}"), hint=rule_hint)
