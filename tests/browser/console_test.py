#!/usr/bin/env python3
"""The operator console in a real browser: Debian's headless Chromium driven by Selenium.

    python3 tests/browser/console_test.py --base-url http://127.0.0.1:8000 \
        --auditor-key ck_... --admin-key ck_... --analyst-key-id <key id> \
        --denied-trace <trace id> --screenshots target/console-screenshots

scripts/console_test.sh starts a gateway, makes the keys and the refused request, then runs this.
Steps, each waited for explicitly (no sleeps) and asserted with a message that says what was expected:
  a. a wrong key is refused at sign-in with an AUTH_ reason code, and nothing is stored;
  b. the auditor signs in; the Keys tab stays hidden (GET /v1/keys is 403 for auditors);
  c. the refused request's trace shows a DENY decision by the action_matrix gate with its reason code;
  d. Decisions filtered on effect=deny lists only denials, the refused request among them;
  e. Chains lists at least one chain;
  f. sign out, the admin signs in, sees Keys and revokes the analyst key with a reason;
  g. the key is in sessionStorage only (not localStorage, not a cookie);
  h. a #trace=<id> deep link opens that trace, in the page and after a reload;
and the browser's log holds no Content-Security-Policy violation or uncaught script error.
Chromium and chromedriver are the system's (/usr/bin); Selenium Manager never downloads anything.
Any failure saves failure.png, prints the browser log and exits 1.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import traceback
from urllib.parse import quote

from selenium import webdriver
from selenium.common.exceptions import (
    NoSuchElementException,
    StaleElementReferenceException,
    TimeoutException,
    WebDriverException,
)
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select, WebDriverWait

CHROMIUM = os.environ.get("CHROMIUM_BIN", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("CHROMEDRIVER_BIN", "/usr/bin/chromedriver")
WAIT_S = float(os.environ.get("CONSOLE_WAIT_S", "20"))
KEY_NAME = "catraca.key"
CODE_RE = re.compile(r"^[A-Z][A-Z0-9_]+$")


def flat(text: str) -> str:
    """An element's text on one line."""
    return " | ".join(line.strip() for line in str(text).splitlines() if line.strip())


def redact(text: str) -> str:
    """API key secrets never reach the log."""
    return re.sub(r"(ck_[A-Za-z0-9]+_)[A-Za-z0-9_-]{4,}", r"\1<redacted>", str(text))


class StepFailed(AssertionError):
    pass


