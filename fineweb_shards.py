"""Token shards on disk, and a loader that streams (x, y) training batches from them.

Three shard formats are read, so the shards people already have work as they are:
- llm.c / modded-nanogpt `.bin` (what prepare_fineweb.py writes): a header of 256
  little-endian int32 (magic 20240520, version 1, token count, rest zero), then the
  tokens as uint16.
- build-nanogpt `.npy`: `np.save` of a 1-D uint16 array.
- headerless `.bin`: raw uint16 tokens (`ndarray.tofile`).
The shards of a split are found by name (`*train*`, `*val*`) and memory-mapped: a batch
reads only its own B*T+1 tokens, so no shard is ever loaded into RAM.
"""

import os
from pathlib import Path

import numpy as np
import torch

MAGIC = 20240520
VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = 4 * HEADER_INTS
NPY_MAGIC = b"\x93NUMPY"
SHARD_SUFFIXES = (".bin", ".npy")


class ShardError(ValueError):
    """A shard directory or file that cannot give the requested batches; the message names the file."""


def write_shard(path: str | os.PathLike, tokens: np.ndarray) -> None:
    """Write uint16 `tokens` as an llm.c shard: the 256-int32 header, then the tokens."""
    if tokens.dtype != np.uint16:
        raise TypeError(f"shard tokens must be uint16, got {tokens.dtype}")
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:3] = MAGIC, VERSION, len(tokens)
    with open(path, "wb") as f:
        f.write(header.tobytes())
        # through the file object, not tofile(): a failed write then raises an OSError naming its cause (tofile's
        # says only how many bytes it wrote)
        f.write(np.ascontiguousarray(tokens, dtype="<u2").data)
        # on disk before the caller renames it into place, so a power loss never leaves a
        # complete-looking shard with missing data
        f.flush()
        os.fsync(f.fileno())


def open_shard(path: str | os.PathLike) -> np.ndarray:
    """Memory-map the tokens of one shard (any of the three formats) as a 1-D uint16 array."""
    path = Path(path)
    if path.suffix == ".npy":
        return _open_npy(path)
    return _open_bin(path)


def _open_npy(path: Path) -> np.ndarray:
    with open(path, "rb") as f:
        if f.read(len(NPY_MAGIC)) != NPY_MAGIC:
            raise ShardError(f"{path}: not a .npy file (it does not start with the numpy magic); re-create it.")
    try:
        tokens = np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError as e:
        raise ShardError(f"{path}: unreadable .npy file ({e}); it is truncated or corrupt, re-create it.") from e
    if tokens.ndim != 1 or tokens.dtype != np.uint16:
        raise ShardError(
            f"{path}: holds a {tokens.ndim}-D {tokens.dtype} array, expected 1-D uint16 tokens "
            "(build-nanogpt's np.save format); re-create it."
        )
    return tokens


