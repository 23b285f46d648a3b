//! `POST /publish` bodies: raw (with `?topic=&event=`), JSON, and form-urlencoded.

use crate::event::Publish;
use crate::http::HttpError;
use crate::sse::{valid_event_name, valid_topic};

/// Topics of a stream or publish request, validated and de-duplicated (order kept).
pub fn validate_topics<'a>(names: impl Iterator<Item = &'a str>, max: usize) -> Result<Vec<Box<str>>, HttpError> {
    let mut topics: Vec<Box<str>> = Vec::new();
    for name in names {
        if !valid_topic(name) {
            return Err(HttpError::BadInput(format!(
                "invalid topic {:?}: use 1-256 bytes of A-Z a-z 0-9 . _ - : /",
                truncate(name, 64)
            )));
        }
        if !topics.iter().any(|t| &**t == name) {
            if topics.len() == max {
                return Err(HttpError::BadInput(format!("too many topics (at most {max})")));
            }
            topics.push(name.into());
        }
    }
    if topics.is_empty() {
        return Err(HttpError::BadRequest("missing topic"));
    }
    Ok(topics)
}

/// Recipients one targeted publish may name.
pub const MAX_USERS: usize = 1000;

/// A user name a targeted publish may name (a token's `sub`): 1-256 bytes, no whitespace,
/// control characters or commas (names travel comma-separated through Redis).
pub fn valid_user(user: &str) -> bool {
    (1..=256).contains(&user.len()) && !user.chars().any(|c| c.is_whitespace() || c.is_control() || c == ',')
}

/// Checks and de-duplicates a targeted publish's recipients.
pub fn validate_users(names: Vec<String>) -> Result<Vec<Box<str>>, HttpError> {
    let mut users: Vec<Box<str>> = Vec::with_capacity(names.len());
    for name in names {
        if !valid_user(&name) {
            return Err(HttpError::BadRequest(
                "user names must be 1-256 bytes without whitespace, control characters or commas",
            ));
        }
        if !users.iter().any(|u| **u == *name) {
            if users.len() == MAX_USERS {
                return Err(HttpError::BadInput(format!("too many users (at most {MAX_USERS})")));
            }
            users.push(name.into());
        }
    }
    Ok(users)
}

fn truncate(s: &str, max: usize) -> &str {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

fn check_event(event: Option<String>) -> Result<Option<Box<str>>, HttpError> {
    match event {
        None => Ok(None),
        Some(name) if name.is_empty() => Ok(None),
        Some(name) if valid_event_name(&name) => Ok(Some(name.into())),
        Some(_) => Err(HttpError::BadRequest("event name must be 1-256 bytes without CR, LF or NUL")),
    }
}

/// Decodes `application/x-www-form-urlencoded` strictly: percent-escapes that do not decode
/// to UTF-8 are a 400, not silently replaced (the form crate decodes lossily).
pub fn decode_form(input: &[u8]) -> Result<Vec<(String, String)>, HttpError> {
    fn decode(part: &[u8]) -> Result<String, HttpError> {
        let mut out = Vec::with_capacity(part.len());
        let mut i = 0;
        while i < part.len() {
            match part[i] {
                b'+' => out.push(b' '),
                b'%' if i + 2 < part.len() => {
                    // Two hex digits exactly: `from_str_radix` alone also takes a sign (`%+A`).
                    let hex = std::str::from_utf8(&part[i + 1..i + 3])
                        .ok()
                        .filter(|h| h.bytes().all(|b| b.is_ascii_hexdigit()))
                        .and_then(|h| u8::from_str_radix(h, 16).ok());
                    match hex {
                        Some(b) => {
                            out.push(b);
                            i += 2;
                        }
                        None => out.push(b'%'),
                    }
                }
                b => out.push(b),
            }
            i += 1;
        }
        String::from_utf8(out).map_err(|_| HttpError::BadRequest("form field is not UTF-8"))
    }
    input
        .split(|&b| b == b'&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (k, v) = match pair.iter().position(|&b| b == b'=') {
                Some(eq) => (&pair[..eq], &pair[eq + 1..]),
                None => (pair, &b""[..]),
            };
            Ok((decode(k)?, decode(v)?))
        })
        .collect()
}

