// Headless-Chromium EventSource check against a running ringcast server.
//
//   node tests/browser/eventsource.mjs http://127.0.0.1:PORT
//
// 1. Launches Debian's /usr/bin/chromium (override: CHROMIUM_PATH) through playwright-core
//    (no browser download: this network is closed).
// 2. Loads `${base}/health`, so the page's origin IS the server under test: the EventSource
//    below is same-origin and loopback-to-loopback (Chromium's Local Network Access blocks an
//    EventSource to 127.0.0.1 from about:blank).
// 3. In the page: `new EventSource('/events?topic=browser')` with `onmessage` and a
//    `greeting` listener; waits for `onopen`.
// 4. From Node: POST /publish?topic=browser body "line one\nline two", then
//    POST /publish?topic=browser&event=greeting body "hello".
// 5. Asserts the page got "line one\nline two" on `message` and "hello" on `greeting`, each
//    with a non-empty lastEventId equal to the id the publish answered, in publish order.
//
// Exit 0 on success; otherwise exit 1 with a message saying what the browser saw.
// The whole run is bounded by OVERALL_TIMEOUT_MS (30 s).

import { answerId, baseArgs, checkRun, postPublish } from './launch.mjs';

const OVERALL_TIMEOUT_MS = 30_000;
const STEP_TIMEOUT_MS = 10_000;
const TOPIC = 'browser';
const MESSAGE_DATA = 'line one\nline two';
const GREETING_DATA = 'hello';



// Everything we learn goes here, so that a failure or timeout can report it.
const state = {
  base: null,
  step: 'start',
  published: {},
  pageConsole: [],
  pageErrors: [],
  pageHttpErrors: [],
  browserSaw: null,
};

const run = checkRun('eventsource.mjs', state, { overallTimeoutMs: OVERALL_TIMEOUT_MS });
const { log, fail } = run;

async function publish(base, query, body) {
  const answer = await postPublish(base, query, body, STEP_TIMEOUT_MS);
  state.published[query] = answer;
  return answerId(base, query, answer);
}

// "<ms>-<seq>" compared as a pair of numbers.
function idLess(a, b) {
  const [am, as] = a.split('-').map(BigInt);
  const [bm, bs] = b.split('-').map(BigInt);
  return am < bm || (am === bm && as < bs);
}

