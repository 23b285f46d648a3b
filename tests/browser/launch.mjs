// Shared by the browser test scripts: start Debian's Chromium through playwright-core the way
// this closed network needs, and open a page that records its console output and errors.

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
export async function launchPage(base, state, stepTimeoutMs) {
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