/// Builds a publish from the request's query, content type and whole body.
pub fn parse_publish(
    query: &str,
    content_type: Option<&str>,
    body: &[u8],
    max_topics: usize,
) -> Result<Publish, HttpError> {
    let mime = content_type.map(|c| c.split(';').next().unwrap_or("").trim()).unwrap_or("");
    let mut topics: Vec<String> = Vec::new();
    let mut event: Option<String> = None;
    let mut users: Vec<String> = Vec::new();
    for (k, v) in decode_form(query.as_bytes())? {
        match k.as_str() {
            "topic" => topics.push(v),
            "user" => users.push(v),
            "event" => event = Some(v),
            _ => {}
        }
    }
    let data = match mime {
        "application/json" => {
            let value: serde_json::Value =
                serde_json::from_slice(body).map_err(|e| HttpError::BadInput(format!("invalid JSON: {e}")))?;
            let obj = value.as_object().ok_or(HttpError::BadRequest("JSON body must be an object"))?;
            match obj.get("topic") {
                Some(serde_json::Value::String(t)) => topics.push(t.clone()),
                Some(_) => return Err(HttpError::BadRequest("\"topic\" must be a string")),
                None => {}
            }
            match obj.get("topics") {
                Some(serde_json::Value::Array(list)) => {
                    for t in list {
                        topics
                            .push(t.as_str().ok_or(HttpError::BadRequest("\"topics\" must hold strings"))?.to_owned());
                    }
                }
                Some(_) => return Err(HttpError::BadRequest("\"topics\" must be an array")),
                None => {}
            }
            match obj.get("users") {
                Some(serde_json::Value::Array(list)) => {
                    for u in list {
                        users.push(u.as_str().ok_or(HttpError::BadRequest("\"users\" must hold strings"))?.to_owned());
                    }
                }
                Some(_) => return Err(HttpError::BadRequest("\"users\" must be an array")),
                None => {}
            }
            match obj.get("event") {
                Some(serde_json::Value::String(e)) => event = Some(e.clone()),
                Some(serde_json::Value::Null) | None => {}
                Some(_) => return Err(HttpError::BadRequest("\"event\" must be a string")),
            }
            match obj.get("data") {
                Some(serde_json::Value::String(s)) => s.clone(),
                Some(other) => other.to_string(),
                None => String::new(),
            }
        }
        // `curl -d 'text'` sends this type for any body: a body without a known field is raw data.
        "application/x-www-form-urlencoded"
            if form_urlencoded::parse(body).any(|(k, _)| matches!(&*k, "topic" | "event" | "data")) =>
        {
            let mut data = String::new();
            for (k, v) in decode_form(body)? {
                match k.as_str() {
                    "topic" => topics.push(v),
                    "user" => users.push(v),
                    "event" => event = Some(v),
                    "data" => data = v,
                    _ => {}
                }
            }
            data
        }
        _ => String::from_utf8(body.to_vec()).map_err(|_| HttpError::BadRequest("body is not UTF-8"))?,
    };
    let topics = validate_topics(topics.iter().map(String::as_str), max_topics)?;
    Ok(Publish { topics, event: check_event(event)?, data, users: validate_users(users)? })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_body_with_query() {
        let p = parse_publish("topic=a&event=tick", Some("text/plain"), b"hello", 64).unwrap();
        assert_eq!((&*p.topics[0], p.event.as_deref(), p.data.as_str()), ("a", Some("tick"), "hello"));
    }

    #[test]
    fn json_forms() {
        let p = parse_publish("", Some("application/json"), br#"{"topics":["a","b","a"],"data":{"x":[1, 2]}}"#, 64)
            .unwrap();
        assert_eq!(p.topics.len(), 2);
        assert_eq!(p.data, r#"{"x":[1,2]}"#);
        let p = parse_publish("", Some("application/json; charset=utf-8"), br#"{"topic":"t","data":"s"}"#, 64).unwrap();
        assert_eq!(p.data, "s");
        assert!(parse_publish("", Some("application/json"), b"{nope", 64).is_err());
    }

    #[test]
    fn targeted_users() {
        let body = br#"{"topic":"t","users":["alice","bob","alice"],"data":"x"}"#;
        let p = parse_publish("", Some("application/json"), body, 64).unwrap();
        assert_eq!(p.users, vec![Box::from("alice"), Box::from("bob")]);
        let p = parse_publish("topic=t&user=carol&user=dan", Some("text/plain"), b"x", 64).unwrap();
        assert_eq!(p.users, vec![Box::from("carol"), Box::from("dan")]);
        assert!(parse_publish("topic=t", Some("text/plain"), b"x", 64).unwrap().users.is_empty());
        for bad in [
            r#"{"topic":"t","users":"alice"}"#,
            r#"{"topic":"t","users":["a b"]}"#,
            r#"{"topic":"t","users":["a,b"]}"#,
            r#"{"topic":"t","users":[""]}"#,
            r#"{"topic":"t","users":[1]}"#,
        ] {
            assert!(parse_publish("", Some("application/json"), bad.as_bytes(), 64).is_err(), "{bad}");
        }
        let many: Vec<String> = (0..=MAX_USERS).map(|i| format!("\"u{i}\"")).collect();
        let body = format!(r#"{{"topic":"t","users":[{}]}}"#, many.join(","));
        assert!(parse_publish("", Some("application/json"), body.as_bytes(), 64).is_err());
    }

    #[test]
    fn form_body() {
        let p =
            parse_publish("", Some("application/x-www-form-urlencoded"), b"topic=a&event=e&data=x+y%0Az", 64).unwrap();
        assert_eq!((p.event.as_deref(), p.data.as_str()), (Some("e"), "x y\nz"));
        let p = parse_publish("topic=a", Some("application/x-www-form-urlencoded"), b"plain text", 64).unwrap();
        assert_eq!(p.data, "plain text");
    }

    #[test]
    fn strict_form_decoding() {
        assert_eq!(
            decode_form(b"a=x+y%21&b=%E2%82%AC&c&d=%zz").unwrap(),
            vec![
                ("a".into(), "x y!".into()),
                ("b".into(), "€".into()),
                ("c".into(), String::new()),
                ("d".into(), "%zz".into())
            ]
        );
        assert!(decode_form(b"data=%FF%FE").is_err());
        // A sign is not a hex digit (`u8::from_str_radix` takes `+A`): found by fuzz/publish_body.
        assert_eq!(decode_form(b"d=%+A1").unwrap(), vec![("d".into(), "% A1".into())]);
        let form = Some("application/x-www-form-urlencoded");
        assert!(parse_publish("", form, b"topic=a&data=%FF%FE", 64).is_err());
    }

    #[test]
    fn rejects_injection_and_bad_input() {
        assert!(parse_publish("topic=a&event=x%0Aid:1", None, b"d", 64).is_err());
        assert!(parse_publish("topic=a", None, &[0xff, 0xfe], 64).is_err());
        assert!(parse_publish("topic=a%20b", None, b"d", 64).is_err());
        assert!(parse_publish("", None, b"d", 64).is_err());
        assert!(parse_publish("topic=a&topic=b", None, b"d", 1).is_err());
    }
}
