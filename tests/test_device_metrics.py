"""Device metrics: live-array bytes move with allocations on CPU; the
memory_stats gauges follow what each device reports (XLA's CPU client reports
nothing, so they are absent there, and a device that reports is stood in
for); NVML figures from a stand-in pynvml, and no error when NVML is absent."""

from __future__ import annotations

import logging
import sys
import types

import jax
import jax.numpy as jnp
import pytest
from prometheus_client import CollectorRegistry, generate_latest

from jpaged.serve import device_metrics
from jpaged.serve.device_metrics import DeviceCollector


def scrape(collector) -> dict:
    r = CollectorRegistry()
    r.register(collector)
    out = {}
    for fam in r.collect():
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    assert generate_latest(r)  # the text exposition works too
    return out


def live(samples, device) -> float:
    return samples[("jpaged:device_live_array_bytes",
                    (("device", str(device.id)), ("platform", device.platform)))]


def test_live_array_bytes_move_on_cpu():
    c = DeviceCollector(nvml=False)
    dev = jax.local_devices()[1]
    before = scrape(c)
    assert {k[0] for k in before} >= {"jpaged:device_live_array_bytes"}
    assert len([k for k in before if k[0] == "jpaged:device_live_array_bytes"]) == \
        len(jax.local_devices())
    x = jax.device_put(jnp.zeros((1024, 1024), jnp.float32), dev)  # 4 MiB
    x.block_until_ready()
    grown = scrape(c)
    assert live(grown, dev) - live(before, dev) >= 4 << 20
    x.delete()
    assert live(scrape(c), dev) == pytest.approx(live(before, dev), abs=1 << 20)


def test_replicated_array_counts_on_every_device():
    from jax.sharding import NamedSharding, PartitionSpec

    mesh = jax.make_mesh((len(jax.devices()),), ("x",))
    before = scrape(DeviceCollector(nvml=False))
    x = jax.device_put(jnp.ones((256, 1024), jnp.float32), NamedSharding(mesh, PartitionSpec()))
    y = jax.device_put(jnp.ones((256 * len(jax.devices()), 1024), jnp.float32),
                       NamedSharding(mesh, PartitionSpec("x")))
    after = scrape(DeviceCollector(nvml=False))
    for d in jax.devices():  # 1 MiB replicated + 1 MiB shard on each
        assert live(after, d) - live(before, d) == pytest.approx(2 << 20, abs=64 << 10)
    del x, y


def test_memory_stats_gauges_follow_the_device(monkeypatch):
    cpu = jax.local_devices()[0]
    stats_here = cpu.memory_stats()
    names = {k[0] for k in scrape(DeviceCollector(nvml=False))}
    if stats_here is None:  # XLA's CPU client keeps no allocator statistics
        assert "jpaged:device_memory_used_bytes" not in names
    else:
        assert "jpaged:device_memory_used_bytes" in names

    class Reporting:  # a device whose allocator reports, as a GPU's does
        id, platform = 7, "gpu"

        def memory_stats(self):
            return {"bytes_in_use": 1000, "peak_bytes_in_use": 5000, "bytes_limit": 9000}

    monkeypatch.setattr(jax, "local_devices", lambda: [Reporting()])
    got = scrape(DeviceCollector(nvml=False))
    lbl = (("device", "7"), ("platform", "gpu"))
    assert got[("jpaged:device_memory_used_bytes", lbl)] == 1000
    assert got[("jpaged:device_memory_peak_bytes", lbl)] == 5000
    assert got[("jpaged:device_memory_limit_bytes", lbl)] == 9000
    assert got[("jpaged:device_live_array_bytes", lbl)] == 0


def _fake_pynvml(power_supported=True):
    class NVMLError(Exception):
        pass

    def power(h):
        if not power_supported:
            raise NVMLError("Not Supported")
        return 123_456  # mW

    return types.SimpleNamespace(
        NVMLError=NVMLError, NVML_TEMPERATURE_GPU=0, nvmlInit=lambda: None,
        nvmlDeviceGetCount=lambda: 2, nvmlDeviceGetHandleByIndex=lambda i: i,
        nvmlDeviceGetUtilizationRates=lambda h: types.SimpleNamespace(gpu=40 + h),
        nvmlDeviceGetMemoryInfo=lambda h: types.SimpleNamespace(used=3 << 30, total=80 << 30),
        nvmlDeviceGetTemperature=lambda h, kind: 55 + h, nvmlDeviceGetPowerUsage=power)


def test_nvml_figures(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", _fake_pynvml())
    got = scrape(DeviceCollector())
    assert got[("jpaged:gpu_utilization_perc", (("gpu", "1"),))] == pytest.approx(0.41)
    assert got[("jpaged:gpu_memory_used_bytes", (("gpu", "0"),))] == 3 << 30
    assert got[("jpaged:gpu_memory_total_bytes", (("gpu", "0"),))] == 80 << 30
    assert got[("jpaged:gpu_temperature_celsius", (("gpu", "1"),))] == 56
    assert got[("jpaged:gpu_power_watts", (("gpu", "0"),))] == pytest.approx(123.456)
    monkeypatch.setitem(sys.modules, "pynvml", _fake_pynvml(power_supported=False))
    got = scrape(DeviceCollector())
    assert not [k for k in got if k[0] == "jpaged:gpu_power_watts"]
    assert ("jpaged:gpu_temperature_celsius", (("gpu", "0"),)) in got


@pytest.mark.parametrize("how", ["not installed", "no driver"])
def test_nvml_absent_is_one_log_line(monkeypatch, caplog, how):
    if how == "not installed":
        monkeypatch.setitem(sys.modules, "pynvml", None)  # import raises ImportError
    else:
        fake = _fake_pynvml()

        def no_driver():
            raise fake.NVMLError("NVML Shared Library Not Found")

        fake.nvmlInit = no_driver
        monkeypatch.setitem(sys.modules, "pynvml", fake)
    with caplog.at_level(logging.INFO, logger=device_metrics.__name__):
        c = DeviceCollector()
        got = scrape(c)
        scrape(c)
    assert not [k for k in got if k[0].startswith("jpaged:gpu_")]
    assert [k for k in got if k[0] == "jpaged:device_live_array_bytes"]
    lines = [r for r in caplog.records if r.name == device_metrics.__name__]
    assert len(lines) == 1 and "NVML not available" in lines[0].getMessage()


def test_real_nvml_here_does_not_fail(caplog):
    # nvidia-ml-py is installed in CI; without an NVIDIA driver nvmlInit fails,
    # which must only be logged.
    pytest.importorskip("pynvml")
    with caplog.at_level(logging.INFO, logger=device_metrics.__name__):
        got = scrape(DeviceCollector())
    gpu = [k for k in got if k[0].startswith("jpaged:gpu_")]
    if gpu:  # a machine with an NVIDIA driver
        assert any(k[0] == "jpaged:gpu_memory_total_bytes" for k in gpu)
    else:
        assert any("NVML" in r.getMessage() for r in caplog.records)
    assert [k for k in got if k[0] == "jpaged:device_live_array_bytes"]
