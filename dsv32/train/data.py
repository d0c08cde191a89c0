"""Training data: chat-encoded conversations -> token ids + loss masks, batches, packing.

A conversation is a `Conversation` (dsv32.train.conversation). Loss masks cover exactly the
assistant tokens (reasoning, `</think>`, content, DSML calls and the closing
`<｜end▁of▁sentence｜>`): the text is rendered with dsv32's own encoder message by message, and an
assistant span is trained only when rendering the conversation up to it is a prefix of the whole
text (turns whose rendering changes later, e.g. dropped reasoning, stay unmasked). With
`mark_values`, assistant tokens that spell a value of the conversation's tool calls or results (a
city, a date, an operand, a result quoted in the answer) get mask 2 instead of 1, so a stage can
weight them (`StageConfig.value_weight`).

Batches come in two shapes:
  * shared-prefix batches: conversations padded on the right, with the length of the token prefix
    common to all rows (the system prompt and tools section), computed once by the trainer;
  * packed rows (`pack`): whole conversations laid end to end in rows of a fixed length, with a
    document id per token so attention never crosses conversations.
Shuffling is a seeded permutation per epoch; `Loader.state_dict()` resumes mid-epoch. With a
`WordDropout`, the loader swaps some of the user's frame words for an unseen token, so a word the
model never read (held-out wording) is an input it has learnt to read past.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from dsv32.chat import Tokenizer, encode_messages

from .conversation import Conversation


def encode_conversation(conv: Conversation, tok: Tokenizer, mark_values: bool = False
                        ) -> tuple[list[int], list[int]]:
    """Token ids and a loss mask of one conversation: 1 = assistant token, 0 = other; with
    `mark_values`, 2 = assistant token that spells a tool-call or tool-result value."""
    msgs, mode = conv.messages, conv.thinking_mode
    full = encode_messages(msgs, thinking_mode=mode)
    cuts, spans = [0], []
    for i, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        before = encode_messages(msgs[:i], thinking_mode=mode) if i else ""
        upto = encode_messages(msgs[: i + 1], thinking_mode=mode)
        if full.startswith(upto) and upto.startswith(before) and len(before) >= cuts[-1]:
            cuts += [len(before), len(upto)]
            spans.append(len(cuts) - 2)          # the piece between cuts[-2] and cuts[-1]
    cuts.append(len(full))
    ids, mask = [], []
    for j in range(len(cuts) - 1):
        piece = tok.encode(full[cuts[j]: cuts[j + 1]]) if cuts[j + 1] > cuts[j] else []
        ids += piece
        mask += [1 if j in spans else 0] * len(piece)
    if mark_values:
        mask = mark_value_tokens(ids, mask, conv.values(), tok)
    return ids, mask


def mark_value_tokens(ids: list[int], mask: list[int], values: list[str], tok: Tokenizer) -> list[int]:
    """`mask` with 2 on the assistant tokens that overlap an occurrence of one of `values` (a whole
    word or number: not inside a longer word or number)."""
    if not values or 1 not in mask:
        return mask
    first = mask.index(1)                       # text before the first assistant token is not marked
    text, offsets = byte_spans(ids[first:], tok)
    hit = bytearray(len(text))
    for v in values:
        v = v.encode()
        at = text.find(v)
        while at >= 0:
            end = at + len(v)
            if not (_inside_word(text, at - 1, -1) or _inside_word(text, end, 1)):
                hit[at:end] = b"\x01" * len(v)
            at = text.find(v, at + 1)
    out = list(mask)
    for i, (start, end) in enumerate(offsets, first):
        if mask[i] and 1 in hit[start:end]:
            out[i] = 2
    return out


def byte_spans(ids: list[int], tok: Tokenizer) -> tuple[bytes, list[tuple[int, int]]]:
    """The bytes that `ids` spell, and each token's (start, end) byte offsets in them."""
    pieces = [tok.token_bytes(i) for i in ids]
    offsets, start = [], 0
    for piece in pieces:
        offsets.append((start, start + len(piece)))
        start += len(piece)
    return b"".join(pieces), offsets


