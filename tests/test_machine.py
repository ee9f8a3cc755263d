"""bnexport.machine: the CPU's name and flags from /proc/cpuinfo, with a fallback elsewhere."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import pytest

from bnexport import machine


def _fake_cpuinfo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, text: str) -> None:
    path = tmp_path / "cpuinfo"
    path.write_text(text)
    monkeypatch.setattr(machine, "CPUINFO", path)


def test_model_name_and_flags_come_from_the_first_processor(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _fake_cpuinfo(
        tmp_path,
        monkeypatch,
        "processor\t: 0\nModel name\t: Fancy CPU @ 3GHz\nflags\t\t: fpu avx2 sse avx\n"
        "processor\t: 1\nmodel name\t: Other CPU\nflags\t\t: avx512f\n",
    )
    assert machine.cpu_model() == "Fancy CPU @ 3GHz"
    assert machine.cpu_flags() == ["avx", "avx2"]  # in CPU_FLAGS' order, only the wanted ones


def test_without_cpuinfo_the_platform_names_the_cpu(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(machine, "CPUINFO", tmp_path / "missing")
    assert machine.cpu_model() == (platform.processor() or platform.machine())
    assert machine.cpu_flags() == []


def test_parity_reports_the_same_cpu_as_the_machine_module() -> None:
    from bnexport.parity import device_info

    assert device_info(cuda=False)["cpu"] == machine.cpu_model()


def test_cpus_available_and_load_average_describe_this_process() -> None:
    assert 1 <= machine.cpus_available() <= (os.cpu_count() or 1)
    load = machine.load_average()
    assert load is None or (len(load) == 3 and all(v >= 0 for v in load))


def test_cpu_model_is_read_from_proc_cpuinfo() -> None:
    path = Path("/proc/cpuinfo")
    if not path.exists():
        pytest.skip("no /proc/cpuinfo on this platform")
    names = [
        line.split(":", 1)[1].strip()
        for line in path.read_text().splitlines()
        if line.lower().startswith("model name")
    ]
    if not names:
        pytest.skip("/proc/cpuinfo has no 'model name' line here")
    assert machine.cpu_model() == names[0]
