"""The LightningModules: a shared base and one file per task."""

from adamoe.tasks.base import MoEModule
from adamoe.tasks.classification import ClassificationModule
from adamoe.tasks.language_model import LanguageModelModule
from adamoe.tasks.translation import TranslationModule

__all__ = ["ClassificationModule", "LanguageModelModule", "MoEModule", "TranslationModule"]
