"""Chat data: assistant-only labels through real chat templates, the file formats, bad rows, and the data module."""

import csv
import json

import pytest

from lightning_qlora.app.data import ChatDataModule, DataFormatError
from lightning_qlora.app.data.chat import IGNORE_INDEX, Conversation, check_messages, tokenize_conversation
from lightning_qlora.app.data.sources import load_rows

# Llama 3's template, as Meta ships it (abridged: no date or tool-call branches), without generation markers.
LLAMA3_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)
# Qwen 2.5's template (abridged): a default system turn, tools in the system turn, tool results as user turns.
QWEN_TEMPLATE = (
    "{%- if tools %}"
    "{{- '<|im_start|>system\\n' }}"
    "{%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] }}{%- else %}{{- 'You are Qwen.' }}{%- endif %}"
    "{{- '\\n\\n# Tools\\n<tools>' }}"
    "{%- for tool in tools %}{{- '\\n' }}{{- tool | tojson }}{%- endfor %}"
    "{{- '\\n</tools><|im_end|>\\n' }}"
    "{%- else %}"
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>system\\nYou are Qwen.<|im_end|>\\n' }}{%- endif %}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'user' or (message.role == 'system' and not loop.first) or message.role == 'assistant' %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}"
    "{%- elif message.role == 'tool' %}"
    "{{- '<|im_start|>user\\n<tool_response>\\n' + message.content + '\\n</tool_response><|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
# A template that knows no tool role: it raises, as many do.
NO_TOOL_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message.role not in ['system', 'user', 'assistant'] %}"
    "{{- raise_exception('Only system, user and assistant roles are supported!') }}{%- endif %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

CHAT = [
    {"role": "system", "content": "Answer in one line."},
    {"role": "user", "content": "What is a hack?"},
    {"role": "assistant", "content": "A quick job that produces what is needed."},
    {"role": "user", "content": "And a kludge?"},
    {"role": "assistant", "content": "A clumsy but working solution."},
]


@pytest.fixture(params=["smollm2", "llama3", "qwen"])
def tokenizer(request, smollm2_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_path)
    if request.param == "llama3":
        tok.add_special_tokens({"additional_special_tokens": ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]})
        tok.chat_template = LLAMA3_TEMPLATE
    elif request.param == "qwen":
        tok.chat_template = QWEN_TEMPLATE
    tok.template_name = request.param
    return tok


def _trained_text(tokenizer, row):
    """The text of the labelled tokens, each contiguous run on a line of its own."""
    runs, current = [], []
    for token, label in zip(row.input_ids, row.labels, strict=True):
        if label != IGNORE_INDEX:
            current.append(token)
        elif current:
            runs.append(tokenizer.decode(current))
            current = []
    if current:
        runs.append(tokenizer.decode(current))
    return runs


END_OF_TURN = {"smollm2": "<|im_end|>", "qwen": "<|im_end|>", "llama3": "<|eot_id|>"}


def test_the_loss_is_on_assistant_turns_only_for_each_template(tokenizer):
    row = tokenize_conversation(tokenizer, Conversation(CHAT, "test:1"), max_length=512)
    end = END_OF_TURN[tokenizer.template_name]
    assert _trained_text(tokenizer, row) == [
        f"A quick job that produces what is needed.{end}", f"A clumsy but working solution.{end}"
    ]
    # Labels are the ids where trained: the model predicts exactly the assistant's tokens.
    assert all(label in (IGNORE_INDEX, token) for token, label in zip(row.input_ids, row.labels, strict=True))
    assert "What is a hack?" in tokenizer.decode(row.input_ids)  # the prompt is there, untrained
    everything = tokenize_conversation(tokenizer, Conversation(CHAT, "test:1"), max_length=512, train_on="all")
    assert everything.labels == everything.input_ids


def test_tools_are_rendered_and_tool_results_never_trained_on(smollm2_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_path)
    tok.chat_template = QWEN_TEMPLATE
    tools = [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}]
    messages = [
        {"role": "user", "content": "Define foo."},
        {"role": "assistant", "content": "Looking it up."},
        {"role": "tool", "content": "foo: a metasyntactic variable"},
        {"role": "assistant", "content": "A placeholder name."},
    ]
    row = tokenize_conversation(tok, Conversation(messages, "t:1", tools), max_length=512)
    assert "lookup" in tok.decode(row.input_ids)
    assert _trained_text(tok, row) == ["Looking it up.<|im_end|>", "A placeholder name.<|im_end|>"]


def test_long_rows_are_cut_at_max_length(tokenizer):
    row = tokenize_conversation(tokenizer, Conversation(CHAT, "t:1"), max_length=20)
    assert len(row) == 20 and row.truncated


@pytest.mark.parametrize(("messages", "reason", "message"), [
    ([{"role": "user", "content": "hi"}], "no assistant turn", r"t:7: no assistant turn"),
    ([{"role": "narrator", "content": "hi"}, {"role": "assistant", "content": "x"}], "unknown role",
     r"t:7: message 0 has role 'narrator'"),
    ([{"role": "user", "content": "  "}, {"role": "assistant", "content": "x"}], "empty content",
     r"t:7: message 0 \(user\) has empty content"),
    ("not a list", "format", r"t:7: 'messages' must be a non-empty list"),
])
def test_bad_rows_are_named_with_their_reason(messages, reason, message):
    from lightning_qlora.app.data.chat import RowError

    with pytest.raises(RowError, match=message) as caught:
        check_messages(messages, "t:7")
    assert caught.value.reason == reason


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _chat_rows(n):
    return [{"messages": [{"role": "user", "content": f"Question {i}?"},
                          {"role": "assistant", "content": f"Answer number {i}, " + "word " * (i % 7)}]} for i in range(n)]


