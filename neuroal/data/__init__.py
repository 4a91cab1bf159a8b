"""Text corpora (a registry of named corpora with train/test splits) and calibration sampling."""

from neuroal.data.calibration import (
    CalibrationSet,
    CalibrationSpec,
    load_calibration,
    sample_calibration,
    save_calibration,
)
from neuroal.data.corpora import (
    SPLITS,
    Corpus,
    corpus_names,
    get_corpus,
    load_documents,
    load_text,
    offline_corpus_names,
)

__all__ = [
    "SPLITS",
    "CalibrationSet",
    "CalibrationSpec",
    "Corpus",
    "corpus_names",
    "get_corpus",
    "load_calibration",
    "load_documents",
    "load_text",
    "offline_corpus_names",
    "sample_calibration",
    "save_calibration",
]
