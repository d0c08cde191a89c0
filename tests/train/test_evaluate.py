"""The teacher-forced argument diagnostic: which tokens it scores and how it counts them."""
import json

import pytest
import torch

from dsv32.chat import Tokenizer
from dsv32.model.init_tiny import tiny_config
from dsv32.train.data import encode_conversation
from dsv32.train.evaluate import argument_accuracy, argument_tokens
from dsv32.train.synth import sft_conversations
from dsv32.train.trainer import new_model

TOK = Tokenizer.load()


def _tool_convs(n=40, seed=2):
    return [c for c in sft_conversations(n, seed=seed, split="heldout") if c.category != "chat"]


def _values(message):
    out = []
    for call in message["tool_calls"]:
        args = json.loads(call["function"]["arguments"])
        out += [v if isinstance(v, str) else json.dumps(v) for v in args.values()]
    return out


def test_argument_tokens_cover_the_call_values_and_nothing_else():
    for conv in _tool_convs():
        ids, mask = encode_conversation(conv, TOK)
        turns = argument_tokens(ids, mask, TOK)
        last = [m for m in conv.messages if m["role"] == "assistant" and m.get("tool_calls")][-1]
        pieces = [TOK.decode([ids[i]]) for i in turns[-1]]
        values = _values(last)
        text = "".join(pieces)
        assert all(v in text for v in values)
        # a token of the tag around a value is counted only where the value's text shares it
        stripped = "".join(p.split('">')[-1].split("</")[0] for p in pieces)
        assert stripped == "".join(values)
        assert all(mask[i] for t in turns for i in t)


class Oracle:
    """Predicts the true next token everywhere except at the positions in `wrong`."""

    def __init__(self, ids, wrong=()):
        self.ids, self.wrong = ids, set(wrong)

    def eval(self):
        return self

    def hidden(self, x):
        assert x[0].tolist() == self.ids
        return torch.arange(x.shape[1], dtype=torch.float32).view(1, -1, 1)

    def logits(self, h):
        pos = h[:, 0].long().tolist()
        out = torch.zeros(len(pos), TOK.vocab_size)
        for r, p in enumerate(pos):
            out[r, self.ids[p + 1] + (1 if p + 1 in self.wrong else 0)] = 1.0
        return out


def test_argument_accuracy_counts_hits_and_exact_first_calls():
    conv = _tool_convs()[0]
    ids, mask = encode_conversation(conv, TOK)
    turns = argument_tokens(ids, mask, TOK)
    n = sum(map(len, turns))
    perfect = argument_accuracy(Oracle(ids), [conv], TOK)
    assert perfect == {"tokens": n, "top1": 1.0, "calls": 1, "first_call_exact": 1.0}
    miss = argument_accuracy(Oracle(ids, wrong=[turns[0][-1]]), [conv], TOK)
    assert miss["top1"] == pytest.approx((n - 1) / n) and miss["first_call_exact"] == 0.0
    with pytest.raises(ValueError, match="attention"):
        argument_accuracy(Oracle(ids), [conv], TOK, attention="sparse")


def test_served_equals_dense_when_every_key_fits_in_top_k():
    convs = _tool_convs(12)[:2]
    longest = max(len(encode_conversation(c, TOK)[0]) for c in convs)
    cfg = tiny_config(layers=2, hidden=32, heads=2, q_lora=16, kv_lora=16, nope=8, rope=8, v=8, inter=32,
                      moe_inter=16, experts=4, groups=2, topk_group=1, active=2, index_heads=4,
                      index_dim=16, topk=longest, dense=1)
    model = new_model(cfg, seed=1, std=0.2)
    served, dense = (argument_accuracy(model, convs, TOK, a) for a in ("served", "dense"))
    assert served == dense and served["tokens"] > 5 and served["calls"] == 2
