//! Who may do what: the shared publish key (`--publish-key`), the addresses that may publish
//! without one (`--publish-from`, loopback by default; `--publish-open`: anyone), and which web
//! origins browsers may let read responses (`--cors-origin`), and how much one client address may
//! take (`--max-streams-per-ip`, `--new-streams-per-ip`, `--publishes-per-ip`, `--trust-proxy`).

use crate::config::Config;
use crate::http::HttpError;
use std::borrow::Cow;
use std::collections::HashMap;
use std::net::IpAddr;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// Client entries kept while idle (no open stream); past this many, idle ones are dropped, so
/// the table is bounded by open streams plus this.
const IDLE_CLIENTS: usize = 65_536;

/// An address block, `10.0.0.0/8` or `::1/128` (a bare address is a block of one).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr {
    net: IpAddr,
    prefix: u8,
}

impl FromStr for Cidr {
    type Err = String;
    fn from_str(text: &str) -> Result<Cidr, String> {
        let text = text.trim();
        let (addr, prefix) = text.split_once('/').unwrap_or((text, ""));
        let net: IpAddr = addr.parse().map_err(|_| format!("bad address in {text:?}"))?;
        let max = if net.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            "" => max,
            p => p.parse::<u8>().ok().filter(|&p| p <= max).ok_or_else(|| format!("bad prefix length in {text:?}"))?,
        };
        Ok(Cidr { net, prefix })
    }
}

impl Cidr {
    pub fn contains(&self, ip: IpAddr) -> bool {
        // An IPv4 client on a dual-stack socket shows as ::ffff:a.b.c.d.
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        match (self.net, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => prefix_eq(&net.octets(), &ip.octets(), self.prefix),
            (IpAddr::V6(net), IpAddr::V6(ip)) => prefix_eq(&net.octets(), &ip.octets(), self.prefix),
            _ => false,
        }
    }
}

fn prefix_eq(a: &[u8], b: &[u8], bits: u8) -> bool {
    let (whole, rest) = ((bits / 8) as usize, bits % 8);
    if a[..whole] != b[..whole] {
        return false;
    }
    rest == 0 || (a[whole] ^ b[whole]) >> (8 - rest) == 0
}

/// The publish policy, checked once per publish request (never per delivered event).
pub struct PublishAccess {
    key: Option<Vec<u8>>,
    from: Vec<Cidr>,
    open: bool,
}

impl PublishAccess {
    pub fn new(cfg: &Config) -> PublishAccess {
        PublishAccess {
            key: cfg.publish_key.as_ref().map(|k| k.as_bytes().to_vec()),
            from: cfg.publish_from.clone(),
            open: cfg.publish_open,
        }
    }

    /// Whether `authorization` carries the --publish-key (false when none is set).
    pub fn key_accepts(&self, authorization: Option<&str>) -> bool {
        let given = authorization.and_then(bearer_token).unwrap_or("");
        self.key.as_ref().is_some_and(|key| constant_time_eq(given.as_bytes(), key))
    }

    /// Ok, 401 (key missing or wrong) or 403 (address not allowed without a key).
    pub fn check(&self, peer: IpAddr, authorization: Option<&str>) -> Result<(), HttpError> {
        if let Some(key) = &self.key {
            let given = authorization.and_then(bearer_token).unwrap_or("");
            return if constant_time_eq(given.as_bytes(), key) { Ok(()) } else { Err(HttpError::Unauthorized) };
        }
        if self.open || self.from.iter().any(|c| c.contains(peer)) {
            Ok(())
        } else {
            Err(HttpError::Forbidden("publishing from this address needs --publish-key (or --publish-open)"))
        }
    }

    /// One line for the start-up log.
    pub fn describe(&self) -> String {
        match (&self.key, self.open) {
            (Some(_), _) => "publishing needs the --publish-key bearer token".into(),
            (None, true) => "publishing is open to anyone (--publish-open)".into(),
            (None, false) => format!(
                "publishing is open only to {} (set --publish-key or --publish-open for others)",
                self.from.iter().map(|c| format!("{}/{}", c.net, c.prefix)).collect::<Vec<_>>().join(", ")
            ),
        }
    }
}

