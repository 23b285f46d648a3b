//! Who may do what: the shared publish key (`--publish-key`), the addresses that may publish
//! without one (`--publish-from`, loopback by default; `--publish-open`: anyone), and which web
//! origins browsers may let read responses (`--cors-origin`).

use crate::config::Config;
use crate::http::HttpError;
use std::borrow::Cow;
use std::net::IpAddr;
use std::str::FromStr;

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