async function main() {
  const [base] = baseArgs(1, 'node tests/browser/eventsource.mjs http://127.0.0.1:PORT');
  state.base = base;

  const page = await run.openPage(base, STEP_TIMEOUT_MS);
  if (!page) return;
  page.on('response', (r) => {
    if (r.status() >= 400) state.pageHttpErrors.push(`${r.status()} ${r.request().method()} ${r.url()}`);
  });

  state.step = `load ${base}/health`;
  const resp = await page.goto(`${base}/health`, { timeout: STEP_TIMEOUT_MS });
  if (!resp || resp.status() !== 200) {
    return fail(`GET ${base}/health answered ${resp ? resp.status() : 'nothing'}`);
  }

  // Open the EventSource; resolve on onopen, reject if it fails before opening.
  state.step = 'open EventSource';
  const opened = await page.evaluate(
    ({ topic, timeoutMs }) =>
      new Promise((resolve) => {
        const rec = { opens: 0, errors: [], events: [] };
        window.__sse = rec;
        const es = new EventSource(`/events?topic=${encodeURIComponent(topic)}`);
        window.__es = es;
        const push = (e) =>
          rec.events.push({
            type: e.type,
            data: e.data,
            lastEventId: e.lastEventId,
            origin: e.origin,
          });
        es.onmessage = push;
        es.addEventListener('greeting', push);
        es.onerror = () => {
          rec.errors.push({ readyState: es.readyState, at: Date.now() });
          if (es.readyState === EventSource.CLOSED) {
            resolve({ ok: false, why: 'EventSource failed for good (readyState CLOSED)', rec });
          }
        };
        es.onopen = () => {
          rec.opens += 1;
          resolve({ ok: true, url: es.url, readyState: es.readyState });
        };
        setTimeout(
          () => resolve({ ok: false, why: `no onopen within ${timeoutMs} ms`, rec }),
          timeoutMs,
        );
      }),
    { topic: TOPIC, timeoutMs: STEP_TIMEOUT_MS },
  );
  if (!opened.ok) {
    state.browserSaw = opened.rec;
    return fail(`EventSource did not open: ${opened.why}`);
  }
  log('EventSource open:', opened.url);

  state.step = 'publish';
  const messageId = await publish(base, `topic=${TOPIC}`, MESSAGE_DATA);
  const greetingId = await publish(base, `topic=${TOPIC}&event=greeting`, GREETING_DATA);
  log('published ids:', messageId, greetingId);

  state.step = 'wait for events in the page';
  const waited = await page.evaluate(
    (timeoutMs) =>
      new Promise((resolve) => {
        const t0 = Date.now();
        const tick = () => {
          const rec = window.__sse;
          const types = rec.events.map((e) => e.type);
          if (types.includes('message') && types.includes('greeting')) {
            resolve({ done: true, rec });
          } else if (Date.now() - t0 > timeoutMs) {
            resolve({ done: false, rec, readyState: window.__es.readyState });
          } else {
            setTimeout(tick, 20);
          }
        };
        tick();
      }),
    STEP_TIMEOUT_MS,
  );
  state.browserSaw = waited.rec;
  // Done listening: close the stream from the page side.
  await page.evaluate(() => window.__es.close()).catch(() => {});

  if (!waited.done) {
    return fail(
      `page did not receive both events within ${STEP_TIMEOUT_MS} ms ` +
        `(EventSource readyState ${waited.readyState})`,
    );
  }

  state.step = 'check events';
  const events = waited.rec.events;
  const problems = [];
  const msgs = events.filter((e) => e.type === 'message');
  const greets = events.filter((e) => e.type === 'greeting');
  if (msgs.length !== 1) problems.push(`expected 1 "message" event, got ${msgs.length}`);
  if (greets.length !== 1) problems.push(`expected 1 "greeting" event, got ${greets.length}`);
  const others = events.filter((e) => e.type !== 'message' && e.type !== 'greeting');
  if (others.length) problems.push(`unexpected events: ${JSON.stringify(others)}`);
  const m = msgs[0];
  const g = greets[0];
  if (m) {
    if (m.data !== MESSAGE_DATA) {
      problems.push(`"message" data ${JSON.stringify(m.data)}, expected ${JSON.stringify(MESSAGE_DATA)}`);
    }
    if (!m.lastEventId) problems.push('"message" has an empty lastEventId');
    else if (m.lastEventId !== messageId) {
      problems.push(`"message" lastEventId ${JSON.stringify(m.lastEventId)} != publish id ${messageId}`);
    }
  }
  if (g) {
    if (g.data !== GREETING_DATA) {
      problems.push(`"greeting" data ${JSON.stringify(g.data)}, expected ${JSON.stringify(GREETING_DATA)}`);
    }
    if (!g.lastEventId) problems.push('"greeting" has an empty lastEventId');
    else if (g.lastEventId !== greetingId) {
      problems.push(`"greeting" lastEventId ${JSON.stringify(g.lastEventId)} != publish id ${greetingId}`);
    }
  }
  if (m && g && events.indexOf(m) > events.indexOf(g)) {
    problems.push('"greeting" arrived before "message" (publish order broken)');
  }
  if (!idLess(messageId, greetingId)) {
    problems.push(`publish ids not increasing: ${messageId} then ${greetingId}`);
  }
  if (waited.rec.errors.length) {
    problems.push(`EventSource fired onerror: ${JSON.stringify(waited.rec.errors)}`);
  }
  if (problems.length) return fail(problems.join('; '));

  return run.finish(
    0,
    `message ${JSON.stringify(m.data)} id ${m.lastEventId}; greeting ${JSON.stringify(g.data)} id ${g.lastEventId}`,
  );
}

run.start(main);