/// `--cors-origin`: `*` (any page may read public feeds; no credentials), or an allow-list whose
/// origins are echoed with credentials allowed (an EventSource `withCredentials` sends cookies).
pub struct Cors {
    /// `None`: any origin.
    origins: Option<Vec<String>>,
}

impl Cors {
    pub fn new(cfg: &Config) -> Cors {
        let any = cfg.cors_origin.is_empty() || cfg.cors_origin.iter().any(|o| o.trim() == "*");
        let origins = cfg.cors_origin.iter().map(|o| o.trim().trim_end_matches('/').to_ascii_lowercase()).collect();
        Cors { origins: if any { None } else { Some(origins) } }
    }

    /// The CORS header lines for a response to a request from `origin` (none for an origin
    /// not on the list: the browser then keeps the response from the page).
    pub fn headers(&self, origin: Option<&str>) -> Cow<'static, str> {
        let Some(list) = &self.origins else { return Cow::Borrowed("Access-Control-Allow-Origin: *\r\n") };
        match origin.filter(|o| list.iter().any(|allowed| allowed.eq_ignore_ascii_case(o))) {
            Some(o) => Cow::Owned(format!(
                "Access-Control-Allow-Origin: {o}\r\nAccess-Control-Allow-Credentials: true\r\nVary: Origin\r\n"
            )),
            None => Cow::Borrowed("Vary: Origin\r\n"),
        }
    }

    /// Whether a preflight from `origin` is answered with CORS headers.
    pub fn allows(&self, origin: Option<&str>) -> bool {
        match &self.origins {
            None => true,
            Some(list) => origin.is_some_and(|o| list.iter().any(|allowed| allowed.eq_ignore_ascii_case(o))),
        }
    }
}

/// What a verified token allows (claims `sub`, `subscribe`, `publish`, `exp`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Grant {
    pub sub: Option<String>,
    pub subscribe: Vec<String>,
    pub publish: Vec<String>,
    /// Unix seconds; a stream is closed then (`ringcast-expired`).
    pub exp: Option<u64>,
}

impl Grant {
    pub fn may_subscribe(&self, topics: &[Box<str>]) -> bool {
        topics.iter().all(|t| self.subscribe.iter().any(|p| glob_match(p, t)))
    }

    pub fn may_publish(&self, topics: &[Box<str>]) -> bool {
        topics.iter().all(|t| self.publish.iter().any(|p| glob_match(p, t)))
    }
}

/// `--jwt-secret` (HS256) and/or `--jwt-public-key` (RS256 or ES256): tokens are checked once
/// per request, never per delivered event.
pub struct Jwt {
    secret: Option<jsonwebtoken::DecodingKey>,
    public: Option<(jsonwebtoken::DecodingKey, jsonwebtoken::Algorithm)>,
    pub cookie: String,
}

/// Clock skew allowed on `exp` and `nbf`.
const JWT_LEEWAY_SECS: u64 = 5;

impl Jwt {
    /// `None` when no JWT flag is set; an error names a key that cannot be read.
    pub fn new(cfg: &Config) -> Result<Option<Jwt>, String> {
        if cfg.jwt_secret.is_none() && cfg.jwt_public_key.is_none() {
            return Ok(None);
        }
        let secret = cfg.jwt_secret.as_ref().map(|s| jsonwebtoken::DecodingKey::from_secret(s.as_bytes()));
        let public = match &cfg.jwt_public_key {
            None => None,
            Some(path) => {
                let pem = std::fs::read(path).map_err(|e| format!("--jwt-public-key {}: {e}", path.display()))?;
                let key = jsonwebtoken::DecodingKey::from_rsa_pem(&pem)
                    .map(|k| (k, jsonwebtoken::Algorithm::RS256))
                    .or_else(|_| {
                        jsonwebtoken::DecodingKey::from_ec_pem(&pem).map(|k| (k, jsonwebtoken::Algorithm::ES256))
                    })
                    .map_err(|e| {
                        format!("--jwt-public-key {}: not an RSA or EC public key PEM ({e})", path.display())
                    })?;
                Some(key)
            }
        };
        Ok(Some(Jwt { secret, public, cookie: cfg.jwt_cookie.clone() }))
    }

