"""Why a reading or payload is rejected: the one list of reasons (the `reason` label of
streamlstm_readings_rejected_total, log lines, `ParseResult.rejected`, `DetectorBatch.reason`)."""
from __future__ import annotations

__all__ = ["CODE", "CODES", "PARSER_REASONS", "REJECTION_REASONS"]

_PARSER, _DETECTOR, _KAFKA = "parser", "detector", "kafka_source"

# reason -> who rejects with it (payload.PayloadParser, detector.Detector), in export order.
_BY = {
    "not_a_number": (_PARSER,),
    "non_finite": (_PARSER,),
    "bad_json": (_PARSER,),
    "missing_field": (_PARSER,),
    "unknown_topic": (_PARSER,),
    "too_large": (_PARSER,),
    "bad_timestamp": (_PARSER,),
    "duplicate_timestamp": (_DETECTOR,),
    "out_of_order": (_DETECTOR,),
    "sensor_cap": (_DETECTOR,),
    "wrong_arity": (_PARSER, _DETECTOR),   # payload vs input width; reading vs the group's model
    "unavailable": (_PARSER,),             # Home Assistant's unavailable / unknown states
    "bad_line_protocol": (_PARSER,),
    "bad_sensor_id": (_PARSER,),
    "clock_skew": (_DETECTOR,),
    "partition_conflict": (_KAFKA,),       # a sensor in two partitions of one worker (topic not keyed by id)
}

REJECTION_REASONS = tuple(_BY)
PARSER_REASONS = frozenset(r for r, by in _BY.items() if _PARSER in by)
# Reasons as small integers for per-reading arrays (DetectorBatch.code): 0 is "accepted".
CODES = ("",) + REJECTION_REASONS
CODE = {reason: code for code, reason in enumerate(CODES)}
