//! The deployment files (deploy/, .dockerignore), checked with real tools and the real binary,
//! without Docker or a running systemd:
//! - deploy/docker-compose.yml parsed by PyYAML; its two nodes started with their exact command
//!   line and environment against a real redis-server, behind real nginx running
//!   deploy/nginx-compose.conf (addresses replaced), an event published and received through it,
//!   the compose health check run against a node, the drain timed against stop_grace_period;
//! - deploy/nginx-compose.conf: `nginx -t`, the same `location /` settings as deploy/nginx.conf;
//! - deploy/Dockerfile: stages, non-root user, COPY sources present and not excluded by
//!   .dockerignore (the build context it sees is rebuilt and `cargo metadata` loads it), CMD and
//!   ENV run through the binary, the HEALTHCHECK command run against it (200, then not while
//!   draining), the drain within `docker stop`'s 10 s;
//! - deploy/ringcast.service: `systemd-analyze verify` and `security`, its ExecStart run.

mod support;

use serde_json::Value;
use std::collections::{BTreeMap, HashSet};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};
use support::browser::run_bounded;
use support::redis::Redis;
use support::{publish_id, publish_request, Conn, Server, SseStream};

const HOW_TO_FIX: &str = "scripts/test.sh installs what these tests need (python3-yaml, nginx, redis-server)";
/// `docker stop` sends SIGKILL after this grace period unless given `-t`.
const DOCKER_STOP_DEFAULT: Duration = Duration::from_secs(10);
/// The publish key the compose file's `${RINGCAST_PUBLISH_KEY:?...}` is given here.
const TEST_PUBLISH_KEY: &str = "deploy-test-key";

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(root().join(rel)).unwrap_or_else(|e| panic!("read {rel}: {e}"))
}

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_ringcast")
}

/// A scratch directory, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "ringcast-deploy-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn free_addr() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("a free port")
}

/// `50us`, `250ms`, `2s`, `1m30s`, `1min 30s`, `1h`, or bare seconds (ringcast, compose and
/// systemd spellings).
fn parse_duration(text: &str) -> Duration {
    let s: String = text.chars().filter(|c| !c.is_whitespace()).collect();
    if let Ok(secs) = s.parse::<f64>() {
        return Duration::from_secs_f64(secs);
    }
    let mut total = Duration::ZERO;
    let mut rest = s.as_str();
    while !rest.is_empty() {
        let num_end = rest.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(rest.len());
        let (num, tail) = rest.split_at(num_end);
        let unit_end = tail.find(|c: char| c.is_ascii_digit()).unwrap_or(tail.len());
        let (unit, next) = tail.split_at(unit_end);
        let n: f64 = num.parse().unwrap_or_else(|_| panic!("duration {text:?}: bad number {num:?}"));
        let secs = match unit {
            "us" | "µs" => n / 1e6,
            "ms" => n / 1e3,
            "s" | "sec" => n,
            "m" | "min" => n * 60.0,
            "h" => n * 3600.0,
            _ => panic!("duration {text:?}: unknown unit {unit:?}"),
        };
        total += Duration::from_secs_f64(secs);
        rest = next;
    }
    total
}

/// The flags `ringcast --help` lists.
fn help_flags() -> HashSet<String> {
    let out = support::command().arg("--help").output().expect("run ringcast --help");
    assert!(out.status.success(), "ringcast --help: {}", out.status);
    let text = String::from_utf8_lossy(&out.stdout);
    text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '-'))
        .filter(|w| w.starts_with("--") && w.len() > 2)
        .map(str::to_string)
        .collect()
}

/// The `--flag`s of `args` that `ringcast --help` does not list.
fn unknown_flags(args: &[String]) -> Vec<String> {
    let known = help_flags();
    args.iter()
        .filter(|a| a.starts_with("--"))
        .map(|a| a.split('=').next().unwrap().to_string())
        .filter(|name| !known.contains(name))
        .collect()
}

/// Every `--flag` of `args` is one `ringcast --help` lists.
fn assert_flags_known(args: &[String], what: &str) {
    let unknown = unknown_flags(args);
    assert!(unknown.is_empty(), "{what}: {unknown:?} not among the flags `ringcast --help` lists (args {args:?})");
}

/// The value of `--name V` / `--name=V` in `args`.
fn flag_value(args: &[String], name: &str) -> Option<String> {
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        if arg == name {
            return Some(it.next().unwrap_or_else(|| panic!("{name} without a value in {args:?}")).clone());
        }
        if let Some(v) = arg.strip_prefix(&format!("{name}=")) {
            return Some(v.to_string());
        }
    }
    None
}

/// `args` without `--listen V`, and V (the test starts the node on 127.0.0.1:0 instead).
fn split_listen(args: &[String], what: &str) -> (Vec<String>, String) {
    let listen = flag_value(args, "--listen").unwrap_or_else(|| panic!("{what}: no --listen in {args:?}"));
    let mut rest = Vec::new();
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        if arg == "--listen" {
            it.next();
        } else if !arg.starts_with("--listen=") {
            rest.push(arg.clone());
        }
    }
    (rest, listen)
}

/// The longest a SIGTERM'd node runs: --drain-delay + --drain-timeout, from the flags, else the
/// environment, else the defaults.
fn drain_bound(args: &[String], env: &BTreeMap<String, String>) -> Duration {
    let get = |flag: &str, var: &str, default: &str| {
        let v = flag_value(args, flag).or_else(|| env.get(var).cloned()).unwrap_or_else(|| default.to_string());
        parse_duration(&v)
    };
    get("--drain-delay", "RINGCAST_DRAIN_DELAY", "0s") + get("--drain-timeout", "RINGCAST_DRAIN_TIMEOUT", "5s")
}

/// Starts the real binary with a deployment file's arguments (--listen replaced) and
/// environment; Server::start panics with its stderr if a flag or value is refused.
fn start_with(args: &[String], env: &BTreeMap<String, String>) -> Server {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    Server::start_with_env(&args, &env)
}

fn health(server: &Server) -> (u16, Value) {
    let resp = server.get("/health");
    let body: Value = serde_json::from_str(&resp.body_str()).unwrap_or_else(|e| panic!("/health JSON: {e}"));
    (resp.status, body)
}

fn wait_health(server: &Server, status: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (code, body) = health(server);
        if code == 200 && body["status"] == status {
            return body;
        }
        assert!(Instant::now() < deadline, "node never reported {status}: {code} {body}");
        thread::sleep(Duration::from_millis(50));
    }
}

