"""A small W3C WebDriver client over aiohttp, driving Debian's chromium via chromedriver.

Enough for the console tests: open pages, find elements, type, click, read text, run a
script, accept a confirm dialog, take screenshots. Chromium runs headless with the flags
this machine needs (no sandbox as root, no background networking: the network is closed).
"""

from __future__ import annotations

import asyncio
import base64
import shutil
import socket
import struct
import tempfile
import zlib
from pathlib import Path
from typing import Any

import aiohttp

ELEMENT = "element-6066-11e4-a52e-4f735466cecf"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--window-size=1280,1000"]


def available() -> bool:
    return Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()


class WebDriverError(Exception):
    pass


class Browser:
    """One chromedriver process and one browser session."""

    def __init__(self) -> None:
        self.proc: asyncio.subprocess.Process | None = None
        self.http: aiohttp.ClientSession | None = None
        self.base = ""
        self.session = ""
        self.profile = Path(tempfile.mkdtemp(prefix="nerve-chromium-"))

    async def start(self) -> Browser:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.proc = await asyncio.create_subprocess_exec(
            CHROMEDRIVER, f"--port={port}", stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL)
        self.base = f"http://127.0.0.1:{port}"
        self.http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60))
        async with asyncio.timeout(20):
            while True:
                try:
                    async with self.http.get(self.base + "/status") as resp:
                        if (await resp.json())["value"].get("ready"):
                            break
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.05)
        caps = {"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {"binary": CHROMIUM,
                                   "args": [*FLAGS, f"--user-data-dir={self.profile}"]},
        }}}
        value = await self._call("POST", "/session", caps, session=False)
        self.session = value["sessionId"]
        return self

    async def close(self) -> None:
        if self.session:
            try:
                await self._call("DELETE", "")
            except (WebDriverError, aiohttp.ClientError):
                pass
        if self.http is not None:
            await self.http.close()
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()
        await asyncio.to_thread(shutil.rmtree, self.profile, True)

    async def _call(self, method: str, path: str, body: Any = None, *,
                    session: bool = True) -> Any:
        assert self.http is not None
        url = self.base + (f"/session/{self.session}" if session else "") + path
        async with self.http.request(method, url, json=body if body is not None else (
                {} if method == "POST" else None)) as resp:
            data = await resp.json()
        value = data.get("value")
        if resp.status >= 400:
            raise WebDriverError(f"{method} {path}: {value}")
        return value

    # -- pages and elements -----------------------------------------------------------
    async def get(self, url: str) -> None:
        await self._call("POST", "/url", {"url": url})

    async def url(self) -> str:
        return str(await self._call("GET", "/url"))

    async def find(self, css: str) -> str:
        value = await self._call("POST", "/element", {"using": "css selector", "value": css})
        return str(value[ELEMENT])

    async def find_all(self, css: str) -> list[str]:
        values = await self._call("POST", "/elements", {"using": "css selector", "value": css})
        return [str(v[ELEMENT]) for v in values]

    async def click(self, css: str) -> None:
        await self._call("POST", f"/element/{await self.find(css)}/click")

    async def type(self, css: str, text: str) -> None:
        element = await self.find(css)
        await self._call("POST", f"/element/{element}/clear")
        await self._call("POST", f"/element/{element}/value", {"text": text})

    async def text(self, css: str) -> str:
        return str(await self._call("GET", f"/element/{await self.find(css)}/text"))

    async def script(self, source: str, *args: Any) -> Any:
        return await self._call("POST", "/execute/sync", {"script": source, "args": list(args)})

    async def accept_alert(self) -> None:
        await self._call("POST", "/alert/accept")

    async def screenshot(self, css: str | None = None) -> bytes:
        path = f"/element/{await self.find(css)}/screenshot" if css else "/screenshot"
        return base64.b64decode(await self._call("GET", path))

    async def wait_for(self, source: str, *args: Any, timeout: float = 30.0,
                       every: float = 0.1) -> Any:
        """Poll a JavaScript expression (``return ...``) until it is truthy."""
        async with asyncio.timeout(timeout):
            while True:
                value = await self.script(source, *args)
                if value:
                    return value
                await asyncio.sleep(every)


def png_pixels(png: bytes) -> tuple[int, int, list[bytes]]:
    """Decode an 8-bit RGB(A) PNG (what Chromium writes): ``(width, height, rows)``."""
    assert png[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat = 8, b""
    width = height = bpp = 0
    while pos < len(png):
        length, kind = struct.unpack(">I4s", png[pos:pos + 8])
        chunk = png[pos + 8:pos + 8 + length]
        if kind == b"IHDR":
            width, height, depth, color = struct.unpack(">IIBB", chunk[:10])
            assert depth == 8 and color in (2, 6), (depth, color)
            bpp = 3 if color == 2 else 4
        elif kind == b"IDAT":
            idat += chunk
        pos += 12 + length
    raw = zlib.decompress(idat)
    stride = width * bpp
    rows: list[bytes] = []
    prev = bytearray(stride)
    for y in range(height):
        f = raw[y * (stride + 1)]
        line = bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        for x in range(stride):
            a = line[x - bpp] if x >= bpp else 0
            b = prev[x]
            c = prev[x - bpp] if x >= bpp else 0
            if f == 1:
                line[x] = (line[x] + a) & 255
            elif f == 2:
                line[x] = (line[x] + b) & 255
            elif f == 3:
                line[x] = (line[x] + (a + b) // 2) & 255
            elif f == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                pred = a if pa <= pb and pa <= pc else (b if pb <= pc else c)
                line[x] = (line[x] + pred) & 255
        rows.append(bytes(line[i] for i in range(stride) if i % bpp < 3))
        prev = line
    return width, height, rows


__all__ = ["Browser", "WebDriverError", "available", "png_pixels"]
