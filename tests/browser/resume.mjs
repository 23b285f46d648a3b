// Headless-Chromium EventSource resume check: a real browser reconnects by itself after a
// network cut, sends Last-Event-ID, and ringcast replays what it missed, exactly once, in order.
//
//   node tests/browser/resume.mjs http://127.0.0.1:RELAY_PORT http://127.0.0.1:SERVER_PORT
//
// Driven by tests/browser_resume.rs, which runs ringcast behind a TCP relay (RELAY_PORT) that it
// can cut. The two talk over this process's stdout/stdin, one line each way:
//   we print `@@CUT`     -> the relay drops every connection and holds new ones; it answers `cut`
//   we print `@@RESUME`  -> the relay forwards again (held connections included); it answers `resumed`
//   we print `@@DONE <id1> ... <id7>` at the end (the publish ids, for the relay-side checks).
//
// Steps:
// 1. Launch Debian's /usr/bin/chromium (override: CHROMIUM_PATH) through playwright-core with the
//    same flags as eventsource.mjs; load `${relay}/health` so the page is same-origin with the
//    relay (Chromium blocks an EventSource to 127.0.0.1 from about:blank).
// 2. In the page: `new EventSource('/events?topic=resume')`; wait for onopen.
// 3. From Node, POST events "1", "2", "3" straight to ringcast; wait until the page has them.
// 4. `@@CUT`; wait until the page's EventSource reports the error (readyState CONNECTING, i.e. it
//    will retry on its own: the server sent `retry: 2000`).
// 5. During the cut, POST "4", "5", "6" straight to ringcast (the page cannot see them live).
// 6. `@@RESUME`; the page reconnects by itself through the relay with Last-Event-ID = id of "3"
//    and must receive "4", "5", "6" from the replay; then POST "7" (live after the resume).
// 7. Assert the page saw exactly "1".."7", each once, in order, each with lastEventId equal to
//    the id its publish answered, no ringcast-gap notice, and exactly two opens.
//
// Exit 0 on success; otherwise exit 1 with what the browser saw. Bounded by OVERALL_TIMEOUT_MS.

import { answerId, baseArgs, checkRun, postPublish } from './launch.mjs';
import { createInterface } from 'node:readline';

const OVERALL_TIMEOUT_MS = 45_000;
const STEP_TIMEOUT_MS = 15_000;
const TOPIC = 'resume';



const state = {
  relay: null,
  server: null,
  step: 'start',
  published: [],
  pageConsole: [],
  pageErrors: [],
  browserSaw: null,
};

// Stdin stays open for the driver's answers, so the event loop never drains by itself.
const run = checkRun('resume.mjs', state, { overallTimeoutMs: OVERALL_TIMEOUT_MS, exitGuard: false });
const { log, fail } = run;

// Lines from the Rust driver on stdin, awaited one at a time.
const stdinLines = [];
const stdinWaiters = [];
createInterface({ input: process.stdin }).on('line', (line) => {
  const waiter = stdinWaiters.shift();
  if (waiter) waiter(line);
  else stdinLines.push(line);
});

function nextStdinLine(timeoutMs) {
  if (stdinLines.length) return Promise.resolve(stdinLines.shift());
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`no answer from the driver within ${timeoutMs} ms`)), timeoutMs);
    stdinWaiters.push((line) => {
      clearTimeout(timer);
      resolve(line);
    });
  });
}

async function ask(command, answer) {
  console.log(command);
  const line = await nextStdinLine(STEP_TIMEOUT_MS);
  if (line.trim() !== answer) throw new Error(`driver answered ${JSON.stringify(line)} to ${command}, expected ${answer}`);
}

async function publish(server, data) {
  const query = `topic=${TOPIC}`;
  const id = answerId(server, query, await postPublish(server, query, data, STEP_TIMEOUT_MS));
  state.published.push({ data, id });
  return id;
}

// Waits in the page until `cond(window.__sse)` holds; returns the record either way.
async function waitInPage(page, condSource, timeoutMs) {
  return page.evaluate(
    ({ condSource, timeoutMs }) =>
      new Promise((resolve) => {
        const cond = new Function('rec', `return (${condSource});`);
        const t0 = Date.now();
        const tick = () => {
          const rec = window.__sse;
          const snapshot = JSON.parse(JSON.stringify({ ...rec, readyState: window.__es.readyState }));
          if (cond(rec)) resolve({ done: true, rec: snapshot });
          else if (Date.now() - t0 > timeoutMs) resolve({ done: false, rec: snapshot });
          else setTimeout(tick, 20);
        };
        tick();
      }),
    { condSource, timeoutMs },
  );
}