/// Runs a Docker-style health check command (exec form) against `port` instead of 8080.
fn run_healthcheck(test: &[String], port: u16, what: &str) -> bool {
    let needle = "/dev/tcp/127.0.0.1/8080";
    assert!(test.iter().any(|a| a.contains(needle)), "{what}: health check {test:?} does not probe {needle}");
    assert!(test.iter().any(|a| a.contains("/health")), "{what}: health check {test:?} does not GET /health");
    let argv: Vec<String> = test.iter().map(|a| a.replace(needle, &format!("/dev/tcp/127.0.0.1/{port}"))).collect();
    let mut cmd = Command::new(&argv[0]);
    cmd.args(&argv[1..]);
    let (status, out, err) = run_bounded(cmd, Duration::from_secs(10));
    let status = status.unwrap_or_else(|| panic!("{what}: health check {argv:?} ran over 10 s"));
    if !status.success() {
        eprintln!("{what}: health check exited {status}; stdout {out:?}; stderr {err:?}");
    }
    status.success()
}

/// Asserts the process exits 0 within `limit` of a SIGTERM sent now.
fn assert_drains_within(server: &mut Server, limit: Duration, what: &str) {
    let start = Instant::now();
    server.signal("TERM");
    let status: Option<ExitStatus> = server.wait_exit(limit);
    let status =
        status.unwrap_or_else(|| panic!("{what}: still running {limit:?} after SIGTERM (SIGKILL would follow)"));
    assert!(status.success(), "{what}: exit {status} after SIGTERM; stderr:\n{}", server.stderr_log());
    eprintln!("{what}: drained and exited in {:?} (limit {limit:?})", start.elapsed());
}

// ---------------------------------------------------------------------------------------------
// docker-compose.yml
// ---------------------------------------------------------------------------------------------

/// The compose file as PyYAML reads it (merge keys resolved), as JSON.
fn compose_raw() -> Value {
    let path = root().join("deploy/docker-compose.yml");
    let out = Command::new("/usr/bin/python3")
        .args([
            "-c",
            "import json, sys, yaml; json.dump(yaml.safe_load(open(sys.argv[1], encoding='utf-8')), sys.stdout)",
        ])
        .arg(&path)
        .output()
        .unwrap_or_else(|e| panic!("run /usr/bin/python3: {e}\n=> {HOW_TO_FIX}"));
    assert!(
        out.status.success(),
        "PyYAML could not load {}: {}\n=> {HOW_TO_FIX}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("python printed JSON")
}

/// Compose's variable interpolation over every string: `$$` is a `$`, `${VAR}`, `${VAR:-def}`,
/// `${VAR-def}`, `${VAR:?err}`, `${VAR?err}` read `vars`. A bare `$name` is refused: compose
/// would substitute it (usually meant for a shell, and then it must be written `$$name`).
fn interpolate(value: &Value, vars: &BTreeMap<&str, &str>, at: &str) -> Value {
    match value {
        Value::String(s) => Value::String(interpolate_str(s, vars).unwrap_or_else(|e| panic!("compose {at}: {e}"))),
        Value::Array(a) => Value::Array(a.iter().map(|v| interpolate(v, vars, at)).collect()),
        Value::Object(o) => {
            Value::Object(o.iter().map(|(k, v)| (k.clone(), interpolate(v, vars, &format!("{at}.{k}")))).collect())
        }
        other => other.clone(),
    }
}

fn interpolate_str(s: &str, vars: &BTreeMap<&str, &str>) -> Result<String, String> {
    let mut out = String::new();
    let mut rest = s;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if let Some(next) = after.strip_prefix('$') {
            out.push('$');
            rest = next;
        } else if let Some(inner) = after.strip_prefix('{') {
            let end = inner.find('}').ok_or_else(|| format!("unclosed ${{ in {s:?}"))?;
            let expr = &inner[..end];
            let name_end = expr.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(expr.len());
            let (name, op) = expr.split_at(name_end);
            let set = vars.get(name).copied();
            let value = if op.is_empty() {
                set.unwrap_or("").to_string()
            } else if let Some(def) = op.strip_prefix(":-").or_else(|| op.strip_prefix('-')) {
                set.filter(|v| !v.is_empty() || !op.starts_with(':')).unwrap_or(def).to_string()
            } else if let Some(err) = op.strip_prefix(":?").or_else(|| op.strip_prefix('?')) {
                set.filter(|v| !v.is_empty() || !op.starts_with(':'))
                    .ok_or_else(|| format!("${{{name}}} required: {err}"))?
                    .to_string()
            } else {
                return Err(format!("unsupported interpolation ${{{expr}}}"));
            };
            out.push_str(&value);
            rest = &inner[end + 1..];
        } else {
            return Err(format!(
                "bare `$` in {s:?}: compose substitutes `$name` from the host's environment; \
                 write `$$` for a literal `$`"
            ));
        }
    }
    out.push_str(rest);
    Ok(out)
}

fn compose() -> Value {
    let vars = BTreeMap::from([("RINGCAST_PUBLISH_KEY", TEST_PUBLISH_KEY)]);
    interpolate(&compose_raw(), &vars, "docker-compose.yml")
}

fn strings(v: &Value, what: &str) -> Vec<String> {
    v.as_array()
        .unwrap_or_else(|| panic!("{what}: expected a list, got {v}"))
        .iter()
        .map(|s| match s {
            Value::String(s) => s.clone(),
            Value::Number(n) => n.to_string(),
            other => panic!("{what}: expected strings, got {other}"),
        })
        .collect()
}

/// A service's `environment` (map or `K=V` list).
fn service_env(svc: &Value) -> BTreeMap<String, String> {
    match &svc["environment"] {
        Value::Null => BTreeMap::new(),
        Value::Object(o) => o
            .iter()
            .map(|(k, v)| (k.clone(), v.as_str().map(str::to_string).unwrap_or_else(|| v.to_string())))
            .collect(),
        Value::Array(a) => a
            .iter()
            .map(|kv| {
                let kv = kv.as_str().expect("environment entry");
                let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
                (k.to_string(), v.to_string())
            })
            .collect(),
        other => panic!("environment: {other}"),
    }
}

/// A compose health check's `test` as an argv.
fn compose_healthcheck(svc: &Value, what: &str) -> Vec<String> {
    match &svc["healthcheck"]["test"] {
        Value::String(s) => vec!["/bin/sh".into(), "-c".into(), s.clone()],
        v @ Value::Array(_) => {
            let list = strings(v, what);
            match list[0].as_str() {
                "CMD" => list[1..].to_vec(),
                "CMD-SHELL" => vec!["/bin/sh".into(), "-c".into(), list[1..].join(" ")],
                other => panic!("{what}: health check test starts with {other:?}"),
            }
        }
        other => panic!("{what}: no healthcheck test ({other})"),
    }
}

/// The ringcast nodes: services built from deploy/Dockerfile, by name.
fn ringcast_nodes(services: &serde_json::Map<String, Value>) -> Vec<(String, Value)> {
    services
        .iter()
        .filter(|(_, s)| s["build"]["dockerfile"] == "deploy/Dockerfile")
        .map(|(n, s)| (n.clone(), s.clone()))
        .collect()
}

