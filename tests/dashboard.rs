//! The embedded dashboard: the page at `/` and `/dashboard`, its stats stream at
//! `/dashboard/stats`, the `--demo` ticker, `--no-dashboard`, and the page itself in headless
//! Chromium (tests/browser/dashboard.mjs), which leaves a screenshot in
//! `target/artifacts/dashboard.png`.

mod support;

use std::process::Command;
use std::time::{Duration, Instant};
use support::browser::{check_prerequisites, chromium_path, repo_root, run_bounded};
use support::{Server, SseStream};

/// The script bounds itself at 45 s; this is the backstop if node itself wedges.
const SCRIPT_TIMEOUT: Duration = Duration::from_secs(90);

/// The next `event: stats` on a `/dashboard/stats` stream, parsed.
fn next_stats(s: &mut SseStream) -> serde_json::Value {
    loop {
        let ev = s.expect_event("stats stream");
        if ev.event.as_deref() == Some("stats") {
            return serde_json::from_str(&ev.data).unwrap_or_else(|e| panic!("stats is not JSON ({e}): {}", ev.data));
        }
    }
}

#[test]
fn page_is_served_self_contained_at_root_and_dashboard() {
    let server = Server::start(&["--cores", "2"]);
    for path in ["/", "/dashboard"] {
        let r = server.get(path);
        r.assert_status(200, path);
        assert!(r.header("content-type").is_some_and(|t| t.starts_with("text/html")), "{path}: {}", r.describe());
        let page = r.body_str();
        assert!(page.contains("/dashboard/stats") && page.contains("EventSource"), "{path}: not the dashboard page");
        // No CDN: nothing is loaded from another origin.
        for needle in ["src=\"http", "href=\"http", "@import", "url(http"] {
            assert!(!page.contains(needle), "{path}: the page loads something from elsewhere ({needle})");
        }
    }
}

