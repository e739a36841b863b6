#!/usr/bin/env python3
"""Opens the users' portal in headless Chromium, driven over the DevTools
protocol on a pipe (no driver to install), and waits until the page says it
is ready (signed in, history drawn, live stream connected). Prints JSON: the
page's DOM, how long it took (performance.now() at ready, real time, from
navigation start) and, with a path, writes a PNG screenshot there.

usage: portal_check.py URL [SCREENSHOT.png]
Environment: CHROMIUM (default: chromium).
"""
import base64
import json
import os
import subprocess
import sys
import tempfile
import time

url = sys.argv[1]
screenshot = sys.argv[2] if len(sys.argv) > 2 else None
DEADLINE_S = 60


class Browser:
    """Chromium with --remote-debugging-pipe: commands on fd 3, answers on fd 4,
    each message JSON ended by a NUL byte."""

    def __init__(self, profile):
        to_child, self.commands = os.pipe()
        self.answers, from_child = os.pipe()

        def wire():
            # Out of the way first: either end may already sit on 3 or 4.
            high_in, high_out = os.dup(to_child), os.dup(from_child)
            os.dup2(high_in, 3)
            os.dup2(high_out, 4)
            os.set_inheritable(3, True)
            os.set_inheritable(4, True)

        self.process = subprocess.Popen(
            [os.environ.get("CHROMIUM", "chromium"), "--headless", "--no-sandbox",
             "--disable-gpu", "--no-first-run", "--disable-extensions", "--hide-scrollbars",
             "--window-size=1100,1500", f"--user-data-dir={profile}",
             "--remote-debugging-pipe", "about:blank"],
            # Kept open for the child: fds 3 and 4, made in `wire`.
            close_fds=False, preexec_fn=wire,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(to_child)
        os.close(from_child)
        self.buffer = b""
        self.next_id = 0

    def call(self, method, params=None, session=None):
        self.next_id += 1
        message = {"id": self.next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self.commands, json.dumps(message).encode() + b"\0")
        while True:
            while b"\0" not in self.buffer:
                chunk = os.read(self.answers, 1 << 16)
                if not chunk:
                    raise RuntimeError("chromium closed the pipe")
                self.buffer += chunk
            raw, self.buffer = self.buffer.split(b"\0", 1)
            answer = json.loads(raw)
            if answer.get("id") == self.next_id:
                if "error" in answer:
                    raise RuntimeError(f"{method}: {answer['error']}")
                return answer["result"]

    def close(self):
        try:
            self.call("Browser.close")
        except RuntimeError:
            pass
        self.process.wait(timeout=10)


def evaluate(browser, session, expression):
    result = browser.call("Runtime.evaluate",
                          {"expression": expression, "returnByValue": True}, session)
    return result["result"].get("value")


with tempfile.TemporaryDirectory() as profile:
    browser = Browser(profile)
    try:
        target = browser.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = browser.call("Target.attachToTarget",
                               {"targetId": target, "flatten": True})["sessionId"]
        browser.call("Page.enable", session=session)
        browser.call("Page.navigate", {"url": url}, session)
        started = time.monotonic()
        state = None
        while time.monotonic() - started < DEADLINE_S:
            state = evaluate(browser, session,
                             "document.body ? document.body.dataset.state + '|' + "
                             "document.getElementById('live-status').textContent : ''")
            if state and state.startswith("ready|") and "connected" in state:
                break
            time.sleep(0.05)
        ready_ms = evaluate(browser, session, "Number(document.body.dataset.readyMs)")
        dom = evaluate(browser, session, "document.documentElement.outerHTML")
        if screenshot:
            shot = browser.call("Page.captureScreenshot", {"format": "png"}, session)
            with open(screenshot, "wb") as f:
                f.write(base64.b64decode(shot["data"]))
        print(json.dumps({"state": state, "ready_ms": ready_ms, "dom": dom}))
    finally:
        browser.close()
