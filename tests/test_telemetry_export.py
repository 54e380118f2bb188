"""Each log record reaches Application Insights once, whoever configures the exporter.

In Azure the app setting PYTHON_APPLICATIONINSIGHTS_ENABLE_TELEMETRY=true (function-app.bicep)
makes the Python worker call `configure_azure_monitor` before it imports function_app.py. The app
must then not configure a second exporter. Here the worker's set-up is played by an OpenTelemetry
LoggerProvider with an in-memory exporter attached to the logger the worker is told to collect
(PYTHON_APPLICATIONINSIGHTS_LOGGER_NAME), and the app's own set-up is recorded instead of run.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import pytest
from opentelemetry.sdk._logs import LoggerProvider, LoggingHandler
from opentelemetry.sdk._logs.export import InMemoryLogRecordExporter, SimpleLogRecordProcessor

from detector import telemetry
from detector.config import Settings
from tests.test_infra import app_settings

CONNECTION = "InstrumentationKey=00000000-0000-0000-0000-000000000000"


@pytest.fixture
def worker(monkeypatch: pytest.MonkeyPatch) -> Iterator[InMemoryLogRecordExporter]:
    """The worker's Azure Monitor set-up: an exporter on the logger named by the app setting."""
    settings = app_settings()
    logger_name = settings["PYTHON_APPLICATIONINSIGHTS_LOGGER_NAME"]
    monkeypatch.setenv("FUNCTIONS_WORKER_RUNTIME", "python")
    monkeypatch.setenv(
        "PYTHON_APPLICATIONINSIGHTS_ENABLE_TELEMETRY",
        settings["PYTHON_APPLICATIONINSIGHTS_ENABLE_TELEMETRY"],
    )
    monkeypatch.setattr(telemetry, "_configured", {"logging": False, "azure_monitor": False})
    monkeypatch.setattr(telemetry, "_tracer", [])
    exporter = InMemoryLogRecordExporter()
    provider = LoggerProvider()
    provider.add_log_record_processor(SimpleLogRecordProcessor(exporter))
    handler = LoggingHandler(logger_provider=provider)
    logger = logging.getLogger(logger_name)
    logger.addHandler(handler)
    yield exporter
    logger.removeHandler(handler)
    provider.shutdown()


def exported_messages(exporter: InMemoryLogRecordExporter) -> list[str]:
    return [str(item.log_record.body) for item in exporter.get_finished_logs()]


def test_the_worker_collects_the_app_logger() -> None:
    settings = app_settings()
    assert settings["PYTHON_APPLICATIONINSIGHTS_ENABLE_TELEMETRY"] == "true"
    # The app logs under `detector` (detector.audit, detector.blob, ...): the worker collects
    # that subtree only, not the SDKs' and the exporter's own records (the root logger).
    assert settings["PYTHON_APPLICATIONINSIGHTS_LOGGER_NAME"] == telemetry.LOGGER_NAME


def test_in_the_worker_the_app_does_not_configure_a_second_exporter(
    worker: InMemoryLogRecordExporter, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[Any] = []
    enabled: list[bool] = []
    monkeypatch.setattr(telemetry, "_configure_azure_monitor", lambda *a: calls.append(a))
    monkeypatch.setattr(telemetry, "enable_otel", lambda: enabled.append(True))
    telemetry.configure_logging(Settings(appinsights_connection=CONNECTION))
    telemetry.configure_logging(Settings(appinsights_connection=CONNECTION))
    assert calls == []
    assert enabled == [True]  # metrics and spans go to the worker's providers

    telemetry.log_event(
        logging.getLogger(telemetry.AUDIT_LOGGER), logging.INFO, {"event": "audit", "n": 1}
    )
    assert exported_messages(worker) == ['{"event":"audit","n":1}']


def test_outside_the_worker_the_app_configures_the_exporter_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[Any] = []
    monkeypatch.setattr(telemetry, "_configured", {"logging": True, "azure_monitor": False})
    monkeypatch.setattr(telemetry, "_configure_azure_monitor", lambda *a: calls.append(a))
    for env in ({}, {"FUNCTIONS_WORKER_RUNTIME": "python"}):
        monkeypatch.delenv("PYTHON_APPLICATIONINSIGHTS_ENABLE_TELEMETRY", raising=False)
        monkeypatch.delenv("FUNCTIONS_WORKER_RUNTIME", raising=False)
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        assert not telemetry.worker_exports_telemetry()
        calls.clear()
        telemetry._configured["azure_monitor"] = False
        telemetry.configure_logging(Settings(appinsights_connection=CONNECTION))
        telemetry.configure_logging(Settings(appinsights_connection=CONNECTION))
        assert len(calls) == 1


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        (
            {
                "FUNCTIONS_WORKER_RUNTIME": "python",
                "PYTHON_APPLICATIONINSIGHTS_ENABLE_TELEMETRY": "true",
            },
            True,
        ),
        (
            {
                "FUNCTIONS_WORKER_RUNTIME": "python",
                "PYTHON_APPLICATIONINSIGHTS_ENABLE_TELEMETRY": "True ",
            },
            True,
        ),
        (
            {
                "FUNCTIONS_WORKER_RUNTIME": "python",
                "PYTHON_APPLICATIONINSIGHTS_ENABLE_TELEMETRY": "false",
            },
            False,
        ),
        ({"FUNCTIONS_WORKER_RUNTIME": "python"}, False),
        ({"PYTHON_APPLICATIONINSIGHTS_ENABLE_TELEMETRY": "true"}, False),  # not in the worker
    ],
)
def test_worker_exports_telemetry(environ: dict[str, str], expected: bool) -> None:
    assert telemetry.worker_exports_telemetry(environ) is expected
