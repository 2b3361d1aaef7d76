"""A pytest plugin: CPU seconds per test, which a loaded machine does not inflate as it does wall-clock durations.

    PYTHONPATH=benchmarks python -m pytest -p pytest_cpu_time tests/test_modeling.py
    PYTHONPATH=benchmarks CPU_TIME_JSONL=cpu.jsonl python -m pytest -p pytest_cpu_time tests/test_train.py

For each test (setup, call and teardown together) it measures the CPU time of the pytest process and of the child
processes it started and waited for (`getrusage` of self and children), prints them, slowest first, after the run
(as `--durations` prints wall time), and with `CPU_TIME_JSONL` appends one JSON line per test (id, wall, CPU, the
test's markers). `benchmarks/results/test_durations.md` was made with it; the tiers it chose are in the README,
"Tests"."""

import json
import os
import resource
import time

import pytest

_RESULTS: list[dict] = []


def _cpu_seconds() -> tuple[float, float]:
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime, children.ru_utime + children.ru_stime


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    wall, (own, children) = time.perf_counter(), _cpu_seconds()
    yield
    own_after, children_after = _cpu_seconds()
    markers = sorted({mark.name for mark in item.iter_markers()} - {"parametrize", "usefixtures", "filterwarnings"})
    result = {
        "id": item.nodeid,
        "wall": round(time.perf_counter() - wall, 2),
        "cpu_self": round(own_after - own, 2),
        "cpu_children": round(children_after - children, 2),
        "markers": markers,
    }
    _RESULTS.append(result)
    path = os.environ.get("CPU_TIME_JSONL")
    if path:
        with open(path, "a") as handle:
            handle.write(json.dumps(result) + "\n")


def pytest_terminal_summary(terminalreporter):
    if not _RESULTS:
        return
    terminalreporter.section("CPU seconds per test (this process + waited-for children)")
    total = sum(r["cpu_self"] + r["cpu_children"] for r in _RESULTS)
    for r in sorted(_RESULTS, key=lambda r: -(r["cpu_self"] + r["cpu_children"])):
        cpu = r["cpu_self"] + r["cpu_children"]
        if cpu >= 0.5:
            terminalreporter.write_line(f"{cpu:8.2f} cpu {r['wall']:8.2f} wall  {r['id']} {r['markers'] or ''}")
    terminalreporter.write_line(f"{total:8.2f} cpu in all, {len(_RESULTS)} tests")
