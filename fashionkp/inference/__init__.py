"""Stage 3, trained models on photos: checkpoint loading, the predictor (the one prediction path, which
validation during training uses too), ONNX export and ``predict.py``."""

from fashionkp.inference.predictor import KeypointPredictor

__all__ = ["KeypointPredictor"]