fn ipv4(s: &str) -> u32 {
    let ip: std::net::Ipv4Addr = s.parse().unwrap_or_else(|_| panic!("not an IPv4 address: {s:?}"));
    u32::from(ip)
}

fn in_cidr(ip: &str, cidr: &str) -> bool {
    let (net, len) = cidr.split_once('/').unwrap_or_else(|| panic!("not a CIDR: {cidr:?}"));
    let len: u32 = len.parse().expect("prefix length");
    let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
    ipv4(ip) & mask == ipv4(net) & mask
}

#[test]
fn compose_file_parses_and_is_consistent() {
    let compose = compose();
    let services = compose["services"].as_object().expect("services: a mapping");
    for name in ["redis", "nginx"] {
        assert!(services.contains_key(name), "docker-compose.yml: no service {name:?} ({:?})", services.keys());
    }
    let nodes = ringcast_nodes(services);
    assert_eq!(nodes.len(), 2, "docker-compose.yml: want two ringcast nodes (build deploy/Dockerfile), got {nodes:?}");

    // The build context and Dockerfile exist, seen from deploy/ (compose paths are relative to
    // the file's directory).
    let deploy = root().join("deploy");
    let dockerfile = read("deploy/Dockerfile");
    let image_env = dockerfile_final_env(&dockerfile_instructions(&dockerfile));
    let mut node_ids = HashSet::new();
    let mut listen_ports = BTreeMap::new();
    for (name, svc) in &nodes {
        let what = format!("docker-compose.yml service {name}");
        let context = deploy.join(svc["build"]["context"].as_str().expect("build.context"));
        assert!(
            context.join(svc["build"]["dockerfile"].as_str().unwrap()).is_file(),
            "{what}: build context {} has no {}",
            context.display(),
            svc["build"]["dockerfile"]
        );
        assert_eq!(
            context.canonicalize().unwrap(),
            root().canonicalize().unwrap(),
            "{what}: the build context must be the repository root"
        );

        let args = strings(&svc["command"], &format!("{what} command"));
        assert_flags_known(&args, &what);
        let id = flag_value(&args, "--node-id").unwrap_or_else(|| panic!("{what}: no --node-id"));
        assert!(node_ids.insert(id.clone()), "{what}: --node-id {id} used twice");
        let redis = flag_value(&args, "--redis").unwrap_or_else(|| panic!("{what}: no --redis"));
        let host = redis
            .strip_prefix("redis://")
            .and_then(|r| r.split(['/', ':']).next())
            .unwrap_or_else(|| panic!("{what}: --redis {redis:?} is not redis://host:port/"));
        assert!(services.contains_key(host), "{what}: --redis host {host:?} is no compose service");
        assert!(redis.contains(":6379"), "{what}: --redis {redis:?}: the redis image listens on 6379");
        let (_, listen) = split_listen(&args, &what);
        assert!(listen.starts_with("0.0.0.0:"), "{what}: --listen {listen} is not reachable from nginx");
        listen_ports.insert(name.clone(), listen.rsplit(':').next().unwrap().to_string());

        // Drain vs stop_grace_period (compose's default is 10 s).
        let mut env = image_env.clone();
        env.extend(service_env(svc));
        let drain = drain_bound(&args, &env);
        let grace = svc["stop_grace_period"].as_str().map(parse_duration).unwrap_or(DOCKER_STOP_DEFAULT);
        assert!(grace > drain, "{what}: stop_grace_period {grace:?} is not longer than the drain bound {drain:?}");
        if let Some(sig) = svc["stop_signal"].as_str() {
            assert_eq!(sig, "SIGTERM", "{what}: stop_signal");
        }

        assert!(
            svc["depends_on"]["redis"].is_object() || strings(&svc["depends_on"], &what).contains(&"redis".into()),
            "{what}: does not depend on redis"
        );
        let check = compose_healthcheck(svc, &what);
        assert!(check.iter().any(|a| a.contains("/health")), "{what}: health check {check:?}");
        let port = &listen_ports[name];
        assert!(
            check.iter().any(|a| a.contains(&format!("/127.0.0.1/{port}"))),
            "{what}: health check {check:?} does not probe the port it listens on ({port})"
        );
        let key = service_env(svc).get("RINGCAST_PUBLISH_KEY").cloned();
        assert_eq!(key.as_deref(), Some(TEST_PUBLISH_KEY), "{what}: RINGCAST_PUBLISH_KEY from the host");
    }

    // Redis: version 7+ (Redis Functions), a health check for depends_on.
    let redis = &services["redis"];
    let image = redis["image"].as_str().expect("redis image");
    let major: u32 = image
        .split(':')
        .nth(1)
        .and_then(|t| t.split(['.', '-']).next())
        .and_then(|m| m.parse().ok())
        .unwrap_or_else(|| panic!("redis image {image:?}: pin a major version (7 or later)"));
    assert!(major >= 7, "redis image {image}: ringcast needs Redis Functions (7.0+)");
    assert!(redis["healthcheck"]["test"].is_array(), "redis: no health check");

    // nginx: mounts nginx-compose.conf, waits for both nodes, upstreams name them.
    let nginx = &services["nginx"];
    let conf_rel = nginx_compose_conf_path(nginx);
    let conf = std::fs::read_to_string(deploy.join(&conf_rel)).unwrap();
    for (name, _) in &nodes {
        assert!(nginx["depends_on"][name].is_object(), "nginx does not depend on {name}: {}", nginx["depends_on"]);
    }
    let upstreams = nginx_upstreams(&conf);
    let mut named: Vec<String> = upstreams.iter().map(|(h, _)| h.clone()).collect();
    named.sort();
    let mut want: Vec<String> = nodes.iter().map(|(n, _)| n.clone()).collect();
    want.sort();
    assert_eq!(named, want, "{conf_rel}: upstream servers vs ringcast services");
    for (host, port) in &upstreams {
        assert_eq!(&listen_ports[host], port, "{conf_rel}: upstream {host}:{port} vs its --listen port");
    }
    let listen = nginx_listen(&conf);
    let ports = strings(&nginx["ports"], "nginx ports");
    assert!(
        ports.iter().any(|p| p.ends_with(&format!(":{listen}"))),
        "nginx publishes {ports:?}, but {conf_rel} listens on {listen}"
    );

    // Fixed addresses: nginx's is the one every node trusts; all lie in the network's subnet,
    // outside the range handed out dynamically.
    let ipam = &compose["networks"]["ringcast"]["ipam"]["config"][0];
    let subnet = ipam["subnet"].as_str().expect("networks.ringcast subnet");
    let ip_of = |svc: &Value, what: &str| {
        svc["networks"]["ringcast"]["ipv4_address"]
            .as_str()
            .unwrap_or_else(|| panic!("{what}: no fixed ipv4_address on network ringcast"))
            .to_string()
    };
    let nginx_ip = ip_of(nginx, "nginx");
    let mut fixed = vec![nginx_ip.clone()];
    for (name, svc) in &nodes {
        let args = strings(&svc["command"], name);
        let trusted = flag_value(&args, "--trust-proxy").unwrap_or_default();
        assert!(
            trusted.split(',').any(|c| c == format!("{nginx_ip}/32")),
            "{name}: --trust-proxy {trusted:?} does not name nginx's address {nginx_ip}"
        );
        fixed.push(ip_of(svc, name));
    }
    for ip in &fixed {
        assert!(in_cidr(ip, subnet), "{ip} is outside the subnet {subnet}");
        if let Some(range) = ipam["ip_range"].as_str() {
            assert!(!in_cidr(ip, range), "{ip} lies in ip_range {range}, handed out to other containers");
        }
    }
    let unique: HashSet<&String> = fixed.iter().collect();
    assert_eq!(unique.len(), fixed.len(), "fixed addresses used twice: {fixed:?}");
}

