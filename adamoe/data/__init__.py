from adamoe.data.datamodule import ClassificationData, LanguageModelData, TextData, TranslationData
from adamoe.data.sources import (
    DataError,
    DataSource,
    HubDataset,
    ParallelText,
    Synthetic,
    SyntheticSentiment,
    SyntheticText,
    TableFiles,
    TextLines,
)

__all__ = [
    "ClassificationData", "DataError", "DataSource", "HubDataset", "LanguageModelData", "ParallelText", "Synthetic",
    "SyntheticSentiment", "SyntheticText", "TableFiles", "TextData", "TextLines", "TranslationData",
]  # fmt: skip
