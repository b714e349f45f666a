"""How one rank's shard of a parameter is cut out of the full tensor a checkpoint stores.

Checkpoints hold every tensor whole, in Megatron-Core's full-tensor layout; each rank reads
only the ranges it owns. A `TensorSharding` turns (local size, rank, world size) into those
ranges, so the same checkpoint loads at any tensor-parallel size.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Piece:
    """Read full[start:stop] along the split dim, then append `pad` zero rows."""

    start: int
    stop: int
    pad: int = 0


@dataclass(frozen=True)
class TensorSharding:
    # Dimension split across ranks; None: every rank holds the whole tensor.
    dim: int | None = None
    # The full tensor is `chunks` equal blocks along `dim`, each split across ranks on its own.
    # A gated linear_fc1 is [gate; up] in full and [gate_r; up_r] on rank r, so chunks=2.
    chunks: int = 1
    # Rows of the full tensor that hold data (the real vocabulary). A rank's range past them is
    # zero padding that no checkpoint stores, so the vocabulary splits evenly across ranks.
    valid: int | None = None

    def pieces(self, local_size: int, rank: int, world_size: int) -> list[Piece]:
        """The ranges along `dim` of the full tensor that make up `rank`'s shard, in order.

        A shard is `chunks` pieces of local_size // chunks rows; with chunks=2, world_size=2:

            full:    [ gate: r0 | r1 ][ up: r0 | r1 ]
            rank 1:              ^^^            ^^^   -> [gate_1; up_1]
        """
        if self.dim is None:
            raise ValueError("a replicated tensor is read whole")
        per_chunk = local_size // self.chunks
        out = []
        for c in range(self.chunks):
            start = (c * world_size + rank) * per_chunk
            stop = start + per_chunk
            if self.valid is None:
                out.append(Piece(start, stop))
            else:
                # Vocabulary padding: clip the range to the real rows, zero-fill the rest.
                real_stop = min(stop, self.valid)
                real_start = min(start, real_stop)
                out.append(Piece(real_start, real_stop, pad=(stop - start) - (real_stop - real_start)))
        return out


REPLICATED = TensorSharding()
