//! What a server's EHLO (LHLO) reply offers: [`Extensions`].

use crate::reply::Reply;

/// What a server's EHLO reply offers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Extensions {
    /// Said EHLO (false after a fallback to HELO).
    pub esmtp: bool,
    pub pipelining: bool,
    /// SIZE: `Some(0)` when offered without a limit.
    pub size: Option<u64>,
    pub eight_bit_mime: bool,
    pub smtputf8: bool,
    pub dsn: bool,
    pub starttls: bool,
    pub chunking: bool,
    /// REQUIRETLS (RFC 8689), as announced after STARTTLS.
    pub requiretls: bool,
    /// AUTH mechanisms, upper-case.
    pub auth: Vec<String>,
    /// XFORWARD attribute names, upper-case (empty: not offered).
    pub xforward: Vec<String>,
}

impl Extensions {
    /// Parses an EHLO reply (every line but the first names an extension).
    pub fn parse(r: &Reply) -> Extensions {
        let mut e = Extensions {
            esmtp: true,
            ..Default::default()
        };
        for t in r.texts().skip(1) {
            let mut words = t.split_whitespace();
            let Some(kw) = words.next() else { continue };
            let kw = kw.to_ascii_uppercase();
            let (kw, first) = match kw.split_once('=') {
                // Old "AUTH=LOGIN PLAIN" form.
                Some((k, v)) => (k.to_string(), Some(v.to_string())),
                None => (kw, None),
            };
            match kw.as_str() {
                "PIPELINING" => e.pipelining = true,
                "SIZE" => e.size = Some(words.next().and_then(|n| n.parse().ok()).unwrap_or(0)),
                "8BITMIME" => e.eight_bit_mime = true,
                "SMTPUTF8" => e.smtputf8 = true,
                "DSN" => e.dsn = true,
                "STARTTLS" => e.starttls = true,
                "CHUNKING" => e.chunking = true,
                "REQUIRETLS" => e.requiretls = true,
                "XFORWARD" => e.xforward = words.map(|w| w.to_ascii_uppercase()).collect(),
                "AUTH" => {
                    for m in first.into_iter().chain(words.map(str::to_string)) {
                        let m = m.to_ascii_uppercase();
                        if !e.auth.contains(&m) {
                            e.auth.push(m);
                        }
                    }
                }
                _ => {}
            }
        }
        e
    }

    /// Forgets what `keywords` (lower-case) name; returns the names of
    /// the offered extensions forgotten, upper-case.
    pub fn discard(&mut self, keywords: &[String]) -> Vec<&'static str> {
        let mut gone = Vec::new();
        let has = |k: &str| keywords.iter().any(|w| w == k);
        let mut off = |on: &mut bool, name: &'static str| {
            if *on && has(&name.to_ascii_lowercase()) {
                *on = false;
                gone.push(name);
            }
        };
        off(&mut self.pipelining, "PIPELINING");
        off(&mut self.eight_bit_mime, "8BITMIME");
        off(&mut self.smtputf8, "SMTPUTF8");
        off(&mut self.dsn, "DSN");
        off(&mut self.starttls, "STARTTLS");
        off(&mut self.chunking, "CHUNKING");
        off(&mut self.requiretls, "REQUIRETLS");
        if self.size.is_some() && has("size") {
            self.size = None;
            gone.push("SIZE");
        }
        if !self.xforward.is_empty() && has("xforward") {
            self.xforward.clear();
            gone.push("XFORWARD");
        }
        if !self.auth.is_empty() && has("auth") {
            self.auth.clear();
            gone.push("AUTH");
        }
        gone
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reply::LineReader;

    #[test]
    fn extensions() {
        let r = LineReader::new()
            .read_reply(
                &mut &b"250-mx.test Hello\r\n250-PIPELINING\r\n250-SIZE 1000\r\n250-8BITMIME\r\n250-AUTH PLAIN login\r\n250-AUTH=LOGIN\r\n250-XFORWARD NAME addr\r\n250 STARTTLS\r\n"[..],
            )
            .unwrap();
        let e = Extensions::parse(&r);
        assert!(e.esmtp && e.pipelining && e.eight_bit_mime && e.starttls);
        assert!(!e.smtputf8 && !e.dsn);
        assert_eq!(e.size, Some(1000));
        assert_eq!(e.auth, vec!["PLAIN", "LOGIN"]);
        assert_eq!(e.xforward, vec!["NAME", "ADDR"]);
        let r = LineReader::new()
            .read_reply(&mut &b"250-x\r\n250 size\r\n"[..])
            .unwrap();
        assert_eq!(Extensions::parse(&r).size, Some(0));
        assert!(!Extensions::parse(&r).requiretls);
        let r = LineReader::new()
            .read_reply(&mut &b"250-x\r\n250 RequireTLS\r\n"[..])
            .unwrap();
        let mut e = Extensions::parse(&r);
        assert!(e.requiretls);
        assert_eq!(e.discard(&["requiretls".into()]), vec!["REQUIRETLS"]);
        assert!(!e.requiretls);
    }
}
