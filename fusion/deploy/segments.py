"""Segment reductions for the exported graph that are exact and thread-safe in onnxruntime, from standard operators.

A segment reduction pools rows values [N, C] by index [N] into [segments, C]: pillar pooling (sums for the means,
maxima for the PFN), camera BEV pooling (sums). Exported as one scatter with a reduction it is either slow
(ScatterElements: onnxruntime reduces element by element, 10-15 ns per element on the 2-core VM: ~22 ms for the
48k LiDAR points x 31 channels of tiny_cpu) or racy (ScatterND with a reduction: onnxruntime's CPU kernel splits
the update rows over the intra-op threads without guarding rows that share a destination, so with more than one
thread additions and maxima are lost at random; onnxruntime issues #18048 and #23396). Here the rows are grouped:

1. `group_rows`: a stable argsort of the index (ONNX TopK, k = N; its ties go to the lower position) puts each
   segment's rows next to each other; where the sorted index changes (NonZero) gives the K occupied segments, their
   ids, where each ends, and every sorted row's segment ordinal and rank within its segment.
2. Sums (`sorted_sum`, the Lift-Splat-Shoot "cumsum trick"): one cumulative sum over the sorted rows in float64,
   read at each segment's last row, minus the previous segment's. float64 keeps the difference of two large prefix
   sums at float32 accuracy (in float32, a prefix over 50k rows of xyz would be off by centimetres).
   Maxima (`sorted_max`): a FAN_IN-ary tree over each segment's rows: every level keeps the rows whose rank is a
   multiple of FAN_IN, as the max of themselves and the next FAN_IN - 1 rows of their segment (gathers and Max).
   MAX_LEVELS levels cover segments of up to FAN_IN ** MAX_LEVELS = 2 ** 32 rows, i.e. any input; the levels past
   the largest segment's need run on the K remaining rows (cheap). Max is exact in any order.
3. `to_dense`: the K rows go to their segments by ScatterND without reduction: unique indices, nothing can race.
Every operator here gives the same result with any number of onnxruntime threads, and the PyTorch forward is the
same arithmetic (stable sort, float64 cumsum, the same tree), so the trace exports what runs in PyTorch. The grouping
(sort, tree levels) depends on the index only and is shared by all reductions over the same index.

Values must be finite for `sorted_sum`: a NaN or inf row spoils the sums of every later segment, not only its own
(the graph sends non-finite points to its trash segment, which sorts last). N may be 0 (K is then 0, the output
zeros); the exported graph never receives an empty cloud (fusion.deploy.inputs pads it with one point far outside).
float64 CumSum has no TensorRT kernel: onnxruntime would run those nodes outside TensorRT (GPU path unmeasured).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch
from torch import Tensor

FAN_IN = 4  # rows reduced into one per tree level (4 measured faster than 2 and 8)
MAX_LEVELS = 16  # FAN_IN ** MAX_LEVELS = 2 ** 32 rows per segment at most


class _StableArgsort(torch.autograd.Function):
    """[N] int64 positions that sort index [N] ascending, equal values in their original order; exported as TopK
    (k = N, smallest first), whose ties go to the lower position (ONNX TopK spec)."""

    @staticmethod
    def forward(ctx, index: Tensor) -> Tensor:
        return torch.argsort(index, stable=True)

    @staticmethod
    def symbolic(g, index):
        _, positions = g.op("TopK", index, g.op("Shape", index), axis_i=0, largest_i=0, sorted_i=1, outputs=2)
        return positions


class _UniqueRowScatter(torch.autograd.Function):
    """out [S, C] with row index[k] replaced by rows[k] [K, C]; index [K] must not repeat. Exported as ScatterND
    without reduction (whole rows, no race: no two updates share a destination)."""

    @staticmethod
    def forward(ctx, out: Tensor, index: Tensor, rows: Tensor) -> Tensor:
        return out.index_copy(0, index, rows)

    @staticmethod
    def symbolic(g, out, index, rows):
        column = g.op("Unsqueeze", index, g.op("Constant", value_t=torch.tensor([1], dtype=torch.int64)))
        return g.op("ScatterND", out, column, rows)


@dataclass
class SegmentRows:
    """Rows grouped by segment, from `group_rows`. N: the rows (less the trash); K: the occupied segments.

    order [N] int64: the input row at each sorted position (segments ascending, stable);
    index [N] int64: the segment at each sorted position (the input index[order], ascending);
    ordinal [N] int64: at each sorted position, its segment's rank among the occupied ones (0 .. K - 1);
    rank [N] int64: at each sorted position, its rank within its segment (0 .. count - 1);
    ids [K] int64: the occupied segments, ascending; ends [K] int64: one past each one's last sorted position;
    segments: the number of rows of the dense output (`to_dense`)."""

    order: Tensor
    index: Tensor
    ordinal: Tensor
    rank: Tensor
    ids: Tensor
    ends: Tensor
    segments: int

    def counts(self) -> Tensor:
        """[K] int64 rows per occupied segment."""
        return self.ends - torch.cat([self.ends.new_zeros(1), self.ends[:-1]])

    @cached_property
    def max_tree(self) -> list[tuple[Tensor, list[Tensor]]]:
        """The levels of `sorted_max`, computed once per grouping (they depend on the index only).

        A level of M rows (level 0: the N sorted rows) keeps the rows whose rank within their segment is a multiple
        of FAN_IN, each as the max of itself and the next FAN_IN - 1 rows of its segment (repeating the segment's
        last row where it has fewer); the other rows go, ranks and counts shrink by FAN_IN. After MAX_LEVELS levels
        every segment of up to FAN_IN ** MAX_LEVELS rows has one row, in segment order. Returns per level (kept,
        [partner] * (FAN_IN - 1)) [*] positions among that level's rows; levels after the last needed one keep all
        K rows (kept = partners = 0 .. K - 1)."""
        ordinal, rank, count = self.ordinal, self.rank, self.counts()
        levels = []
        for _ in range(MAX_LEVELS):
            kept = torch.nonzero(rank % FAN_IN == 0).view(-1)
            ordinal, rank = ordinal[kept], rank[kept]
            after = count[ordinal] - 1 - rank  # [M'] rows of its segment after each kept row
            levels.append((kept, [kept + after.clamp(max=step) for step in range(1, FAN_IN)]))
            rank, count = rank // FAN_IN, (count + FAN_IN - 1) // FAN_IN
        return levels


def group_rows(index: Tensor, segments: int, trash: bool = False) -> SegmentRows:
    """Group the rows of index [N] (int64 in [0, segments)) by segment; see SegmentRows. trash: index may also be
    `segments`, for rows to leave out (in no segment, not listed in `order`)."""
    order = _StableArgsort.apply(index)
    if trash:  # the trash rows sort last: list the rows before the first of them
        order = order[:(index < segments).sum()]
    sorted_index = index[order]
    # The next sorted index, -1 after the last (for N = 0 the [1] tail broadcasts against [0]).
    following = torch.cat([sorted_index[1:], sorted_index.new_full((1,), -1)])
    last = torch.nonzero(sorted_index != following).view(-1)  # [K] each segment's last sorted position
    ends = last + 1
    first = torch.cat([sorted_index.new_full((1,), -1), sorted_index[:-1]]) != sorted_index
    ordinal = torch.cumsum(first.long(), 0) - 1
    starts = torch.cat([ends.new_zeros(1), ends[:-1]])  # [K] each segment's first sorted position
    rank = torch.arange(sorted_index.shape[0], device=index.device) - starts[ordinal]
    return SegmentRows(order, sorted_index, ordinal, rank, sorted_index[last], ends, segments)


def sorted_sum(values: Tensor, rows: SegmentRows) -> Tensor:
    """[K, C] sum per occupied segment of finite values [N, C] given in sorted order (values[rows.order]): a float64
    cumulative sum read at each segment's last row, minus the previous segment's."""
    prefix = values.double().cumsum(0)
    at_end = prefix[rows.ends - 1]  # [K, C] the sum of all rows up to each segment's last
    before = torch.cat([at_end.new_zeros(1, values.shape[1]), at_end[:-1]])
    return (at_end - before).to(values.dtype)


def sorted_max(values: Tensor, rows: SegmentRows) -> Tensor:
    """[K, C] max per occupied segment of values [N, C] given in sorted order (values[rows.order]), by the tree of
    `SegmentRows.max_tree`."""
    for kept, partners in rows.max_tree:
        reduced = values[kept]
        for partner in partners:
            reduced = torch.maximum(reduced, values[partner])
        values = reduced
    return values


def to_dense(compact: Tensor, rows: SegmentRows) -> Tensor:
    """[segments, C]: row k of compact [K, C] at row rows.ids[k], zeros in the rows of empty segments."""
    out = compact.new_zeros(rows.segments, compact.shape[1])
    return _UniqueRowScatter.apply(out, rows.ids, compact)


def segment_sum(values: Tensor, index: Tensor, segments: int) -> Tensor:
    """[segments, C] sum of values [N, C] over index [N] in [0, segments]; empty segments 0, rows with index ==
    segments (the trash) left out."""
    rows = group_rows(index, segments, trash=True)
    return to_dense(sorted_sum(values[rows.order], rows), rows)


def segment_max(values: Tensor, index: Tensor, segments: int) -> Tensor:
    """[segments, C] max of values [N, C] over index [N] in [0, segments]; empty segments 0 (torch's scatter_reduce
    "amax" with include_self=False into zeros), rows with index == segments (the trash) left out."""
    rows = group_rows(index, segments, trash=True)
    return to_dense(sorted_max(values[rows.order], rows), rows)