def _inside_word(text: bytes, i: int, step: int) -> bool:
    """Whether byte i (just outside a match, on the side `step`) continues a word or number: a
    letter or digit, or a decimal point followed by a digit."""
    if not 0 <= i < len(text):
        return False
    c = text[i:i + 1]
    if c.isalnum():
        return True
    j = i + step
    return c == b"." and 0 <= j < len(text) and text[j:j + 1].isdigit()


@dataclass
class Example:
    """One tokenised conversation."""

    ids: list[int]
    mask: list[int]              # 0 = no loss, 1 = loss, 2 = loss on a copied value (mark_values)
    category: str = ""           # the conversation's category ("skill" for drills)


@dataclass
class Batch:
    """Right-padded rows [B, T]: ids, loss mask (on labels' positions), document ids, prefix length."""

    ids: torch.Tensor
    mask: torch.Tensor
    doc: torch.Tensor | None = None   # [B, T] conversation index within the row (packed rows)
    prefix: int = 0                   # tokens shared by every row (computed once)

    @property
    def tokens(self) -> int:
        return int((self.mask > 0).sum())


def common_prefix(rows: list[list[int]]) -> int:
    """Length of the longest token prefix shared by all rows."""
    n = min(map(len, rows))
    first = rows[0]
    for i in range(n):
        if any(r[i] != first[i] for r in rows[1:]):
            return i
    return n


def collate(examples: list[Example], pad_id: int = 1, share_prefix: bool = True,
            min_prefix: int = 32) -> Batch:
    """Pad to the longest example; the shared prefix stops one token short of the shortest row."""
    T = max(len(e.ids) for e in examples)
    ids = torch.full((len(examples), T), pad_id, dtype=torch.long)
    mask = torch.zeros(len(examples), T, dtype=torch.long)
    for b, e in enumerate(examples):
        ids[b, : len(e.ids)] = torch.tensor(e.ids)
        mask[b, : len(e.mask)] = torch.tensor(e.mask)
    prefix = 0
    if share_prefix and len(examples) > 1:
        prefix = min(common_prefix([e.ids for e in examples]), min(len(e.ids) for e in examples) - 1)
        prefix = prefix if prefix >= min_prefix else 0
    return Batch(ids, mask, prefix=prefix)


def pack(examples: list[Example], seq_len: int, pad_id: int = 1) -> list[Batch]:
    """Greedy first-fit packing of whole conversations into rows of `seq_len` (one Batch per row,
    B = 1, with document ids); conversations longer than a row are truncated."""
    rows: list[list[Example]] = []
    room: list[int] = []
    for e in examples:
        n = min(len(e.ids), seq_len)
        for r, free in enumerate(room):
            if free >= n:
                rows[r].append(e)
                room[r] -= n
                break
        else:
            rows.append([e])
            room.append(seq_len - n)
    out = []
    for row in rows:
        ids, mask, doc = [], [], []
        for d, e in enumerate(row):
            ids += e.ids[:seq_len]
            mask += e.mask[:seq_len]
            doc += [d] * min(len(e.ids), seq_len)
        pad = seq_len - len(ids)
        out.append(Batch(torch.tensor([ids + [pad_id] * pad]), torch.tensor([mask + [0] * pad]),
                         torch.tensor([doc + [-1] * pad])))
    return out


