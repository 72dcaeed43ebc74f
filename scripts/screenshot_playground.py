"""Generate the README's screenshot of the playground: a real model, a real server, a real browser.

    python scripts/screenshot_playground.py                      # trains the quickstart model first (~150 s)
    python scripts/screenshot_playground.py --artifact models/current --out docs/playground.png

Without ``--artifact`` it runs ``nextoken up --no-serve`` (quickstart preset, BPE on the built-in
corpus, ``--train-time`` seconds) in a temporary folder. It then starts ``nextoken serve`` on a
free loopback port, opens the playground in Debian's chromium through Playwright (``pip install
playwright``; ``apt-get install chromium``), generates from ``--prompt`` with a fixed seed, opens
the alternatives of the generated token where the model hesitated most (the largest runner-up
probability), waits for the live server panel, and saves the viewport as a PNG, reduced to a
palette image when Pillow is present. Nothing is drawn by hand; every number in it came from the API.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_artifact(work: Path, seconds: float, steps: int | None) -> Path:
    from nextoken.up import UpOptions, up

    # One thread: steadier than two when other jobs share the cores (field notes).
    overrides = {"max_time": seconds, "threads": 1, **({"max_iters": steps} if steps else {})}
    result = up(UpOptions(preset="quickstart", overrides=overrides, out_dir=str(work / "run"),
                          artifact_dir=str(work / "artifact"), models_dir=str(work / "models"), name="quickstart",
                          serve=False))
    return result.version_dir


class Server:
    def __init__(self, artifact: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([sys.executable, "-m", "nextoken", "serve", str(artifact), "--port",
                                      str(self.port)], start_new_session=True)
        deadline = time.monotonic() + 120
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.url + "/ready", timeout=1).status_code == 200:
                    return
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise SystemExit("the server did not start")
            time.sleep(0.2)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def hesitant_token(chips: list[dict], bars_of) -> int:
    """Index of the generated token whose runner-up alternative was the most likely (a close call)."""
    best, best_i = -1.0, 0
    for c in chips[: min(len(chips), 48)]:
        bars = bars_of(int(c["i"]))
        if len(bars) >= 2 and bars[1] > best:
            best, best_i = bars[1], int(c["i"])
    return best_i


def shoot(url: str, out: Path, prompt: str, seed: int, max_tokens: int, width: int, height: int) -> None:
    from playwright.sync_api import sync_playwright

    exe = os.environ.get("NEXTOKEN_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=exe, args=CHROMIUM_ARGS, headless=True)
        page = browser.new_page(viewport={"width": width, "height": height})
        errors: list[str] = []
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(url + "/")
        page.wait_for_selector("body[data-ready]")
        page.fill("#prompt", prompt)
        for name, value in (("temperature", "0.8"), ("top_k", "50"), ("max_tokens", str(max_tokens)),
                            ("seed", str(seed)), ("logprobs", "8")):
            page.fill(f"#{name}", value)
        page.click("#generate")
        page.wait_for_selector("#gen-status[data-finish]")
        chips = page.locator("#output .chip").evaluate_all("els => els.map(e => ({i: e.dataset.i}))")

        def bars_of(i: int) -> list[float]:
            page.click(f'#output .chip[data-i="{i}"]')
            return page.locator("#detail-body .bar").evaluate_all("els => els.map(e => Number(e.dataset.p))")

        i = hesitant_token(chips, bars_of)
        page.click(f'#output .chip[data-i="{i}"]')
        page.hover("#prompt")  # no hover outline in the picture; the pinned token stays selected
        time.sleep(2.5)  # one refresh of the live server panel after the request
        page.screenshot(path=str(out))
        browser.close()
    if errors:
        raise SystemExit(f"the page logged errors: {errors}")


def shrink(png: Path) -> None:
    try:
        from PIL import Image
    except ImportError:
        return
    img = Image.open(png).convert("RGB")
    img.quantize(colors=128, method=Image.Quantize.MEDIANCUT).save(png, optimize=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--artifact", type=Path, help="artifact folder (or models/current) to serve; default: train one")
    ap.add_argument("--train-time", type=float, default=150.0,
                    help="seconds of training without --artifact (0 = no limit: --train-steps decides)")
    ap.add_argument("--train-steps", type=int, default=None, help="training steps (default: the preset's 1200)")
    ap.add_argument("--work-dir", type=Path, default=None,
                    help="keep the trained run, artifact and models folder here (then reuse with --artifact "
                         "WORK/models/current); default: a temporary folder, removed")
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "playground.png")
    ap.add_argument("--prompt", default="    def __init__(self")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--max-tokens", type=int, default=56)
    ap.add_argument("--width", type=int, default=1280)
    ap.add_argument("--height", type=int, default=960)
    args = ap.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="nextoken-screenshot-") as tmp:
        work = args.work_dir or Path(tmp)
        artifact = args.artifact or train_artifact(work, args.train_time, args.train_steps)
        server = Server(artifact)
        try:
            shoot(server.url, args.out, args.prompt, args.seed, args.max_tokens, args.width, args.height)
        finally:
            server.stop()
    shrink(args.out)
    print(f"wrote {args.out} ({args.out.stat().st_size / 1000:.0f} kB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