    /// Verifies a token (signature with the configured key for its algorithm, `exp`, `nbf`).
    pub fn verify(&self, token: &str) -> Result<Grant, HttpError> {
        use jsonwebtoken::{Algorithm, Validation};
        let header = jsonwebtoken::decode_header(token).map_err(|_| HttpError::Unauthorized)?;
        let key = match (header.alg, &self.secret, &self.public) {
            (Algorithm::HS256, Some(secret), _) => secret,
            (alg, _, Some((public, expected))) if alg == *expected => public,
            _ => return Err(HttpError::Unauthorized),
        };
        let mut validation = Validation::new(header.alg);
        validation.leeway = JWT_LEEWAY_SECS;
        validation.validate_nbf = true;
        validation.required_spec_claims.clear();
        let data =
            jsonwebtoken::decode::<serde_json::Value>(token, key, &validation).map_err(|_| HttpError::Unauthorized)?;
        let claims = data.claims;
        let list = |name: &str| -> Vec<String> {
            match &claims[name] {
                serde_json::Value::Array(items) => items.iter().filter_map(|v| v.as_str().map(str::to_owned)).collect(),
                serde_json::Value::String(one) => vec![one.clone()],
                _ => Vec::new(),
            }
        };
        Ok(Grant {
            sub: claims["sub"].as_str().map(str::to_owned),
            subscribe: list("subscribe"),
            publish: list("publish"),
            exp: claims["exp"].as_u64(),
        })
    }

    /// The token a request carries: `Authorization: Bearer`, then `?token=`, then the cookie.
    pub fn token<'a>(
        &self,
        authorization: Option<&'a str>,
        query_token: Option<&'a str>,
        cookies: Option<&'a str>,
    ) -> Option<&'a str> {
        authorization.and_then(bearer_token).or(query_token).or_else(|| {
            cookies?.split(';').find_map(|c| {
                let (name, value) = c.trim().split_once('=')?;
                (name.trim() == self.cookie).then_some(value.trim())
            })
        })
    }
}

/// `*` matches any run of characters (none too); everything else matches itself.
pub fn glob_match(pattern: &str, text: &str) -> bool {
    let (p, t) = (pattern.as_bytes(), text.as_bytes());
    let (mut pi, mut ti) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() && p[pi] == b'*' {
            star = Some((pi, ti));
            pi += 1;
        } else if pi < p.len() && p[pi] == t[ti] {
            pi += 1;
            ti += 1;
        } else if let Some((sp, st)) = star {
            pi = sp + 1;
            ti = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&b| b == b'*')
}

/// Why a client was refused by `ClientLimits`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    StreamsPerIp,
    NewStreamsPerIp,
    PublishesPerIp,
}

struct Client {
    streams: usize,
    stream_tokens: f64,
    publish_tokens: f64,
    refilled: Instant,
}

/// Per client address: open streams, and token buckets for new streams and publishes. Shared
/// by every core (a client's connections land on any of them); touched once per stream opened
/// or closed and once per publish, never per delivered event.
pub struct ClientLimits {
    max_streams: usize,
    stream_rate: f64,
    publish_rate: f64,
    trusted: Vec<Cidr>,
    clients: Mutex<HashMap<IpAddr, Client>>,
    pub refused: [AtomicU64; 3],
}

/// Holds one open stream's place in its client's count; gives it back when dropped.
pub struct StreamPermit {
    limits: Arc<ClientLimits>,
    ip: IpAddr,
}

impl Drop for StreamPermit {
    fn drop(&mut self) {
        let mut clients = self.limits.clients.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = clients.get_mut(&self.ip) {
            c.streams = c.streams.saturating_sub(1);
        }
    }
}

impl ClientLimits {
    pub fn new(cfg: &Config) -> ClientLimits {
        ClientLimits {
            max_streams: cfg.max_streams_per_ip,
            stream_rate: cfg.new_streams_per_ip,
            publish_rate: cfg.publishes_per_ip,
            trusted: cfg.trust_proxy.clone(),
            clients: Mutex::new(HashMap::new()),
            refused: Default::default(),
        }
    }

    fn active(&self) -> bool {
        self.max_streams > 0 || self.stream_rate > 0.0 || self.publish_rate > 0.0
    }

