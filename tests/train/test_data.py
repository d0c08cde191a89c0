"""Loss masks from the chat encoding, batching, packing and resumable shuffling."""

from dataclasses import replace

from dsv32.chat import Tokenizer, encode_messages
from dsv32.train.conversation import Conversation
from dsv32.train.data import Example, Loader, collate, encode_all, encode_conversation, pack

TOK = Tokenizer.load()
TOOLS = [{"type": "function", "function": {"name": "calculator", "description": "math",
          "parameters": {"type": "object", "properties": {"expression": {"type": "string"}},
                         "required": ["expression"]}}}]


def conv(mode):
    call = {"id": "c1", "type": "function",
            "function": {"name": "calculator", "arguments": '{"expression": "2+3"}'}}
    msgs = [{"role": "system", "content": "Be brief.", "tools": TOOLS},
            {"role": "user", "content": "what is 2+3?"},
            {"role": "assistant", "content": "", "reasoning_content": "Add them.", "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "c1", "content": "5"},
            {"role": "assistant", "content": "It is 5.", "reasoning_content": "Got 5."}]
    if mode == "chat":
        for m in msgs:
            m.pop("reasoning_content", None)
    return Conversation(msgs, thinking_mode=mode)


def assistant_text(c):
    """The assistant renderings, each cut between the prompt before it and the prompt after it."""
    msgs, mode, out = c.messages, c.thinking_mode, ""
    for i, m in enumerate(msgs):
        if m["role"] == "assistant":
            before = encode_messages(msgs[:i], thinking_mode=mode)
            out += encode_messages(msgs[: i + 1], thinking_mode=mode)[len(before):]
    return out


def test_masks_cover_exactly_the_assistant_tokens():
    for mode in ("thinking", "chat"):
        c = conv(mode)
        ids, mask = encode_conversation(c, TOK)
        assert TOK.decode(ids) == encode_messages(c.messages, thinking_mode=mode)
        assert TOK.decode([i for i, m in zip(ids, mask) if m]) == assistant_text(c)
        assert TOK.decode([i for i, m in zip(ids, mask) if not m]).endswith("<function_results>\n<result>5</result>\n</function_results>\n\n" + ("<think>" if mode == "thinking" else "</think>"))
        assert mask[-1] == 1 and ids[-1] == TOK.eos_id            # the closing EOS is trained
        if mode == "thinking":
            masked = TOK.decode([i for i, m in zip(ids, mask) if m])
            assert masked.startswith("Add them.</think>")


def test_earlier_turn_with_dropped_reasoning_is_not_trained():
    c = conv("thinking")
    c = replace(c, messages=c.messages + [{"role": "user", "content": "thanks"},
                                          {"role": "assistant", "content": "ok", "reasoning_content": "r"}])
    ids, mask = encode_conversation(c, TOK)
    assert TOK.decode([i for i, m in zip(ids, mask) if m]) == "r</think>ok<｜end▁of▁sentence｜>"


def test_without_tools_keeps_the_turns_and_drops_the_tools_section():
    c = conv("thinking")
    ids, mask = encode_conversation(c, TOK)
    short = c.without_tools()
    sids, smask = encode_conversation(short, TOK)
    assert "## Tools" in TOK.decode(ids) and "## Tools" not in TOK.decode(sids)
    assert len(sids) < len(ids) and "tools" in c.messages[0]             # the original is untouched
    trained = lambda i, m: TOK.decode([t for t, k in zip(i, m) if k])    # noqa: E731
    assert trained(sids, smask) == trained(ids, mask)                    # same assistant tokens
    assert TOK.decode(sids).endswith(TOK.decode(ids)[TOK.decode(ids).index("<｜User｜>"):])


def test_conversation_reads_its_tools_and_calls_and_copies_apart():
    c = conv("thinking")
    assert c.tools == TOOLS and c.called_tools() == {"calculator"}
    assert c.values() == ["2+3", "5"]
    assert c.without_tools().tools is None and c.offering([], id="x").tools == []
    assert c.offering([], id="x").id == "x" and c.tools == TOOLS           # the original keeps its tools
    drill = Conversation.drill("d-0", [("Echo: Oslo", "Oslo"), ("Echo: 7", "7")])
    assert drill.tools is None and (drill.category, drill.thinking_mode) == ("skill", "chat")
    assert [m["content"] for m in drill.messages] == ["Echo: Oslo", "Oslo", "Echo: 7", "7"]


def test_collate_shared_prefix_and_packing():
    a, b = Example([5] * 40 + [1, 2], [0] * 40 + [1, 1]), Example([5] * 40 + [3], [0] * 40 + [1])
    batch = collate([a, b], min_prefix=8)
    assert batch.prefix == 40 and batch.ids.shape == (2, 42) and batch.mask[1].tolist()[-1] == 0
    rows = pack([a, b, Example([7, 8], [0, 1])], seq_len=50)
    assert len(rows) == 2 and rows[0].doc[0].tolist()[-8:] == [1, 1, -1, -1, -1, -1, -1, -1]
    assert rows[0].ids.shape == (1, 50)


def test_loader_is_deterministic_and_resumes():
    ex = [Example([0, i % 3, 9, i], [0, 0, 1, 1]) for i in range(20)]
    a = Loader(ex, 3, seed=1, bucket_id=9)
    seq = [a.next().ids.tolist() for _ in range(15)]
    b = Loader(ex, 3, seed=1, bucket_id=9)
    for _ in range(7):
        b.next()
    c = Loader(ex, 3, seed=1, bucket_id=9)
    c.load_state_dict(b.state_dict())
    assert [c.next().ids.tolist() for _ in range(8)] == seq[7:]
    for batch in seq:                                 # bucketed: rows share the system segment
        assert len({tuple(r[:2]) for r in batch}) == 1


def test_encode_all_filters():
    ex = encode_all([conv("chat"), Conversation([{"role": "user", "content": "hi"}])], TOK)
    assert len(ex) == 1


def test_encode_all_keeps_the_category():
    drill = replace(conv("chat"), category="skill")
    assert [e.category for e in encode_all([drill, conv("thinking")], TOK)] == ["skill", ""]


def _dropout(p):
    from dsv32.train.data import WordDropout

    words = (" what", "what", " is", "is")
    ids = frozenset(i for w in words for i in TOK.encode(w) if len(TOK.encode(w)) == 1)
    return WordDropout(unk_id=2, p=p, ids=ids | set(TOK.encode(" 5")), user_id=TOK.user_id,
                       assistant_id=TOK.assistant_id)


def test_word_dropout_swaps_only_frame_words_of_user_turns():
    import torch

    c = conv("thinking")
    c.messages[0]["content"] = "what is brief?"           # frame words outside a user turn stay
    c.messages[1]["content"] = "what is 2+3? is it 5"     # " 5": a token the answer copies
    ids, mask = encode_conversation(c, TOK)
    e = Example(ids, mask)
    drop = _dropout(1.0)
    out = drop(e, torch.Generator().manual_seed(0))
    changed = [t for t, (a, b) in enumerate(zip(ids, out.ids)) if a != b]
    text = TOK.decode(ids)
    user = (text.index("<｜User｜>"), text.index("<｜Assistant｜>"))
    assert changed and all(out.ids[t] == 2 for t in changed)
    assert out.mask == mask
    starts = [len(TOK.decode(ids[:t])) for t in changed]
    assert all(user[0] < s < user[1] for s in starts)                # inside the user turn only
    swapped = {ids[t] for t in changed}
    assert swapped <= drop.ids and not swapped & {i for i, m in zip(ids, mask) if m}
    assert TOK.encode(" 5")[0] in [ids[t] for t in range(len(ids)) if user[0] < len(TOK.decode(ids[:t])) < user[1]]
    assert _dropout(0.0)(e, torch.Generator().manual_seed(0)).ids == ids
    half = [_dropout(0.5)(e, torch.Generator().manual_seed(s)).ids for s in (1, 1, 2, 3, 4)]
    assert half[0] == half[1] and len({tuple(h) for h in half}) > 1


def test_loader_with_word_dropout_is_deterministic_and_resumes():
    ex = [Example(*encode_conversation(conv(m), TOK)) for m in ("thinking", "chat")] * 8
    a = Loader(ex, 4, seed=3, bucket_id=TOK.user_id, dropout=_dropout(0.5))
    first = [a.next().ids for _ in range(3)]
    state = a.state_dict()
    rest = [a.next().ids for _ in range(3)]
    b = Loader(ex, 4, seed=3, bucket_id=TOK.user_id, dropout=_dropout(0.5))
    assert all((x == y).all() for x, y in zip(first, [b.next().ids for _ in range(3)]))
    c = Loader(ex, 4, seed=3, bucket_id=TOK.user_id, dropout=_dropout(0.5))
    c.load_state_dict(state)
    assert all((x == y).all() for x, y in zip(rest, [c.next().ids for _ in range(3)]))
    assert any((x == 2).any() for x in first + rest)


def marked(c):
    ids, mask = encode_conversation(c, TOK, mark_values=True)
    plain = encode_conversation(c, TOK)[1]
    assert [min(m, 1) for m in mask] == plain                 # marks only refine the loss mask
    return [TOK.decode([i]) for i, m in zip(ids, mask) if m == 2]


def test_value_marks_cover_the_copied_argument_and_result_tokens():
    c = conv("thinking")
    c.messages[2]["reasoning_content"] = "Add 2+3 now."
    c.messages[4]["content"] = "It is 5, not 15 or 5.5."
    # the call's "2+3" in the reasoning and the DSML value; the result "5" once in the answer and
    # once in its reasoning ("Got 5."); "15" and "5.5" contain a 5 but are other numbers
    assert "".join(marked(c)) == "2+3" + "2+3" + "5" + "5"


def test_value_marks_of_a_json_tool_result_and_numbers():
    c = conv("chat")
    call = c.messages[2]["tool_calls"][0]["function"]
    call["name"], call["arguments"] = "get_weather", '{"city": "Oslo", "date": "2024-05-01"}'
    c.messages[3]["content"] = '{"city": "Oslo", "high_c": -3, "condition": "sunny"}'
    c.messages[4]["content"] = "In Oslo: sunny, high -3°C (Oslofjord 13)."
    got = "".join(marked(c))
    assert got == "Oslo" + "2024-05-01" + " Oslo" + " sunny" + " -3", got


def test_encode_all_marks_values_only_when_asked():
    plain = encode_all([conv("thinking")], TOK)[0]
    marks = encode_all([conv("thinking")], TOK, mark_values=True)[0]
    assert 2 not in plain.mask and 2 in marks.mask and plain.ids == marks.ids
    assert collate([marks]).tokens == sum(plain.mask)
