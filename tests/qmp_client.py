#!/usr/bin/env python3
"""Drive minivmm with the qemu.qmp library, as a user's script would.

Usage: qmp_client.py SOCKET
Checks query-status, stop/cont with their events, system_reset, then quits.
Exits non-zero (with a message) on any mismatch.
"""
import asyncio
import sys

from qemu.qmp import QMPClient


async def next_event(listener, name):
    async for event in listener:
        if event["event"] == name:
            return event
    raise AssertionError(f"no {name} event")


async def main(path):
    qmp = QMPClient("minivmm-test")
    await qmp.connect(path)
    status = await qmp.execute("query-status")
    assert status["status"] == "running" and status["running"] is True, status
    assert (await qmp.execute("query-name")) == {"name": "py"}

    with qmp.listener() as listener:
        await qmp.execute("stop")
        ev = await asyncio.wait_for(next_event(listener, "STOP"), 30)
        assert "timestamp" in ev, ev
    assert (await qmp.execute("query-status"))["status"] == "paused"

    with qmp.listener() as listener:
        await qmp.execute("cont")
        await asyncio.wait_for(next_event(listener, "RESUME"), 30)

    with qmp.listener() as listener:
        await qmp.execute("system_reset")
        ev = await asyncio.wait_for(next_event(listener, "RESET"), 30)
        assert ev["data"] == {"guest": False, "reason": "host-qmp-system-reset"}, ev

    try:
        await qmp.execute("no-such-command")
        raise AssertionError("unknown command accepted")
    except Exception as e:  # qemu.qmp raises ExecuteError
        assert "has not been found" in str(e), e

    with qmp.listener() as listener:
        await qmp.execute("quit")
        ev = await asyncio.wait_for(next_event(listener, "SHUTDOWN"), 30)
        assert ev["data"]["reason"] == "host-qmp-quit", ev
    await qmp.disconnect()
    print("qmp_client.py: ok")


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