def test_every_file_format_reads_the_same_rows(tmp_path):
    import datasets

    rows = [{"instruction": f"Define term {i}.", "response": f"Term {i} means thing {i}."} for i in range(6)]
    _jsonl(tmp_path / "a.jsonl", rows)
    (tmp_path / "a.json").write_text(json.dumps(rows))
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "a.parquet"))
    with (tmp_path / "a.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["instruction", "response"])
        writer.writeheader()
        writer.writerows(rows)
    loaded = {ext: load_rows(tmp_path / f"a.{ext}") for ext in ("jsonl", "json", "parquet", "csv")}
    for ext, result in loaded.items():
        assert result.format == "instruction", ext
        assert [c.messages for c in result.conversations] == [c.messages for c in loaded["jsonl"].conversations], ext
    assert loaded["csv"].conversations[2].messages == [
        {"role": "user", "content": "Define term 2."}, {"role": "assistant", "content": "Term 2 means thing 2."}
    ]


def test_chat_sharegpt_and_text_rows_are_recognized(tmp_path):
    chat = load_rows(_jsonl(tmp_path / "chat.jsonl", _chat_rows(3)))
    assert chat.format == "messages" and len(chat.conversations) == 3
    share = load_rows(_jsonl(tmp_path / "sharegpt.jsonl", [
        {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]}
    ]))
    assert share.conversations[0].messages == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    text = load_rows(_jsonl(tmp_path / "text.jsonl", [{"text": "Plain prose."}, {"text": "More."}]))
    assert text.format == "text" and [t for t, _ in text.texts] == ["Plain prose.", "More."]


def test_bad_rows_are_skipped_counted_and_named_and_a_missing_column_is_an_error(tmp_path):
    rows = _chat_rows(4) + [
        {"messages": [{"role": "user", "content": "only a question"}]},
        {"messages": [{"role": "wizard", "content": "abracadabra"}, {"role": "assistant", "content": "x"}]},
        {"messages": [{"role": "user", "content": ""}, {"role": "assistant", "content": "x"}]},
    ]
    loaded = load_rows(_jsonl(tmp_path / "mixed.jsonl", rows))
    assert len(loaded.conversations) == 4
    assert dict(loaded.skipped) == {"no assistant turn": 1, "unknown role": 1, "empty content": 1}
    assert loaded.examples["unknown role"][0].startswith(f"{tmp_path / 'mixed.jsonl'}:row 6: message 0 has role 'wizard'")
    with pytest.raises(DataFormatError, match=r"data.format=instruction needs column\(s\) \['response'\]"):
        load_rows(_jsonl(tmp_path / "half.jsonl", [{"instruction": "a"}]), "instruction")
    with pytest.raises(DataFormatError, match=r"Cannot tell the row format from the columns \['question'\]"):
        load_rows(_jsonl(tmp_path / "odd.jsonl", [{"question": "a"}]))
    with pytest.raises(DataFormatError, match=r"bad.jsonl:2: invalid JSON"):
        (tmp_path / "bad.jsonl").write_text('{"text": "a"}\n{"text": \n')
        load_rows(tmp_path / "bad.jsonl")
    with pytest.raises(DataFormatError, match=r"unknown file type '.txt'"):
        (tmp_path / "data.txt").write_text("x")
        load_rows(tmp_path / "data.txt")


def test_a_template_that_cannot_render_a_role_skips_the_row_and_says_so(tmp_path, smollm2_path, monkeypatch):
    from transformers import AutoTokenizer

    rows = _chat_rows(12) + [{"messages": [
        {"role": "user", "content": "Look it up."}, {"role": "tool", "content": "result"},
        {"role": "assistant", "content": "Done."}]}]
    path = _jsonl(tmp_path / "tools.jsonl", rows)
    original = AutoTokenizer.from_pretrained

    def with_template(*args, **kwargs):
        tok = original(*args, **kwargs)
        tok.chat_template = NO_TOOL_TEMPLATE
        return tok

    monkeypatch.setattr("transformers.AutoTokenizer.from_pretrained", with_template)
    dm = ChatDataModule(smollm2_path, source="file", path=str(path), val_size=2, max_tokens=128)
    dm.setup("fit")
    assert dm.counts["skipped (template)"] == 1
    assert "1 skipped (template)" in dm.describe()


def test_the_data_module_packs_reports_and_drops_what_it_says(tmp_path, smollm2_path):
    rows = [{"messages": [{"role": "user", "content": f"Question {i}?"},
                          {"role": "assistant", "content": f"Answer number {i}, " + "word " * (3 * (i % 7))}]}
            for i in range(40)] + [{"messages": [{"role": "user", "content": "q"}]}]
    path = _jsonl(tmp_path / "chat.jsonl", rows)
    dm = ChatDataModule(smollm2_path, source="file", path=str(path), val_size=4, max_tokens=128, max_length=60,
                        overlong="drop", batch_size=2)
    dm.setup("fit")
    text = dm.describe()
    assert dm.counts["dropped (too long)"] > 0 and f"{dm.counts['dropped (too long)']} dropped (too long)" in text
    assert len(dm.train_rows) + len(dm.val_rows) + dm.counts["dropped (too long)"] == 40
    assert "1 skipped (no assistant turn)" in text and "packed into" in text
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"input_ids", "position_ids", "labels", "tokens"}
    assert batch["input_ids"].shape == (2, 128) and 0 < int(batch["tokens"]) <= 256
    assert all(len(r["input_ids"]) <= 60 for r in dm.train_rows)
    assert dm.val_examples and dm.val_examples[0].reference.startswith("Answer number")
