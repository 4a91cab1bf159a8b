"""Text corpora (named corpora, user files, Python's stdlib; disjoint train/test splits),
calibration sampling, and the rule for a BOS at the start of every window."""

from neuroal.data.calibration import (
    CalibrationSet,
    CalibrationSpec,
    check_calibration_documents,
    load_calibration,
    sample_calibration,
    save_calibration,
)
from neuroal.data.corpora import (
    SPLITS,
    Corpus,
    corpus_digest,
    corpus_names,
    get_corpus,
    load_documents,
    load_text,
    offline_corpus_names,
)
from neuroal.data.windows import (
    BOS_PER_WINDOW_CHOICES,
    BOS_PER_WINDOW_MODEL_TYPES,
    BosPerWindow,
    resolve_bos_per_window,
    window_bos_id,
)

__all__ = [
    "BOS_PER_WINDOW_CHOICES",
    "BOS_PER_WINDOW_MODEL_TYPES",
    "SPLITS",
    "BosPerWindow",
    "CalibrationSet",
    "CalibrationSpec",
    "Corpus",
    "check_calibration_documents",
    "corpus_digest",
    "corpus_names",
    "get_corpus",
    "load_calibration",
    "load_documents",
    "load_text",
    "offline_corpus_names",
    "resolve_bos_per_window",
    "sample_calibration",
    "save_calibration",
    "window_bos_id",
]
