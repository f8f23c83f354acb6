from adamoe.data.batch import Batch, collate
from adamoe.data.datamodule import TextData
from adamoe.data.modules import ClassificationData, LanguageModelData, TranslationData
from adamoe.data.sources import (
    DataSource,
    Generated,
    ParallelText,
    SyntheticSentiment,
    SyntheticText,
    SyntheticTranslation,
    TextLines,
)
from adamoe.data.tables import HubDataset, TableFiles

__all__ = [
    "Batch",
    "ClassificationData",
    "DataSource",
    "Generated",
    "HubDataset",
    "LanguageModelData",
    "ParallelText",
    "SyntheticSentiment",
    "SyntheticText",
    "SyntheticTranslation",
    "TableFiles",
    "TextData",
    "TextLines",
    "TranslationData",
    "collate",
]
