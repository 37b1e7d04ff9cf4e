"""Flat buffers: every leaf of one device and dtype packed into one contiguous 1-D tensor.

An optimizer step is memory-bound, and on a CPU only fused code reaches the memory floor.
Running a transform over one flat buffer per device/dtype instead of over a list of
tensors gives the fusing compiler a single loop to generate (a first step of about a
second, where a 161-tensor list takes tens of seconds) and gives eager foreach kernels one
large tensor instead of many small ones.

Elementwise transforms need nothing else: ``tx.init(layout.flatten(params))`` gives
state over flat buffers, and :meth:`FlatLayout.unflatten` gives per-leaf views of any of
them (of a state buffer too, for a per-parameter checkpoint). Transforms with per-tensor
reductions must not be run on a flat buffer as if it were one tensor. The trust ratio
(LARS, LAMB, RaLars), TAdam, AdamP (both projections) and Scout can, given where the
tensors lie: build the layout with ``align=`` (each leaf starts on a row of that many
values, the gaps zero) and pass ``segments=layout.segments()`` to ``update``
(``make_step`` passes it on). Each per-tensor sum is then a sum over whole rows, which a
fusing compiler computes in the same loop as the update; AdamP's per-output-channel sums
(:func:`channel_sums`) are row sums too, corrected where a channel starts inside a row.
TAdam keeps one weight sum per tensor, sized at ``init`` from the segments that an
aligned layout's buffers carry: init over ``layout.flatten(params)`` itself (a copy of a
buffer carries none). Compile with :data:`COMPILE_OPTIONS`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from holotx import executor, ops, tree
from holotx.base import GradientTransformation, Params, State, apply_updates

__all__ = ["COMPILE_OPTIONS", "Channels", "FlatLayout", "LeafSlot", "Segments", "channel_sums",
           "check_segments", "host_decisions", "make_step", "per_channel", "per_row", "segment_sums"]

COMPILE_OPTIONS: dict[str, Any] = {"realize_reads_threshold": 100, "realize_opcount_threshold": 1000}
"""inductor options for a compiled flat step:
``torch.compile(make_step(tx, donate=True), options=COMPILE_OPTIONS)``.

