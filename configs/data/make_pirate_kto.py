"""Builds the KTO demo rows from the DPO demo pairs: each pair {"prompt", "chosen", "rejected"} of pirate_pairs.jsonl
(pirate_pairs_val.jsonl) becomes two unpaired rows ({"prompt", "completion", "label"}, TRL's unpaired preference
type, `format: kto`): the pirate answer labelled true (desirable) and the model's own plain answer labelled false.

Rerun (from the repository root, a second, no model needed; output is deterministic):

    python configs/data/make_pirate_kto.py
"""

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SPLITS = {"pirate_pairs.jsonl": "pirate_kto.jsonl", "pirate_pairs_val.jsonl": "pirate_kto_val.jsonl"}


def unpaired(pair: dict) -> list[dict]:
    return [{"prompt": pair["prompt"], "completion": pair["chosen"], "label": True},
            {"prompt": pair["prompt"], "completion": pair["rejected"], "label": False}]


def main() -> None:
    for source, target in SPLITS.items():
        pairs = [json.loads(line) for line in (HERE / source).read_text().splitlines() if line.strip()]
        rows = [row for pair in pairs for row in unpaired(pair)]
        (HERE / target).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        print(f"{target}: {len(rows)} rows from {len(pairs)} pairs", file=sys.stderr)


if __name__ == "__main__":
    main()
