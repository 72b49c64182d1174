//! The before-queue content filter's settings, as Postfix 3.7 reads them
//! (SMTPD_PROXY_README): `smtpd_proxy_filter` names where the filter
//! listens, `smtpd_proxy_options` how smtpd talks to it. One parser for
//! smtpd (which connects) and `postern check` (which refuses a value
//! smtpd could not use).
//!
//! The endpoint forms are Postfix's: `host:port`, `inet:host:port`,
//! `[host]:port` (IPv6 too), a bare `port` (on `localhost`, as Postfix's
//! `inet_connect`), and `unix:pathname`, a relative pathname being under
//! the queue directory (smtpd's working directory in Postfix).

use std::path::{Path, PathBuf};

/// Where the filter listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// Host (without brackets) and port.
    Inet(String, u16),
    Unix(PathBuf),
}

impl Endpoint {
    /// Parses a `smtpd_proxy_filter` value; an error names what is wrong.
    pub fn parse(spec: &str, queue_directory: &Path) -> Result<Endpoint, String> {
        let spec = spec.trim();
        let bad = |why: &str| format!("smtpd_proxy_filter = {spec}: {why}");
        if spec.len() >= 5 && spec[..5].eq_ignore_ascii_case("unix:") {
            let p = &spec[5..];
            if p.is_empty() {
                return Err(bad("expected unix:pathname"));
            }
            let path = PathBuf::from(p);
            return Ok(Endpoint::Unix(if path.is_absolute() {
                path
            } else {
                queue_directory.join(path)
            }));
        }
        let hp = if spec.len() >= 5 && spec[..5].eq_ignore_ascii_case("inet:") {
            &spec[5..]
        } else {
            spec
        };
        let (host, port) = if let Some(rest) = hp.strip_prefix('[') {
            let Some((h, p)) = rest.split_once(']') else {
                return Err(bad("missing \"]\""));
            };
            let Some(p) = p.strip_prefix(':') else {
                return Err(bad("expected [host]:port"));
            };
            (h, p)
        } else {
            match hp.rsplit_once(':') {
                Some((h, _)) if h.contains(':') => {
                    return Err(bad("an IPv6 address goes in brackets: [address]:port"))
                }
                Some((h, p)) => (h, p),
                None => ("localhost", hp),
            }
        };
        if host.is_empty() || host.chars().any(|c| c.is_whitespace()) {
            return Err(bad("expected host:port, inet:host:port or unix:pathname"));
        }
        let port = match port.parse::<u16>() {
            Ok(p) if p > 0 => p,
            _ => match service_port(port) {
                Some(p) => p,
                None => return Err(bad(&format!("bad port \"{port}\""))),
            },
        };
        Ok(Endpoint::Inet(host.to_string(), port))
    }
}

/// A port given by its service name (`smtp`), from /etc/services.
fn service_port(name: &str) -> Option<u16> {
    if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
        return None;
    }
    let text = std::fs::read_to_string("/etc/services").ok()?;
    text.lines().find_map(|l| {
        let l = l.split('#').next()?;
        let mut w = l.split_whitespace();
        let first = w.next()?;
        let (port, proto) = w.next()?.split_once('/')?;
        let named = first == name || w.any(|a| a == name);
        (named && proto == "tcp").then(|| port.parse().ok())?
    })
}

/// `smtpd_proxy_options`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Options {
    /// `speed_adjust`: connect only once the whole message is in.
    pub speed_adjust: bool,
}

impl Options {
    /// Parses the words (comma or space separated); an unknown one is an
    /// error, as Postfix's smtpd stops on it.
    pub fn parse(value: &str) -> Result<Options, String> {
        let mut o = Options::default();
        for w in value
            .split([',', ' ', '\t', '\n'])
            .filter(|w| !w.is_empty())
        {
            match w.to_ascii_lowercase().as_str() {
                "speed_adjust" => o.speed_adjust = true,
                other => {
                    return Err(format!(
                        "unknown smtpd_proxy_options value \"{other}\" in \"{}\"",
                        value.trim()
                    ))
                }
            }
        }
        Ok(o)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints() {
        let q = Path::new("/q");
        let inet = |h: &str, p| Endpoint::Inet(h.into(), p);
        assert_eq!(
            Endpoint::parse("127.0.0.1:10024", q),
            Ok(inet("127.0.0.1", 10024))
        );
        assert_eq!(
            Endpoint::parse("inet:localhost:10024", q),
            Ok(inet("localhost", 10024))
        );
        assert_eq!(Endpoint::parse("[::1]:10024", q), Ok(inet("::1", 10024)));
        assert_eq!(Endpoint::parse("inet:[::1]:25", q), Ok(inet("::1", 25)));
        assert_eq!(Endpoint::parse("10024", q), Ok(inet("localhost", 10024)));
        assert_eq!(
            Endpoint::parse("unix:private/filter", q),
            Ok(Endpoint::Unix("/q/private/filter".into()))
        );
        assert_eq!(
            Endpoint::parse("unix:/run/f.sock", q),
            Ok(Endpoint::Unix("/run/f.sock".into()))
        );
        for bad in [
            "unix:",
            "host:",
            ":25",
            "host:99999",
            "::1:25",
            "[::1]25",
            "a b:25",
        ] {
            assert!(Endpoint::parse(bad, q).is_err(), "{bad}");
        }
    }

    #[test]
    fn options() {
        assert_eq!(Options::parse(""), Ok(Options::default()));
        assert!(Options::parse("speed_adjust").unwrap().speed_adjust);
        assert!(Options::parse(" Speed_Adjust, ").unwrap().speed_adjust);
        assert!(Options::parse("speed_adjust,forward_ehlo").is_err());
    }
}
