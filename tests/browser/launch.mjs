// Shared by the browser test scripts: start Debian's Chromium through playwright-core the way
// this closed network needs, open a page that records its console output and errors, run a
// check with one bounded exit path, and publish to ringcast.

import { chromium } from 'playwright-core';
import { existsSync } from 'node:fs';

// Flags this closed network needs (docs: /work/.library/env/machines/rust.md). playwright-core
// itself adds a fresh temporary --user-data-dir for every launch() (and refuses one in `args`),
// and deletes it on close.
export const CHROMIUM_FLAGS = [
  '--headless',
  '--no-sandbox',
  '--disable-gpu',
  '--disable-quic',
  '--no-first-run',
  '--disable-background-networking',
  '--disable-component-update',
  '--disable-sync',
];

// Launches Chromium allowed to reach `base`'s port and opens one page whose console lines and
// errors land in `state.pageConsole` / `state.pageErrors`. Throws with a clear message when
// Chromium is missing. Returns { browser, page }.
async function launchPage(base, state, stepTimeoutMs) {
  const executablePath = process.env.CHROMIUM_PATH || '/usr/bin/chromium';
  if (!existsSync(executablePath)) {
    throw new Error(`${executablePath} not found: run scripts/test.sh (it installs Debian's chromium)`);
  }
  state.step = 'launch chromium';
  const browser = await chromium.launch({
    executablePath,
    headless: true,
    // Chromium refuses some ports outright (ERR_UNSAFE_PORT); allow the one under test.
    args: [...CHROMIUM_FLAGS, `--explicitly-allowed-ports=${new URL(base).port || 80}`],
    timeout: stepTimeoutMs,
  });
  const page = await browser.newPage();
  page.on('console', (m) => state.pageConsole.push(`${m.type()}: ${m.text()}`));
  page.on('pageerror', (e) => state.pageErrors.push(String(e)));
  // Chromium asks for /favicon.ico; the server rightly 404s it. Answer it here so that a
  // failure report holds only requests the test made.
  await page.route('**/favicon.ico', (route) => route.fulfill({ status: 204, body: '' }));
  page.setDefaultTimeout(stepTimeoutMs);
  return { browser, page };
}

export function sleep(ms) {
  return new Promise((r) => setTimeout(r, ms));
}

// One check run. `run.finish(code, message)` reports (with `state` on failure, written through
// `replacer`), closes `run.browser` within 3 s, and exits; only the first call counts.
// `run.start(main)` bounds the whole run by `overallTimeoutMs` and fails on a thrown error, and,
// with `exitGuard`, when the event loop drains before the check finished (never exit 0 by
// running out of work).
export function checkRun(name, state, { overallTimeoutMs, replacer = null, exitGuard = true }) {
  let finished = false;
  const run = {
    browser: null,
    log: (...a) => console.log(`[${name}]`, ...a),
    async finish(code, message) {
      if (finished) return;
      finished = true;
      if (code === 0) {
        run.log('PASS:', message);
      } else {
        console.error(`[${name}] FAIL (at step "${state.step}"): ${message}`);
        console.error(`[${name}] state:`, JSON.stringify(state, replacer, 2));
      }
      if (run.browser) {
        // Bounded close: never let a stuck browser keep us alive.
        await Promise.race([run.browser.close().catch(() => {}), sleep(3000)]);
      }
      process.exit(code);
    },
    fail: (message) => run.finish(1, message),
    // `launchPage` for this run: the browser is closed by `finish`. Null (and the run failed)
    // when Chromium cannot start.
    async openPage(base, stepTimeoutMs) {
      try {
        const { browser, page } = await launchPage(base, state, stepTimeoutMs);
        run.browser = browser;
        return page;
      } catch (e) {
        await run.fail(e.message);
        return null;
      }
    },
    start(main) {
      setTimeout(() => run.fail(`overall timeout of ${overallTimeoutMs / 1000} s`), overallTimeoutMs);
      if (exitGuard) process.on('beforeExit', () => run.fail('event loop drained before the check finished'));
      main().catch((e) => run.fail(e && e.stack ? e.stack : String(e)));
    },
  };
  return run;
}

// POST `body` as text/plain to `${base}/publish?${query}`; resolves with the answer
// ({ status, contentType, body }) whatever its status.
export async function postPublish(base, query, body, timeoutMs) {
  const res = await fetch(`${base}/publish?${query}`, {
    method: 'POST',
    headers: { 'Content-Type': 'text/plain; charset=utf-8' },
    body,
    signal: AbortSignal.timeout(timeoutMs),
  });
  return { status: res.status, contentType: res.headers.get('content-type'), body: await res.text() };
}

// The event id of a publish answer; throws unless it is 200 with `{"id":"<ms>-<seq>"}`.
export function answerId(base, query, answer) {
  const what = `POST ${base}/publish?${query}`;
  if (answer.status !== 200) throw new Error(`${what} answered ${answer.status}: ${answer.body}`);
  let id;
  try {
    id = JSON.parse(answer.body).id;
  } catch (e) {
    throw new Error(`${what} answered non-JSON body ${JSON.stringify(answer.body)}`);
  }
  if (typeof id !== 'string' || !/^\d+-\d+$/.test(id)) {
    throw new Error(`${what} answered id ${JSON.stringify(id)}, expected "<ms>-<seq>"`);
  }
  return id;
}

// The script's http(s) base URL arguments, trailing slashes removed; exits 2 with `usage` when
// there are fewer than `count` or one is not an http(s) URL.
export function baseArgs(count, usage) {
  const args = process.argv.slice(2, 2 + count);
  if (args.length < count || !args.every((a) => /^https?:\/\//.test(a))) {
    console.error(`usage: ${usage}`);
    process.exit(2);
  }
  return args.map((a) => a.replace(/\/+$/, ''));
}
