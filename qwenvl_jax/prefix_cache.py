"""Prefix caching: a new request starts from the decode state an earlier request left after a shared prefix.

Attention layers keep keys and values per token, so any prefix of a cached sequence is reusable; they are kept in
pages of ``page_tokens`` positions. A Gated DeltaNet layer's state is a running summary of every token before it,
so a prefix is reusable only where a snapshot of that state (conv window and recurrent state) was taken: at the
end of every prompt, at each chunk boundary of a chunked prefill, and at the end of every request that finished
by itself (stop token or length). A hybrid model's hit is the longest cached prefix ending at a snapshot.

Host side, ``PrefixIndex`` is a trie of pages keyed by content: token ids, and for image and video tokens a hash
of the pixels, so the same image in the next turn matches. Device side, ``PrefixPool`` holds the pages (every
attention layer's keys and values, the MTP head's too) and the snapshots in their own pool; both are sized in
bytes and evicted least recently used. The slot's own cache stays contiguous: a hit copies its pages and snapshot
into the slot (``restore_program``, a gather of the hit's pages) and the request prefills only the rest; finished
prefixes are copied out of the slot (``save_program``). Pages are never shared with a running slot, so no request
can see another's later tokens.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import hashlib
import os
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from qwenvl_jax.cache import DecodeState, tree_bytes
from qwenvl_jax.models.attention import AttnCache
from qwenvl_jax.models.gated_deltanet import GdnCache
from qwenvl_jax.sampling import mark_seen

DEFAULT_PAGE_TOKENS = 64
# The pool's default size: at most this, and no more than MAX_CONTEXTS_PER_SLOT whole contexts per decode slot
# (a small engine, or a tiny model, gets a small pool).
DEFAULT_BUDGET_BYTES = 2 << 30
MAX_CONTEXTS_PER_SLOT = 8


class PrefixPool(NamedTuple):
    """Device storage: per decoder layer, AttnCache pages [N, page_tokens, KV, D] (attention layers) or
    GdnCache snapshots [M, ...] (Gated DeltaNet layers), None for the other kind; the MTP head's pages; and
    with speculative decoding the hidden state each snapshot's next prompt chunk needs ([M, D])."""

    pages: tuple[AttnCache | None, ...]
    snapshots: tuple[GdnCache | None, ...]
    mtp_pages: tuple[AttnCache, ...]
    hidden: jax.Array | None


