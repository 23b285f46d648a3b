// Headless-Chromium check of the embedded dashboard against a running `ringcast --demo`.
//
//   node tests/browser/dashboard.mjs http://127.0.0.1:PORT SCREENSHOT.png
//
// 1. Loads `${base}/` in Chromium (playwright-core driving Debian's /usr/bin/chromium).
// 2. Waits for the page's stats stream (/dashboard/stats): the status pill says "ok", the node,
//    version and core table are filled in, and at least two stats messages arrived.
// 3. Live numbers that change: publishes PUBLISHES events from Node on topic `dash.check` and
//    waits until the page's "published in all" figure reaches at least its value before plus
//    PUBLISHES; the page's connection count covers its own two streams.
// 4. The demo ticker: every symbol's card shows a price, the quote count grows, the stream pill
//    says "live", and the top-topics table lists demo topics (the page's own subscriptions).
// 5. No page error, no failed request (>= 400), no request to another origin (no CDN).
// 6. Saves a full-page screenshot to SCREENSHOT.png.
//
// Exit 0 on success; otherwise 1 with what the page showed. Bounded by OVERALL_TIMEOUT_MS.

import { answerId, checkRun, postPublish, sleep } from './launch.mjs';

// DASHBOARD_SETTLE_MS (default 3000): how long the charts run before the screenshot.
const OVERALL_TIMEOUT_MS = 45_000 + Number(process.env.DASHBOARD_SETTLE_MS || 0);
const STEP_TIMEOUT_MS = 15_000;
const PUBLISHES = 25;
const SYMBOLS = ['AAPL', 'MSFT', 'GOOG', 'AMZN', 'NVDA', 'TSLA'];

const state = {
  base: null,
  step: 'start',
  pageConsole: [],
  pageErrors: [],
  pageHttpErrors: [],
  foreignRequests: [],
  seen: {},
};

const run = checkRun('dashboard.mjs', state, { overallTimeoutMs: OVERALL_TIMEOUT_MS });
const { log, fail } = run;

// "12,345" -> 12345 (NaN for "–").
const num = (s) => Number(String(s).replace(/[^0-9.]/g, '') || NaN);

async function snapshot(page) {
  return page.evaluate(() => {
    const t = (id) => document.querySelector(`[data-testid="${id}"]`)?.textContent ?? null;
    return {
      status: t('status'),
      node: t('node'),
      version: t('version'),
      connections: t('connections'),
      subscribers: t('subscribers'),
      published: t('published-total'),
      statsCount: Number(document.body.dataset.statsCount || 0),
      quotes: Number(document.body.dataset.quotes || 0),
      demoState: t('demo-state'),
      cores: document.querySelectorAll('#cores tr[data-testid^="core-"]').length,
      topics: [...document.querySelectorAll('#topics tr[data-testid="topic-row"] td.mono')].map((e) => e.textContent),
      prices: Object.fromEntries(
        ['AAPL', 'MSFT', 'GOOG', 'AMZN', 'NVDA', 'TSLA'].map((s) => [s, t(`price-${s}`)]),
      ),
    };
  });
}

// Polls `snapshot` until `pred` holds; fails with the last snapshot after STEP_TIMEOUT_MS.
async function waitFor(page, what, pred) {
  state.step = what;
  const deadline = Date.now() + STEP_TIMEOUT_MS;
  for (;;) {
    const s = await snapshot(page);
    state.seen = s;
    if (pred(s)) return s;
    if (Date.now() > deadline) throw new Error(`timed out waiting for: ${what}`);
    await sleep(200);
  }
}

async function main() {
  const args = process.argv.slice(2);
  if (args.length < 2 || !/^https?:\/\//.test(args[0])) {
    console.error('usage: node tests/browser/dashboard.mjs http://127.0.0.1:PORT SCREENSHOT.png');
    process.exit(2);
  }
  const base = args[0].replace(/\/+$/, '');
  const shot = args[1];
  state.base = base;

  const page = await run.openPage(base, STEP_TIMEOUT_MS);
  if (!page) return;
  await page.setViewportSize({ width: 1360, height: 900 });
  const origin = new URL(base).origin;
  page.on('request', (r) => {
    const u = r.url();
    if (!u.startsWith(origin) && !u.startsWith('data:')) state.foreignRequests.push(u);
  });
  page.on('response', (r) => {
    if (r.status() >= 400) state.pageHttpErrors.push(`${r.status()} ${r.request().method()} ${r.url()}`);
  });

  state.step = `load ${base}/`;
  const resp = await page.goto(`${base}/`, { timeout: STEP_TIMEOUT_MS });
  if (!resp || resp.status() !== 200) return fail(`GET ${base}/ answered ${resp ? resp.status() : 'nothing'}`);
  const type = resp.headers()['content-type'] || '';
  if (!type.startsWith('text/html')) return fail(`GET ${base}/ has content-type ${type}`);

  const first = await waitFor(page, 'stats stream live (status ok, two messages, cores listed)', (s) =>
    s.status === 'ok' && s.statsCount >= 2 && s.cores > 0 && s.node && s.node !== '–' && /^\d+\.\d+/.test(s.version));
  log(`stats live: node ${first.node}, version ${first.version}, ${first.cores} cores, ${first.connections} connections`);

  // Live numbers that change: our publishes must show in the page's published total.
  const before = num(first.published);
  state.step = `publish ${PUBLISHES} events`;
  for (let i = 0; i < PUBLISHES; i++) {
    const q = 'topic=dash.check';
    answerId(base, q, await postPublish(base, q, `check ${i}`, STEP_TIMEOUT_MS));
  }
  const after = await waitFor(page, `published total >= ${before} + ${PUBLISHES}`, (s) => num(s.published) >= before + PUBLISHES);
  log(`published total on the page went ${before} -> ${num(after.published)}`);

  // The page holds two streams (stats and demo), so the node has at least two connections.
  await waitFor(page, 'connections and subscribers count the page', (s) => num(s.connections) >= 2 && num(s.subscribers) >= 1);

  // The demo ticker: every card priced, quotes keep arriving, demo topics in the top list.
  const demo = await waitFor(page, 'every ticker card shows a price and the demo stream is live', (s) =>
    s.demoState === 'live' && SYMBOLS.every((sym) => /^\d+\.\d\d$/.test(s.prices[sym] || '')));
  const grown = await waitFor(page, 'more quotes arrive', (s) => s.quotes > demo.quotes);
  await waitFor(page, 'top topics list the demo topics', (s) => s.topics.some((t) => t.startsWith('demo.')));
  log(`ticker live: ${grown.quotes} quotes, e.g. AAPL ${grown.prices.AAPL}`);

  state.step = 'page health';
  if (state.pageErrors.length) return fail(`page errors: ${state.pageErrors.join(' | ')}`);
  if (state.pageHttpErrors.length) return fail(`failed requests: ${state.pageHttpErrors.join(' | ')}`);
  if (state.foreignRequests.length) return fail(`requests to other origins: ${state.foreignRequests.join(' | ')}`);

  // Let the charts gather a few seconds of lines before the picture.
  state.step = 'screenshot';
  await sleep(Number(process.env.DASHBOARD_SETTLE_MS || 3000));
  await page.screenshot({ path: shot, fullPage: true });
  log(`screenshot: ${shot}`);
  await run.finish(0, 'dashboard loads, shows live stats that follow publishes, and plays the demo ticker');
}

run.start(main);
