"""Load against the real daemon and a real mosquitto: a burst of 10^6 readings from 10^4 sensors,
the sensor cap, and a consumer slower than the publisher (backpressure, bounded memory).

Readings travel as batched JSON (1000 per message) so publishing is not the bottleneck; the
model is the small one of daemon_harness (hidden_size 4, window 4, train_every 8, CPU backend).
Memory is the daemon's peak RSS (VmHWM in /proc/PID/status), against stated budgets.
STREAMLSTM_LOAD_READINGS sets the burst size (default 10^6, the full figure: ~15 s on 2 cores).
"""
from __future__ import annotations

import os
import time

import pytest

pytest.importorskip("paho.mqtt.client")

from daemon_harness import (Publisher, batch_payloads, daemon_config, proc_status_mib, report,  # noqa: E402
                            wait_for)

BURST_READINGS = int(os.environ.get("STREAMLSTM_LOAD_READINGS", "1000000"))
BURST_SENSORS = 10_000
PER_MESSAGE = 1000
# Budgets (MiB). At READY the daemon is ~185 MiB (Python, NumPy, Numba kernels). The burst runs
# with the default queue (100 000 readings); the slow consumer with a 1000-reading queue, where
# everything not yet processed must stay in the broker: a queue that buffered the whole burst in
# the daemon would need ~300 B per reading on top.
BURST_PEAK_RSS_MIB = 512
BURST_GROWTH_MIB = 256
SLOW_GROWTH_MIB = 64


def vm_rss_mib(pid: int) -> float:
    return proc_status_mib(pid, "VmRSS")


def publish(broker, items) -> tuple[Publisher, float]:
    pub = Publisher(broker.host, broker.port)
    t0 = time.monotonic()
    pub.publish_all(items)
    return pub, t0


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_burst_of_readings_from_ten_thousand_sensors(mosquitto, tmp_path, daemons):
    n_sensors = min(BURST_SENSORS, BURST_READINGS)
    per_sensor = BURST_READINGS // n_sensors
    total = n_sensors * per_sensor
    d = daemons(tmp_path, daemon_config(mosquitto.port, tmp_path)).start()
    d.wait_ready()
    rss_ready = vm_rss_mib(d.pid)
    pub, t0 = publish(mosquitto, batch_payloads(n_sensors, per_sensor, PER_MESSAGE))
    try:
        assert pub.wait_acked(600) == total
        published_s = time.monotonic() - t0
        # Generous: ~80 000 readings/s here; a loaded 2-core box may be several times slower.
        s = d.wait_handled(total, timeout=max(300, total / 2000))
        elapsed = time.monotonic() - t0
    finally:
        pub.close()
    assert s.readings == total and s.rejected == {}, s.rejected
    assert s.value("streamlstm_sensors", group="default") == n_sensors
    assert s.value("streamlstm_queue_depth") <= s.value("streamlstm_queue_capacity")
    peak = d.update_peak_rss() / 1024
    assert d.stop() == 0, d.log_tail()
    report("load/burst", published=total, processed=s.readings, lost=total - s.readings, rejected=s.rejected,
           sensors=n_sensors, readings_per_message=PER_MESSAGE, publish_s=round(published_s, 1),
           process_s=round(elapsed, 1), readings_per_s=round(total / elapsed), rss_at_ready_mib=round(rss_ready, 1),
           peak_rss_mib=round(peak, 1), budget_mib=BURST_PEAK_RSS_MIB,
           model="hidden_size 4, window 4, train_every 8, cpu")
    assert peak <= BURST_PEAK_RSS_MIB, f"peak RSS {peak:.0f} MiB"
    assert peak - rss_ready <= BURST_GROWTH_MIB, f"RSS grew {peak - rss_ready:.0f} MiB during the burst"


