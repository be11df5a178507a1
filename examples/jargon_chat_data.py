"""Write a multi-turn chat data set from the Jargon File, in the ``messages`` format any chat fine-tune reads.

    python examples/jargon_chat_data.py --out jargon_chat.jsonl [--rows 1500]
    lightning-qlora data=chat data.path=jargon_chat.jsonl

Each row is a conversation: a system turn, a user asking what a term means, the assistant's definition, then a
follow-up asking about a second term and its answer (both assistant turns are trained on; the rest is context). Some
rows are kept as single questions. Nothing is fetched but the Jargon File itself (the Debian package, once).
"""

import argparse
import json
import random
from pathlib import Path

from lightning_qlora.app.data.jargon import load_jargon

SYSTEM = "You are a helpful assistant who explains hacker jargon precisely."
FOLLOW_UPS = ("And what about {term}?", "What does {term} mean, then?", "One more: {term}?")


def conversations(rows: int, seed: int = 0) -> list[dict]:
    pairs = load_jargon()
    random.Random(seed).shuffle(pairs)
    out, i = [], 0
    while len(out) < rows and i + 1 < len(pairs):
        first, second = pairs[i], pairs[i + 1]
        messages = [{"role": "system", "content": SYSTEM},
                    {"role": "user", "content": first.prompt},
                    {"role": "assistant", "content": first.response}]
        if len(out) % 3:  # two rows in three have a second turn
            term = second.prompt.split('"')[1] if '"' in second.prompt else second.prompt
            follow_up = FOLLOW_UPS[len(out) % len(FOLLOW_UPS)].format(term=term)
            messages += [{"role": "user", "content": follow_up}, {"role": "assistant", "content": second.response}]
            i += 2
        else:
            i += 1
        out.append({"messages": messages})
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="jargon_chat.jsonl")
    parser.add_argument("--rows", type=int, default=1500)
    args = parser.parse_args()
    rows = conversations(args.rows)
    Path(args.out).write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    turns = sum(len(r["messages"]) for r in rows)
    print(f"{len(rows)} conversations ({turns} turns) written to {args.out}")


if __name__ == "__main__":
    main()
