import json

import pytest

from lightning_qlora.app.data import (
    DataFormatError,
    Example,
    InstructionDataModule,
    load_jargon,
    load_jsonl,
    parse_jargon,
)
from lightning_qlora.app.data.examples import split_held_out
from lightning_qlora.app.data.tokenize import IGNORE_INDEX, collate, tokenize_examples

SNIPPET = """\
                             Part II. The Jargon Lexicon

   :cruft: /kruhft/

   [very common; back-formation from {crufty}]

   1. n. An unpleasant substance. The dust that gathers under your bed is
   cruft; the TMRC Dictionary correctly noted that attacking it with a broom
   only produces more.

   2. n. The results of shoddy construction.

   3. vt. To write assembler code.

   :cruftsmanship: /kruhfts'm@n-ship /, n.

   [from {cruft}] The antithesis of craftsmanship.

  D

   :daemon: /day'mn/, /dee'mn/, n.

   [from the mythological meaning] A program that is not invoked explicitly.

                             Part III. Appendices

   Table of Contents
"""


def test_parse_jargon_entries():
    examples = parse_jargon(SNIPPET, source="snippet")
    assert [e.prompt for e in examples] == [
        'What does the hacker jargon term "cruft" mean?',
        'What does the hacker jargon term "cruftsmanship" mean?',
        'What does the hacker jargon term "daemon" mean?',
    ]
    cruft = examples[0]
    # The etymology paragraph is dropped, two senses kept, line breaks joined, braces removed.
    assert cruft.response.startswith("1. n. An unpleasant substance. The dust that gathers under your bed is cruft;")
    assert "2. n. The results of shoddy construction." in cruft.response
    assert "3. vt." not in cruft.response
    # An etymology that is the only paragraph is kept, without braces; section headings end an entry.
    assert examples[1].response == "[from cruft] The antithesis of craftsmanship."
    assert examples[2].response == "[from the mythological meaning] A program that is not invoked explicitly."
    assert examples[0].source == "snippet:3"  # the 1-based line of the entry header


def test_real_jargon_file_has_about_2200_pairs():
    examples = load_jargon()
    assert 2100 <= len(examples) <= 2500
    terms = {e.prompt for e in examples}
    assert 'What does the hacker jargon term "hacker" mean?' in terms
    assert all(e.response for e in examples)


def test_missing_jargon_path_is_explained(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"data.path=.*does not exist.*jargon.txt"):
        load_jargon(tmp_path / "nope.txt")


def test_file_without_entries_is_refused(tmp_path):
    path = tmp_path / "jargon.txt"
    path.write_text("just some text\n")
    with pytest.raises(ValueError, match=r"found no lexicon entries"):
        load_jargon(path)


def _write(tmp_path, lines):
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_jsonl_reads_rows_and_skips_blank_lines(tmp_path):
    path = _write(tmp_path, [json.dumps({"instruction": "Say hi", "response": "hi"}), "", json.dumps({"instruction": "2+2", "response": "4"})])
    examples = load_jsonl(path)
    assert [(e.prompt, e.response) for e in examples] == [("Say hi", "hi"), ("2+2", "4")]
    assert examples[1].source.endswith("data.jsonl:3")


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        (['{"instruction": "a", "response": "b"}', '{"instruction": "a", "response": '], r"data.jsonl:2: invalid JSON"),
        (['["a", "b"]'], r"data.jsonl:1: expected a JSON object, got list"),
        (['{"instruction": "a"}'], r"data.jsonl:1: expected a non-empty string under 'response', got None"),
        (['{"instruction": "", "response": "b"}'], r"data.jsonl:1: expected a non-empty string under 'instruction'"),
        (['{"instruction": 3, "response": "b"}'], r"under 'instruction', got 3"),
        ([""], r"the file has no rows"),
    ],
)
def test_jsonl_bad_rows_name_file_and_line(tmp_path, lines, message):
    with pytest.raises(DataFormatError, match=message):
        load_jsonl(_write(tmp_path, lines))


def test_jsonl_alpaca_input_joins_the_instruction(tmp_path):
    path = _write(tmp_path, [
        '{"instruction": "Translate to French.", "input": "Good morning", "response": "Bonjour"}',
        '{"instruction": "Name a colour.", "input": "", "response": "Blue"}',
    ])
    examples = load_jsonl(path)
    assert [e.prompt for e in examples] == ["Translate to French.\n\nGood morning", "Name a colour."]
    assert load_jsonl(path, input_key=None)[0].prompt == "Translate to French."
    with pytest.raises(DataFormatError, match=r"data.jsonl:1: 'input' must be a string"):
        load_jsonl(_write(tmp_path, ['{"instruction": "a", "input": 3, "response": "b"}']))


def test_jsonl_missing_file(tmp_path):
    with pytest.raises(DataFormatError, match=r"does not exist. Expected a JSONL file"):
        load_jsonl(tmp_path / "missing.jsonl")


