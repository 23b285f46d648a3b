// Headless-Chromium EventSource on a gzip event stream (docs/CONTRACT.md, "gzip streams").
//
//   node tests/browser/gzip.mjs http://127.0.0.1:PORT
//
// 1. Launches Debian's /usr/bin/chromium (override: CHROMIUM_PATH) through playwright-core with
//    the same flags as eventsource.mjs, and loads `${base}/health` so the page's origin is the
//    server under test (same-origin, loopback-to-loopback EventSource).
// 2. In the page: `new EventSource('/events?topic=gzbrowser')`; waits for onopen.
// 3. Chromium's own view of that exchange (playwright `response` event, allHeaders(), the
//    headers its network stack received): the response must carry `Content-Encoding: gzip`.
// 4. From Node, the same request with the Accept-Encoding Chromium sent (when playwright reports
//    it; else Chromium's default `gzip, deflate, br, zstd`) over node:http, which does not
//    decompress: the answer must carry `Content-Encoding: gzip` and `Vary: Accept-Encoding`.
// 5. From Node: POST a small multi-line event, then a large (~8 KiB, deflated by the server)
//    multi-line JSON-ish event, then a small one-line event.
// 6. Asserts the page got all three intact on `message`, in order, each once, with lastEventId
//    equal to the id the publish answered, and no onerror.
//
// Exit 0 on success; otherwise exit 1 with what the browser saw. Bounded by OVERALL_TIMEOUT_MS.

import { answerId, baseArgs, checkRun, postPublish, sleep } from './launch.mjs';
import http from 'node:http';

const OVERALL_TIMEOUT_MS = 30_000;
const STEP_TIMEOUT_MS = 10_000;
const TOPIC = 'gzbrowser';


// What Chromium's network stack sends on http:// requests.
const CHROMIUM_ACCEPT_ENCODING = 'gzip, deflate, br, zstd';

function largeData() {
  const rows = [];
  let len = 0;
  for (let k = 0; len < 8 * 1024; k++) {
    const row = JSON.stringify({ row: k, sym: 'EURUSD', bid: 1 + ((k * 7) % 10000) / 10000, venue: 'LDN' });
    rows.push(row);
    len += row.length + 1;
  }
  return rows.join('\n');
}

const EVENTS = [
  { name: 'small multi-line', data: 'first line\nsecond line {"n":1}\n  third, indented' },
  { name: 'large', data: largeData() },
  { name: 'small one-line', data: 'caf\u00e9 \u{1f600} done' },
];


const state = {
  base: null,
  step: 'start',
  eventsRequestHeaders: null,
  eventsResponseHeaders: null,
  nodeCheck: null,
  published: [],
  pageConsole: [],
  pageErrors: [],
  pageHttpErrors: [],
  browserSaw: null,
};

// Long data is cut in the failure report.
function brief(s) {
  return typeof s === 'string' && s.length > 300 ? `${s.slice(0, 300)}...(${s.length} chars)` : s;
}

const run = checkRun('gzip.mjs', state, {
  overallTimeoutMs: OVERALL_TIMEOUT_MS,
  replacer: (k, v) => (k === 'data' ? brief(v) : v),
});
const { log, fail } = run;

async function publish(base, data) {
  const query = `topic=${TOPIC}`;
  const id = answerId(base, query, await postPublish(base, query, data, STEP_TIMEOUT_MS));
  state.published.push({ id, bytes: Buffer.byteLength(data) });
  return id;
}

// GET /events with the given headers over node:http; resolves with the status and headers, then
// drops the connection.
function rawStreamHead(base, headers) {
  return new Promise((resolve, reject) => {
    const req = http.get(`${base}/events?topic=${TOPIC}-probe`, { headers, agent: false }, (res) => {
      resolve({ status: res.statusCode, headers: res.headers });
      res.destroy();
      req.destroy();
    });
    req.on('error', reject);
    req.setTimeout(STEP_TIMEOUT_MS, () => req.destroy(new Error('no response head')));
  });
}

