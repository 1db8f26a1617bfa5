"""One node's windows of one split, as the driver sees them: references and the order, no rows.

The driver asks for the pieces of batch j (`pieces`) and tells the stream which batch the slowest
consumer on the node still needs (`advance`). Windows are requested from the node's readers in
stream order, at most `budget` of them at a time from the slowest consumer's first window on
(backpressure: the object store holds at most that many windows of the split, and the readers
work ahead up to it). A batch beyond the budget is not handed out until the slowest consumer
moves on. Windows behind every consumer are released (the driver drops its reference; consumers
still running on a batch keep theirs until they finish).
"""

from __future__ import annotations

from dictsweep.stream.order import StreamOrder


class WindowStream:
    """The windows of one split on one node, kept in its object store while consumers need them."""

    def __init__(self, readers: list, order: StreamOrder, split: str, batches: int, budget: int):
        if budget < 1:
            raise ValueError(f"a node must be allowed at least one window, got {budget}")
        self.readers, self.order, self.split, self.budget = readers, order, split, budget
        self.batches = batches  # the stream ends after this many batches: nothing past it is read
        self.end = order.span(batches - 1)[1] + 1  # one past the last window of the stream
        self.held: dict[int, object] = {}  # window position -> ObjectRef of its rows
        self.floor = 0  # the first window the slowest consumer still needs
        self.requested = 0  # windows asked of the readers (restarted consumers may ask again)
        self.most_held = 0  # the most windows held at once (the budget, unless a consumer lags behind it)

    def pieces(self, batch: int) -> list[tuple] | None:
        """Batch `batch` as `[(window ref, start, stop)]`, or None while it lies beyond the budget."""
        first, last = self.order.span(batch)
        if last >= self.floor + self.budget and first > self.floor:
            return None  # the slowest consumer's own batch always goes, however many windows it spans
        for position in range(first, last + 1):
            self._request(position)
        self._fill()
        return [
            (self.held[self.order.sequence(piece.window)], piece.start, piece.stop)
            for piece in self.order.pieces(batch)
        ]

    def advance(self, slowest_batch: int) -> None:
        """The slowest consumer still needs batch `slowest_batch`: release what lies before (and
        beyond the budget, after a consumer went back), and let the readers work ahead."""
        self.floor = self.order.span(slowest_batch)[0] if slowest_batch < self.batches else self.end
        for position in [p for p in self.held if p < self.floor or p >= self.floor + self.budget]:
            del self.held[position]
        self._fill()

    def _fill(self) -> None:
        for position in range(self.floor, min(self.floor + self.budget, self.end)):
            self._request(position)

    def _request(self, position: int) -> None:
        if position not in self.held:
            reader = self.readers[position % len(self.readers)]  # consecutive windows on different readers
            self.held[position] = reader.window.remote(self.split, position)
            self.requested += 1
            self.most_held = max(self.most_held, len(self.held))

    def close(self) -> None:
        self.held.clear()
