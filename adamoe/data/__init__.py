from adamoe.data.batch import Batch, collate
from adamoe.data.datamodule import ClassificationData, LanguageModelData, TextData, TranslationData
from adamoe.data.sources import (
    DataError,
    DataSource,
    Generated,
    HubDataset,
    ParallelText,
    SyntheticSentiment,
    SyntheticText,
    SyntheticTranslation,
    TableFiles,
    TextLines,
)

__all__ = [
    "Batch", "ClassificationData", "DataError", "DataSource", "Generated", "HubDataset", "LanguageModelData", "ParallelText",
    "SyntheticSentiment", "SyntheticText", "SyntheticTranslation", "TableFiles", "TextData", "TextLines", "TranslationData", "collate",
]  # fmt: skip
