"""Device metrics for ``/metrics``: JAX device memory on every backend and,
on NVIDIA GPUs, NVML's utilisation, memory, temperature and power.

`DeviceCollector` is a prometheus-client custom collector, so every figure
is read when Prometheus scrapes, not on the engine's hot path. Per JAX device
(labels ``device``, ``platform``):

- ``jpaged:device_live_array_bytes``: bytes held by live JAX arrays on the
  device (from ``jax.live_arrays()`` and each array's sharding), available on
  every backend, CPU included;
- ``jpaged:device_memory_used_bytes``, ``..._peak_bytes``, ``..._limit_bytes``:
  the allocator's ``bytes_in_use``, ``peak_bytes_in_use`` and
  ``bytes_limit`` from ``Device.memory_stats()``; XLA's CPU client returns no
  statistics (``None``), so there these three are simply absent.

Per NVML GPU (label ``gpu``, NVML's index), when ``nvidia-ml-py`` imports and
NVML finds a driver: ``jpaged:gpu_utilization_perc`` (0 to 1, like
``kv_cache_usage_perc``), ``jpaged:gpu_memory_used_bytes``,
``jpaged:gpu_memory_total_bytes``, ``jpaged:gpu_temperature_celsius`` and
``jpaged:gpu_power_watts``. vLLM exports none of these, so the names follow
its conventions (prefix, ``_perc``, units in the name). Without NVML these are
not exported and one line is logged; a figure a GPU does not support (power on
some boards) is left out for that GPU.
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict

from prometheus_client.core import GaugeMetricFamily

logger = logging.getLogger(__name__)

_MEMORY_STATS = (("device_memory_used_bytes", "bytes_in_use",
                  "Bytes the device allocator has in use."),
                 ("device_memory_peak_bytes", "peak_bytes_in_use",
                  "Most bytes the device allocator has had in use."),
                 ("device_memory_limit_bytes", "bytes_limit",
                  "Bytes the device allocator may use."))


def live_array_bytes() -> dict:
    """Bytes of live JAX arrays per device (a replicated array counts on each)."""
    import jax

    per = defaultdict(int)
    for a in jax.live_arrays():
        try:
            shard = math.prod(a.sharding.shard_shape(a.shape)) * a.dtype.itemsize
            for d in a.sharding.addressable_devices:
                per[d] += shard
        except Exception:  # noqa: BLE001 - an array deleted while we looked
            continue
    return per


class _NVML:
    """NVML handles, or nothing (with one log line) where NVML is not usable."""

    def __init__(self):
        self.nv, self.handles = None, []
        try:
            import pynvml

            pynvml.nvmlInit()
            self.handles = [pynvml.nvmlDeviceGetHandleByIndex(i)
                            for i in range(pynvml.nvmlDeviceGetCount())]
            self.nv = pynvml
        except Exception as e:  # noqa: BLE001 - no module, no driver or no GPU alike
            logger.info("NVML not available (%s): GPU utilisation, temperature and power "
                        "are not exported", str(e) or type(e).__name__)
            return
        if not self.handles:
            logger.info("NVML found no GPU: GPU utilisation, temperature and power are not "
                        "exported")
            self.nv = None

    def read(self, handle) -> dict:
        nv, out = self.nv, {}
        reads = {
            "gpu_utilization_perc": lambda: nv.nvmlDeviceGetUtilizationRates(handle).gpu / 100,
            "gpu_memory_used_bytes": lambda: nv.nvmlDeviceGetMemoryInfo(handle).used,
            "gpu_memory_total_bytes": lambda: nv.nvmlDeviceGetMemoryInfo(handle).total,
            "gpu_temperature_celsius": lambda: nv.nvmlDeviceGetTemperature(
                handle, nv.NVML_TEMPERATURE_GPU),
            "gpu_power_watts": lambda: nv.nvmlDeviceGetPowerUsage(handle) / 1000,  # mW
        }
        for name, fn in reads.items():
            try:
                out[name] = float(fn())
            except nv.NVMLError:
                continue  # not supported on this board
        return out


_NVML_DOCS = {
    "gpu_utilization_perc": "GPU utilisation over NVML's last sample period; 1 is 100%.",
    "gpu_memory_used_bytes": "GPU memory in use (all processes), from NVML.",
    "gpu_memory_total_bytes": "GPU memory installed, from NVML.",
    "gpu_temperature_celsius": "GPU core temperature, from NVML.",
    "gpu_power_watts": "GPU power draw, from NVML.",
}


class DeviceCollector:
    """Prometheus collector of JAX device memory and NVML figures (module doc)."""

    def __init__(self, nvml: bool = True):
        self.nvml = _NVML() if nvml else None

    def describe(self):
        return []  # figures are only known at scrape time; skip the registration probe

    def collect(self):
        import jax

        live = GaugeMetricFamily("jpaged:device_live_array_bytes",
                                 "Bytes held by live JAX arrays on the device.",
                                 labels=["device", "platform"])
        stats_fams = {key: GaugeMetricFamily(f"jpaged:{name}", doc,
                                             labels=["device", "platform"])
                      for name, key, doc in _MEMORY_STATS}
        per = live_array_bytes()
        for d in jax.local_devices():
            labels = [str(d.id), d.platform]
            live.add_metric(labels, per.get(d, 0))
            try:
                stats = d.memory_stats()
            except Exception:  # noqa: BLE001 - some backends raise instead of None
                stats = None
            for key, fam in stats_fams.items():
                if stats and key in stats:
                    fam.add_metric(labels, stats[key])
        yield live
        for fam in stats_fams.values():
            if fam.samples:
                yield fam
        if self.nvml is None or self.nvml.nv is None:
            return
        fams = {n: GaugeMetricFamily(f"jpaged:{n}", doc, labels=["gpu"])
                for n, doc in _NVML_DOCS.items()}
        for i, h in enumerate(self.nvml.handles):
            for name, value in self.nvml.read(h).items():
                fams[name].add_metric([str(i)], value)
        yield from (f for f in fams.values() if f.samples)
