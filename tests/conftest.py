"""Suite-wide hooks: the integration marker by directory, and logs attached to failure reports."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

# Per test: (title, read) pairs whose text is added to the report when the test fails.
FAILURE_LOGS = pytest.StashKey[list[tuple[str, Callable[[], str]]]]()
MAX_LOG_CHARS = 20_000


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    integration_dir = Path(config.rootpath, "tests", "integration")
    for item in items:
        if integration_dir in Path(item.path).parents:
            item.add_marker(pytest.mark.integration)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    report = yield
    if report.failed:
        for title, read in item.stash.get(FAILURE_LOGS, []):
            text = read()
            if len(text) > MAX_LOG_CHARS:
                text = "[...]\n" + text[-MAX_LOG_CHARS:]
            report.sections.append((title, text or "(empty)"))
    return report


@pytest.fixture
def failure_log(request: pytest.FixtureRequest) -> Callable[[str, Callable[[], str]], None]:
    """failure_log(title, read): show read()'s text under `title` if this test fails."""

    def register(title: str, read: Callable[[], str]) -> None:
        request.node.stash.setdefault(FAILURE_LOGS, []).append((title, read))

    return register