def page_bytes(state: DecodeState, page_tokens: int) -> int:
    """Bytes of one page: every attention layer's (and the MTP head's) keys and values for page_tokens positions."""
    caches = [c for c in state.layers if isinstance(c, AttnCache)] + list(state.spec.mtp_layers if state.spec else ())
    return sum(page_tokens * tree_bytes(c) // (c.k.shape[0] * c.k.shape[1]) for c in caches)


def snapshot_bytes(state: DecodeState) -> int:
    """Bytes of one snapshot: every Gated DeltaNet layer's state of one slot (0 for attention-only models)."""
    gdn = [c for c in state.layers if isinstance(c, GdnCache)]
    if not gdn:
        return 0
    hidden = 0 if state.spec is None else tree_bytes(state.spec.chunk_hidden) // state.spec.chunk_hidden.shape[0]
    return sum(tree_bytes(c) // c.conv.shape[0] for c in gdn) + hidden


def init_pool(state: DecodeState, num_pages: int, page_tokens: int, num_snapshots: int) -> PrefixPool:
    """Zero pools laid out (and on a mesh, sharded) like the decode state's caches."""

    def like(x: jax.Array, rows: tuple[int, ...]) -> jax.Array:
        # Committed where x lives (the programs' outputs are: an uncommitted first input compiles twice).
        return jax.device_put(jnp.zeros(rows + x.shape[len(rows):], x.dtype), x.sharding)

    def pages(c: AttnCache) -> AttnCache:
        return AttnCache(like(c.k, (num_pages, page_tokens)), like(c.v, (num_pages, page_tokens)))

    return PrefixPool(
        pages=tuple(pages(c) if isinstance(c, AttnCache) else None for c in state.layers),
        snapshots=tuple(GdnCache(like(c.conv, (num_snapshots,)), like(c.recurrent, (num_snapshots,)))
                        if isinstance(c, GdnCache) else None for c in state.layers),
        mtp_pages=tuple(pages(c) for c in state.spec.mtp_layers) if state.spec is not None else (),
        hidden=like(state.spec.chunk_hidden, (num_snapshots,)) if state.spec is not None else None,
    )


# ----------------------------------------------------------------------------------------------- device programs


def save_program(state: DecodeState, pool: PrefixPool, slot: jax.Array, src_n: jax.Array, dst_n: jax.Array,
                 snapshot: jax.Array) -> PrefixPool:
    """Copies page ``src_n[i]`` of the slot (positions [src * P, src * P + P)) into pool page ``dst_n[i]`` (out of
    range: skipped), and the slot's Gated DeltaNet state into snapshot ``snapshot`` (out of range: none)."""
    page_tokens = next(p.k.shape[1] for p in pool.pages + pool.mtp_pages if p is not None)
    positions_np = src_n[:, None] * page_tokens + jnp.arange(page_tokens)[None, :]

    def pages(cache: AttnCache, pool_pages: AttnCache) -> AttnCache:
        return AttnCache(*(p.at[dst_n].set(c[slot].at[positions_np].get(mode="clip"), mode="drop")
                           for c, p in zip(cache, pool_pages)))

    snapshots = tuple(
        None if s is None else GdnCache(s.conv.at[snapshot].set(c.conv[slot], mode="drop"),
                                        s.recurrent.at[snapshot].set(c.recurrent[slot], mode="drop"))
        for c, s in zip(state.layers, pool.snapshots))
    return PrefixPool(
        pages=tuple(None if p is None else pages(c, p) for c, p in zip(state.layers, pool.pages)),
        snapshots=snapshots,
        mtp_pages=tuple(pages(c, p) for c, p in zip(state.spec.mtp_layers, pool.mtp_pages)) if pool.mtp_pages else (),
        hidden=None if pool.hidden is None else pool.hidden.at[snapshot].set(state.spec.chunk_hidden[slot],
                                                                             mode="drop"),
    )


def restore_program(state: DecodeState, pool: PrefixPool, slot: jax.Array, pages_n: jax.Array,
                    snapshot: jax.Array, prefix_ids_t: jax.Array, prefix_len: jax.Array) -> DecodeState:
    """Fills the slot's positions [0, n * P) from pool pages ``pages_n`` (in order; positions past the hit hold
    whatever those pages hold, and the prefill that follows overwrites them), its Gated DeltaNet state from
    ``snapshot``, and its seen-token mask from the prefix ``prefix_ids_t[:prefix_len]``."""
    num = pages_n.shape[0] * next(p.k.shape[1] for p in pool.pages + pool.mtp_pages if p is not None)

    def pages(cache: AttnCache, pool_pages: AttnCache) -> AttnCache:
        # One contiguous block written in place (a row scatter would address every position); positions past
        # max_len (the last page of a max_len that is no multiple of P) are cut off.
        return AttnCache(*(jax.lax.dynamic_update_slice(
            c, p[pages_n].reshape(num, *p.shape[2:])[None, : c.shape[1]], (slot, 0, 0, 0))
            for c, p in zip(cache, pool_pages)))

    def layer(cache, pool_pages, snap):
        if isinstance(cache, AttnCache):
            return pages(cache, pool_pages)
        return GdnCache(cache.conv.at[slot].set(snap.conv[snapshot]),
                        cache.recurrent.at[slot].set(snap.recurrent[snapshot]))

    valid_t = jnp.arange(prefix_ids_t.shape[0]) < prefix_len
    seen_v = mark_seen(jnp.zeros((1, state.seen.shape[1]), bool), prefix_ids_t[None], valid_t[None])[0]
    state = state._replace(layers=tuple(layer(*x) for x in zip(state.layers, pool.pages, pool.snapshots)),
                           seen=state.seen.at[slot].set(seen_v))
    if state.spec is not None:
        state = state._replace(spec=state.spec._replace(
            mtp_layers=tuple(pages(c, p) for c, p in zip(state.spec.mtp_layers, pool.mtp_pages)),
            chunk_hidden=state.spec.chunk_hidden.at[slot].set(pool.hidden[snapshot])
            if pool.hidden is not None else state.spec.chunk_hidden))
    return state


# ----------------------------------------------------------------------------------------------- host index


def request_content(input_ids: np.ndarray, vision=None, merge: int = 1) -> np.ndarray:
    """What identifies a prompt's tokens for caching (int64 [T]): the token ids, with each image or video token
    replaced by a negative value from a hash of its pixels and grid plus its index in the image, so two
    prompts share a prefix only where the text and the pixels agree."""
    content = np.asarray(input_ids, np.int64).copy()
    if vision is None:
        return content
    for grid, patches, tokens in zip(np.asarray(vision.grids_thw).reshape(-1, 3), *vision_spans(vision, merge)):
        pixels = np.ascontiguousarray(vision.pixel_patches[patches])
        base = int.from_bytes(_pixel_digest(np.asarray(grid, np.int64).tobytes(), pixels)[:8], "little")
        base &= (1 << 62) - 1
        dest = np.asarray(vision.dest_t[tokens])
        content[dest] = -1 - ((base + np.arange(len(dest), dtype=np.int64)) & ((1 << 62) - 1))
    return content


def vision_spans(vision, merge: int) -> tuple[list[slice], list[slice]]:
    """Each image's or video's rows of a VisionPayload (images then videos): its patches in ``pixel_patches``
    and its merged tokens in ``dest_t``."""
    offsets = np.concatenate([[0], np.cumsum(np.asarray(vision.grids_thw).reshape(-1, 3).prod(axis=1))])
    pairs = list(zip(offsets[:-1], offsets[1:]))
    return [slice(a, b) for a, b in pairs], [slice(a // merge**2, b // merge**2) for a, b in pairs]


_HASH_PIECE_BYTES = 1 << 22
_hash_threads: concurrent.futures.ThreadPoolExecutor | None = None


def _pixel_digest(head: bytes, pixels: np.ndarray) -> bytes:
    """SHA-256 of ``head`` and the digests of the pixels' 4 MiB pieces, hashed on several threads (hashlib
    releases the GIL): an image's hash sits on the path to its first token (one 1024 x 1024 image is 25 MB of
    float32 patches, ~20 ms for one thread)."""
    global _hash_threads
    data = memoryview(pixels).cast("B")
    pieces = [data[i : i + _HASH_PIECE_BYTES] for i in range(0, len(data), _HASH_PIECE_BYTES)]
    if len(pieces) > 1:
        if _hash_threads is None:
            _hash_threads = concurrent.futures.ThreadPoolExecutor(min(8, os.cpu_count() or 1))
        digests = list(_hash_threads.map(lambda piece: hashlib.sha256(piece).digest(), pieces))
    else:
        digests = [hashlib.sha256(piece).digest() for piece in pieces]
    return hashlib.sha256(head + b"".join(digests)).digest()


def common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    n = min(len(a), len(b))
    differ = np.flatnonzero(a[:n] != b[:n])
    return int(differ[0]) if differ.size else n


class _Node:
    """One page of a cached sequence: its content (<= page_tokens entries, fewer only at a sequence's end) at
    positions [start, start + len(content)), the pool page holding its keys and values, and the snapshots taken
    after ``offset`` of its tokens."""

    __slots__ = ("parent", "start", "content", "page", "children", "snapshots", "mtp_complete")

    def __init__(self, parent: _Node | None, start: int, content: np.ndarray, page: int | None):
        self.parent, self.start, self.content, self.page = parent, start, content, page
        self.children: dict[bytes, _Node] = {}
        self.snapshots: dict[int, int] = {}  # tokens into this page -> snapshot id
        # The MTP head's keys trail the model's by one position: the page's last one is written only once a
        # later token was prefilled. False while it is missing (then a hit may end in this page, not pass it).
        self.mtp_complete = True


@dataclasses.dataclass
class Hit:
    tokens: int  # cached prefix length (0: none)
    pages: list[int]  # pool pages covering [0, tokens), in order
    snapshot: int | None  # the snapshot at ``tokens`` (hybrid models)


@dataclasses.dataclass
class Insertion:
    """What ``PrefixIndex.insert`` needs copied out of the slot."""

    src_pages: list[int]  # page indices of the slot
    dst_pages: list[int]  # pool pages
    snapshot: int | None


class PrefixIndex:
    """The host half: which pool page holds which content, which snapshot sits where, and LRU order."""

    def __init__(self, num_pages: int, num_snapshots: int, page_tokens: int, *, hybrid: bool, mtp: bool):
        self.page_tokens, self.hybrid, self.mtp = page_tokens, hybrid, mtp
        self.num_pages, self.num_snapshots = num_pages, num_snapshots
        self._root = _Node(None, 0, np.zeros(0, np.int64), None)
        self._free_pages = list(range(num_pages - 1, -1, -1))
        self._free_snapshots = list(range(num_snapshots - 1, -1, -1))
        self._nodes: collections.OrderedDict[int, _Node] = collections.OrderedDict()  # LRU first
        self._snapshots: collections.OrderedDict[int, tuple[_Node, int]] = collections.OrderedDict()
        self.stats = collections.Counter()

    def lookup(self, content: np.ndarray, limit: int, touch: bool = True) -> Hit:
        """The longest usable cached prefix of ``content`` no longer than ``limit`` tokens."""
        node, pos, path = self._root, 0, []
        best = (0, None, 0)  # tokens, snapshot, pages
        while pos < limit and node.children:
            want = content[pos : pos + self.page_tokens]
            child = node.children.get(want.tobytes())
            matched = len(want) if child is not None else 0
            if child is None:
                for candidate in node.children.values():
                    if (n := common_prefix(candidate.content, want)) > matched:
                        child, matched = candidate, n
                if child is None:
                    break
            path.append(child)
            usable = min(matched, limit - pos)
            if self.hybrid:
                for offset, snap in child.snapshots.items():
                    if 0 < offset <= usable and pos + offset > best[0]:
                        best = (pos + offset, snap, len(path))
            elif usable > 0:
                best = (pos + usable, None, len(path))
            if matched < self.page_tokens or (self.mtp and not child.mtp_complete):
                break
            node, pos = child, pos + self.page_tokens
        tokens, snap, pages = best
        if touch:
            self.stats["lookups"] += 1
            if tokens:
                self.stats["hits"] += 1
                self.stats["hit_tokens"] += tokens
                for n in path[:pages]:
                    self._nodes.move_to_end(id(n))
                if snap is not None:
                    self._snapshots.move_to_end(snap)
        return Hit(tokens, [n.page for n in path[:pages]], snap)

    def insert(self, content: np.ndarray, length: int, snapshot: bool) -> Insertion:
        """Records ``content[:length]`` (whose state a slot holds) as cached, with a snapshot at ``length`` if
        asked: pages missing from the cache get pool pages (evicting the least recently used) and are to be
        copied. When the pool has no page left to give, the rest goes uncached."""
        p = self.page_tokens
        node, pos, path = self._root, 0, []
        out = Insertion([], [], None)
        while pos < length:
            piece = content[pos : min(pos + p, length)]
            complete = pos + p < length  # this insertion's MTP keys cover the page's last position
            child = node.children.get(piece.tobytes())
            if child is None:  # a longer page holding this piece, or a shorter last page to extend with it
                for candidate in node.children.values():
                    common = common_prefix(candidate.content, piece)
                    if common == len(piece) < len(candidate.content):
                        child = candidate
                        break
                    if common == len(candidate.content) < len(piece) and not candidate.children:
                        del node.children[candidate.content.tobytes()]
                        candidate.content = piece
                        node.children[piece.tobytes()] = candidate
                        candidate.mtp_complete = complete
                        out.src_pages.append(pos // p)
                        out.dst_pages.append(candidate.page)
                        child = candidate
                        break
            if child is None:
                page = self._allocate_page(protect={id(n) for n in path} | {id(node)})
                if page is None:
                    self.stats["uncached_pages"] += 1
                    return out
                child = _Node(node, pos, piece, page)
                child.mtp_complete = complete
                node.children[piece.tobytes()] = child
                self._nodes[id(child)] = child
                out.src_pages.append(pos // p)
                out.dst_pages.append(page)
            elif self.mtp and not child.mtp_complete and complete:  # this slot has the missing MTP key
                child.mtp_complete = True
                out.src_pages.append(pos // p)
                out.dst_pages.append(child.page)
            self._nodes.move_to_end(id(child))
            path.append(child)
            node, pos = child, pos + len(piece)
        if snapshot and self.hybrid and path:
            offset = length - node.start
            if offset in node.snapshots:
                self._snapshots.move_to_end(node.snapshots[offset])
            elif (snap := self._allocate_snapshot()) is not None:
                node.snapshots[offset] = snap
                self._snapshots[snap] = (node, offset)
                out.snapshot = snap
        self.stats["saved_pages"] += len(out.dst_pages)
        self.stats["saved_snapshots"] += out.snapshot is not None
        return out

    def _allocate_page(self, protect: set[int]) -> int | None:
        if self._free_pages:
            return self._free_pages.pop()
        for key, victim in self._nodes.items():  # least recently used first; only leaves go
            if not victim.children and key not in protect:
                self._evict(victim)
                return self._free_pages.pop()
        return None

    def _evict(self, victim: _Node) -> None:
        del victim.parent.children[victim.content.tobytes()]
        del self._nodes[id(victim)]
        for snap in victim.snapshots.values():
            del self._snapshots[snap]
            self._free_snapshots.append(snap)
            self.stats["evicted_snapshots"] += 1
        self._free_pages.append(victim.page)
        self.stats["evicted_pages"] += 1

    def _allocate_snapshot(self) -> int | None:
        if not self._free_snapshots:
            if not self._snapshots:
                return None
            snap, (node, offset) = self._snapshots.popitem(last=False)
            del node.snapshots[offset]
            self._free_snapshots.append(snap)
            self.stats["evicted_snapshots"] += 1
        return self._free_snapshots.pop()

    @property
    def pages_used(self) -> int:
        return self.num_pages - len(self._free_pages)

    @property
    def snapshots_used(self) -> int:
        return self.num_snapshots - len(self._free_snapshots)


# ----------------------------------------------------------------------------------------------- the engine's cache


class PrefixCache:
    """An engine's prefix cache: the index, the device pool and the programs that copy between pool and slots.

    ``budget_bytes`` (None: the smaller of DEFAULT_BUDGET_BYTES and MAX_CONTEXTS_PER_SLOT whole contexts per
    slot) is split between pages and snapshots in the proportion one whole context of ``max_len`` tokens with a
    snapshot every ``snapshot_interval`` tokens needs."""

    def __init__(self, state: DecodeState, max_len: int, page_tokens: int, budget_bytes: int | None,
                 snapshot_interval: int):
        if page_tokens < 1:
            raise ValueError(f"prefix_page_tokens must be >= 1, got {page_tokens}")
        per_page, per_snapshot = page_bytes(state, page_tokens), snapshot_bytes(state)
        self.hybrid = per_snapshot > 0
        self.page_tokens = page_tokens
        self.pages_per_slot = -(-max_len // page_tokens)
        pages_bytes = self.pages_per_slot * per_page
        context_bytes = pages_bytes + (max_len // snapshot_interval + 2) * per_snapshot
        if budget_bytes is None:
            slots = state.lengths.shape[0] - 1
            budget_bytes = min(DEFAULT_BUDGET_BYTES, MAX_CONTEXTS_PER_SLOT * slots * context_bytes)
        share = pages_bytes / context_bytes  # of the budget, for pages
        num_pages = int(budget_bytes * share) // per_page
        num_snapshots = int(budget_bytes * (1 - share)) // per_snapshot if self.hybrid else 0
        if num_pages < 1 or (self.hybrid and num_snapshots < 1):
            least = max(per_page / share, per_snapshot / (1 - share) if self.hybrid else 0)
            snapshot = f" and a snapshot {per_snapshot}" if self.hybrid else ""
            raise ValueError(f"prefix_cache_bytes={budget_bytes} is too small for this model: a page of {page_tokens} "
                             f"tokens takes {per_page} bytes{snapshot}; give at least {int(least) + 1}")
        self.index = PrefixIndex(num_pages, num_snapshots, page_tokens, hybrid=self.hybrid,
                                 mtp=state.spec is not None)
        self.pool = init_pool(state, num_pages, page_tokens, num_snapshots)
        self.bytes = tree_bytes(self.pool)
        keep_pool = keep_state = {}
        if isinstance(state.lengths.sharding, jax.sharding.NamedSharding):  # on a mesh: layouts kept call to call
            keep_pool = dict(out_shardings=jax.tree_util.tree_map(lambda x: x.sharding, self.pool))
            keep_state = dict(out_shardings=jax.tree_util.tree_map(lambda x: x.sharding, state))
        self._save = jax.jit(save_program, donate_argnums=1, **keep_pool)
        self._restore = jax.jit(restore_program, donate_argnums=0, **keep_state)
        self._buckets = sorted({min(1 << i, self.pages_per_slot) for i in range(self.pages_per_slot.bit_length() + 1)})

    def clear(self) -> None:
        """Forgets every cached prefix (the pool's contents are then unreachable; nothing is freed or copied)."""
        old = self.index
        self.index = PrefixIndex(old.num_pages, old.num_snapshots, self.page_tokens, hybrid=old.hybrid, mtp=old.mtp)

    def _bucket(self, pages: int) -> int:
        return next(b for b in self._buckets if b >= pages)

    def lookup(self, content: np.ndarray, limit: int, touch: bool = True) -> Hit:
        return self.index.lookup(content, limit, touch)

    def restore(self, state: DecodeState, slot: int, hit: Hit, input_ids: np.ndarray) -> DecodeState:
        """The slot holding the hit's prefix: its pages, snapshot and seen tokens."""
        n = self._bucket(len(hit.pages))
        pages = np.zeros(n, np.int32)
        pages[: len(hit.pages)] = hit.pages
        ids = np.zeros(n * self.page_tokens, np.int32)
        ids[: hit.tokens] = input_ids[: hit.tokens]
        snapshot = np.int32(hit.snapshot if hit.snapshot is not None else 0)
        return self._restore(state, self.pool, np.int32(slot), pages, snapshot, ids, np.int32(hit.tokens))

    def save(self, state: DecodeState, slot: int, content: np.ndarray, length: int, snapshot: bool) -> None:
        """Caches ``content[:length]``, whose state the slot holds now (a snapshot at ``length`` if asked)."""
        out = self.index.insert(content, length, snapshot)
        if out.dst_pages or out.snapshot is not None:
            self._copy(state, slot, out.src_pages, out.dst_pages, out.snapshot)

    def _copy(self, state: DecodeState, slot: int, src: list[int], dst: list[int], snapshot: int | None) -> None:
        n = self._bucket(max(len(dst), 1))
        src_n = np.zeros(n, np.int32)
        dst_n = np.full(n, self.index.num_pages, np.int32)  # out of range: dropped
        src_n[: len(src)], dst_n[: len(dst)] = src, dst
        snap = np.int32(self.index.num_snapshots if snapshot is None else snapshot)
        self.pool = self._save(state, self.pool, np.int32(slot), src_n, dst_n, snap)

    def warmup(self, state: DecodeState, slot: int) -> DecodeState:
        """Compiles every page-count bucket of both programs on ``slot`` (the scratch slot), copying nothing
        into the pool."""
        for n in self._buckets:
            self._copy(state, slot, [0] * n, [self.index.num_pages] * n, None)
            state = self._restore(state, self.pool, np.int32(slot), np.zeros(n, np.int32), np.int32(0),
                                  np.zeros(n * self.page_tokens, np.int32), np.int32(0))
        return state

    def compiled_programs(self) -> int:
        return self._save._cache_size() + self._restore._cache_size()

    def stats(self) -> dict[str, int]:
        """Lookups, hits, hit tokens, pages and snapshots saved and evicted, pool occupancy and bytes."""
        s = self.index.stats
        return dict(lookups=s["lookups"], hits=s["hits"], hit_tokens=s["hit_tokens"],
                    saved_pages=s["saved_pages"], saved_snapshots=s["saved_snapshots"],
                    evicted_pages=s["evicted_pages"], evicted_snapshots=s["evicted_snapshots"],
                    uncached_pages=s["uncached_pages"], pages_used=self.index.pages_used,
                    pages_total=self.index.num_pages, snapshots_used=self.index.snapshots_used,
                    snapshots_total=self.index.num_snapshots, page_tokens=self.page_tokens, bytes=self.bytes)