def test_sensor_cap_is_enforced_logged_and_counted(mosquitto, tmp_path, daemons):
    n_sensors, per_sensor, cap = 10_000, 10, 1000
    total = n_sensors * per_sensor
    d = daemons(tmp_path, daemon_config(mosquitto.port, tmp_path, pipeline={"max_sensors": cap})).start()
    d.wait_ready()
    pub, t0 = publish(mosquitto, batch_payloads(n_sensors, per_sensor, PER_MESSAGE))
    try:
        pub.wait_acked(300)
        s = d.wait_handled(total, timeout=300)
    finally:
        pub.close()
    # Round 0 lists s0..s9999 in order: s0..s999 are admitted, every later sensor is refused.
    assert s.readings == cap * per_sensor
    assert s.rejected == {"sensor_cap": total - cap * per_sensor}
    assert s.handled == total
    assert s.value("streamlstm_sensors", group="default") == cap
    assert d.alive()
    log = d.log_text()
    assert "rejected (sensor_cap)" in log and f"pipeline.max_sensors={cap}" in log, d.log_tail()
    cap_lines = sum("rejected (sensor_cap)" in line for line in log.splitlines())
    assert cap_lines < 100, "the sensor_cap warning is not rate-limited"
    assert d.stop() == 0, d.log_tail()
    report("load/sensor_cap", published=total, processed=s.readings, lost=total - s.handled, rejected=s.rejected,
           sensors=n_sensors, max_sensors=cap, cap_log_lines=cap_lines, peak_rss_mib=d.peak_rss_mib)


def test_slow_consumer_gets_backpressure_not_unbounded_memory(mosquitto, tmp_path, daemons):
    n_sensors, per_sensor = 1000, 300  # 300 000 readings
    total = n_sensors * per_sensor
    queue_size = 1000
    cfg = daemon_config(mosquitto.port, tmp_path, pipeline={"queue_size": queue_size, "max_batch": 100})
    d = daemons(tmp_path, cfg).start()
    d.wait_ready()
    rss_ready = vm_rss_mib(d.pid)
    pub, t0 = publish(mosquitto, batch_payloads(n_sensors, per_sensor, PER_MESSAGE))
    depths = []
    try:
        def done_publishing():
            s = d.scrape()
            depths.append(s.value("streamlstm_queue_depth"))
            return pub.acked_messages == pub.published_messages and s
        at_acked = wait_for(done_publishing, 300, step=0.05, what="the broker acknowledging the burst")
        acked_s = time.monotonic() - t0

        def finished():
            s = d.scrape()
            depths.append(s.value("streamlstm_queue_depth"))
            return s.handled >= total and s
        s = wait_for(finished, 300, step=0.1, what=f"{total} readings handled")
        elapsed = time.monotonic() - t0
    finally:
        pub.close()
    assert s.readings == total and s.rejected == {}, s.rejected  # nothing lost, nothing dropped
    # Slower than the publisher: when the broker had everything, the daemon was far from done,
    # and its queue was full (backpressure) but never over capacity by more than the one
    # message read while it had room (the network thread then pauses reads, it never blocks).
    assert at_acked.handled < 0.8 * total, (at_acked.handled, total)
    assert max(depths) <= queue_size + PER_MESSAGE
    assert max(depths) >= queue_size / 2, depths
    peak = d.update_peak_rss() / 1024
    assert d.stop() == 0, d.log_tail()
    report("load/slow_consumer", published=total, processed=s.readings, lost=total - s.readings,
           rejected=s.rejected, queue_size=queue_size, max_queue_depth=max(depths),
           handled_when_broker_had_all=at_acked.handled, broker_acked_s=round(acked_s, 1),
           process_s=round(elapsed, 1), readings_per_s=round(total / elapsed), rss_at_ready_mib=round(rss_ready, 1),
           peak_rss_mib=round(peak, 1), growth_budget_mib=SLOW_GROWTH_MIB)
    assert peak - rss_ready <= SLOW_GROWTH_MIB, f"RSS grew {peak - rss_ready:.0f} MiB with a {queue_size}-reading queue"