def test_held_out_split_is_fixed_and_disjoint():
    examples = [Example(f"term {i}", f"definition {i}") for i in range(50)]
    train, held = split_held_out(examples, 5)
    train2, held2 = split_held_out(list(reversed(examples)), 5)
    assert {e.prompt for e in held} == {e.prompt for e in held2}
    assert len(held) == 5 and len(train) == 45
    assert not {e.prompt for e in train} & {e.prompt for e in held}
    with pytest.raises(ValueError, match=r"too few to hold out val_size=5"):
        split_held_out(examples[:5], 5)


def test_tokenize_masks_prompt_and_ends_with_eos(smollm2_tokenizer):
    tok = smollm2_tokenizer
    assert tok.eos_token == "<|im_end|>"  # the chat template's end of turn, checked after GGUF conversion
    split = tokenize_examples(tok, [Example("What is cruft?", "Junk code.")], max_length=128)
    row = split.rows[0]
    answer = [t for t, label in zip(row["input_ids"], row["labels"]) if label != IGNORE_INDEX]
    assert tok.decode(answer) == "Junk code.<|im_end|>"
    prompt = tok.decode(row["input_ids"][: len(row["input_ids"]) - len(answer)])
    assert prompt.endswith("<|im_start|>assistant\n") and "What is cruft?" in prompt
    assert (split.truncated, split.dropped) == (0, 0)


def test_tokenize_truncates_and_drops_with_counts(smollm2_tokenizer):
    long = Example("What is cruft?", "junk " * 200)
    huge_prompt = Example("word " * 200, "short")
    split = tokenize_examples(smollm2_tokenizer, [long, huge_prompt], max_length=64)
    assert (split.truncated, split.dropped) == (1, 1)
    assert len(split.rows) == 1 and len(split.rows[0]["input_ids"]) == 64


def test_collate_pads_and_masks():
    batch = collate([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}], pad_token_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]


def test_datamodule_jsonl_end_to_end_padded_and_packed(tmp_path, smollm2_path):
    rows = [json.dumps({"instruction": f"Define word {i}", "response": f"Meaning number {i}."}) for i in range(20)]
    path = _write(tmp_path, rows)
    padded = InstructionDataModule(smollm2_path, source="jsonl", path=str(path), max_length=64, batch_size=4,
                                   val_size=4, packing=False)
    padded.setup("fit")
    assert len(padded.train_rows) == 16 and len(padded.val_rows) == 4
    batch = next(iter(padded.train_dataloader()))
    assert batch["input_ids"].shape[0] == 4 and "attention_mask" in batch and (batch["labels"] != IGNORE_INDEX).any()
    packed = InstructionDataModule(smollm2_path, source="jsonl", path=str(path), max_length=64, max_tokens=128,
                                   batch_size=2, val_size=4)
    packed.setup("fit")
    assert packed.train_rows == padded.train_rows  # the same rows, only batched differently
    batch = next(iter(packed.train_dataloader()))
    assert batch["input_ids"].shape == (2, 128) and "attention_mask" not in batch


def test_datamodule_rejects_bad_arguments():
    with pytest.raises(ValueError, match=r"source='jsonl' needs data.path=FILE.*max_length=4 must be >= 16"):
        InstructionDataModule("unused", source="jsonl", max_length=4)
    with pytest.raises(ValueError, match=r"train_on='some' must be 'assistant' or 'all'; max_tokens=64 must be >= max_length=128"):
        InstructionDataModule("unused", max_tokens=64, max_length=128, train_on="some")


def test_processes_asking_for_the_jargon_file_at_once_fetch_it_once(tmp_path, monkeypatch):
    # Two DDP ranks (or test workers) on a fresh machine: one fetches the Debian package, the other waits and reads
    # its copy (without the lock both fetched, and each one's atomic rename could swap the cache under the other).
    import threading
    from pathlib import Path

    from lightning_qlora.app.data import jargon

    fetched = []

    def fetch(target):
        with jargon.atomic_directory(target) as staging:
            fetched.append(threading.current_thread().name)
            threading.Event().wait(0.3)  # the other caller arrives meanwhile
            (staging / jargon._PACKAGE_FILE).parent.mkdir(parents=True)
            (staging / jargon._PACKAGE_FILE).write_bytes(b"jargon")
        return target / jargon._PACKAGE_FILE

    monkeypatch.setattr(jargon, "_PACKAGE_FILE", Path("not/on/this/machine/jargon.txt.gz"))
    monkeypatch.setattr(jargon, "cache_dir", lambda: tmp_path)
    monkeypatch.setattr(jargon, "_fetch_debian_package", fetch)
    found = []
    threads = [threading.Thread(target=lambda: found.append(jargon.find_jargon_file())) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(fetched) == 1 and len(found) == 2 and len(set(found)) == 1 and found[0].read_bytes() == b"jargon"