#[test]
fn compose_interpolation_check_catches_a_bare_dollar() {
    // The checker itself: a shell variable left unescaped in a compose string is refused.
    let vars = BTreeMap::new();
    assert!(interpolate_str("[ \"$status\" = 200 ]", &vars).is_err(), "a bare $status must be refused");
    assert!(interpolate_str("${KEY:?needed}", &vars).is_err(), "an unset required variable must be refused");
    assert_eq!(interpolate_str("a $$b ${X:-c}", &vars).unwrap(), "a $b c");
}

// ---------------------------------------------------------------------------------------------
// nginx-compose.conf
// ---------------------------------------------------------------------------------------------

/// The nginx service's config mount onto /etc/nginx/nginx.conf, relative to deploy/.
fn nginx_compose_conf_path(nginx: &Value) -> String {
    let volumes = strings(&nginx["volumes"], "nginx volumes");
    let mount = volumes
        .iter()
        .find(|v| v.split(':').nth(1) == Some("/etc/nginx/nginx.conf"))
        .unwrap_or_else(|| panic!("nginx mounts nothing on /etc/nginx/nginx.conf: {volumes:?}"));
    let src = mount.split(':').next().unwrap().to_string();
    assert!(root().join("deploy").join(&src).is_file(), "nginx mounts {src}, which is not a file in deploy/");
    src
}

/// Lines of `conf` without comments, trimmed, non-empty.
fn nginx_lines(conf: &str) -> Vec<String> {
    conf.lines().map(|l| l.split('#').next().unwrap().trim().to_string()).filter(|l| !l.is_empty()).collect()
}

/// The directive lines of the block opened by the line `open` (e.g. `location / {`).
fn nginx_block(conf: &str, open: &str) -> Vec<String> {
    let lines = nginx_lines(conf);
    let start = lines.iter().position(|l| l.starts_with(open)).unwrap_or_else(|| panic!("no `{open}` block"));
    let mut depth = 0;
    let mut out = Vec::new();
    for line in &lines[start..] {
        depth += line.matches('{').count() as i32;
        depth -= line.matches('}').count() as i32;
        if depth <= 0 {
            break;
        }
        if line != &lines[start] && depth == 1 {
            out.push(line.clone());
        }
    }
    out
}

/// (host, port) of each `server` line of the `upstream ringcast` block.
fn nginx_upstreams(conf: &str) -> Vec<(String, String)> {
    nginx_block(conf, "upstream ringcast")
        .iter()
        .filter_map(|l| l.strip_prefix("server "))
        .map(|rest| {
            let target = rest.split_whitespace().next().unwrap().trim_end_matches(';');
            let (host, port) =
                target.rsplit_once(':').unwrap_or_else(|| panic!("upstream server {target} has no port"));
            (host.to_string(), port.to_string())
        })
        .collect()
}

fn nginx_listen(conf: &str) -> String {
    let line = nginx_block(conf, "server {")
        .into_iter()
        .find(|l| l.starts_with("listen "))
        .expect("a listen line in the server block");
    line.trim_start_matches("listen ").trim_end_matches(';').trim().to_string()
}

/// The compose nginx config made runnable here: upstreams -> `nodes`, listen -> `listen`,
/// temporary files under `dir`.
fn nginx_conf_for_test(conf: &str, nodes: &BTreeMap<String, SocketAddr>, listen: SocketAddr, dir: &Path) -> String {
    let mut out = conf.to_string();
    for (host, port) in nginx_upstreams(conf) {
        let addr = nodes.get(&host).unwrap_or_else(|| panic!("upstream {host} is no node: {nodes:?}"));
        let from = format!("server {host}:{port} ");
        assert!(out.contains(&from), "upstream line `{from}` not found");
        out = out.replace(&from, &format!("server {addr} "));
    }
    let port = nginx_listen(conf);
    out = out.replace(&format!("listen {port};"), &format!("listen {listen};"));
    let temp: String = ["client_body", "proxy", "fastcgi", "uwsgi", "scgi"]
        .iter()
        .map(|k| format!("\n    {k}_temp_path {}/tmp/{k};", dir.display()))
        .collect();
    assert!(out.contains("http {"), "no http block");
    out.replacen("http {", &format!("http {{{temp}"), 1)
}

fn nginx_command(dir: &Path, conf: &Path, global: &str) -> Command {
    let mut cmd = Command::new("nginx");
    cmd.arg("-p").arg(dir).arg("-c").arg(conf).arg("-g").arg(format!("pid {}/nginx.pid; {global}", dir.display()));
    cmd
}