class Console:
    def __init__(self, args: argparse.Namespace) -> None:
        self.base = args.base_url.rstrip("/")
        self.args = args
        self.shots = args.screenshots
        self.log: list[dict] = []
        options = webdriver.ChromeOptions()
        options.binary_location = CHROMIUM
        for arg in (
            "--headless=new",
            "--no-sandbox",
            "--disable-dev-shm-usage",
            "--window-size=1280,900",
            "--disable-gpu",
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-extensions",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--password-store=basic",
        ):
            options.add_argument(arg)
        options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
        # An explicit driver path: Selenium Manager is not consulted, so nothing is downloaded.
        service = Service(executable_path=CHROMEDRIVER)
        self.d = webdriver.Chrome(service=service, options=options)
        self.d.set_page_load_timeout(30)

    # ---- helpers --------------------------------------------------------------------------------------
    def wait(self, what: str, predicate, timeout: float = WAIT_S):
        try:
            return WebDriverWait(
                self.d,
                timeout,
                poll_frequency=0.1,
                ignored_exceptions=(NoSuchElementException, StaleElementReferenceException),
            ).until(lambda d: predicate(d))
        except TimeoutException:
            raise StepFailed(f"timed out after {timeout:g}s waiting for {what}") from None

    def by_id(self, element_id: str):
        return self.d.find_element(By.ID, element_id)

    def displayed(self, element_id: str) -> bool:
        try:
            return self.by_id(element_id).is_displayed()
        except NoSuchElementException:
            return False

    def body_data(self, name: str) -> str | None:
        return self.d.find_element(By.TAG_NAME, "body").get_attribute(f"data-{name}")

    def js(self, script: str, *args):
        return self.d.execute_script(script, *args)

    def shot(self, name: str) -> None:
        path = os.path.join(self.shots, name)
        if not self.d.save_screenshot(path):
            raise StepFailed(f"could not save the screenshot {path}")
        print(f"    screenshot {path}")

    def drain_log(self) -> None:
        try:
            self.log.extend(self.d.get_log("browser"))
        except WebDriverException:
            pass

    def sign_in(self, key: str) -> None:
        self.wait("the sign-in form", lambda d: self.displayed("api-key") and self.by_id("signin-submit").is_enabled())
        field = self.by_id("api-key")
        field.clear()
        field.send_keys(key)
        self.by_id("signin-submit").click()

    def wait_signed_in(self, who: str) -> None:
        def done(_):
            state = self.body_data("state")
            if state == "signed-out" and self.displayed("signin-error"):
                raise StepFailed(f"{who} was refused at sign-in: {redact(flat(self.by_id('signin-error').text))}")
            return state == "signed-in" and self.body_data("keys") in ("allowed", "forbidden")

        self.wait(f"{who} to be signed in and GET /v1/keys probed (body data-state, data-keys)", done)
        if not self.displayed("console"):
            raise StepFailed(f"{who} is signed in but the console is not shown")

    def click_tab(self, name: str) -> None:
        tab = self.by_id(f"tab-{name}")
        if not tab.is_displayed():
            raise StepFailed(f"the {name} tab is not visible")
        tab.click()
        self.wait(f"the {name} panel to show", lambda d: self.displayed(f"panel-{name}"))

    def storage(self) -> dict:
        return self.js(
            "return {session: sessionStorage.getItem(arguments[0]), local: localStorage.getItem(arguments[0]),"
            " localLength: localStorage.length, cookie: document.cookie};",
            KEY_NAME,
        )

    # ---- steps ----------------------------------------------------------------------------------------
    def a_wrong_key(self) -> None:
        self.d.get(f"{self.base}/console")
        self.wait("the page title 'Catraca console'", lambda d: d.title == "Catraca console")
        self.sign_in("ck_nope_nope")
        self.wait("an error naming an AUTH_ reason code in #signin-error",
                  lambda d: self.displayed("signin-error") and "AUTH_" in self.by_id("signin-error").text)
        print(f"    refused: {redact(flat(self.by_id('signin-error').text))!r}")
        if self.body_data("state") != "signed-out" or self.displayed("console"):
            raise StepFailed("after a refused key the console must stay signed out")
        st = self.storage()
        if st["session"] is not None or st["local"] is not None:
            raise StepFailed("a refused key must not be stored")

    def b_auditor(self) -> None:
        self.sign_in(self.args.auditor_key)
        self.wait_signed_in("the auditor")
        if self.body_data("keys") != "forbidden":
            raise StepFailed(f"GET /v1/keys must be refused to an auditor (data-keys={self.body_data('keys')!r})")
        if self.displayed("tab-keys"):
            raise StepFailed("the Keys tab is visible to an auditor")
        for t in ("trace", "decisions", "chains"):
            if not self.displayed(f"tab-{t}"):
                raise StepFailed(f"the {t} tab is not visible to the auditor")
        if self.storage()["session"] != self.args.auditor_key:
            raise StepFailed(f"sessionStorage[{KEY_NAME!r}] does not hold the auditor's key")

    def c_trace(self) -> None:
        trace = self.args.denied_trace
        self.click_tab("trace")
        field = self.by_id("trace-input")
        field.clear()
        field.send_keys(trace)
        self.by_id("trace-search").click()

        def loaded(_):
            panel = self.by_id("panel-trace")
            if panel.get_attribute("data-state") == "error":
                raise StepFailed(f"the trace search failed: {redact(flat(self.by_id('trace-error').text))}")
            return (panel.get_attribute("data-state") == "ready"
                    and self.by_id("timeline").get_attribute("data-trace-id") == trace)

        self.wait(f"the timeline of trace {trace}", loaded)
        items = self.d.find_elements(By.CSS_SELECTOR, "#timeline > li.event")
        types = [i.get_attribute("data-event-type") for i in items]
        print(f"    events: {' '.join(types)}")
        if "REQUEST_START" not in types:
            raise StepFailed(f"the timeline has no REQUEST_START item (types: {types})")
        decisions = self.d.find_elements(By.CSS_SELECTOR, '#timeline > li.event[data-event-type="DECISION"]')
        if not decisions:
            raise StepFailed(f"the timeline has no DECISION item (types: {types})")
        item = decisions[0]
        classes = (item.get_attribute("class") or "").split()
        if "deny" not in classes:
            raise StepFailed(f"the DECISION item has no class deny (classes: {classes})")
        if "action_matrix" not in item.text:
            raise StepFailed(f"the DECISION item does not name the gate action_matrix: {item.text!r}")
        gate = item.find_element(By.CSS_SELECTOR, ".event-head .gate").text
        if gate != "action_matrix":
            raise StepFailed(f"the deciding gate shown is {gate!r}, not action_matrix")
        codes = [c.text for c in item.find_elements(By.CSS_SELECTOR, ".reasons .reason-code")]
        if not codes or not all(CODE_RE.match(c) for c in codes):
            raise StepFailed(f"the DECISION item shows no reason code (found {codes})")
        print(f"    DECISION deny by {gate}, reasons {codes}")
        verdicts = item.find_elements(By.CSS_SELECTOR, "table.gates tbody tr")
        if not verdicts:
            raise StepFailed("the DECISION item has no table of gate verdicts")
        if not any("ms" in r.text for r in verdicts):
            raise StepFailed("the gate verdicts show no duration in ms")
        self.shot("trace.png")

    def d_decisions(self) -> None:
        trace = self.args.denied_trace
        self.click_tab("decisions")
        Select(self.by_id("f-effect")).select_by_value("deny")
        self.wait("the Apply button to be enabled", lambda d: self.by_id("f-apply").is_enabled())
        self.by_id("f-apply").click()

        def loaded(_):
            table = self.by_id("decisions")
            if table.get_attribute("data-state") == "error":
                raise StepFailed(f"GET /v1/audit/decisions failed: {redact(flat(self.by_id('decisions-error').text))}")
            return table.get_attribute("data-query") == "effect=deny" and table.get_attribute("data-state") == "ready"

        self.wait("the decisions filtered on effect=deny", loaded)
        for page in range(1, 21):
            rows = self.d.find_elements(By.CSS_SELECTOR, "#decisions tbody tr.decision")
            for r in rows:
                classes = (r.get_attribute("class") or "").split()
                if "deny" not in classes:
                    raise StepFailed(f"a row of the effect=deny list has classes {classes}: {r.text!r}")
            if any(r.get_attribute("data-trace-id") == trace for r in rows):
                print(f"    {len(rows)} deny rows, trace {trace} among them (page {page}); "
                      f"note: {self.by_id('decisions-note').text!r}")
                break
            if not self.displayed("decisions-older"):
                raise StepFailed(f"trace {trace} is not among the {len(rows)} deny rows and there is no Older page "
                                 f"(note: {self.by_id('decisions-note').text!r})")
            self.wait("the Older button to be enabled", lambda d: self.by_id("decisions-older").is_enabled())
            self.by_id("decisions-older").click()
            self.wait("the Older page", lambda d: self.by_id("decisions").get_attribute("data-state") != "loading")
        else:
            raise StepFailed(f"trace {trace} not found in 20 pages of denials")
        link = self.d.find_element(By.CSS_SELECTOR, f'#decisions tr.decision[data-trace-id="{trace}"] .trace-link')
        if link.text != trace:
            raise StepFailed(f"the row's trace link reads {link.text!r}, not {trace!r}")
        self.js("window.scrollTo(0, 0);")
        self.shot("decisions.png")

    def e_chains(self) -> None:
        self.click_tab("chains")

        def loaded(_):
            panel = self.by_id("panel-chains")
            if panel.get_attribute("data-state") == "error":
                raise StepFailed(f"GET /v1/audit/chains failed: {redact(flat(self.by_id('chains-error').text))}")
            return panel.get_attribute("data-state") == "ready"

        self.wait("the chains", loaded)
        rows = self.d.find_elements(By.CSS_SELECTOR, "#chains tbody tr.chain")
        if not rows:
            raise StepFailed("the Chains tab shows no chain")
        verification = self.by_id("verification").text.strip()
        if not verification:
            raise StepFailed("the Chains tab shows no verification summary")
        print(f"    {len(rows)} chain(s); {verification.splitlines()[0]!r}")
        self.shot("chains.png")

    def f_admin_revokes(self) -> None:
        analyst = self.args.analyst_key_id
        self.by_id("signout").click()
        self.wait("the sign-in form after signing out",
                  lambda d: self.body_data("state") == "signed-out" and self.displayed("api-key"))
        st = self.storage()
        if st["session"] is not None:
            raise StepFailed("sign out left the key in sessionStorage")
        if self.d.find_elements(By.CSS_SELECTOR, "#timeline > li, #decisions tbody tr, #chains tbody tr"):
            raise StepFailed("sign out left the previous key's data in the page")
        self.sign_in(self.args.admin_key)
        self.wait_signed_in("the admin")
        if not self.displayed("tab-keys"):
            raise StepFailed(f"the Keys tab is not visible to the admin (data-keys={self.body_data('keys')!r})")
        self.click_tab("keys")
        row_css = f'#keys tbody tr.key[data-key-id="{analyst}"]'

        def listed(d):
            if self.by_id("panel-keys").get_attribute("data-state") == "error":
                raise StepFailed(f"GET /v1/keys failed: {redact(flat(self.by_id('keys-error').text))}")
            return self.by_id("panel-keys").get_attribute("data-state") == "ready" and d.find_elements(By.CSS_SELECTOR, row_css)

        self.wait(f"the analyst key {analyst} in the keys table", listed)
        row = self.d.find_element(By.CSS_SELECTOR, row_css)
        state = row.find_element(By.CSS_SELECTOR, "td.state").text
        if state != "active" and not state.startswith("expires"):
            raise StepFailed(f"the analyst key is not active before the revocation (state {state!r})")
        row.find_element(By.CSS_SELECTOR, "button.revoke").click()
        reason = self.wait("the revocation reason input",
                           lambda d: d.find_element(By.CSS_SELECTOR, f"{row_css} input.revoke-reason"))
        reason.send_keys("console test: leaked in a ticket")
        self.d.find_element(By.CSS_SELECTOR, f"{row_css} .revoke-confirm").click()

        def revoked(d):
            if self.displayed("keys-error"):
                raise StepFailed(f"the revocation failed: {redact(flat(self.by_id('keys-error').text))}")
            cells = d.find_elements(By.CSS_SELECTOR, f"{row_css} td.state")
            return cells and cells[0].text.startswith("revoked")

        self.wait("the analyst key's row to read 'revoked …'", revoked)
        row = self.d.find_element(By.CSS_SELECTOR, row_css)
        if row.find_elements(By.CSS_SELECTOR, "button.revoke"):
            raise StepFailed("a revoked key still offers a Revoke button")
        print(f"    {row.find_element(By.CSS_SELECTOR, 'td.state').text!r}; "
              f"note: {self.by_id('keys-note').text!r}")
        self.shot("keys.png")

    def g_storage(self) -> None:
        st = self.storage()
        if st["session"] != self.args.admin_key:
            raise StepFailed(f"sessionStorage[{KEY_NAME!r}] does not hold the signed-in admin key")
        if st["local"] is not None or st["localLength"] != 0:
            raise StepFailed(f"localStorage holds {st['localLength']} item(s); the key belongs in sessionStorage only")
        if st["cookie"]:
            raise StepFailed("the console set a cookie")

    def h_deep_link(self) -> None:
        trace = self.args.denied_trace
        url = f"{self.base}/console#trace={quote(trace, safe='')}"
        self.d.get(url)
        self._wait_trace_shown(trace, "after following the #trace= link")
        self.d.refresh()
        self._wait_trace_shown(trace, "after a reload (the key restored from sessionStorage)")

    def _wait_trace_shown(self, trace: str, when: str) -> None:
        def shown(_):
            return (self.body_data("state") == "signed-in" and self.displayed("panel-trace")
                    and self.by_id("panel-trace").get_attribute("data-state") == "ready"
                    and self.by_id("timeline").get_attribute("data-trace-id") == trace
                    and self.d.find_elements(By.CSS_SELECTOR, '#timeline > li.event[data-event-type="DECISION"].deny'))

        self.wait(f"the trace {trace} {when}", shown)
        if self.by_id("trace-input").get_attribute("value") != trace:
            raise StepFailed(f"the trace input does not hold the deep-linked id {when}")

    def check_log(self) -> None:
        self.drain_log()
        bad = [e for e in self.log
               if "Content Security Policy" in e.get("message", "")
               or "Refused to" in e.get("message", "")
               or (e.get("level") == "SEVERE" and e.get("source") == "javascript")
               or "Uncaught" in e.get("message", "")]
        if bad:
            raise StepFailed("the browser log shows CSP violations or script errors:\n"
                             + "\n".join(redact(f"  {e.get('level')} {e.get('message')}") for e in bad))