    /// The client's address: the peer, or, when the peer is a trusted proxy, the nearest
    /// untrusted address of `X-Forwarded-For` (then `X-Real-IP`).
    pub fn client_ip(&self, peer: IpAddr, forwarded_for: Option<&str>, real_ip: Option<&str>) -> IpAddr {
        let trusted = |ip: IpAddr| self.trusted.iter().any(|c| c.contains(ip));
        if !trusted(peer) {
            return peer;
        }
        if let Some(list) = forwarded_for {
            let mut nearest = None;
            for ip in list.rsplit(',').map(|s| s.trim().parse::<IpAddr>()) {
                match ip {
                    Ok(ip) if trusted(ip) => nearest = Some(ip),
                    Ok(ip) => return ip,
                    Err(_) => break,
                }
            }
            if let Some(ip) = nearest {
                return ip;
            }
        }
        real_ip.and_then(|s| s.trim().parse().ok()).unwrap_or(peer)
    }

    /// Takes a place for a new stream from `ip`.
    pub fn open_stream(self: &Arc<Self>, ip: IpAddr) -> Result<Option<StreamPermit>, Refusal> {
        if !self.active() {
            return Ok(None);
        }
        let mut clients = self.clients.lock().unwrap_or_else(|p| p.into_inner());
        let client = self.entry(&mut clients, ip);
        if self.max_streams > 0 && client.streams >= self.max_streams {
            return Err(self.refuse(Refusal::StreamsPerIp));
        }
        if self.stream_rate > 0.0 {
            if client.stream_tokens < 1.0 {
                return Err(self.refuse(Refusal::NewStreamsPerIp));
            }
            client.stream_tokens -= 1.0;
        }
        client.streams += 1;
        Ok(Some(StreamPermit { limits: self.clone(), ip }))
    }

    /// Takes a publish from `ip` out of its bucket.
    pub fn publish(&self, ip: IpAddr) -> Result<(), Refusal> {
        if self.publish_rate <= 0.0 {
            return Ok(());
        }
        let mut clients = self.clients.lock().unwrap_or_else(|p| p.into_inner());
        let client = self.entry(&mut clients, ip);
        if client.publish_tokens < 1.0 {
            return Err(self.refuse(Refusal::PublishesPerIp));
        }
        client.publish_tokens -= 1.0;
        Ok(())
    }

    fn refuse(&self, why: Refusal) -> Refusal {
        self.refused[why as usize].fetch_add(1, Ordering::Relaxed);
        why
    }

    /// The client's entry with its buckets refilled (a second's worth at most).
    fn entry<'a>(&self, clients: &'a mut HashMap<IpAddr, Client>, ip: IpAddr) -> &'a mut Client {
        let now = Instant::now();
        if clients.len() > IDLE_CLIENTS && !clients.contains_key(&ip) {
            clients.retain(|_, c| c.streams > 0);
        }
        let (stream_cap, publish_cap) = (self.stream_rate.max(1.0), self.publish_rate.max(1.0));
        let client = clients.entry(ip).or_insert(Client {
            streams: 0,
            stream_tokens: stream_cap,
            publish_tokens: publish_cap,
            refilled: now,
        });
        let secs = now.duration_since(client.refilled).as_secs_f64();
        client.refilled = now;
        client.stream_tokens = (client.stream_tokens + secs * self.stream_rate).min(stream_cap);
        client.publish_tokens = (client.publish_tokens + secs * self.publish_rate).min(publish_cap);
        client
    }
}

/// The token of `Bearer <token>` (scheme case-insensitive).
fn bearer_token(header: &str) -> Option<&str> {
    let (scheme, token) = header.trim().split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then_some(token.trim())
}