def _open_bin(path: Path) -> np.ndarray:
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(HEADER_BYTES)
    header = np.frombuffer(head[: len(head) // 4 * 4], dtype="<i4")
    # A headerless file cannot start with the magic: its first two tokens would be 54984 and
    # 308, and 54984 is no GPT-2 id. A zero-padded header with another magic is treated as a
    # bad header rather than as tokens (that would be 506 zero tokens in a row).
    if len(header) and header[0] == MAGIC:
        return _open_llmc(path, header, size)
    if len(header) == HEADER_INTS and header[1:3].any() and not header[3:].any():
        raise ShardError(
            f"{path}: starts like an llm.c header but with magic {header[0]} (expected {MAGIC}); "
            "it is not a token shard of this format, remove it from the directory."
        )
    if size == 0 or size % 2:
        raise ShardError(
            f"{path}: {size} bytes, no llm.c header (magic {MAGIC}) and not a whole number of uint16 tokens; "
            "the file is corrupt or not a token shard."
        )
    return np.memmap(path, dtype="<u2", mode="r")


def _open_llmc(path: Path, header: np.ndarray, size: int) -> np.ndarray:
    if len(header) < HEADER_INTS:
        raise ShardError(f"{path}: {size} bytes, shorter than the {HEADER_BYTES}-byte llm.c header; re-create it.")
    version, count = int(header[1]), int(header[2])
    if version != VERSION:
        raise ShardError(
            f"{path}: llm.c header version {version}, expected {VERSION} (uint16 GPT-2 tokens; llm.c's version 2 "
            "holds uint32 LLaMA-3 tokens). Re-tokenise with prepare_fineweb.py."
        )
    expected = HEADER_BYTES + 2 * count
    if size != expected:
        raise ShardError(
            f"{path}: header says {count} tokens ({expected} bytes) but the file has {size} bytes; "
            "it is truncated or was still being written, re-create it."
        )
    if count == 0:
        return np.empty(0, dtype=np.uint16)
    return np.memmap(path, dtype="<u2", mode="r", offset=HEADER_BYTES, shape=(count,))


def find_shards(data_dir: str | os.PathLike, split: str) -> list[Path]:
    """The shard files of `split` ("train" or "val") in `data_dir`: every .bin/.npy file with `split` in its name."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise ShardError(f"{data_dir}: no such directory; create shards with `python prepare_fineweb.py`.")
    entries = sorted(data_dir.iterdir())
    shards = [p for p in entries if split in p.name and p.suffix in SHARD_SUFFIXES and p.is_file()]
    if not shards:
        names = [p.name for p in entries]
        listing = ", ".join(names[:20]) + (f", ... ({len(names)} entries)" if len(names) > 20 else "")
        raise ShardError(
            f"{data_dir}: no {split} shards (*{split}*.bin or *{split}*.npy); it contains: {listing or 'nothing'}."
        )
    return shards


class ShardLoader:
    """Endless (x, y) batches of B x T tokens for one rank of a data-parallel group.

    Each shard is cut into windows of B*T+1 tokens starting every B*T tokens (neighbouring
    windows share one token, as in llm.c, so every token is an input exactly once); the
    tail of a shard too short for a window is not used. Step s of an epoch gives rank r the
    window s * world_size + r of the epoch's window sequence, so ranks read disjoint windows
    and together cover all of them. With `shuffle`, the shard order is permuted every epoch,
    and a window's B rows are B sequences (T+1 tokens starting every T) drawn without
    replacement from all over its shard, rather than B neighbours from a few documents: by
    generators seeded with (seed, epoch[, shard]), identical on every rank.

    Only the shard being read is memory-mapped. Token ids are checked against `vocab_size`
    on each window as it is read: that costs a max over B*T+1 values already in memory,
    where checking whole shards up front would read every shard from disk before the
    first step (20 GB for FineWeb-Edu 10B).
    """

    def __init__(
        self,
        data_dir: str | os.PathLike,
        split: str,
        batch_size: int,
        seq_len: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle: bool = False,
        vocab_size: int = 50257,
    ):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside a world of {world_size} processes")
        self.batch_size, self.seq_len = batch_size, seq_len
        self.rank, self.world_size = rank, world_size
        self.seed, self.shuffle, self.vocab_size = seed, shuffle, vocab_size
        self.paths = find_shards(data_dir, split)
        self.lengths = [len(open_shard(p)) for p in self.paths]
        window = batch_size * seq_len + 1
        for path, length in zip(self.paths, self.lengths, strict=True):
            if length < window:
                raise ShardError(
                    f"{path}: {length} tokens, shorter than one batch window of B*T+1 = {window} tokens; "
                    "lower batch_size or seq_len, or re-prepare the data with a larger --shard_size."
                )
        self.windows = [(length - 1) // (batch_size * seq_len) for length in self.lengths]
        self.num_batches = sum(self.windows) // world_size  # per rank and epoch
        if self.num_batches == 0:
            raise ShardError(
                f"{self.paths[0].parent}: {split} shards hold {sum(self.windows)} batch windows, "
                f"fewer than the {world_size} ranks; use fewer ranks or more data."
            )
        # caches, each with the key it was computed for
        self._open = (-1, np.empty(0, dtype=np.uint16))  # (shard, its memmap)
        self._order = (-1, None)  # (epoch, _shard_order())
        self._permutation = (None, None)  # ((epoch, shard), sequence order in that shard)
        self.reset()

    def reset(self) -> None:
        """Go back to the first batch (a fresh pass, e.g. over the validation split)."""
        self.epoch, self.step = 0, 0

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next (x, y): int64 tensors of shape (B, T), y being x shifted left by one token."""
        if self.step == self.num_batches:
            self.epoch, self.step = self.epoch + 1, 0
        shard, window = self._locate(self.step * self.world_size + self.rank)
        self.step += 1
        rows = self._sequences(shard, window) * self.seq_len
        shard_tokens = self._tokens(shard)
        tokens = np.stack([shard_tokens[start : start + self.seq_len + 1] for start in rows])  # (B, T+1)
        self._check_ids(tokens, shard, rows)
        tokens = torch.from_numpy(tokens.astype(np.int64))
        return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()

    def __iter__(self) -> "ShardLoader":
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.next_batch()

    def state_dict(self) -> dict:
        """The position, plus what must match on resume; identical on every rank, so rank 0's copy restores all."""
        return {
            "epoch": self.epoch,
            "step": self.step,
            "batch_size": self.batch_size,
            "seq_len": self.seq_len,
            "world_size": self.world_size,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "shards": [[p.name, n] for p, n in zip(self.paths, self.lengths, strict=True)],
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state_dict()` of a loader over the same shards with the same batch layout."""
        expected = {k: v for k, v in self.state_dict().items() if k not in ("epoch", "step")}
        found = {k: state.get(k) for k in expected}
        # a JSON round trip turns the [name, length] pairs into lists, so compare as lists
        found["shards"] = [list(s) for s in found["shards"] or []]
        mismatched = [f"{k}: saved {found[k]!r}, now {v!r}" for k, v in expected.items() if found[k] != v]
        if mismatched:
            raise ValueError("loader state does not fit this loader (" + "; ".join(mismatched) + ")")
        self.epoch, self.step = int(state["epoch"]), int(state["step"])

    def _locate(self, index: int) -> tuple[int, int]:
        """(shard, window in that shard) of the index-th window of the current epoch."""
        order, ends = self._shard_order()
        position = int(np.searchsorted(ends, index, side="right"))
        shard = int(order[position])
        window = index - (int(ends[position - 1]) if position else 0)
        return shard, window

    def _shard_order(self) -> tuple[np.ndarray, np.ndarray]:
        """This epoch's shard order, and the cumulative window counts along it."""
        if self._order[0] != self.epoch:
            order = np.arange(len(self.paths))
            if self.shuffle:
                order = np.random.default_rng((self.seed, self.epoch)).permutation(order)
            self._order = (self.epoch, (order, np.cumsum([self.windows[i] for i in order])))
        return self._order[1]

    def _sequences(self, shard: int, window: int) -> np.ndarray:
        """Which T-token sequences of the shard are the B rows of a window: consecutive ones, or with `shuffle`
        the window-th B of a permutation of all of them."""
        first = window * self.batch_size
        if not self.shuffle:
            return np.arange(first, first + self.batch_size)
        key = (self.epoch, shard)
        if self._permutation[0] != key:
            rng = np.random.default_rng((self.seed, self.epoch, shard))
            self._permutation = (key, rng.permutation((self.lengths[shard] - 1) // self.seq_len))
        return self._permutation[1][first : first + self.batch_size]

    def _tokens(self, shard: int) -> np.ndarray:
        if self._open[0] != shard:
            self._open = (shard, open_shard(self.paths[shard]))
        return self._open[1]

    def _check_ids(self, tokens: np.ndarray, shard: int, row_starts: np.ndarray) -> None:
        """tokens: (B, T+1), row b read from token row_starts[b] of the shard."""
        if tokens.max() >= self.vocab_size:
            row, column = np.unravel_index(int(np.argmax(tokens >= self.vocab_size)), tokens.shape)
            raise ShardError(
                f"{self.paths[shard]}: token id {int(tokens[row, column])} at token {row_starts[row] + column} is "
                f">= vocab_size {self.vocab_size}; the shard was made with another tokenizer or is corrupt."
            )


def validation_loader(data_dir: str | os.PathLike, shuffle: bool, **layout) -> ShardLoader:
    """The validation split as every evaluation reads it, from its first batch each time: neighbouring sequences,
    or with `shuffle` sequences drawn from all over the split. The permutation's seed is fixed rather than the
    run's, so runs of different seeds evaluate on the same sequences, and a pass of a few batches samples the
    whole split's documents instead of the first few (on the offline corpus that cuts the spread of one model's
    loss over disjoint 32,768-token passes from 0.20 to 0.04)."""
    return ShardLoader(data_dir, "val", seed=0, shuffle=shuffle, **layout)
