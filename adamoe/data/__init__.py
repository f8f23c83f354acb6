from adamoe.data.datamodule import TranslationData
from adamoe.data.sources import DataError, DataSource, HubDataset, ParallelText, Synthetic, TableFiles

__all__ = ["DataError", "DataSource", "HubDataset", "ParallelText", "Synthetic", "TableFiles", "TranslationData"]