#[test]
fn stats_stream_reports_live_numbers() {
    let server = Server::start(&["--cores", "2"]);
    let mut stats = SseStream::open(server.addr, "/dashboard/stats").unwrap();
    stats.head.assert_status(200, "/dashboard/stats");
    assert_eq!(
        stats.head.header("content-type"),
        Some("text/event-stream; charset=utf-8"),
        "{}",
        stats.head.describe()
    );

    let first = next_stats(&mut stats);
    for key in [
        "ts",
        "node",
        "version",
        "uptime_s",
        "status",
        "connections",
        "subscribers",
        "topics_count",
        "published_total",
        "delivered_total",
        "bytes_out_total",
        "history_events",
        "cores",
        "latency_us",
        "topics",
    ] {
        assert!(first.get(key).is_some(), "stats lacks {key:?}: {first}");
    }
    assert_eq!(first["status"], "ok", "{first}");
    assert_eq!(first["demo"], false, "{first}");
    assert_eq!(first["cores"].as_array().map(Vec::len), Some(2), "{first}");
    assert!(first["redis"].is_null(), "no Redis configured: {first}");
    assert_eq!(first["version"], env!("CARGO_PKG_VERSION"));

    // Subscribers on a topic and publishes show up in the following stats messages.
    let mut subs: Vec<SseStream> = (0..3).map(|_| server.subscribe(&["dash.prices"])).collect();
    let published_before = first["published_total"].as_u64().unwrap();
    for i in 0..10 {
        server.publish("dash.prices", &format!("p{i}"));
    }
    for s in &mut subs {
        for i in 0..10 {
            assert_eq!(s.expect_event("subscriber").data, format!("p{i}"));
        }
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    let last = loop {
        let s = next_stats(&mut stats);
        let topic_listed = s["topics"]
            .as_array()
            .unwrap()
            .iter()
            .any(|t| t["topic"] == "dash.prices" && t["subscribers"].as_u64() == Some(3));
        if topic_listed && s["published_total"].as_u64().unwrap() >= published_before + 10 {
            break s;
        }
        assert!(Instant::now() < deadline, "stats never showed the topic and the publishes: {s}");
    };
    assert!(last["subscribers"].as_u64().unwrap() >= 3, "{last}");
    assert!(last["delivered_total"].as_u64().unwrap() >= 30, "{last}");
    assert!(last["connections"].as_u64().unwrap() >= 4, "{last}");
    let per_core: u64 = last["cores"].as_array().unwrap().iter().map(|c| c["delivered_total"].as_u64().unwrap()).sum();
    assert_eq!(per_core, last["delivered_total"].as_u64().unwrap(), "per-core counts add up: {last}");
    assert!(last["ts"].as_u64() > first["ts"].as_u64(), "ts moves on");
}

#[test]
fn demo_publishes_quotes() {
    let server = Server::start(&["--cores", "1", "--demo"]);
    let mut s = server.subscribe(&["demo.AAPL", "demo.MSFT", "demo.GOOG", "demo.AMZN", "demo.NVDA", "demo.TSLA"]);
    let parse = |id: &str| -> (u64, u64) {
        let (ms, seq) = id.split_once('-').unwrap_or_else(|| panic!("id {id:?}"));
        (ms.parse().unwrap(), seq.parse().unwrap())
    };
    let mut last_id = (0, 0);
    for _ in 0..5 {
        let ev = s.expect_event("demo quote");
        assert_eq!(ev.event.as_deref(), Some("quote"));
        let q: serde_json::Value = serde_json::from_str(&ev.data).unwrap();
        assert!(q["symbol"].as_str().is_some_and(|s| s.len() == 4), "{q}");
        assert!(q["price"].as_f64().is_some_and(|p| p > 0.0), "{q}");
        let id = parse(&ev.id.unwrap());
        assert!(id > last_id, "ids increase: {last_id:?} then {id:?}");
        last_id = id;
    }
    let stats = next_stats(&mut SseStream::open(server.addr, "/dashboard/stats").unwrap());
    assert_eq!(stats["demo"], true);
}

#[test]
fn no_dashboard_turns_the_page_and_stats_off() {
    let server = Server::start(&["--cores", "1", "--no-dashboard"]);
    for path in ["/", "/dashboard", "/dashboard/stats"] {
        server.get(path).assert_status(404, path);
    }
    // Everything else still serves.
    server.get("/health").assert_status(200, "/health");
    let mut s = server.subscribe(&["still.here"]);
    server.publish("still.here", "yes");
    assert_eq!(s.expect_event("subscriber").data, "yes");
}

/// Runs `tests/browser/<script> <base> <arg>` against `server` and fails the test with the
/// script's and the server's output unless it exits 0.
fn run_page_check(server: &Server, script: &str, arg: &str) {
    let root = repo_root();
    let browser_dir = root.join("tests").join("browser");
    check_prerequisites(&browser_dir);
    let base = format!("http://{}", server.addr);
    let mut cmd = Command::new("node");
    cmd.current_dir(&root).arg(browser_dir.join(script)).arg(&base).arg(arg).env("CHROMIUM_PATH", chromium_path());
    let (status, out, err) = run_bounded(cmd, SCRIPT_TIMEOUT);
    assert!(
        matches!(status, Some(s) if s.success()),
        "{script} failed against {base}: {status:?}\n--- node stdout ---\n{out}\n\
         --- node stderr ---\n{err}\n--- server stderr ---\n{}",
        server.stderr_log()
    );
    print!("{out}");
}

#[test]
fn chromium_shows_the_live_dashboard() {
    let artifacts = repo_root().join("target").join("artifacts");
    std::fs::create_dir_all(&artifacts).unwrap();
    let shot = artifacts.join("dashboard.png");
    let _ = std::fs::remove_file(&shot);
    let server = Server::start(&["--cores", "2", "--demo"]);
    run_page_check(&server, "dashboard.mjs", shot.to_str().expect("UTF-8 path"));
    let png = std::fs::read(&shot).unwrap_or_else(|e| panic!("no screenshot at {}: {e}", shot.display()));
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n") && png.len() > 10_000, "screenshot is not a real PNG");
}

#[test]
fn chromium_dashboard_with_tokens_explains_the_refusal_then_shows_stats() {
    use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
    let server = Server::start(&["--cores", "1", "--jwt-secret", "dash-secret"]);
    let exp = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() + 600;
    let claims = serde_json::json!({"sub": "ops", "subscribe": ["$stats"], "exp": exp});
    let token = encode(&Header::new(Algorithm::HS256), &claims, &EncodingKey::from_secret(b"dash-secret")).unwrap();
    run_page_check(&server, "dashboard_token.mjs", &token);
}