/// Compares without stopping at the first difference (the time does not tell how much matched).
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = a.len() ^ b.len();
    for (i, &x) in a.iter().enumerate() {
        diff |= usize::from(x ^ b.get(i).copied().unwrap_or(!x));
    }
    diff == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidr_blocks() {
        let lo: Cidr = "127.0.0.0/8".parse().unwrap();
        assert!(lo.contains("127.1.2.3".parse().unwrap()));
        assert!(lo.contains("::ffff:127.0.0.2".parse().unwrap()));
        assert!(!lo.contains("128.0.0.1".parse().unwrap()));
        let one: Cidr = "10.1.2.3".parse().unwrap();
        assert!(one.contains("10.1.2.3".parse().unwrap()) && !one.contains("10.1.2.4".parse().unwrap()));
        let v6: Cidr = "::1/128".parse().unwrap();
        assert!(v6.contains("::1".parse().unwrap()) && !v6.contains("127.0.0.1".parse().unwrap()));
        let odd: Cidr = "192.168.0.0/23".parse().unwrap();
        assert!(odd.contains("192.168.1.255".parse().unwrap()) && !odd.contains("192.168.2.0".parse().unwrap()));
        assert!("1.2.3.4/33".parse::<Cidr>().is_err() && "x/8".parse::<Cidr>().is_err());
    }

    #[test]
    fn client_limits_count_streams_and_refill_buckets() {
        let limits = Arc::new(ClientLimits {
            max_streams: 2,
            stream_rate: 0.0,
            publish_rate: 2.0,
            trusted: vec!["127.0.0.1".parse().unwrap()],
            clients: Mutex::new(HashMap::new()),
            refused: Default::default(),
        });
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let a = limits.open_stream(ip).unwrap();
        let _b = limits.open_stream(ip).unwrap();
        assert_eq!(limits.open_stream(ip).err(), Some(Refusal::StreamsPerIp));
        assert!(limits.open_stream("10.0.0.2".parse().unwrap()).is_ok(), "another client");
        drop(a);
        assert!(limits.open_stream(ip).is_ok(), "a closed stream gives its place back");
        assert!(limits.publish(ip).is_ok() && limits.publish(ip).is_ok());
        assert_eq!(limits.publish(ip), Err(Refusal::PublishesPerIp));
        std::thread::sleep(std::time::Duration::from_millis(600));
        assert!(limits.publish(ip).is_ok(), "refilled at 2/s");
        assert_eq!(limits.refused[Refusal::StreamsPerIp as usize].load(Ordering::Relaxed), 1);
        // Behind a trusted proxy the forwarded client counts; from anyone else, the peer.
        let proxy: IpAddr = "127.0.0.1".parse().unwrap();
        assert_eq!(limits.client_ip(proxy, Some("1.2.3.4, 127.0.0.1"), None), "1.2.3.4".parse::<IpAddr>().unwrap());
        assert_eq!(limits.client_ip(proxy, None, Some("5.6.7.8")), "5.6.7.8".parse::<IpAddr>().unwrap());
        assert_eq!(limits.client_ip(ip, Some("1.2.3.4"), None), ip, "untrusted peers cannot claim an address");
    }

    #[test]
    fn glob_patterns() {
        assert!(glob_match("*", "anything") && glob_match("user.*", "user.alice") && glob_match("a*b*c", "axxbyyc"));
        assert!(!glob_match("user.*", "users.alice") && !glob_match("a*b", "ac") && glob_match("exact", "exact"));
        assert!(glob_match("*.orders", "alice.orders") && !glob_match("*.orders", "alice.orders.x"));
    }

    #[test]
    fn keys_and_addresses() {
        let access = |key: Option<&str>, open: bool| PublishAccess {
            key: key.map(|k| k.as_bytes().to_vec()),
            from: vec!["127.0.0.0/8".parse().unwrap()],
            open,
        };
        let (local, remote): (IpAddr, IpAddr) = ("127.0.0.1".parse().unwrap(), "10.0.0.1".parse().unwrap());
        assert_eq!(access(None, false).check(local, None), Ok(()));
        assert!(matches!(access(None, false).check(remote, None), Err(HttpError::Forbidden(_))));
        assert_eq!(access(None, true).check(remote, None), Ok(()));
        let keyed = access(Some("s3cret"), false);
        assert_eq!(keyed.check(remote, Some("Bearer s3cret")), Ok(()));
        assert_eq!(keyed.check(local, Some("bearer  s3cret ")), Ok(()));
        assert_eq!(keyed.check(local, None), Err(HttpError::Unauthorized));
        assert_eq!(keyed.check(local, Some("Bearer s3cre")), Err(HttpError::Unauthorized));
        assert_eq!(keyed.check(local, Some("Basic s3cret")), Err(HttpError::Unauthorized));
        assert!(!constant_time_eq(b"", b"x") && constant_time_eq(b"ab", b"ab") && !constant_time_eq(b"ab", b"abc"));
    }
}