fn nginx_t(dir: &Path, conf_text: &str) {
    std::fs::create_dir_all(dir.join("tmp")).unwrap();
    let conf = dir.join("nginx.conf");
    std::fs::write(&conf, conf_text).unwrap();
    let out = nginx_command(dir, &conf, "")
        .arg("-t")
        .output()
        .unwrap_or_else(|e| panic!("run nginx -t: {e}\n=> {HOW_TO_FIX}"));
    assert!(
        out.status.success(),
        "nginx -t rejects the compose nginx config:\n{}\n--- config ---\n{conf_text}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// nginx in the foreground, stopped (TERM, then KILL) on drop.
struct NginxProc(Child);

impl NginxProc {
    fn start(dir: &Path, addr: SocketAddr) -> NginxProc {
        let child = nginx_command(dir, &dir.join("nginx.conf"), "daemon off;")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("start nginx: {e}\n=> {HOW_TO_FIX}"));
        let proc = NginxProc(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
            assert!(Instant::now() < deadline, "nginx did not listen on {addr} within 10 s");
            thread::sleep(Duration::from_millis(20));
        }
        proc
    }
}

impl Drop for NginxProc {
    fn drop(&mut self) {
        let _ = Command::new("kill").arg("-TERM").arg(self.0.id().to_string()).status();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            thread::sleep(Duration::from_millis(20));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn nginx_compose_conf_passes_nginx_t_and_matches_nginx_conf() {
    let compose = compose();
    let rel = nginx_compose_conf_path(&compose["services"]["nginx"]);
    let conf = read(&format!("deploy/{rel}"));

    // Every setting of deploy/nginx.conf's `location /` (the one tests/cluster.rs runs) is here.
    let reference = nginx_block(&read("deploy/nginx.conf"), "location / {");
    let ours = nginx_block(&conf, "location / {");
    for line in &reference {
        assert!(ours.contains(line), "deploy/{rel}: `location /` lacks `{line}` of deploy/nginx.conf");
    }
    for must in [
        "proxy_buffering off;",
        "proxy_http_version 1.1;",
        "proxy_set_header Connection \"\";",
        "proxy_pass http://ringcast;",
    ] {
        assert!(ours.iter().any(|l| l == must), "deploy/{rel}: `location /` lacks `{must}`");
    }
    let read_timeout = ours
        .iter()
        .find_map(|l| l.strip_prefix("proxy_read_timeout "))
        .unwrap_or_else(|| panic!("deploy/{rel}: no proxy_read_timeout"));
    let heartbeat = parse_duration("15s");
    assert!(
        parse_duration(read_timeout.trim_end_matches(';')) >= heartbeat * 4,
        "deploy/{rel}: proxy_read_timeout {read_timeout} is too short for SSE streams"
    );
    assert!(
        nginx_block(&conf, "upstream ringcast").iter().any(|l| l.starts_with("keepalive ")),
        "deploy/{rel}: no upstream keepalive"
    );

    // Real nginx accepts it, node names replaced by loopback addresses.
    let dir = TempDir::new("nginx-t");
    let nodes: BTreeMap<String, SocketAddr> =
        nginx_upstreams(&conf).into_iter().map(|(h, _)| (h, "127.0.0.1:9".parse().unwrap())).collect();
    nginx_t(&dir.0, &nginx_conf_for_test(&conf, &nodes, free_addr(), &dir.0));
}

// ---------------------------------------------------------------------------------------------
// The compose deployment run for real, without Docker
// ---------------------------------------------------------------------------------------------

#[test]
fn compose_nodes_run_behind_compose_nginx() {
    let compose = compose();
    let services = compose["services"].as_object().unwrap();
    let image_env = dockerfile_final_env(&dockerfile_instructions(&read("deploy/Dockerfile")));
    let redis = Redis::start();

    // Each node with its exact compose command (--listen and the Redis address replaced) and
    // environment (the image's ENV, then the service's).
    let mut nodes = Vec::new();
    for (name, svc) in ringcast_nodes(services) {
        let args = strings(&svc["command"], &name);
        let (mut args, _) = split_listen(&args, &name);
        let url = flag_value(&args, "--redis").unwrap();
        for a in args.iter_mut().filter(|a| **a == url) {
            *a = redis.url();
        }
        let mut env = image_env.clone();
        env.extend(service_env(&svc));
        let node = start_with(&args, &env);
        let h = wait_health(&node, "ok");
        assert_eq!(h["node"], flag_value(&args, "--node-id").unwrap().as_str(), "{name}: {h}");
        assert_eq!(h["redis"], "up", "{name}: {h}");
        nodes.push((name, svc, args, env, node));
    }

    // nginx with the compose config, upstreams pointed at the nodes.
    let conf = read(&format!("deploy/{}", nginx_compose_conf_path(&services["nginx"])));
    let dir = TempDir::new("nginx-run");
    let addrs: BTreeMap<String, SocketAddr> = nodes.iter().map(|(n, _, _, _, s)| (n.clone(), s.addr)).collect();
    let listen = free_addr();
    nginx_t(&dir.0, &nginx_conf_for_test(&conf, &addrs, listen, &dir.0));
    let _nginx = NginxProc::start(&dir.0, listen);

    // Two streams through nginx (round robin: one per node), a publish through nginx reaches
    // both; without the key it is refused.
    let mut streams: Vec<SseStream> = (0..2).map(|_| SseStream::subscribe(listen, &["deploy.news"])).collect();
    let path = "/publish?topic=deploy.news";
    let refused = publish_request(listen, path, Some("text/plain"), b"no key");
    refused.assert_status(401, "publish through nginx without the key");
    let body = "hello through nginx";
    let mut conn = Conn::connect(listen);
    conn.send(
        format!(
            "POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {TEST_PUBLISH_KEY}\r\n\
             Content-Type: text/plain\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .as_bytes(),
    );
    let resp = conn.read_response().expect("publish answer through nginx");
    resp.assert_status(200, "publish through nginx with the key");
    let id = publish_id(&resp);
    for (i, s) in streams.iter_mut().enumerate() {
        let ev = s.expect_event(&format!("stream {i} through nginx"));
        assert_eq!((ev.id.as_deref(), ev.data.as_str()), (Some(id.as_str()), body), "stream {i}");
    }

    // The compose health check passes against a serving node, fails once it drains, and the
    // node is gone (exit 0) within stop_grace_period.
    let (name, svc, args, env, node) = &mut nodes[0];
    let check = compose_healthcheck(svc, name);
    assert!(run_healthcheck(&check, node.addr.port(), name), "{name}: health check fails on a serving node");
    let grace = svc["stop_grace_period"].as_str().map(parse_duration).unwrap_or(DOCKER_STOP_DEFAULT);
    let delay = parse_duration(
        &flag_value(args, "--drain-delay")
            .unwrap_or_else(|| env.get("RINGCAST_DRAIN_DELAY").cloned().unwrap_or_else(|| "0s".into())),
    );
    assert!(delay >= Duration::from_secs(1), "{name}: --drain-delay {delay:?} leaves no time to see /health 503");
    let start = Instant::now();
    node.signal("TERM");
    let unhealthy = !run_healthcheck(&check, node.addr.port(), name);
    assert!(
        unhealthy || start.elapsed() >= delay,
        "{name}: health check still passes during the drain ({:?} after SIGTERM)",
        start.elapsed()
    );
    let status = node.wait_exit(grace).unwrap_or_else(|| panic!("{name}: still running {grace:?} after SIGTERM"));
    assert!(status.success(), "{name}: exit {status}; stderr:\n{}", node.stderr_log());
}

// ---------------------------------------------------------------------------------------------
// Dockerfile and .dockerignore
// ---------------------------------------------------------------------------------------------

struct Instr {
    stage: usize,
    op: String,
    args: String,
}

/// Instructions with continuation lines joined and comments dropped; `stage` counts FROMs.
fn dockerfile_instructions(text: &str) -> Vec<Instr> {
    let mut logical = Vec::new();
    let mut cur = String::new();
    for line in text.lines() {
        let t = line.trim();
        if t.starts_with('#') || (t.is_empty() && cur.is_empty()) {
            continue;
        }
        if let Some(body) = t.strip_suffix('\\') {
            cur.push_str(body);
            cur.push(' ');
        } else {
            cur.push_str(t);
            logical.push(std::mem::take(&mut cur));
        }
    }
    assert!(cur.is_empty(), "Dockerfile ends inside a continued line");
    let mut stage = 0;
    logical
        .into_iter()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let (op, args) = l.split_once(char::is_whitespace).unwrap_or((&l, ""));
            let op = op.to_ascii_uppercase();
            if op == "FROM" {
                stage += 1;
            }
            Instr { stage, op, args: args.trim().to_string() }
        })
        .collect()
}

fn final_stage(instrs: &[Instr]) -> usize {
    instrs.iter().map(|i| i.stage).max().unwrap_or(0)
}

/// The final stage's ENV (`K=V ...` form).
fn dockerfile_final_env(instrs: &[Instr]) -> BTreeMap<String, String> {
    let last = final_stage(instrs);
    let mut env = BTreeMap::new();
    for i in instrs.iter().filter(|i| i.stage == last && i.op == "ENV") {
        for kv in i.args.split_whitespace() {
            let (k, v) = kv.split_once('=').unwrap_or_else(|| panic!("ENV {:?}: use the K=V form", i.args));
            env.insert(k.to_string(), v.trim_matches('"').to_string());
        }
    }
    env
}

/// An exec-form (JSON array) argument list.
fn exec_form(args: &str, what: &str) -> Vec<String> {
    serde_json::from_str(args).unwrap_or_else(|e| panic!("{what} {args}: not an exec-form JSON array: {e}"))
}

/// The last `op` of the final stage.
fn final_instr<'a>(instrs: &'a [Instr], op: &str) -> &'a Instr {
    let last = final_stage(instrs);
    instrs
        .iter()
        .rev()
        .find(|i| i.stage == last && i.op == op)
        .unwrap_or_else(|| panic!("Dockerfile: no {op} in the final stage"))
}

