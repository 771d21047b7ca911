"""Model registry: classifiers (``features`` + linear ``head``) and conditional generators."""

from mosaic_flwr.models.classifiers import MODELS, Classifier, ResNet8, ResNet18, SmallCNN, build_model

__all__ = ["MODELS", "Classifier", "ResNet8", "ResNet18", "SmallCNN", "build_model"]