STEPS = [
    ("a. a wrong key is refused with an AUTH_ reason", Console.a_wrong_key),
    ("b. the auditor signs in; no Keys tab", Console.b_auditor),
    ("c. the refused request's trace: DENY by action_matrix with a reason code", Console.c_trace),
    ("d. decisions filtered on deny include the refused request", Console.d_decisions),
    ("e. chains listed", Console.e_chains),
    ("f. the admin revokes the analyst key", Console.f_admin_revokes),
    ("g. the key in sessionStorage only", Console.g_storage),
    ("h. a #trace= deep link, in the page and after a reload", Console.h_deep_link),
    ("i. no CSP violation or script error in the browser log", Console.check_log),
]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base-url", required=True)
    # The keys may come from the environment instead, which keeps them off the command line (ps).
    ap.add_argument("--auditor-key", default=os.environ.get("CONSOLE_AUDITOR_KEY"),
                    help="an auditor's API key (default: $CONSOLE_AUDITOR_KEY)")
    ap.add_argument("--admin-key", default=os.environ.get("CONSOLE_ADMIN_KEY"),
                    help="an admin's API key (default: $CONSOLE_ADMIN_KEY)")
    ap.add_argument("--analyst-key-id", required=True, help="a key the admin revokes in the test")
    ap.add_argument("--denied-trace", required=True, help="trace id of a request the action matrix refused")
    ap.add_argument("--screenshots", default="target/console-screenshots")
    args = ap.parse_args()
    sys.stdout.reconfigure(line_buffering=True)
    for name in ("auditor_key", "admin_key"):
        if not getattr(args, name):
            ap.error(f"--{name.replace('_', '-')} (or $CONSOLE_{name.upper()}) is required")
    os.makedirs(args.screenshots, exist_ok=True)
    for path in (CHROMIUM, CHROMEDRIVER):
        if not os.access(path, os.X_OK):
            print(f"CONSOLE BROWSER TEST FAILED: {path} not found (apt-get install chromium chromium-driver)",
                  file=sys.stderr)
            return 1

    try:
        console = Console(args)
    except WebDriverException as e:
        print(f"CONSOLE BROWSER TEST FAILED: could not start Chromium through {CHROMEDRIVER}: {e.msg}",
              file=sys.stderr)
        return 1
    passed = 0
    failed_step = None
    try:
        for title, step in STEPS:
            print(f"  .. {title}", flush=True)
            try:
                step(console)
            except StepFailed as e:
                failed_step = (title, str(e))
                break
            except WebDriverException as e:
                failed_step = (title, f"browser error: {e.msg}")
                break
            except Exception:  # an error of the test itself: still a failure with evidence
                failed_step = (title, traceback.format_exc())
                break
            console.drain_log()
            passed += 1
            print(f"  ok {title}", flush=True)
        if failed_step:
            title, why = failed_step
            print(f"  FAIL {title}\n       {redact(why)}", file=sys.stderr)
            try:
                path = os.path.join(args.screenshots, "failure.png")
                console.d.save_screenshot(path)
                print(f"       screenshot {path}; page {redact(console.d.current_url)}", file=sys.stderr)
                text = console.d.find_element(By.TAG_NAME, "body").text
                print("----- page text (first 1500 characters)\n" + redact(text[:1500]), file=sys.stderr)
            except WebDriverException as e:
                print(f"       (no screenshot: {e.msg})", file=sys.stderr)
            console.drain_log()
            if console.log:
                print("----- browser console log", file=sys.stderr)
                for e in console.log:
                    print(redact(f"  {e.get('level')} {e.get('source', '')} {e.get('message')}"), file=sys.stderr)
            else:
                print("----- browser console log: empty", file=sys.stderr)
    finally:
        try:
            console.d.quit()
        except WebDriverException:
            pass
    print(f"console: {passed} passed, {1 if failed_step else 0} failed")
    if failed_step:
        print(f"CONSOLE BROWSER TEST FAILED: {failed_step[0]}", file=sys.stderr)
        return 1
    print("CONSOLE BROWSER TEST PASSED")
    return 0


if __name__ == "__main__":
    sys.exit(main())