/// HEALTHCHECK's command as an argv.
fn dockerfile_healthcheck(instrs: &[Instr]) -> Vec<String> {
    let hc = final_instr(instrs, "HEALTHCHECK");
    let cmd = hc.args.split_once("CMD ").map(|(_, c)| c.trim()).expect("HEALTHCHECK ... CMD ...");
    if cmd.starts_with('[') {
        exec_form(cmd, "HEALTHCHECK CMD")
    } else {
        vec!["/bin/sh".into(), "-c".into(), cmd.to_string()]
    }
}

/// .dockerignore patterns: (negated, components).
fn dockerignore() -> Vec<(bool, Vec<String>)> {
    read(".dockerignore")
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| {
            let (neg, p) = match l.strip_prefix('!') {
                Some(p) => (true, p),
                None => (false, l),
            };
            let p = p.trim_start_matches("./").trim_start_matches('/').trim_end_matches('/');
            (neg, p.split('/').map(str::to_string).collect())
        })
        .collect()
}

/// One path component against one pattern component (`*`, `?`, literals).
fn glob_component(pat: &[u8], name: &[u8]) -> bool {
    match (pat.first(), name.first()) {
        (None, None) => true,
        (Some(b'*'), _) => glob_component(&pat[1..], name) || (!name.is_empty() && glob_component(pat, &name[1..])),
        (Some(b'?'), Some(_)) => glob_component(&pat[1..], &name[1..]),
        (Some(p), Some(n)) if p == n => glob_component(&pat[1..], &name[1..]),
        _ => false,
    }
}

/// Whether the pattern matches the path or one of its parent directories (`**` = any depth).
fn glob_prefix(pat: &[String], path: &[&str]) -> bool {
    match pat.first() {
        None => true, // the pattern matched a parent: everything under it is excluded too
        Some(p) if p == "**" => (0..=path.len()).any(|skip| glob_prefix(&pat[1..], &path[skip..])),
        Some(p) => {
            !path.is_empty() && glob_component(p.as_bytes(), path[0].as_bytes()) && glob_prefix(&pat[1..], &path[1..])
        }
    }
}

fn ignored(patterns: &[(bool, Vec<String>)], rel: &str) -> bool {
    let path: Vec<&str> = rel.split('/').filter(|c| !c.is_empty() && *c != ".").collect();
    let mut out = false;
    for (neg, pat) in patterns {
        if glob_prefix(pat, &path) {
            out = !neg;
        }
    }
    out
}

/// Copies `src` (file or tree) under the repo root to `dst`, skipping what .dockerignore excludes.
fn copy_context(patterns: &[(bool, Vec<String>)], rel: &str, dst: &Path) {
    if ignored(patterns, rel) {
        return;
    }
    let src = root().join(rel);
    if src.is_dir() {
        std::fs::create_dir_all(dst).unwrap();
        for entry in std::fs::read_dir(&src).unwrap() {
            let name = entry.unwrap().file_name().into_string().unwrap();
            copy_context(patterns, &format!("{rel}/{name}"), &dst.join(&name));
        }
    } else {
        std::fs::create_dir_all(dst.parent().unwrap()).unwrap();
        std::fs::copy(&src, dst).unwrap_or_else(|e| panic!("copy {rel}: {e}"));
    }
}

