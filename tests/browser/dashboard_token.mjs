// Headless-Chromium check of the dashboard on a node with tokens (--jwt-secret):
//
//   node tests/browser/dashboard_token.mjs http://127.0.0.1:PORT TOKEN
//
// 1. `${base}/` without a token: the stats stream is refused (401), and the page says a token
//    covering `$stats` is needed (`[data-testid=stats-refused]`).
// 2. `${base}/?token=TOKEN` (a token whose `subscribe` covers `$stats`): the stats stream is
//    live (status pill "ok", stats messages arriving), no refusal note.
// Exit 0 on success; otherwise 1 with what the page showed.

import { checkRun, sleep } from './launch.mjs';

const OVERALL_TIMEOUT_MS = 40_000;
const STEP_TIMEOUT_MS = 15_000;
const state = { step: 'start', pageConsole: [], pageErrors: [], seen: null };
const run = checkRun('dashboard_token.mjs', state, { overallTimeoutMs: OVERALL_TIMEOUT_MS });

async function until(page, what, fn) {
  state.step = what;
  const deadline = Date.now() + STEP_TIMEOUT_MS;
  for (;;) {
    state.seen = await page.evaluate(() => ({
      status: document.querySelector('[data-testid="status"]').textContent,
      refused: document.querySelector('[data-testid="stats-refused"]')?.textContent ?? null,
      statsCount: Number(document.body.dataset.statsCount || 0),
    }));
    if (fn(state.seen)) return state.seen;
    if (Date.now() > deadline) throw new Error(`timed out waiting for: ${what}`);
    await sleep(200);
  }
}

async function main() {
  const [base, token] = [process.argv[2]?.replace(/\/+$/, ''), process.argv[3]];
  if (!/^https?:\/\//.test(base || '') || !token) {
    console.error('usage: node tests/browser/dashboard_token.mjs http://127.0.0.1:PORT TOKEN');
    process.exit(2);
  }
  const page = await run.openPage(base, STEP_TIMEOUT_MS);
  if (!page) return;
  await page.goto(`${base}/`, { timeout: STEP_TIMEOUT_MS });
  const refused = await until(page, 'the page explains the refused stats stream', (s) => s.refused !== null);
  if (!refused.refused.includes('$stats')) return run.fail(`refusal note does not name $stats: ${refused.refused}`);
  if (refused.statsCount !== 0) return run.fail('stats arrived without a token');

  await page.goto(`${base}/?token=${encodeURIComponent(token)}`, { timeout: STEP_TIMEOUT_MS });
  await until(page, 'stats live with the token', (s) => s.status === 'ok' && s.statsCount >= 2);
  if (state.seen.refused !== null) return run.fail('refusal note shown although the token covers $stats');
  if (state.pageErrors.length) return run.fail(`page errors: ${state.pageErrors.join(' | ')}`);
  await run.finish(0, 'stats refused without a token (and explained), live with one');
}

run.start(main);