A rule that reduces each tensor before its update (LAMB's and RaLars's trust ratios,
TAdam's weight, LARS's norms, Scout's coherence) uses the update twice: in the reduction
and in the final ``p += lr * r * u``. By default inductor stores such a value (one read
by several loops that reads more than 4 buffers, or of more than 50 operations on a CPU)
in a fresh param-sized buffer between the two loops, and recomputes the per-tensor ratio
in the apply loop for every 16 values. On a CPU that fresh buffer is new memory at every
step: page faults and zeroing took about a third of LAMB's step on the ResNet-50 set. These
thresholds let inductor recompute the update from the stored moments in the second loop
instead, which is the floor's plan (read p and the moments again). Measured there (flat
segmented compiled, 2 threads, ms, floor timed beside): LAMB 60.6 -> 37.6 (floor 24.4),
RaLars 62.0 -> 32.7 (21.0), TAdam 60.8 -> 21.1 (21.1), LARS 19.4 -> 16.4 (15.5); AdamW
unchanged (its update is used once). Measured on a CPU only: ``fused=True`` uses them for
CPU params (on a GPU, inductor's defaults are kept until measured there)."""


class LeafSlot(NamedTuple):
    """Where one leaf sits in a :class:`FlatLayout` (``layout.slots[i]``, ``None`` for a ``None`` leaf).

    Args:
        group: the index of the leaf's buffer in the layout's list of buffers.
        offset: where the leaf starts in that buffer.
        shape: the leaf's shape.

    Example:
        >>> import torch
        >>> from holotx.flat import FlatLayout
        >>> layout = FlatLayout({"a": torch.zeros(2, 3), "b": torch.zeros(4)})
        >>> layout.slots[1]
        LeafSlot(group=0, offset=6, shape=torch.Size([4]))
    """

    group: int
    """Index of the leaf's buffer in the layout's list of buffers."""
    offset: int
    shape: torch.Size


class Channels(NamedTuple):
    """Where the output channels lie in one aligned flat buffer, for per-channel reductions
    (AdamP's cosines): :func:`channel_sums` and :func:`per_channel`.

    A tensor of two or more dimensions is ``shape[0]`` channels of ``numel // shape[0]``
    contiguous values (``p.reshape(p.shape[0], -1)``'s rows); any other tensor (0-d, 1-D or
    empty) counts as one channel, the whole tensor. The buffer's channels are numbered in
    its tensors' order, each tensor's padding counted in its last channel. A channel need
    not start on a row: where one starts inside a row (a *cut*), the channel before it ends
    there. The fields are int64 vectors but ``most_per_row`` and the per-row tables
    :func:`per_channel` reads (two of them 2-D), all computed once by
    :meth:`FlatLayout.segments` (static: a compiled step loads them, and computes none of
    them at each step).

    Args:
        tensor_ids: for each channel, the index of its tensor (0-based within the buffer).
        lengths: for each channel, its values in the buffer, padding included: they add up
            to the buffer's size.
        sizes: for each tensor, the values in each of its channels; 0 for a tensor counted as
            one channel.
        row_first: for each row, the channel of its first value.
        row_offset: for each row, the position of its first value within that channel.
        row_last: for each row, the channel of its last value (padding left out).
        cut_rows: for each cut, its row.
        cut_cols: for each cut, its column (never 0).
        cut_channels: for each cut, the channel that starts there.
        most_per_row: the most channels any row holds (at least 1), a number.
        row_sizes: for each row, the values in each channel of its tensor (0 for a tensor
            counted as one channel).
        row_slots: for each row, its channels in order, ``(rows, most_per_row)``: the
            row's first channel, the next, ... up to its last (repeated after it); empty
            (no rows) where a row holds more than 8 channels.
        row_starts: for each row, the column where its second, third, ... channel starts,
            ``(rows, most_per_row - 1)`` int32 (at most 0 for a channel the row does not
            hold); empty where ``row_slots`` is.

    Example:
        >>> import torch
        >>> from holotx.flat import FlatLayout
        >>> # Three channels of 2 values, then a 1-D tensor: rows of 4 values.
        >>> (segments,) = FlatLayout([torch.zeros(3, 2), torch.zeros(3)], align=4).segments()
        >>> channels = segments.channels
        >>> channels.tensor_ids, channels.lengths, channels.sizes
        (tensor([0, 0, 0, 1]), tensor([2, 2, 4, 4]), tensor([2, 0]))
        >>> channels.row_first, channels.row_last  # channel 1 starts inside row 0: a cut
        (tensor([0, 2, 3]), tensor([1, 2, 3]))
        >>> channels.cut_rows, channels.cut_cols, channels.cut_channels, channels.most_per_row
        (tensor([0]), tensor([2]), tensor([1]), 2)
    """

    tensor_ids: torch.Tensor
    """For each channel, the index of its tensor (0-based within the buffer)."""
    lengths: torch.Tensor
    """For each channel, its values in the buffer, padding included."""
    sizes: torch.Tensor
    """For each tensor, the values in each of its channels; 0 for a tensor counted as one channel."""
    row_first: torch.Tensor
    """For each row, the channel of its first value."""
    row_offset: torch.Tensor
    """For each row, the position of its first value within that channel."""
    row_last: torch.Tensor
    """For each row, the channel of its last value (padding left out)."""
    cut_rows: torch.Tensor
    """For each channel that starts inside a row, that row."""
    cut_cols: torch.Tensor
    """For each channel that starts inside a row, its column there."""
    cut_channels: torch.Tensor
    """For each channel that starts inside a row, the channel's index."""
    most_per_row: int
    """The most channels any row holds (at least 1)."""
    row_sizes: torch.Tensor
    """For each row, the values in each channel of its tensor (0: the tensor is one channel)."""
    row_slots: torch.Tensor
    """For each row, its channels in order, ``(rows, most_per_row)`` (empty beyond 8 a row)."""
    row_starts: torch.Tensor
    """For each row, where its channels after the first start, ``(rows, most_per_row - 1)`` int32."""

    def to(self, device: torch.device | str) -> Channels:
        """These channels with every tensor on ``device``.

        Args:
            device: where the buffer they describe is.

        Returns:
            The moved :class:`Channels`.

        Example:
            >>> import torch
            >>> from holotx.flat import FlatLayout
            >>> (segments,) = FlatLayout([torch.zeros(3, 2)], align=4).segments()
            >>> segments.channels.to("meta").row_first.device
            device(type='meta')
        """
        return Channels(*(x.to(device) if isinstance(x, torch.Tensor) else x for x in self))


class Segments(NamedTuple):
    """Where the tensors lie in one aligned flat buffer, for per-tensor reductions: the
    buffer seen as ``(rows, width)``, each row belonging to one tensor.

    Args:
        row_ids: for each row, the index of its tensor (0-based within the buffer), int64.
        count: the number of tensors in the buffer.
        width: values per row (the layout's ``align``).
        numels: for each tensor, its number of values (the padding left out), int64 (default
            ``None``).
        channels: where the tensors' output channels lie, for per-channel reductions
            (:class:`Channels`; default ``None``).

    Example:
        >>> import torch
        >>> from holotx.flat import FlatLayout
        >>> (segments,) = FlatLayout({"a": torch.zeros(5), "b": torch.zeros(3)}, align=4).segments()
        >>> segments.row_ids, segments.count, segments.width, segments.numels
        (tensor([0, 0, 1]), 2, 4, tensor([5, 3]))
    """

    row_ids: torch.Tensor
    """For each row, the index of its tensor (0-based within the buffer), int64."""
    count: int
    """The number of tensors in the buffer."""
    width: int
    """Values per row (the layout's ``align``)."""
    numels: torch.Tensor | None = None
    """For each tensor, its number of values (the padding left out), int64."""
    channels: Channels | None = None
    """Where the tensors' output channels lie (:class:`Channels`), for per-channel reductions."""

    def to(self, device: torch.device | str) -> Segments:
        """These segments with every tensor (those of :attr:`channels` too) on ``device``.

        Args:
            device: where the buffers they describe are.

        Returns:
            The moved :class:`Segments`.

        Example:
            >>> import torch
            >>> from holotx.flat import FlatLayout
            >>> (segments,) = FlatLayout([torch.zeros(5)], align=4).segments()
            >>> segments.to("meta").channels.row_first.device
            device(type='meta')
        """
        def moved(x: Any) -> Any:
            return None if x is None else x.to(device)

        channels = None if self.channels is None else self.channels.to(device)
        return self._replace(row_ids=self.row_ids.to(device), numels=moved(self.numels), channels=channels)


def _channels(slots: list[LeafSlot], width: int) -> Channels:
    """The :class:`Channels` of one aligned buffer holding ``slots`` (in buffer order),
    built tensor by tensor with vector ops (a row or a channel at a time would be a Python
    loop over millions of values)."""
    empty = torch.zeros(0, dtype=torch.int64)
    vectors = Channels._fields[:Channels._fields.index("most_per_row")]
    fields: dict[str, list[torch.Tensor]] = {name: [empty] for name in (*vectors, "row_sizes")}
    first_channel = 0
    for k, slot in enumerate(slots):
        numel = slot.shape.numel()
        rows = -(-numel // width)
        split = len(slot.shape) >= 2 and numel > 0
        count, size = (slot.shape[0], numel // slot.shape[0]) if split else (1, 0)
        lengths = torch.full((count,), size, dtype=torch.int64)
        lengths[-1] = rows * width - size * (count - 1)  # the last channel takes the padding
        starts = torch.arange(rows, dtype=torch.int64) * width  # each row's first value, in the tensor
        fields["tensor_ids"].append(torch.full((count,), k, dtype=torch.int64))
        fields["lengths"].append(lengths)
        fields["sizes"].append(torch.tensor([size], dtype=torch.int64))
        fields["row_sizes"].append(torch.full((rows,), size, dtype=torch.int64))
        if split:
            last = (starts + width).clamp(max=numel) - 1  # each row's last value, padding left out
            fields["row_first"].append(first_channel + starts // size)
            fields["row_offset"].append(starts % size)
            fields["row_last"].append(first_channel + last // size)
            cuts = torch.arange(1, count, dtype=torch.int64) * size  # where channels 1.. start
            cuts = cuts[cuts % width != 0]
            fields["cut_rows"].append(slot.offset // width + cuts // width)
            fields["cut_cols"].append(cuts % width)
            fields["cut_channels"].append(first_channel + cuts // size)
        else:
            fields["row_first"].append(torch.full((rows,), first_channel, dtype=torch.int64))
            fields["row_offset"].append(starts)
            fields["row_last"].append(torch.full((rows,), first_channel, dtype=torch.int64))
        first_channel += count
    cat = {name: torch.cat(parts) for name, parts in fields.items()}
    row_first, row_last = cat["row_first"], cat["row_last"]
    most_per_row = int((row_last - row_first).max()) + 1 if row_first.numel() else 1
    if most_per_row <= _CHAIN_LIMIT:
        # The row's k-th channel starts at column k * size - offset (never, for a tensor that
        # is one channel: that is at most 0); it is the k-th after the row's first, or past
        # the tensor's end (its padding) the row's last.
        slots = torch.arange(most_per_row, dtype=torch.int64)
        row_slots = torch.minimum(row_first.unsqueeze(1) + slots, row_last.unsqueeze(1))
        row_starts = (slots[1:] * cat["row_sizes"].unsqueeze(1) - cat["row_offset"].unsqueeze(1))
        # int32 for the comparisons (a column is below the row's width), clamped so that no
        # start far before or after the row wraps around: it compares as it did
        row_starts = row_starts.clamp(min=-1, max=width).to(torch.int32)
    else:
        row_slots, row_starts = empty.view(0, most_per_row), empty.view(0, most_per_row - 1).to(torch.int32)
    return Channels(*(cat[name] for name in vectors), most_per_row, cat["row_sizes"], row_slots, row_starts)


class FlatLayout:
    """Where each leaf of a tree sits in one flat buffer per (device, dtype).

    ``None`` leaves take no room and come back as ``None``. Groups are ordered by first
    appearance; leaves are laid out in tree order inside their group. With ``align > 1``
    every leaf starts at a multiple of ``align`` and each buffer's length is one, the
    gaps filled with zeros (for :meth:`segments`).

    Args:
        params: the tree to lay out (its tensors' shapes, devices and dtypes; ``None`` leaves
            allowed). DTensors are refused.
        align: every leaf starts at a multiple of this many values (default ``1``: packed);
            ``align > 1`` gives rows for :meth:`segments`.

    Example:
        >>> import torch
        >>> import holotx
        >>> from holotx.flat import FlatLayout
        >>> params = {"w": torch.ones(2, 2), "b": torch.zeros(3)}
        >>> layout = FlatLayout(params)
        >>> flat = layout.flatten(params)
        >>> flat
        [tensor([0., 0., 0., 1., 1., 1., 1.])]
        >>> tx = holotx.adamw(lr=0.1)  # elementwise: runs on the flat buffer as on the tree
        >>> flat_grads = layout.flatten({"w": torch.ones(2, 2), "b": torch.ones(3)})
        >>> updates, state = tx.update(flat_grads, tx.init(flat), flat)
        >>> layout.unflatten(holotx.apply_updates(flat, updates))["w"]
        tensor([[0.8990, 0.8990],
                [0.8990, 0.8990]])
    """

    def __init__(self, params: Params, *, align: int = 1) -> None:
        if isinstance(align, bool) or not isinstance(align, int) or align < 1:
            raise ValueError(f"align must be a positive integer, got {align!r}")
        self.align = align
        leaves, self.treespec = tree.flatten(params)
        keys: dict[tuple[torch.device, torch.dtype], int] = {}
        sizes: list[int] = []
        self.slots: list[LeafSlot | None] = []
        for i, leaf in enumerate(leaves):
            if leaf is None:
                self.slots.append(None)
                continue
            if ops.is_wrapper(leaf):
                path = tree.path_strings(self.treespec)[i]
                raise ValueError(
                    f"FlatLayout cannot pack the {type(leaf).__name__} at {path}: a DTensor (FSDP2, "
                    "tensor parallel) is sharded across ranks and has no storage of its own to lay "
                    "out; run the transform on the DTensors themselves")
            key = (leaf.device, leaf.dtype)
            g = keys.setdefault(key, len(keys))
            if g == len(sizes):
                sizes.append(0)
            self.slots.append(LeafSlot(g, sizes[g], leaf.shape))
            sizes[g] += -(-leaf.numel() // align) * align
        self.groups: list[tuple[torch.device, torch.dtype]] = list(keys)
        self.sizes = sizes
        self._segments: list[Segments] | None = None

    def segments(self) -> list[Segments]:
        """One :class:`Segments` per buffer. Needs ``align > 1`` (rows of one value would
        make the per-row sums a pass of their own).

        Returns:
            The list of :class:`Segments`, one per buffer.

        Example:
            >>> import torch
            >>> from holotx.flat import FlatLayout
            >>> layout = FlatLayout({"a": torch.zeros(5), "b": torch.zeros(2)}, align=4)
            >>> [s.row_ids for s in layout.segments()]
            [tensor([0, 0, 1])]
        """
        if self.align == 1:
            raise ValueError("segments() needs a layout built with align > 1, "
                             "e.g. FlatLayout(params, align=256)")
        out = []
        for g, ((device, _), size) in enumerate(zip(self.groups, self.sizes)):
            row_ids = torch.empty(size // self.align, dtype=torch.int64)
            slots = [s for s in self.slots if s is not None and s.group == g]
            for k, slot in enumerate(slots):
                first = slot.offset // self.align
                row_ids[first:first + -(-slot.shape.numel() // self.align)] = k
            numels = torch.tensor([slot.shape.numel() for slot in slots], dtype=torch.int64)
            channels = _channels(slots, self.align)
            out.append(Segments(row_ids.to(device), len(slots), self.align, numels.to(device),
                                channels.to(device)))
        return out

    def _with_segments(self, buffers: list[torch.Tensor]) -> list[torch.Tensor]:
        """``buffers``, each told its segments (aligned layouts only): a rule that keeps a
        value per tensor sizes its state from them at ``init``."""
        if self.align > 1:
            if self._segments is None:
                self._segments = self.segments()
            for b, seg in zip(buffers, self._segments):
                tree.set_segments(b, seg)
        return buffers

    def __repr__(self) -> str:
        parts = ", ".join(f"{n} x {dt} on {dev}" for (dev, dt), n in zip(self.groups, self.sizes))
        return f"FlatLayout({len(self.slots)} leaves in {len(self.groups)} buffers: {parts})"

    def flatten(self, params: Params) -> list[torch.Tensor]:
        """New flat buffers holding the leaves' values (differentiable and vmappable:
        a batched leaf gives a batched buffer). An aligned layout's buffers carry their
        :class:`Segments` (see :func:`holotx.tree.segments_of`).

        Args:
            params: a tree with the layout's structure.

        Returns:
            The new flat buffers, one per (device, dtype) group.

        Example:
            >>> import torch
            >>> from holotx.flat import FlatLayout
            >>> layout = FlatLayout({"a": torch.zeros(3), "b": torch.zeros(2)}, align=4)
            >>> layout.flatten({"a": torch.ones(3), "b": torch.full((2,), 2.0)})
            [tensor([1., 1., 1., 0., 2., 2., 0., 0.])]
        """
        leaves = tree.leaves_matching(params, self.treespec, "tree", "layout")
        parts: list[list[torch.Tensor]] = [[] for _ in self.groups]
        for leaf, slot in zip(leaves, self.slots):
            if slot is not None:
                parts[slot.group].append(leaf.reshape(-1))
                gap = -leaf.numel() % self.align
                if gap:
                    parts[slot.group].append(leaf.new_zeros(gap))
        return self._with_segments([torch.cat(p) if len(p) > 1 else p[0].clone() for p in parts])

    def unflatten(self, buffers: list[torch.Tensor]) -> Params:
        """A tree of views into ``buffers``: writes to a view write the buffer.

        Args:
            buffers: one flat buffer per group, of the layout's sizes.

        Returns:
            The tree of views.

        Example:
            >>> import torch
            >>> from holotx.flat import FlatLayout
            >>> layout = FlatLayout({"a": torch.zeros(2), "b": torch.zeros(1)})
            >>> layout.unflatten([torch.tensor([1.0, 2.0, 3.0])])
            {'a': tensor([1., 2.]), 'b': tensor([3.])}
        """
        if len(buffers) != len(self.groups):
            raise ValueError(f"expected {len(self.groups)} flat buffers, got {len(buffers)}")
        for i, (b, n) in enumerate(zip(buffers, self.sizes)):
            if b.shape != (n,):
                raise ValueError(f"flat buffer {i} has shape {tuple(b.shape)}, expected ({n},)")
        leaves = [None if s is None else buffers[s.group][s.offset:s.offset + s.shape.numel()].view(s.shape)
                  for s in self.slots]
        return tree.unflatten(self.treespec, leaves)

    def zeros(self) -> list[torch.Tensor]:
        """Zeroed flat buffers, one per group (carrying their segments when aligned).

        Returns:
            The buffers.

        Example:
            >>> import torch
            >>> from holotx.flat import FlatLayout
            >>> FlatLayout({"a": torch.zeros(2), "b": torch.zeros(1, dtype=torch.float64)}).zeros()
            [tensor([0., 0.]), tensor([0.], dtype=torch.float64)]
        """

        return self._with_segments([torch.zeros(n, device=dev, dtype=dt)
                                    for (dev, dt), n in zip(self.groups, self.sizes)])

    def bind(self, params: Params) -> list[torch.Tensor]:
        """Move the storage of every tensor in ``params`` into flat buffers and return them.

        Afterwards each param (an ``nn.Parameter`` keeps its identity) is a view of its
        buffer, so an in-place step on the buffer is an in-place step on the params. This
        is for code that owns the params, e.g. an optimizer adapter.

        Args:
            params: the tree of tensors (``nn.Parameter`` objects) to move into the buffers.

        Returns:
            The flat buffers, now the params' storage.

        Example:
            >>> import torch
            >>> from holotx.flat import FlatLayout
            >>> params = {"a": torch.ones(2), "b": torch.ones(1)}
            >>> (buffer,) = FlatLayout(params).bind(params)
            >>> buffer.mul_(3.0)
            tensor([3., 3., 3.])
            >>> params["a"]
            tensor([3., 3.])
        """
        buffers = self.flatten(params)
        leaves = tree.leaves_matching(params, self.treespec, "params", "layout")
        views = tree.flatten(self.unflatten(buffers))[0]
        with torch.no_grad():
            for leaf, view in zip(leaves, views):
                if leaf is not None:
                    leaf.data = view
        return buffers

    def bind_grads(self, params: Params) -> list[torch.Tensor]:
        """Give every param a ``.grad`` that is a view of a zeroed flat buffer, and return
        the buffers. Autograd accumulates into an existing ``.grad`` in place, so
        backward passes fill the buffers (until ``zero_grad(set_to_none=True)``).

        Args:
            params: the tree of ``nn.Parameter`` objects.

        Returns:
            The zeroed flat gradient buffers.

        Example:
            >>> import torch
            >>> from holotx.flat import FlatLayout
            >>> w = torch.nn.Parameter(torch.ones(2))
            >>> (grads,) = FlatLayout({"w": w}).bind_grads({"w": w})
            >>> (3 * w).sum().backward()
            >>> grads
            tensor([3., 3.])
        """
        buffers = self.zeros()
        leaves = tree.leaves_matching(params, self.treespec, "params", "layout")
        for leaf, view in zip(leaves, tree.flatten(self.unflatten(buffers))[0]):
            if leaf is not None:
                leaf.grad = view
        return buffers


def _can_take_memory(params: Params, updates: Any) -> bool:
    """Whether ``updates`` can hold the new params: a tensor, of the param's dtype, at
    every path where there is a param (and ``None`` where there is none)."""
    p_leaves, spec = tree.flatten(params)
    u_leaves, u_spec = tree.flatten(updates)
    return u_spec == spec and all(
        (p is None and u is None) or (p is not None and u is not None and p.dtype == u.dtype)
        for p, u in zip(p_leaves, u_leaves))


def _check_distinct(tree_: Any, name: str) -> None:
    """In place, a tensor that appears twice (tied weights given twice) would be stepped
    twice: refuse it, as torch.optim refuses duplicate params."""
    leaves, spec = tree.flatten(tree_)
    if torch.compiler.is_compiling():
        # Traced, id() would make the compiled step guard on each tensor's identity: new
        # grads every step (autograd's) would recompile it every step. ``is`` between
        # inputs is what dynamo's own aliasing guards keep; it is compared within groups
        # of one dtype and shape only (every comparison costs tracing time).
        groups: dict[Any, list[tuple[int, torch.Tensor]]] = {}
        for i, x in enumerate(leaves):
            if x is not None:
                groups.setdefault(_alias_key(x), []).append((i, x))
        pairs = ((i, j) for group in groups.values() for k, (i, x) in enumerate(group)
                 for j, y in group[k + 1:] if x is y)
        first = next(pairs, None)
    else:
        seen: dict[int, int] = {}
        first = next(((seen[id(x)], i) for i, x in enumerate(leaves)
                      if x is not None and seen.setdefault(id(x), i) != i), None)
    if first is not None:
        paths = tree.path_strings(spec)
        raise ValueError(f"{name} at {paths[first[0]]} and {paths[first[1]]} are the same tensor: "
                         "a donated step would update it twice; give it once")


def _alias_key(x: torch.Tensor) -> Any:
    """What two names of one tensor share: dtype, device and shape (its dimension count
    alone where sizes are symbolic, which do not hash)."""
    key = (x.dtype, x.device, tuple(x.shape))
    try:
        hash(key)
    except TypeError:
        return (x.dtype, x.device, x.dim())
    return key


def host_decisions(tx: GradientTransformation, state: State, params: Params) -> dict[int, Any]:
    """What ``tx``'s next step decides from host values, decided now, for a compiled
    donated step to take as given: ``step(params, grads, state, decisions=...)``.

    Lookahead and Scout synchronise every ``sync_period`` steps, counted on the CPU.
    Eager, a step reads its counts and skips the synchronisation on the other steps.
    Compiled, the graph cannot read a tensor's value: it computes both and selects with
    ``torch.where``, reading and writing the slow weights at every step. Given the flags
    made here (eagerly, before calling the compiled step), it takes them as constants:
    two graphs, one that synchronises and one that does not. The keys are the identities
    of the state tensors, so only a donated step (state written in place) takes them; a
    pure step ignores them. Empty for a transform that decides nothing.

    Args:
        tx: the transform the step runs.
        state: its state before the step.
        params: the params (flat buffers, for a flat step).

    Returns:
        ``{id(state tensor): value}``, to pass as ``decisions=`` to the step.

    Example:
        >>> import torch
        >>> import holotx
        >>> from holotx.flat import host_decisions, make_step
        >>> tx = holotx.lookahead(holotx.sgd(0.1), sync_period=2)
        >>> params = {"w": torch.zeros(3)}
        >>> state = tx.init(params)
        >>> step = make_step(tx, donate=True)  # torch.compile(step, fullgraph=True) too
        >>> for _ in range(4):
        ...     decisions = host_decisions(tx, state, params)
        ...     print(list(decisions.values()), end=" ")
        ...     params, state = step(params, {"w": torch.ones(3)}, state, decisions=decisions)
        [False] [True] [False] [True]
    """
    return executor.decisions(tx, state, params)


def make_step(
    tx: GradientTransformation, *, donate: bool = False
) -> Callable[..., tuple[Params, State]]:
    """``step(params, grads, state, **extra) -> (params, state)``: one ``update`` and
    :func:`~holotx.apply_updates`.

    With ``donate=True`` the step is done in place: the state buffers and the grads are
    overwritten, the params are updated in place (under ``torch.no_grad``) and the same
    objects are returned. Compiled, e.g. ``torch.compile(make_step(tx, donate=True))``
    over flat buffers, the update and its application fuse into one loop that reads and
    writes each buffer once: the memory-traffic floor. A compiled donated step also takes
    ``decisions=host_decisions(tx, state, params)``, made outside the compiled function
    (see :func:`host_decisions`): a Lookahead or Scout step then compiles one graph that
    synchronises and one that does not.

    Args:
        tx: the transform to step with.
        donate: step in place, overwriting state and grads (default ``False``: pure).

    Returns:
        The step function ``step(params, grads, state, **extra) -> (params, state)``.

    Example:
        >>> import torch
        >>> import holotx
        >>> from holotx.flat import FlatLayout, make_step
        >>> w, b = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.zeros(1))
        >>> params = {"w": w, "b": b}
        >>> layout = FlatLayout(params)
        >>> flat_params, flat_grads = layout.bind(params), layout.bind_grads(params)
        >>> tx = holotx.sgd(lr=0.1)
        >>> state = tx.init(flat_params)
        >>> step = make_step(tx, donate=True)  # torch.compile(step) fuses it into one loop
        >>> (w.sum() + 4 * b.sum()).backward()
        >>> _, state = step(flat_params, flat_grads, state)
        >>> b  # its gradient was 4: one in-place step of -0.4
        Parameter containing:
        tensor([-0.4000], requires_grad=True)
    """

    def step(params: Params, grads: Any, state: State, **extra: Any) -> tuple[Params, State]:
        if donate:
            _check_distinct(params, "params")
            _check_distinct(grads, "grads")
            with torch.no_grad():
                # In eager mode a chain ending in a scaling (the learning rate) hands its factor
                # over, and p += factor * u is one pass instead of two. Compiled, the compiler
                # fuses the scaling itself, and better without the request (LARS: 2.7x slower).
                updates, state, factor, _ = executor.run(
                    tx, grads, state, params, donate=True, donate_updates=True,
                    hand_over_scale=not torch.compiler.is_compiling(), **extra)
                apply_updates(params, updates, inplace=True, scale=factor)
            return params, state
        updates, new_state, _, owned = executor.run(tx, grads, state, params, **extra)
        if owned and _can_take_memory(params, updates):
            # The updates are this step's own scratch: the new params can take their memory.
            return apply_updates(updates, params, inplace=True), new_state
        return apply_updates(params, updates), new_state

    return step


def check_segments(segments: Any, buffers: list[Any], rule: str) -> list[Segments]:
    """``segments`` as a list, checked against the flat buffers they describe (one per
    buffer, from the layout that made them) before any buffer is written.

    Args:
        segments: a list of :class:`Segments`, one per buffer (``layout.segments()``).
        buffers: the flat buffers they describe (``None`` entries are skipped).
        rule: the name of the transform checking, for the error message.

    Returns:
        ``segments`` as a list.

    Example:
        >>> import torch
        >>> from holotx.flat import FlatLayout, check_segments
        >>> layout = FlatLayout({"a": torch.zeros(5)}, align=4)
        >>> len(check_segments(layout.segments(), layout.zeros(), "my_rule"))
        1
        >>> check_segments(layout.segments(), [torch.zeros(3)], "my_rule")
        Traceback (most recent call last):
            ...
        ValueError: my_rule: segments[0] describes 8 values in 1 tensors, but ...
    """
    segments = list(segments)
    if len(segments) != len(buffers):
        raise ValueError(f"{rule}: segments has {len(segments)} entries for {len(buffers)} flat buffers: "
                         "pass layout.segments() with the layout's buffers")
    for i, (seg, buffer) in enumerate(zip(segments, buffers)):
        if buffer is None:
            continue
        if not isinstance(seg, Segments) or seg.numels is None:
            raise ValueError(f"{rule}: segments[{i}] is not a layout's Segments: pass layout.segments()")
        described = seg.row_ids.numel() * seg.width
        if described != buffer.numel() or seg.numels.numel() != seg.count:
            raise ValueError(f"{rule}: segments[{i}] describes {described} values in {seg.count} tensors, "
                             f"but flat buffer {i} has {buffer.numel()}: pass the segments of the layout "
                             "that made the buffers")
    return segments


def segment_sums(x: torch.Tensor, segments: Segments, out_dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The sum of each tensor's values in an aligned flat buffer ``x``, a ``(count,)``
    vector: sums over rows (accumulated in ``x``'s dtype; a bool ``x`` is counted), then
    over each tensor's rows (a small scatter-add in ``out_dtype``). The padding is zero
    in every buffer a layout makes and adds nothing. A fusing compiler computes the row
    sums in the loop that produces ``x``.

    Args:
        x: an aligned flat buffer (or a bool mask over one).
        segments: the buffer's :class:`Segments`.
        out_dtype: the dtype of the sums (default ``torch.float64``).

    Returns:
        The per-tensor sums, a ``(segments.count,)`` vector of ``out_dtype``.

    Example:
        >>> import torch
        >>> from holotx.flat import FlatLayout, segment_sums
        >>> layout = FlatLayout({"a": torch.zeros(5), "b": torch.zeros(2)}, align=4)
        >>> (buffer,) = layout.flatten({"a": torch.ones(5), "b": torch.full((2,), 10.0)})
        >>> segment_sums(buffer, layout.segments()[0])
        tensor([ 5., 20.], dtype=torch.float64)
    """
    row_sums = x.reshape(-1, segments.width).sum(1).to(out_dtype)
    return _sums_by(segments.row_ids, row_sums, segments.count)


def _sums_by(index: torch.Tensor, values: torch.Tensor, size: int) -> torch.Tensor:
    """``values`` summed by ``index`` into a ``(size,)`` vector: a small scatter-add, or
    for one slot a plain sum. Inductor (torch 2.13, CPU) fails to generate a vectorised
    scatter-add into a one-element buffer (the index folds to a constant), which a buffer
    holding one tensor of several rows asks for."""
    if size == 1:
        return values.sum(0, keepdim=True)
    return torch.zeros(size, dtype=values.dtype, device=values.device).index_add(0, index, values)


def per_row(values: torch.Tensor, segments: Segments) -> torch.Tensor:
    """``values``, one per tensor of an aligned flat buffer, as ``(rows, 1)``: each
    tensor's value on each of its rows, for :func:`holotx.ops.mul_rows` and
    :func:`holotx.ops.lerp_rows`. Stored once where compiled (:func:`holotx.ops.in_memory`),
    so the loop over the elements loads it instead of computing it again.

    Args:
        values: one value per tensor of the buffer, a ``(count,)`` vector.
        segments: the buffer's :class:`Segments`.

    Returns:
        A ``(rows, 1)`` tensor: each row's tensor's value.

    Example:
        >>> import torch
        >>> from holotx.flat import FlatLayout, per_row
        >>> (segments,) = FlatLayout({"a": torch.zeros(5), "b": torch.zeros(2)}, align=4).segments()
        >>> per_row(torch.tensor([1.0, 2.0]), segments)
        tensor([[1.],
                [1.],
                [2.]])
    """
    return ops.in_memory(values)[segments.row_ids].unsqueeze(1)


def _channels_of(segments: Segments) -> Channels:
    if segments.channels is None:
        raise ValueError("these segments have no channels (Segments.channels): pass layout.segments(), "
                         "which describes each tensor's output channels")
    return segments.channels


def channel_sums(x: torch.Tensor, segments: Segments, out_dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The sum over each output channel (:class:`Channels`) of an aligned flat buffer ``x``,
    a ``(channels,)`` vector. Each row's sum (accumulated in ``x``'s dtype) goes to the
    channel of its last value; where a channel starts inside a row (a cut), the values
    before the cut are summed too (one more row read per cut, none where channels start on
    rows) and moved from that channel to the one ending there. The corrections are small
    scatter-adds in ``out_dtype``, and a fusing compiler computes the row sums in the loop
    that produces ``x``: no index per value is stored or computed. The padding is zero in
    every buffer a layout makes and adds nothing.

    Args:
        x: an aligned flat buffer (or values computed over one, e.g. ``p * g``).
        segments: the buffer's :class:`Segments`, with its channels.
        out_dtype: the dtype of the sums (default ``torch.float64``).

    Returns:
        The per-channel sums, a ``(channels,)`` vector of ``out_dtype``.

    Example:
        >>> import torch
        >>> from holotx.flat import FlatLayout, channel_sums
        >>> layout = FlatLayout([torch.zeros(3, 2), torch.zeros(3)], align=4)
        >>> (buffer,) = layout.flatten([torch.arange(6.0).reshape(3, 2), torch.ones(3)])
        >>> channel_sums(buffer, layout.segments()[0])  # rows [0, 1], [2, 3], [4, 5]; the 1-D tensor
        tensor([1., 5., 9., 3.], dtype=torch.float64)
    """
    channels = _channels_of(segments)
    count = channels.tensor_ids.shape[0]
    rows = x.reshape(-1, segments.width)
    sums = _sums_by(channels.row_last, rows.sum(1).to(out_dtype), count)
    if count == 1:
        return sums  # no cuts: a cut is where a second channel starts
    before = torch.arange(segments.width, device=x.device) < channels.cut_cols.unsqueeze(1)
    heads = torch.where(before, rows[channels.cut_rows], 0).sum(1).to(out_dtype)
    return sums.index_add(0, channels.cut_channels - 1, heads).index_add(0, channels.cut_channels, -heads)


_CHAIN_LIMIT = 8
"""The most channels a row may hold for :func:`per_channel`'s compiled form to choose
between them by comparisons (a compare and a select per channel, on whole vectors) rather
than gather one value per position (one lane at a time). Measured with inductor on a CPU,
one thread, ``u + per_channel(f) * p`` over 25 M float32 values in rows of 256 (ms of CPU
time, the comparisons then the gather): 4 channels a row at most (the ResNet-50 set) 68
and 83, 5: 69 and 81, 9: 80 and 81, 16: 97 and 82, 30: 139 and 79."""


def per_channel(values: torch.Tensor, segments: Segments) -> torch.Tensor:
    """``values``, one per output channel (:class:`Channels`) of an aligned flat buffer,
    spread over the buffer seen as ``(rows, width)``: each channel's value at each of its
    positions (a tensor's padding takes its last channel's).

    Eager, ``torch.repeat_interleave`` over the channels' lengths. Compiled (or under a
    functorch transform), from the small ``values`` vector, stored once
    (:func:`holotx.ops.in_memory`), with no index per value in memory: where no row holds
    more than 8 channels, by comparing each column with where the row's channels start (a
    compare and a select per channel on whole vectors: 4 at most on the ResNet-50 set);
    beyond, by computing each position's channel from its row's first channel and offset
    and gathering its value (one lane at a time).

    Args:
        values: one value per channel, a ``(channels,)`` vector.
        segments: the buffer's :class:`Segments`, with its channels.

    Returns:
        A ``(rows, width)`` tensor: each position's channel's value.

    Example:
        >>> import torch
        >>> from holotx.flat import FlatLayout, per_channel
        >>> (segments,) = FlatLayout([torch.zeros(3, 2), torch.zeros(3)], align=4).segments()
        >>> per_channel(torch.tensor([1.0, 2.0, 3.0, 4.0]), segments)
        tensor([[1., 1., 2., 2.],
                [3., 3., 3., 3.],
                [4., 4., 4., 4.]])
    """
    channels = _channels_of(segments)
    width = segments.width
    rows = segments.row_ids.shape[0]
    plan = executor.current()
    if not (plan.compiling or plan.transformed):
        return torch.repeat_interleave(values, channels.lengths, output_size=rows * width).view(rows, width)
    stored = ops.in_memory(values)
    if channels.most_per_row <= _CHAIN_LIMIT:
        # Each row's channels' values, stored: a value loaded by a computed index is gathered
        # lane by lane in a vectorised loop, even where every lane's index is the row's.
        # Where they start is a table of the layout's (Channels.row_starts), loaded as it is.
        most = channels.most_per_row
        table = ops.in_memory(stored[channels.row_slots.reshape(-1)]).view(rows, most)
        column = torch.arange(width, dtype=torch.int32, device=values.device).unsqueeze(0)
        out = table[:, most - 1:]
        for k in range(most - 1, 0, -1):
            out = torch.where(column < channels.row_starts[:, k - 1:k], table[:, k - 1:k], out)
        return out.expand(rows, width)
    first, last = channels.row_first.unsqueeze(1), channels.row_last.unsqueeze(1)
    offset = channels.row_offset.unsqueeze(1)
    sizes = channels.row_sizes.unsqueeze(1)  # (0: the row's tensor is one channel)
    position = torch.arange(width, device=values.device).unsqueeze(0) + offset
    if values.device.type == "mps":
        # No float64 there; float32 would not keep the division below exact.
        local = torch.div(position, sizes.clamp(min=1), rounding_mode="floor") * (sizes > 0)
    else:
        # floor((i + 1/2) / size) in float64, for the channel within the tensor: exact (the
        # value is at least 1 / (2 size) from an integer and float64 errs by far less) and
        # vectorised by inductor, which divides 64-bit integers one lane at a time.
        inverse = torch.where(sizes > 0, 1.0 / sizes.clamp(min=1).to(torch.float64), 0.0)
        local = torch.floor((position.to(torch.float64) + 0.5) * inverse).to(torch.int64)
    # Past the tensor's last value (its padding), the row's last channel.
    return stored[torch.minimum(first + local, last)]
