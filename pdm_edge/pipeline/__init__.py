"""The path of a window: each stream's lifecycle (``streams``) and the scoring stage
(``scoring``); alerts are :mod:`pdm_edge.alerts`."""

from pdm_edge.pipeline.scoring import ReplayCandidates, ScoringStage
from pdm_edge.pipeline.streams import STATES, StreamEvent, StreamTable

__all__ = ["STATES", "ReplayCandidates", "ScoringStage", "StreamEvent", "StreamTable"]
