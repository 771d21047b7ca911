"""Model registry: classifiers (``features`` + linear ``head``) and conditional generators."""

from .classifiers import MODELS, Classifier, ResNet8, ResNet18, SmallCNN, build_model

__all__ = ["MODELS", "Classifier", "ResNet8", "ResNet18", "SmallCNN", "build_model"]