@dataclass(frozen=True)
class WordDropout:
    """Replace each droppable token of a user turn, with probability `p`, by `unk_id` (a token that
    training never writes, whose embedding every unseen token shares). Droppable: a token in `ids`
    (the frame words) between `<｜User｜>` and the next `<｜Assistant｜>`, whose id the row's
    assistant tokens never use (a word the answer copies stays)."""

    unk_id: int
    p: float
    ids: frozenset[int]
    user_id: int
    assistant_id: int

    def __call__(self, e: Example, g: torch.Generator) -> Example:
        kept = {i for i, m in zip(e.ids, e.mask) if m}
        out, in_user = list(e.ids), False
        draws = torch.rand(len(e.ids), generator=g).tolist()
        for t, i in enumerate(e.ids):
            if i == self.user_id or i == self.assistant_id:
                in_user = i == self.user_id
            elif in_user and i in self.ids and i not in kept and draws[t] < self.p:
                out[t] = self.unk_id
        return Example(out, e.mask, e.category)


class Loader:
    """Deterministic, resumable batches: a seeded permutation per epoch, `batch_size` per step.

    With `bucket_id` (e.g. the `<｜User｜>` token id) rows are grouped by the tokens before its
    first occurrence (system prompt + tools), so every batch shares that prefix and the trainer
    runs it once; the batches of an epoch are then shuffled together. `dropout` (a `WordDropout`)
    is drawn afresh for every batch from (seed, epoch, step), so resuming replays it.
    """

    def __init__(self, examples: list[Example], batch_size: int, seed: int = 0, pad_id: int = 1,
                 bucket_id: int | None = None, dropout: WordDropout | None = None):
        self.examples, self.batch_size, self.seed = examples, batch_size, seed
        self.pad_id, self.bucket_id = pad_id, bucket_id
        self.dropout = dropout
        self.epoch, self.cursor = 0, 0
        self._cache: tuple[int, list[list[int]]] | None = None

    def _key(self, e: Example) -> tuple:
        ids = e.ids
        cut = ids.index(self.bucket_id) if self.bucket_id in ids else len(ids)
        return tuple(ids[:cut])

    def _batches(self) -> list[list[int]]:
        if self._cache and self._cache[0] == self.epoch:
            return self._cache[1]
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(len(self.examples), generator=g).tolist()
        B = self.batch_size
        if self.bucket_id is None:
            batches = [b for b in self._cut(order) if len(b) == B]
        else:
            buckets: dict[tuple, list[int]] = {}
            for i in order:
                buckets.setdefault(self._key(self.examples[i]), []).append(i)
            batches = [b for v in buckets.values() for b in self._cut(v)]
            perm = torch.randperm(len(batches), generator=g).tolist()
            batches = [batches[i] for i in perm]
        self._cache = (self.epoch, batches)
        return batches

    def _cut(self, rows: list[int]) -> list[list[int]]:
        """Shuffled row indices -> batches."""
        B = self.batch_size
        return [rows[i: i + B] for i in range(0, len(rows), B)]

    def __len__(self) -> int:
        """Batches in an epoch."""
        return len(self._batches())

    def next(self) -> Batch:
        batches = self._batches()
        if self.cursor >= len(batches):
            self.epoch, self.cursor = self.epoch + 1, 0
            batches = self._batches()
        pick = batches[self.cursor]
        self.cursor += 1
        rows = [self.examples[i] for i in pick]
        if self.dropout is not None and self.dropout.p > 0:
            g = torch.Generator().manual_seed((self.seed * 1_000_003 + self.epoch) * 1_000_003 + self.cursor)
            rows = [self.dropout(e, g) for e in rows]
        return collate(rows, self.pad_id, self.bucket_id is not None)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.cursor, self.seed = state["epoch"], state["cursor"], state["seed"]


def encode_all(convs: list[Conversation], tok: Tokenizer, max_len: int | None = None,
               mark_values: bool = False) -> list[Example]:
    """Tokenise conversations, dropping those longer than `max_len` or without assistant tokens."""
    out = []
    for c in convs:
        ids, mask = encode_conversation(c, tok, mark_values)
        if sum(mask) and (max_len is None or len(ids) <= max_len):
            out.append(Example(ids, mask, c.category))
    return out