async function main() {
  const [relay, server] = baseArgs(
    2,
    'node tests/browser/resume.mjs http://127.0.0.1:RELAY_PORT http://127.0.0.1:SERVER_PORT',
  );
  state.relay = relay;
  state.server = server;

  const page = await run.openPage(relay, STEP_TIMEOUT_MS);
  if (!page) return;

  state.step = `load ${relay}/health`;
  const resp = await page.goto(`${relay}/health`, { timeout: STEP_TIMEOUT_MS });
  if (!resp || resp.status() !== 200) {
    return fail(`GET ${relay}/health answered ${resp ? resp.status() : 'nothing'}`);
  }

  state.step = 'open EventSource';
  await page.evaluate((topic) => {
    const rec = { opens: 0, errors: [], events: [] };
    window.__sse = rec;
    const es = new EventSource(`/events?topic=${encodeURIComponent(topic)}`);
    window.__es = es;
    es.onmessage = (e) => rec.events.push({ type: e.type, data: e.data, lastEventId: e.lastEventId });
    es.addEventListener('ringcast-gap', (e) => rec.events.push({ type: e.type, data: e.data, lastEventId: e.lastEventId }));
    es.onerror = () => rec.errors.push({ readyState: es.readyState, at: Date.now(), events: rec.events.length });
    es.onopen = () => {
      rec.opens += 1;
    };
  }, TOPIC);
  let w = await waitInPage(page, 'rec.opens >= 1', STEP_TIMEOUT_MS);
  state.browserSaw = w.rec;
  if (!w.done) return fail('EventSource did not open');

  state.step = 'publish 1..3 and wait for them in the page';
  const ids = [];
  for (const d of ['1', '2', '3']) ids.push(await publish(server, d));
  w = await waitInPage(page, 'rec.events.length >= 3', STEP_TIMEOUT_MS);
  state.browserSaw = w.rec;
  if (!w.done) return fail('page did not receive events 1..3');

  state.step = 'cut the connection';
  await ask('@@CUT', 'cut');
  w = await waitInPage(page, 'rec.errors.length >= 1', STEP_TIMEOUT_MS);
  state.browserSaw = w.rec;
  if (!w.done) return fail('the page never noticed the cut (no onerror)');
  if (w.rec.errors[0].readyState !== 0) {
    return fail(`after the cut the EventSource is in readyState ${w.rec.errors[0].readyState}, not CONNECTING (0): it will not retry`);
  }

  state.step = 'publish 4..6 during the cut';
  for (const d of ['4', '5', '6']) ids.push(await publish(server, d));

  state.step = 'resume the relay and wait for the browser to reconnect and catch up';
  await ask('@@RESUME', 'resumed');
  w = await waitInPage(page, 'rec.opens >= 2 && rec.events.length >= 6', STEP_TIMEOUT_MS);
  state.browserSaw = w.rec;
  if (!w.done) return fail('the page did not reconnect and receive events 4..6');

  state.step = 'publish 7 live after the resume';
  ids.push(await publish(server, '7'));
  w = await waitInPage(page, 'rec.events.some((e) => e.data === "7")', STEP_TIMEOUT_MS);
  state.browserSaw = w.rec;
  await page.evaluate(() => window.__es.close()).catch(() => {});
  if (!w.done) return fail('the page did not receive event 7 after resuming');

  state.step = 'check events';
  const problems = [];
  const got = w.rec.events.map((e) => `${e.type}:${e.data}@${e.lastEventId}`);
  const want = ['1', '2', '3', '4', '5', '6', '7'].map((d, i) => `message:${d}@${ids[i]}`);
  if (JSON.stringify(got) !== JSON.stringify(want)) {
    problems.push(`events ${JSON.stringify(got)}, expected ${JSON.stringify(want)}`);
  }
  if (w.rec.opens !== 2) problems.push(`EventSource opened ${w.rec.opens} times, expected 2 (once, then one reconnect)`);
  if (problems.length) return fail(problems.join('; '));

  console.log(`@@DONE ${ids.join(' ')}`);
  return run.finish(0, `events 1..7 once each in order across a reconnect; ids ${ids.join(' ')}`);
}

run.start(main);