async function main() {
  const [base] = baseArgs(1, 'node tests/browser/gzip.mjs http://127.0.0.1:PORT');
  state.base = base;

  const page = await run.openPage(base, STEP_TIMEOUT_MS);
  if (!page) return;
  const isEvents = (url) => new URL(url).pathname === '/events';
  // Resolves with the page's /events response once playwright reports its head.
  let onEventsResponse;
  const eventsResponse = new Promise((r) => (onEventsResponse = r));
  page.on('response', (r) => {
    if (r.status() >= 400) state.pageHttpErrors.push(`${r.status()} ${r.request().method()} ${r.url()}`);
    if (isEvents(r.url())) onEventsResponse(r);
  });

  state.step = `load ${base}/health`;
  const resp = await page.goto(`${base}/health`, { timeout: STEP_TIMEOUT_MS });
  if (!resp || resp.status() !== 200) {
    return fail(`GET ${base}/health answered ${resp ? resp.status() : 'nothing'}`);
  }

  state.step = 'open EventSource';
  const opened = await page.evaluate(
    ({ topic, timeoutMs }) =>
      new Promise((resolve) => {
        const rec = { opens: 0, errors: [], events: [] };
        window.__sse = rec;
        const es = new EventSource(`/events?topic=${encodeURIComponent(topic)}`);
        window.__es = es;
        es.onmessage = (e) => rec.events.push({ type: e.type, data: e.data, lastEventId: e.lastEventId });
        es.onerror = () => {
          rec.errors.push({ readyState: es.readyState, at: Date.now() });
          if (es.readyState === EventSource.CLOSED) {
            resolve({ ok: false, why: 'EventSource failed for good (readyState CLOSED)', rec });
          }
        };
        es.onopen = () => {
          rec.opens += 1;
          resolve({ ok: true, url: es.url });
        };
        setTimeout(() => resolve({ ok: false, why: `no onopen within ${timeoutMs} ms`, rec }), timeoutMs);
      }),
    { topic: TOPIC, timeoutMs: STEP_TIMEOUT_MS },
  );
  if (!opened.ok) {
    state.browserSaw = opened.rec;
    return fail(`EventSource did not open: ${opened.why}`);
  }
  log('EventSource open:', opened.url);

  // Chromium's own view of its /events exchange: the headers its network stack sent (with the
  // Accept-Encoding it adds) and received.
  state.step = "read Chromium's /events request and response headers";
  const r = await Promise.race([eventsResponse, sleep(STEP_TIMEOUT_MS).then(() => null)]);
  if (!r) return fail(`playwright reported no response for the page's /events within ${STEP_TIMEOUT_MS} ms`);
  state.eventsResponseHeaders = await r.allHeaders();
  state.eventsRequestHeaders = await r.request().allHeaders();
  if (state.eventsResponseHeaders['content-encoding'] !== 'gzip') {
    return fail(
      `Chromium's /events response has no Content-Encoding: gzip: ${JSON.stringify(state.eventsResponseHeaders)}`,
    );
  }
  // playwright does not always see the headers the network stack adds; Chromium's default then.
  const acceptEncoding = state.eventsRequestHeaders['accept-encoding'] || CHROMIUM_ACCEPT_ENCODING;
  state.acceptEncodingProbed = acceptEncoding;

  state.step = "check the server answers Chromium's Accept-Encoding with gzip (node:http)";
  const probe = await rawStreamHead(base, { Accept: 'text/event-stream', 'Accept-Encoding': acceptEncoding });
  state.nodeCheck = probe;
  if (probe.status !== 200 || probe.headers['content-encoding'] !== 'gzip') {
    return fail(
      `GET /events with Chromium's Accept-Encoding ${JSON.stringify(acceptEncoding)} answered ` +
        `${probe.status} ${JSON.stringify(probe.headers)}, expected Content-Encoding: gzip`,
    );
  }
  if (!/accept-encoding/i.test(probe.headers.vary || '')) {
    return fail(`gzip stream without Vary: Accept-Encoding: ${JSON.stringify(probe.headers)}`);
  }

  state.step = 'publish';
  const ids = [];
  for (const ev of EVENTS) ids.push(await publish(base, ev.data));
  log('published ids:', ids.join(' '));

  state.step = 'wait for events in the page';
  const waited = await page.evaluate(
    ({ want, timeoutMs }) =>
      new Promise((resolve) => {
        const t0 = Date.now();
        const tick = () => {
          const rec = window.__sse;
          if (rec.events.length >= want) resolve({ done: true, rec });
          else if (Date.now() - t0 > timeoutMs) resolve({ done: false, rec, readyState: window.__es.readyState });
          else setTimeout(tick, 20);
        };
        tick();
      }),
    { want: EVENTS.length, timeoutMs: STEP_TIMEOUT_MS },
  );
  state.browserSaw = waited.rec;
  // A moment for any extra (duplicate) event to show up before the stream is closed.
  await sleep(200);
  state.browserSaw = await page.evaluate(() => window.__sse).catch(() => waited.rec);
  await page.evaluate(() => window.__es.close()).catch(() => {});
  if (!waited.done) {
    return fail(
      `page got ${waited.rec.events.length} of ${EVENTS.length} events within ${STEP_TIMEOUT_MS} ms ` +
        `(EventSource readyState ${waited.readyState})`,
    );
  }

  state.step = 'check events';
  const got = state.browserSaw.events;
  const problems = [];
  if (got.length !== EVENTS.length) problems.push(`expected ${EVENTS.length} events, got ${got.length}`);
  EVENTS.forEach((ev, i) => {
    const g = got[i];
    if (!g) return;
    if (g.data !== ev.data) {
      let at = 0;
      while (at < g.data.length && g.data[at] === ev.data[at]) at++;
      problems.push(
        `event ${i} (${ev.name}, ${ev.data.length} chars): data differs at char ${at}: got ` +
          `${JSON.stringify(g.data.slice(Math.max(0, at - 40), at + 40))} (${g.data.length} chars), want ` +
          `${JSON.stringify(ev.data.slice(Math.max(0, at - 40), at + 40))}`,
      );
    }
    if (g.lastEventId !== ids[i]) {
      problems.push(`event ${i} (${ev.name}): lastEventId ${JSON.stringify(g.lastEventId)} != publish id ${ids[i]}`);
    }
  });
  if (state.browserSaw.errors.length) {
    problems.push(`EventSource fired onerror: ${JSON.stringify(state.browserSaw.errors)}`);
  }
  if (state.browserSaw.opens !== 1) problems.push(`EventSource opened ${state.browserSaw.opens} times`);
  if (problems.length) return fail(problems.join('; '));

  return run.finish(
    0,
    `${EVENTS.length} events intact (${EVENTS.map((e) => e.data.length).join('/')} chars) over gzip; ` +
      `Chromium sent Accept-Encoding ${JSON.stringify(acceptEncoding)} and got Content-Encoding ` +
      `${JSON.stringify(state.eventsResponseHeaders['content-encoding'])}`,
  );
}

run.start(main);