#[test]
fn dockerfile_is_multi_stage_non_root_and_its_context_builds() {
    let text = read("deploy/Dockerfile");
    let instrs = dockerfile_instructions(&text);
    let froms: Vec<&Instr> = instrs.iter().filter(|i| i.op == "FROM").collect();
    assert!(froms.len() >= 2, "Dockerfile: want a builder and a runtime stage, got {} FROM", froms.len());
    let stage_names: Vec<String> = froms
        .iter()
        .filter_map(|f| {
            let w: Vec<&str> = f.args.split_whitespace().collect();
            (w.len() == 3 && w[1].eq_ignore_ascii_case("as")).then(|| w[2].to_string())
        })
        .collect();
    let last = final_stage(&instrs);
    assert!(froms[last - 1].args.starts_with("debian:bookworm-slim"), "runtime stage: {}", froms[last - 1].args);

    // The builder builds the release binary.
    let runs: String = instrs.iter().filter(|i| i.stage < last && i.op == "RUN").map(|i| i.args.clone()).collect();
    assert!(runs.contains("cargo build --release") && runs.contains("--bin ringcast"), "builder RUN: {runs}");

    // Non-root in the final stage, before the process starts.
    let user = final_instr(&instrs, "USER").args.clone();
    let uid = user.split(':').next().unwrap();
    assert!(!["root", "0", ""].contains(&uid), "Dockerfile: final USER {user:?} is root");

    for (op, want) in [("EXPOSE", "8080"), ("STOPSIGNAL", "SIGTERM")] {
        assert_eq!(final_instr(&instrs, op).args, want, "Dockerfile {op}");
    }
    let hc = final_instr(&instrs, "HEALTHCHECK").args.clone();
    assert!(hc.contains("/health"), "HEALTHCHECK {hc} does not check /health");

    // ENTRYPOINT is the binary the runtime stage copies in.
    let entry = exec_form(&final_instr(&instrs, "ENTRYPOINT").args, "ENTRYPOINT");
    let copied_bin = instrs
        .iter()
        .filter(|i| i.stage == last && i.op == "COPY")
        .find_map(|i| i.args.split_whitespace().last().filter(|d| d.ends_with("/ringcast")).map(str::to_string))
        .expect("the final stage copies the ringcast binary");
    assert_eq!(entry, vec![copied_bin.clone()], "ENTRYPOINT vs the copied binary {copied_bin}");

    // COPY: `--from` names an earlier stage; other sources exist and are in the build context.
    let patterns = dockerignore();
    let context = TempDir::new("context");
    let mut workdir = String::from("/");
    for i in &instrs {
        match i.op.as_str() {
            "FROM" => workdir = "/".into(),
            "WORKDIR" => workdir = i.args.clone(),
            "COPY" | "ADD" => {
                assert!(!i.args.starts_with('['), "{} {}: the test reads the plain form only", i.op, i.args);
                let words: Vec<&str> = i.args.split_whitespace().collect();
                let flags: Vec<&str> = words.iter().copied().filter(|w| w.starts_with("--")).collect();
                let paths: Vec<&str> = words.iter().copied().filter(|w| !w.starts_with("--")).collect();
                assert!(paths.len() >= 2, "{} {}: sources and a destination", i.op, i.args);
                if let Some(from) = flags.iter().find_map(|f| f.strip_prefix("--from=")) {
                    assert!(stage_names.iter().any(|n| n == from), "COPY --from={from}: no such stage");
                    continue;
                }
                let (dest, srcs) = paths.split_last().unwrap();
                for src in srcs {
                    assert!(root().join(src).exists(), "{} {src}: no such path in the repository", i.op);
                    assert!(
                        !ignored(&patterns, src),
                        "{} {src}: excluded from the build context by .dockerignore",
                        i.op
                    );
                    if i.stage == last {
                        continue;
                    }
                    // Rebuild the builder's tree: COPY into WORKDIR.
                    let dest_abs = if dest.starts_with('/') {
                        dest.to_string()
                    } else {
                        format!("{}/{}", workdir.trim_end_matches('/'), dest.trim_start_matches("./"))
                    };
                    let rel = dest_abs
                        .strip_prefix(workdir.trim_end_matches('/'))
                        .unwrap_or_else(|| panic!("COPY {src} {dest}: outside WORKDIR {workdir}"))
                        .trim_start_matches('/');
                    let target = if root().join(src).is_file() && (dest.ends_with('/') || srcs.len() > 1) {
                        context.0.join(rel).join(Path::new(src).file_name().unwrap())
                    } else {
                        context.0.join(rel)
                    };
                    copy_context(&patterns, src, &target);
                }
            }
            _ => {}
        }
    }
    // What the builder stage sees is a loadable workspace with the ringcast binary target.
    let out = Command::new(env!("CARGO"))
        .args(["metadata", "--no-deps", "--offline", "--format-version", "1"])
        .current_dir(&context.0)
        .output()
        .expect("run cargo metadata");
    assert!(
        out.status.success(),
        "cargo cannot load the builder stage's copied tree (a COPY is missing?):\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let meta: Value = serde_json::from_slice(&out.stdout).unwrap();
    let has_bin = meta["packages"].as_array().unwrap().iter().any(|p| {
        p["name"] == "ringcast"
            && p["targets"].as_array().unwrap().iter().any(|t| t["name"] == "ringcast" && t["kind"][0] == "bin")
    });
    assert!(has_bin, "the copied tree has no ringcast bin target");

    // The runtime stage installs no libraries: the binary must need only what the base has.
    let ldd = Command::new("ldd").arg(bin()).output().expect("run ldd");
    let base =
        ["linux-vdso.so", "libc.so", "libm.so", "libgcc_s.so", "ld-linux", "libpthread.so", "libdl.so", "librt.so"];
    for line in String::from_utf8_lossy(&ldd.stdout).lines() {
        let lib = line.split_whitespace().next().unwrap_or("");
        let lib = lib.rsplit('/').next().unwrap();
        assert!(
            base.iter().any(|b| lib.starts_with(b)),
            "the binary links {lib}, which debian:bookworm-slim lacks: install it in the runtime stage \
             (and add it here)"
        );
    }
}

#[test]
fn dockerignore_matcher() {
    let pats = vec![
        (false, vec!["**".to_string(), "target".to_string()]),
        (false, vec!["*.log".to_string()]),
        (false, vec![".git".to_string()]),
    ];
    assert!(ignored(&pats, "target/release/ringcast"));
    assert!(ignored(&pats, "loadtest/target"));
    assert!(ignored(&pats, "a.log"));
    assert!(ignored(&pats, ".git/HEAD"));
    assert!(!ignored(&pats, "src/main.rs"));
    assert!(!ignored(&pats, "targets"));
    assert!(!ignored(&pats, "src/a.log"));
}

#[test]
fn dockerfile_cmd_env_and_healthcheck_run() {
    let instrs = dockerfile_instructions(&read("deploy/Dockerfile"));
    let cmd = exec_form(&final_instr(&instrs, "CMD").args, "CMD");
    assert_flags_known(&cmd, "Dockerfile CMD");
    let (args, listen) = split_listen(&cmd, "Dockerfile CMD");
    assert_eq!(listen, "0.0.0.0:8080", "CMD --listen: reachable from outside the container, on the EXPOSEd port");
    let env = dockerfile_final_env(&instrs);
    for k in env.keys().filter(|k| k.starts_with("RINGCAST_")) {
        let flag = format!("--{}", k.trim_start_matches("RINGCAST_").to_ascii_lowercase().replace('_', "-"));
        assert_flags_known(&[flag], &format!("Dockerfile ENV {k}"));
    }
    let drain = drain_bound(&args, &env);
    assert!(drain < DOCKER_STOP_DEFAULT, "the image's drain ({drain:?}) does not fit `docker stop`'s default 10 s");

    let mut server = start_with(&args, &env);
    let check = dockerfile_healthcheck(&instrs);
    let port = server.addr.port();
    assert!(run_healthcheck(&check, port, "Dockerfile HEALTHCHECK"), "HEALTHCHECK fails on a serving node");
    // Pointed at a closed port it fails (it does check something).
    let closed = free_addr().port();
    assert!(!run_healthcheck(&check, closed, "HEALTHCHECK on a closed port"), "HEALTHCHECK passes with no server");

    let delay = parse_duration(env.get("RINGCAST_DRAIN_DELAY").map(String::as_str).unwrap_or("0s"));
    let start = Instant::now();
    server.signal("TERM");
    if !delay.is_zero() {
        let healthy = run_healthcheck(&check, port, "HEALTHCHECK while draining");
        assert!(!healthy || start.elapsed() >= delay, "HEALTHCHECK passes on a draining node");
    }
    let status = server
        .wait_exit(DOCKER_STOP_DEFAULT)
        .unwrap_or_else(|| panic!("the image's server outlives `docker stop`'s 10 s after SIGTERM"));
    assert!(status.success(), "exit {status} after SIGTERM; stderr:\n{}", server.stderr_log());
}

// ---------------------------------------------------------------------------------------------
// ringcast.service
// ---------------------------------------------------------------------------------------------

/// `[Service]` (and other sections') `Key=Value` lines; repeated keys keep every value.
fn unit_entries(text: &str) -> Vec<(String, String, String)> {
    let mut section = String::new();
    let mut out = Vec::new();
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if line.starts_with('[') {
            section = line.trim_matches(['[', ']']).to_string();
            continue;
        }
        assert!(!line.ends_with('\\'), "ringcast.service: the test reads no continued lines: {line}");
        let (k, v) = line.split_once('=').unwrap_or_else(|| panic!("ringcast.service: not Key=Value: {line}"));
        out.push((section.clone(), k.trim().to_string(), v.trim().to_string()));
    }
    out
}

