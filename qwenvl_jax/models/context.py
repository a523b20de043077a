"""What every decoder layer of one forward pass shares: rotary tables, row geometry, cache addressing."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class ForwardContext:
    cos_btr: jax.Array  # [B, T, rotary_dim] fp32
    sin_btr: jax.Array
    lengths_b: jax.Array  # [B] real (non-pad) new tokens per row; rows are right-padded
    starts_b: jax.Array  # [B] cache index of each row's first new token
    # Cache slot of each row: an int array, or a Python int b meaning "rows are slots 0..b-1" (a static slice,
    # which lets decode read its slots without a gather copy).
    rows: jax.Array | int
    # True when every row starts a new sequence: attend over the new tokens only and start GDN state at zero.
    fresh: bool
    # A speculative verify pass (rows = slots 0..B-1): attention writes the keys of every token (those past the
    # accepted length are dead once the lengths are rolled back); Gated DeltaNet leaves its state untouched and
    # returns a GdnPending that ``commit_verified`` applies once the accepted length is known.
    verify: bool = False

    def row_index(self) -> jax.Array | slice:
        return slice(0, self.rows) if isinstance(self.rows, int) else self.rows

    def is_decode(self, t: int) -> bool:
        """One new token per row, rows being slots 0..B-1 of a running sequence: the decode step."""
        return t == 1 and not self.fresh and isinstance(self.rows, int)

    def row_ids(self) -> jax.Array:
        return jnp.arange(self.rows) if isinstance(self.rows, int) else self.rows


def full_sequence_context(cos_btr: jax.Array, sin_btr: jax.Array, lengths_b: jax.Array) -> ForwardContext:
    """A cache-free forward over whole right-padded sequences (logits)."""
    return ForwardContext(cos_btr, sin_btr, lengths_b, jnp.zeros_like(lengths_b), lengths_b.shape[0], True)
