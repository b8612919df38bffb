"""[server] retention: ended runs and their logs are deleted once that long has passed."""

from __future__ import annotations

import aiohttp
import pytest

from server_process import BOTH_STORES, handler, poll_until

pytestmark = [pytest.mark.e2e, BOTH_STORES]


async def test_an_ended_run_and_its_log_go_after_the_retention(eventrun_server, http: aiohttp.ClientSession) -> None:
    server = eventrun_server(
        {"sleepy": {"handler": handler("sleepy")}, "quick": {"handler": handler("quick")}}, server={"retention": "2s"}
    )
    api = server.client(http)
    gone = await api.accepted("sleepy", {"seconds": 0.3})
    await api.wait_ended(gone)
    assert "sleepy done" in await api.logs(gone)
    log_files = list(server.data_dir.glob(f"logs/*/*/{gone}.log"))
    staying = await api.accepted("sleepy", {"seconds": 30, "quiet": True})  # not ended: kept however old

    async def deleted() -> bool:
        return (await api.request("GET", f"/invocations/{gone}")).status == 404

    await poll_until(deleted, 15, "the ended run deleted after its retention")
    assert (await api.request("GET", f"/invocations/{gone}/logs")).status == 404
    assert not any(path.exists() for path in log_files), "its log file went too"
    assert (await api.status(staying))["Status"] == "RUNNING"
