"""What the daemon's worker does with each detector batch besides stepping it: metrics, log
lines for rejections and model resets, events and per-sensor state on MQTT, and Home Assistant
discovery (also re-sent from paho's network thread after a reconnect or HA's birth message)."""
from __future__ import annotations

import logging
import threading
import time

import numpy as np

from .homeassistant import discovery_messages, state_topic
from .messages import event_message, format_time, state_message
from .reasons import CODES
from .version import package_version

__all__ = ["STATE_MIN_INTERVAL_S", "BatchOutput"]

log = logging.getLogger("streamlstm")

STATE_MIN_INTERVAL_S = 1.0    # per-sensor state topic: at most one message per second unless the flag flips


class BatchOutput:
    """`config` is swapped by the worker when a reload is applied; `handle` runs on the worker."""

    def __init__(self, config, mqtt, metrics, rlog):
        self.config = config
        self.mqtt = mqtt
        self.metrics = metrics
        self.rlog = rlog
        self._state_sent: dict = {}  # sensor -> (monotonic time, anomaly flag) of the last state message
        # Sensors announced to Home Assistant (re-announced on reconnect and HA's birth message, from
        # paho's network thread, while the worker adds new ones): guarded by _announce_lock.
        self._announced: set = set()
        self._announce_lock = threading.Lock()

    def handle(self, batch, detector) -> None:
        self.metrics.observe_batch(batch)
        self._log_rejections(batch, detector)
        self._log_resets(batch)
        out = self.config.output
        for kind, incident in batch.events:
            topic = out.events_topic.replace("{sensor}", incident.sensor)
            if self.mqtt.publish(topic, event_message(kind, incident), qos=out.events_qos,
                                 expiry_s=out.message_expiry_s or None):
                self.metrics.events_published.inc()
            # %r: a sensor id (from a device, or a checkpoint of an older version) cannot forge a line.
            log.info("%s: sensor %r (group %s) score %.4f at %s", kind, incident.sensor, incident.group,
                     incident.score, format_time(incident.timestamp if kind == "anomaly" else incident.end))
        if state_topic(out) is not None:
            self._publish_states(batch)

    # --- Home Assistant discovery --------------------------------------------------------------

    def announced(self, sensors) -> None:
        """Sensors that have their entities already (restored from a checkpoint): announced again
        on connect."""
        if self.config.output.homeassistant.enabled:
            with self._announce_lock:
                self._announced.update(sensors)

    def announce_all(self, why: str) -> None:
        if not self.config.output.homeassistant.enabled:
            return
        with self._announce_lock:
            sensors = sorted(self._announced)
        for sensor in sensors:
            self._announce(sensor)
        if sensors:
            log.info("Home Assistant discovery (%s): %d sensors announced", why, len(sensors))

    def _announce(self, sensor: str) -> bool:
        ok = True
        for topic, payload in discovery_messages(self.config, sensor, package_version()):
            ok = self.mqtt.publish(topic, payload, qos=1, retain=True) and ok
        return ok

    # --- per batch -----------------------------------------------------------------------------

    def _log_rejections(self, batch, detector) -> None:
        cap = self.config.pipeline.max_sensors
        for i in np.flatnonzero(batch.code).tolist():  # rejected rows only
            reason = CODES[batch.code[i]]
            if reason == "sensor_cap":
                self.rlog.log(("rejected", reason), logging.WARNING,
                              "rejected (sensor_cap): sensor %r: pipeline.max_sensors=%d reached", batch.sensors[i], cap)
            elif reason == "wrong_arity":
                group = detector.group_for(batch.sensors[i]).name
                active = detector.active.get(group)
                expected = active.spec.input_size if active is not None else "?"
                self.rlog.log(("rejected", reason), logging.WARNING,
                              "rejected (wrong_arity): sensor %r sent %d value(s) per reading, but the model of "
                              "group %r takes %s (one width per group: give the inputs groups of their own)",
                              batch.sensors[i], int(batch.value_width[i]), group, expected)
            elif reason in ("out_of_order", "duplicate_timestamp"):
                # Both times, readable: a device stamping local time as UTC shows up here at once.
                self.rlog.log(("rejected", reason), logging.WARNING,
                              "rejected (%s): sensor %r reading at %s, its last accepted reading is at %s",
                              reason, batch.sensors[i], format_time(batch.timestamps[i]),
                              format_time(_last_time(detector, batch.sensors[i])))
            else:
                self.rlog.log(("rejected", reason), logging.WARNING, "rejected (%s): sensor %r at %s",
                              reason, batch.sensors[i], format_time(batch.timestamps[i]))

    def _log_resets(self, batch) -> None:
        # Both are counted in streamlstm_model_resets_total{reason}; the line says which sensor.
        for group, sensor, why in batch.resets:
            if why == "implausible_scale":
                self.rlog.log(("reset", why), logging.WARNING, "sensor %r (group %s): its statistics were "
                              "implausible (a huge reading?): scale and model state reset, warming up again",
                              sensor, group)
            elif why == "clock_jump":
                self.rlog.log(("reset", why), logging.WARNING, "sensor %r (group %s): its clock jumped (last "
                              "timestamp beyond detector.max_clock_skew_s): timestamps re-based", sensor, group)

    def _publish_states(self, batch) -> None:
        out = self.config.output
        announce = out.homeassistant.enabled
        topic = state_topic(out)
        sensors, rows = batch.accepted()  # each sensor's last accepted reading
        now = time.monotonic()
        for sensor, i in zip(map(batch.names.__getitem__, sensors.tolist()), rows.tolist()):
            flag = bool(batch.is_anomaly[i])
            sent = self._state_sent.get(sensor)
            if sent is not None and now - sent[0] < STATE_MIN_INTERVAL_S and sent[1] == flag:
                continue
            if announce and sensor not in self._announced and self._announce(sensor):
                with self._announce_lock:
                    self._announced.add(sensor)
            if self.mqtt.publish(topic.replace("{sensor}", sensor), state_message(batch, i, int(batch.width[i])),
                                 qos=1, retain=True):
                self._state_sent[sensor] = (now, flag)


def _last_time(detector, sensor: str) -> float:
    g = detector.active.get(detector.group_for(sensor).name)
    slot = None if g is None else g.sensors.get(sensor)
    return float("nan") if slot is None else float(g.last_ts[slot])
