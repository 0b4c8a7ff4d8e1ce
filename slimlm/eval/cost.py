"""What running a model costs on this machine, in one call: latency, throughput, memory, size,
compression, CPU utilisation and energy.

Builds on :func:`slimlm.eval.efficiency.efficiency` (size, TTFT, decode tok/s) and adds batched
throughput, CPU utilisation and energy measured over a greedy decode. Energy is read from Intel
RAPL (``/sys/class/powercap/intel-rapl:N/energy_uj``, the whole CPU package, so other processes
count too) where readable; otherwise it is *estimated* as this process's CPU-seconds × a stated
watts-per-core figure, and every such row says ``energy_source: estimated``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import psutil
import torch

from slimlm.eval.efficiency import efficiency, greedy_run, peak_rss_bytes, prompt_ids
from slimlm.models.load import LoadedModel

WATTS_PER_CORE = 10.0  # a busy laptop/desktop x86 core under AVX load: ~5-15 W; stated, not measured
RAPL = Path("/sys/class/powercap")


def rapl_zones() -> list[Path]:
    """Top-level RAPL package zones whose counters this process can read."""
    zones = []
    for z in sorted(RAPL.glob("intel-rapl:*")):
        f = z / "energy_uj"
        if z.name.count(":") == 1 and f.is_file():
            try:
                int(f.read_text())
                zones.append(z)
            except (OSError, ValueError):
                continue
    return zones


def _read_uj(zones: list[Path]) -> list[int]:
    return [int((z / "energy_uj").read_text()) for z in zones]


class Meter:
    """Wall time, this process's CPU-seconds and (where readable) RAPL joules over a ``with`` block."""

    def __init__(self, watts_per_core: float = WATTS_PER_CORE) -> None:
        self.watts_per_core = watts_per_core
        self.zones = rapl_zones()
        self.proc = psutil.Process()

    def __enter__(self) -> "Meter":
        self._uj = _read_uj(self.zones)
        cpu = self.proc.cpu_times()
        self._cpu = cpu.user + cpu.system
        self._t = time.perf_counter()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.wall_s = time.perf_counter() - self._t
        cpu = self.proc.cpu_times()
        self.cpu_s = cpu.user + cpu.system - self._cpu
        if self.zones:
            joules = 0.0
            for z, before, after in zip(self.zones, self._uj, _read_uj(self.zones)):
                if after < before:  # the counter wrapped
                    after += int((z / "max_energy_range_uj").read_text())
                joules += (after - before) / 1e6
            self.joules, self.energy_source = joules, "rapl"
        else:
            self.joules, self.energy_source = self.cpu_s * self.watts_per_core, "estimated"


def source_weight_bytes(lm: LoadedModel) -> tuple[int, str]:
    """Bytes of the model an artifact was compressed from (its manifest's source params × 4, fp32);
    for a model that is not an artifact, its own parameter count × 4."""
    params = lm.info.n_params
    if lm.info.source_kind == "artifact" and lm.info.weights_dir:
        from slimlm.artifact import read_manifest

        manifest = read_manifest(Path(lm.info.weights_dir))
        params = manifest["source"].get("n_params") or manifest.get("report", {}).get("source_params") or params
    return int(params) * 4, "source params x 4 bytes (fp32)"


@torch.no_grad()
def batched_throughput(lm: LoadedModel, batch: int, prompt_tokens: int, new_tokens: int) -> float:
    """Generated tokens per second for ``batch`` copies of the prompt decoded together (prefill included)."""
    ttft, dec = greedy_run(lm, [prompt_ids(lm, prompt_tokens)] * batch, new_tokens)
    return batch * new_tokens / (ttft + dec)


@torch.no_grad()
def cost(lm: LoadedModel, *, threads: int | None = None, batch_sizes: tuple[int, ...] = (1, 4, 16), prompt_tokens: int = 64,
         new_tokens: int = 32, repeats: int = 2, watts_per_core: float = WATTS_PER_CORE) -> dict[str, Any]:
    """Every cost figure of ``lm`` as one flat dict (``threads`` pins torch's intra-op threads)."""
    if threads:
        torch.set_num_threads(threads)
    n_threads = torch.get_num_threads()
    row = efficiency(lm, prompt_tokens=prompt_tokens, new_tokens=new_tokens, repeats=repeats)
    row["time_per_output_token_s"] = 1.0 / row["decode_tok_s"]
    with Meter(watts_per_core) as m:  # one batch-1 generation, prefill included
        greedy_run(lm, [prompt_ids(lm, prompt_tokens)], new_tokens)
    row.update({
        "cpu_util_pct": 100.0 * m.cpu_s / (m.wall_s * n_threads),
        "energy_j": m.joules, "energy_source": m.energy_source,
        "j_per_token": m.joules / new_tokens,
    })
    if m.energy_source == "estimated":
        row["watts_per_core"] = watts_per_core
    for b in batch_sizes:
        row[f"throughput_b{b}_tok_s"] = batched_throughput(lm, b, prompt_tokens, new_tokens)
    src_bytes, basis = source_weight_bytes(lm)
    row["source_weight_bytes"] = src_bytes
    row["compression_ratio"] = src_bytes / row["weight_bytes_in_memory"]
    if row.get("bytes_on_disk"):
        row["disk_compression_ratio"] = src_bytes / row["bytes_on_disk"]
    row["compression_basis"] = basis
    row["peak_rss_bytes"] = peak_rss_bytes()  # after the batch-16 run, the largest
    row["threads"] = n_threads
    return row
