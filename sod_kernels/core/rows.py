"""The distilled rows of a chunked problem: the row index in the form the chunk loops want, and the rows of
one chunk (a slice when the rows are all of them, in order: no gathers)."""

from __future__ import annotations

import torch

from .chunks import row_selector


def chunk_row_index(row_index: torch.Tensor, n_hidden: int) -> tuple[torch.Tensor, bool]:
    """``(rows, contiguous)``: ``row_index [Na]`` as contiguous int64 and whether it is ``arange(n_hidden)``."""
    rows = row_index.to(torch.int64).contiguous()
    n = rows.numel()
    return rows, n == n_hidden and (n == 0 or bool(rows[-1] == n - 1))


class RowChunks:
    """Mixin of a problem with the fields ``row_index [Na]`` (int64) and ``contiguous`` (whether it is
    ``arange``): the number of distilled rows and the rows of a chunk."""

    row_index: torch.Tensor
    contiguous: bool

    @property
    def n_rows(self) -> int:
        """``Na``, the number of distilled rows."""
        return self.row_index.numel()

    def rows(self, start: int, stop: int) -> torch.Tensor | slice:
        """The rows of chunk ``[start, stop)``: a slice when ``row_index`` is ``arange``, else int64 indices."""
        return row_selector(self.row_index, start, stop, self.contiguous)