fn unit_value(entries: &[(String, String, String)], section: &str, key: &str) -> String {
    entries
        .iter()
        .rev()
        .find(|(s, k, _)| s == section && k == key)
        .map(|(_, _, v)| v.clone())
        .unwrap_or_else(|| panic!("ringcast.service: no {key}= in [{section}]"))
}

fn unit_exec_start(entries: &[(String, String, String)]) -> Vec<String> {
    let exec = unit_value(entries, "Service", "ExecStart");
    assert!(!exec.contains(['"', '\'', '%', '$']), "ExecStart {exec}: the test splits on spaces only");
    exec.split_whitespace().map(str::to_string).collect()
}

#[test]
fn systemd_unit_settings_and_exec_start() {
    let text = read("deploy/ringcast.service");
    let e = unit_entries(&text);
    let argv = unit_exec_start(&e);
    assert_eq!(argv[0], "/usr/local/bin/ringcast", "ExecStart binary (docs/DEPLOY.md installs it there)");
    let args = argv[1..].to_vec();
    assert_flags_known(&args, "ringcast.service ExecStart");

    for (key, want) in [
        ("LimitNOFILE", "1048576"),
        ("KillSignal", "SIGTERM"),
        ("Restart", "on-failure"),
        ("EnvironmentFile", "-/etc/ringcast/env"),
        ("NoNewPrivileges", "yes"),
        ("ProtectSystem", "strict"),
        ("ProtectHome", "yes"),
        ("PrivateTmp", "yes"),
    ] {
        assert_eq!(unit_value(&e, "Service", key), want, "ringcast.service {key}");
    }
    let dynamic = e.iter().any(|(s, k, v)| s == "Service" && k == "DynamicUser" && v == "yes");
    let user = e.iter().any(|(s, k, v)| s == "Service" && k == "User" && v != "root" && v != "0");
    assert!(dynamic || user, "ringcast.service: runs as root (set DynamicUser=yes or User=)");
    for key in ["After", "Wants"] {
        assert!(
            unit_value(&e, "Unit", key).split_whitespace().any(|u| u == "network-online.target"),
            "ringcast.service: {key}= lacks network-online.target"
        );
    }
    let stop = parse_duration(&unit_value(&e, "Service", "TimeoutStopSec"));
    let drain = drain_bound(&args, &BTreeMap::new());
    assert!(stop > drain, "TimeoutStopSec {stop:?} is not longer than the drain bound {drain:?}");

    // The real binary takes ExecStart's flags and drains within TimeoutStopSec.
    let (args, listen) = split_listen(&args, "ExecStart");
    assert!(listen.ends_with(":8080"), "ExecStart --listen {listen}");
    let mut server = start_with(&args, &BTreeMap::new());
    assert_eq!(health(&server).0, 200, "/health of the unit's command line");
    assert_drains_within(&mut server, stop, "ringcast.service ExecStart");
}

#[test]
fn systemd_analyze_verify_and_security() {
    let Ok(version) = Command::new("systemd-analyze").arg("--version").output() else {
        eprintln!("SKIPPED: systemd-analyze not found: `systemd-analyze verify` of deploy/ringcast.service not run");
        return;
    };
    assert!(version.status.success(), "systemd-analyze --version failed");
    let text = read("deploy/ringcast.service");
    assert!(text.contains("ExecStart=/usr/local/bin/ringcast "), "ExecStart path");
    let dir = TempDir::new("unit");
    let unit = dir.0.join("ringcast.service");
    std::fs::write(&unit, text.replace("ExecStart=/usr/local/bin/ringcast ", &format!("ExecStart={} ", bin())))
        .unwrap();

    // verify exits 0 on a misspelt key or value ("..., ignoring."): any line about the unit fails.
    let out = Command::new("systemd-analyze").args(["--man=no", "verify"]).arg(&unit).output().unwrap();
    let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    let about: Vec<&str> = said.lines().filter(|l| l.contains("ringcast")).collect();
    assert!(
        out.status.success() && about.is_empty(),
        "systemd-analyze verify ringcast.service ({}):\n{said}",
        out.status
    );

    // Exposure score (0-10, shown as such; --threshold is in tenths): "OK" is below 3.
    let out = Command::new("systemd-analyze")
        .args(["security", "--offline=true", "--threshold=30", "--no-pager"])
        .arg(&unit)
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stdout);
    let overall = said.lines().find(|l| l.contains("Overall exposure")).unwrap_or("").to_string();
    eprintln!("systemd-analyze security: {overall}");
    assert!(
        out.status.success(),
        "systemd-analyze security: exposure above 3.0 or an error ({}): {overall}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn flag_checks_fail_on_a_typo() {
    // The checks above do fail on a misspelt flag: --help does not list it, and the binary
    // refuses it at start-up.
    let typo = vec!["--drain-timout".to_string(), "5s".to_string()];
    assert_eq!(unknown_flags(&typo), vec!["--drain-timout".to_string()]);
    let out = support::command().args(&typo).arg("--listen").arg("127.0.0.1:0").stdin(Stdio::null()).output().unwrap();
    assert!(!out.status.success(), "ringcast accepted --drain-timout");
}
