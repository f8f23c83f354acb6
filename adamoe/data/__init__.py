from adamoe.data.batch import Batch, collate
from adamoe.data.datamodule import TextData
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
from adamoe.data.tasks import ClassificationData, LanguageModelData, TranslationData

__all__ = [
    "Batch", "ClassificationData", "DataError", "DataSource", "Generated", "HubDataset", "LanguageModelData", "ParallelText",
    "SyntheticSentiment", "SyntheticText", "SyntheticTranslation", "TableFiles", "TextData", "TextLines", "TranslationData", "collate",
]  # fmt: skip
