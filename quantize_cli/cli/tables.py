"""Tables that fit the terminal's width: names shortened, text cut, columns dropped by
priority, numbers never cut."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from rich.table import Table
from rich.text import Text

from .text import shorten_name

#: What a column holds decides how it gives way on a narrow terminal: numbers never
#: (they are shown whole or their column is dropped), names are shortened in the middle
#: (the end says which weight, the start which layer), text is cut at the end.
Kind = Literal["name", "number", "text"]


NAME_MINIMUM, NAME_ENOUGH, TEXT_MINIMUM = 16, 28, 10


@dataclass
class Column:
    """A column of a table that fits the terminal: ``drop`` orders the columns that may
    go when even shortened names and text do not fit (the highest first; 0: never);
    ``shortest`` is how narrow names and text may become."""

    header: str
    kind: Kind
    drop: int = 0
    justify: Literal["left", "right"] = "left"
    shortest: int | None = None
    cells: list[str | Text] = field(default_factory=list)

    def natural(self) -> int:
        """The widest cell, or the header if wider: a short one whole, a long one at
        its longest word (it wraps)."""
        header = max((len(word) for word in self.header.split()), default=0)
        if len(self.header) <= 8:
            header = len(self.header)
        return max([header, *(len(cell) for cell in self.cells)])

    def minimum(self, roomy_names: bool = True) -> int:
        """How narrow the column may become. With ``roomy_names``, names keep the width
        at which their initials tell them apart (within bounds)."""
        if self.kind == "number":
            return self.natural()
        if self.kind == "name":
            initials = max((len(shorten_name(str(cell), 0, ellipsis=False))
                            for cell in self.cells), default=0) if roomy_names else 0
            return min(self.natural(), max(NAME_MINIMUM, min(initials, NAME_ENOUGH)))
        return min(self.natural(), self.shortest or TEXT_MINIMUM)


def _shorten_end(cell: str | Text, width: int) -> str | Text:
    if len(cell) <= width:
        return cell
    text = cell if isinstance(cell, Text) else Text(cell)
    text = text.copy()
    text.truncate(width, overflow="ellipsis")
    return text


#: Columns with ``drop`` up to this go only once names are as short as they may be.
ESSENTIAL = 2


def fitted_table(columns: list[Column], width: int, **options: Any) -> Table:
    """A table of ``columns`` no wider than ``width``: text and names shortened to their
    minimum first, then columns dropped by ``drop`` (the essential ones only once names
    are at their shortest), then the space left given back to names and text. Numbers
    are never cut.

    >>> table = fitted_table([Column("Tensor", "name", cells=["a" * 40]),
    ...                       Column("SQNR dB", "number", justify="right", cells=["42.10"])], 30)
    >>> [column.header for column in table.columns], table.columns[0].width
    (['Tensor', 'SQNR dB'], 16)
    """
    shown = list(columns)

    def overhead(count: int) -> int:
        return 3 * count + 1  # borders and padding of a boxed table

    def needed(roomy_names: bool) -> int:
        return sum(c.minimum(roomy_names) for c in shown) + overhead(len(shown))

    for roomy_names, keep in ((True, ESSENTIAL), (False, ESSENTIAL), (False, 0)):
        while needed(roomy_names) > width and any(c.drop > keep for c in shown):
            shown.remove(max((c for c in shown if c.drop > keep), key=lambda c: c.drop))
        if needed(roomy_names) <= width:
            break
    widths = {id(c): c.minimum(roomy_names) for c in shown}
    spare = width - overhead(len(shown)) - sum(widths.values())
    # Text first: names already have the width at which their initials tell them apart.
    for kind in ("text", "name"):
        for column in shown:
            if column.kind == kind and spare > 0:
                grow = min(spare, column.natural() - widths[id(column)])
                widths[id(column)] += grow
                spare -= grow
    if spare < 0:  # even the columns that never go do not fit: names give way to numbers
        for column in shown:
            if column.kind == "name":
                widths[id(column)] = max(1, widths[id(column)] + spare)
    table = Table(**options)
    for column in shown:
        # Cells are made to fit below, so only a header ever wraps (at its spaces).
        table.add_column(column.header, justify=column.justify, width=widths[id(column)])
    for index in range(len(columns[0].cells) if columns else 0):
        cells: list[str | Text] = []
        for column in shown:
            cell, column_width = column.cells[index], widths[id(column)]
            if column.kind == "name":
                plain = cell.plain if isinstance(cell, Text) else cell
                cells.append(Text(shorten_name(plain, column_width)))
            elif column.kind == "text":
                cells.append(_shorten_end(cell, column_width))
            else:
                cells.append(cell)
        table.add_row(*cells)
    return table
