"""Anomaly detection on top of the LSTM bank; knows nothing about MQTT."""
from .detector import Detector, GroupConfig, Outcome
from .group import BatchResult, GroupDetector
from .incidents import Incident
from .settings import DetectorSettings

__all__ = ["Detector", "GroupConfig", "Outcome", "BatchResult", "GroupDetector", "Incident", "DetectorSettings"]
