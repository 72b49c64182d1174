//! `check_client_access`, `check_helo_access`, `check_sender_access`,
//! `check_recipient_access`, `check_etrn_access`: the lookup keys Postfix's access(5) tries,
//! in order, and the actions a table may answer.

use super::{Item, Request, Restrictions, Stage, Verdict};
use postern_common::{addr, info, warning};
use std::net::IpAddr;

impl Restrictions {
    pub(super) fn check_access(&self, item: &Item, stage: Stage, req: &Request<'_>) -> Verdict {
        let Some(spec) = &item.arg else {
            warning!("restriction {} requires a table argument", item.name);
            return Verdict::Reject("451 4.3.5 Server configuration error".into());
        };
        let table = match self.tables.get(spec) {
            Some(Ok(t)) => t,
            _ => {
                warning!("{}: table {spec} is not available", item.name);
                return Verdict::Reject("451 4.3.5 Server configuration error".into());
            }
        };
        // The stage whose words a reject uses: the thing looked up.
        let (kind, keys) = match item.name.as_str() {
            "check_client_access" => (Stage::Client, client_keys(req.client_name, req.ip())),
            "check_helo_access" => match req.helo {
                Some(h) => (Stage::Helo, domain_keys(h)),
                None => return Verdict::Dunno,
            },
            "check_sender_access" => match req.sender {
                Some(s) => (Stage::Sender, address_keys(s)),
                None => return Verdict::Dunno,
            },
            "check_etrn_access" => match req.etrn_domain {
                Some(d) => (Stage::Etrn, domain_keys(d)),
                None => return Verdict::Dunno,
            },
            _ => match req.recipient {
                Some(r) => (Stage::Recipient, address_keys(r)),
                None => return Verdict::Dunno,
            },
        };
        let _ = stage;
        for key in keys {
            match table.lookup_expanded(&key) {
                Ok(Some(action)) => return self.action(&action, kind, req, spec),
                Ok(None) => {}
                // Postfix: the table's error is logged, and the request
                // gets this result as if the table had answered it.
                Err(_) => {
                    return self.action("451 4.3.5 Server configuration error", kind, req, spec)
                }
            }
        }
        Verdict::Dunno
    }

    /// `check_sasl_access type:table`: the SASL login name of an
    /// authenticated client is looked up; the result is an access(5)
    /// action, worded as a client restriction.
    pub(super) fn check_sasl_access(&self, item: &Item, req: &Request<'_>) -> Verdict {
        let (Some(spec), Some(login)) = (&item.arg, req.sasl_username) else {
            return Verdict::Dunno;
        };
        let table = match self.tables.get(spec) {
            Some(Ok(t)) => t,
            _ => {
                warning!("{}: table {spec} is not available", item.name);
                return Verdict::Reject("451 4.3.5 Server configuration error".into());
            }
        };
        match table.lookup_expanded(login) {
            Ok(Some(action)) => self.action(&action, Stage::Client, req, spec),
            Ok(None) => Verdict::Dunno,
            // As check_access: the table's error answers for it.
            Err(_) => self.action(
                "451 4.3.5 Server configuration error",
                Stage::Client,
                req,
                spec,
            ),
        }
    }

    /// `permit_tls_clientcerts` (the client certificate's public key or
    /// certificate fingerprint in `relay_clientcerts`),
    /// `permit_tls_all_clientcerts` (any certificate that chains to
    /// `smtpd_tls_CAfile`) and `check_ccert_access type:table` (the
    /// certificate's fingerprint, then its public key's, as access(5)
    /// keys, worded as a client restriction).
    pub(super) fn client_cert_check(&self, item: &Item, req: &Request<'_>) -> Verdict {
        let Some(cert) = req.client_cert else {
            if !self.ask_ccert && req.tls {
                warning!(
                    "{} is requested, but \"smtpd_tls_ask_ccert = no\"",
                    item.name
                );
            }
            return Verdict::Dunno;
        };
        let prints = |pkey_first: bool| {
            let mut p = vec![&cert.cert_fingerprint, &cert.pkey_fingerprint];
            if pkey_first {
                p.reverse();
            }
            p.into_iter()
                .filter(|f| !f.is_empty())
                .cloned()
                .collect::<Vec<_>>()
        };
        match item.name.as_str() {
            "permit_tls_all_clientcerts" if cert.trusted => Verdict::Permit,
            "permit_tls_all_clientcerts" => Verdict::Dunno,
            "permit_tls_clientcerts" => {
                let Some(t) = &self.relay_clientcerts else {
                    return Verdict::Dunno;
                };
                for f in prints(true) {
                    match t.lookup(&f) {
                        Ok(Some(_)) => return Verdict::Permit,
                        Ok(None) => {}
                        Err(_) => {
                            warning!("relay_clientcerts: lookup error for fingerprint '{f}'");
                            return Verdict::Reject("451 4.3.5 Server configuration error".into());
                        }
                    }
                }
                Verdict::Dunno
            }
            _ => {
                let Some(spec) = &item.arg else {
                    return Verdict::Dunno;
                };
                let Some(Ok(table)) = self.tables.get(spec) else {
                    warning!("{}: table {spec} is not available", item.name);
                    return Verdict::Reject("451 4.3.5 Server configuration error".into());
                };
                for f in prints(false) {
                    match table.lookup_expanded(&f) {
                        Ok(Some(action)) => return self.action(&action, Stage::Client, req, spec),
                        Ok(None) => {}
                        Err(_) => {
                            return self.action(
                                "451 4.3.5 Server configuration error",
                                Stage::Client,
                                req,
                                spec,
                            )
                        }
                    }
                }
                Verdict::Dunno
            }
        }
    }

    /// An access(5) result.
    pub(super) fn action(
        &self,
        action: &str,
        stage: Stage,
        req: &Request<'_>,
        spec: &str,
    ) -> Verdict {
        let action = action.trim();
        let (word, text) = match action.split_once(char::is_whitespace) {
            Some((w, t)) => (w, t.trim()),
            None => (action, ""),
        };
        let upper = word.to_ascii_uppercase();
        match upper.as_str() {
            "OK" => Verdict::Permit,
            "DUNNO" => Verdict::Dunno,
            "REJECT" => {
                let (dsn, text) = leading_dsn(text, '5');
                Self::reject(
                    stage,
                    req,
                    "554",
                    &dsn,
                    if text.is_empty() {
                        "Access denied"
                    } else {
                        text
                    },
                )
            }
            // DEFER_IF_PERMIT / DEFER_IF_REJECT [text]: the flag, with
            // this reply (an enhanced status code may start the text).
            "DEFER_IF_PERMIT" | "DEFER_IF_REJECT" => {
                let (dsn, rest) = match text.split_once(' ') {
                    Some((d, r)) if is_dsn(d, '4') => (d.to_string(), r),
                    _ if is_dsn(text, '4') => (text.to_string(), ""),
                    _ => ("4.7.1".to_string(), text),
                };
                let rest = if rest.is_empty() {
                    "Service unavailable"
                } else {
                    rest
                };
                Self::raise_defer(&upper, stage, req, "450", &dsn, rest)
            }
            "DEFER" => {
                let (dsn, text) = leading_dsn(text, '4');
                Self::reject(
                    stage,
                    req,
                    "450",
                    &dsn,
                    if text.is_empty() {
                        "Try again later"
                    } else {
                        text
                    },
                )
            }
            // FILTER transport:nexthop: the message goes through that
            // content filter after it is queued (as Postfix, the last
            // FILTER wins, and the restriction goes on as DUNNO).
            "FILTER" if text.contains(':') => {
                let (key, what) = Self::subject(stage, req);
                info!(
                    "NOQUEUE: filter: {} from {}[{}]: <{key}>: {what} triggers FILTER {text}",
                    req.command,
                    req.client_name,
                    req.ip(),
                );
                if let Some(f) = req.filter {
                    *f.borrow_mut() = Some(text.to_string());
                }
                Verdict::Dunno
            }
            "FILTER" => {
                warning!("access table {spec}: FILTER without transport:nexthop; ignored");
                Verdict::Dunno
            }
            // PREPEND name: value: the header goes above the Received
            // header (postgrey's X-Greylist), and the restriction goes on
            // as DUNNO.
            "PREPEND" if is_header(text) => {
                if let Some(p) = req.prepend {
                    p.borrow_mut().push(text.to_string());
                }
                Verdict::Dunno
            }
            "WARN" | "INFO" => {
                let (key, what) = Self::subject(stage, req);
                info!(
                    "NOQUEUE: {}: {} from {}[{}]: <{key}>: {what} triggers {}: {text}",
                    upper.to_ascii_lowercase(),
                    req.command,
                    req.client_name,
                    req.ip(),
                    upper
                );
                Verdict::Dunno
            }
            _ if word.len() == 3 && word.bytes().all(|b| b.is_ascii_digit()) => {
                match word.as_bytes()[0] {
                    b'4' | b'5' => {
                        let class = word.as_bytes()[0] as char;
                        // An enhanced status code at the start of the text
                        // is used; else X.7.1.
                        let (dsn, rest) = match text.split_once(' ') {
                            Some((d, r)) if is_dsn(d, class) => (d.to_string(), r),
                            _ if is_dsn(text, class) => (text.to_string(), ""),
                            _ => (format!("{class}.7.1"), text),
                        };
                        let rest = if rest.is_empty() {
                            "Access denied"
                        } else {
                            rest
                        };
                        Self::reject(stage, req, word, &dsn, rest)
                    }
                    // All-numerical results are OK (Postfix's rule).
                    _ => Verdict::Permit,
                }
            }
            _ if !word.is_empty() && word.bytes().all(|b| b.is_ascii_digit()) => Verdict::Permit,
            _ => {
                let name = word.to_ascii_lowercase();
                if matches!(
                    name.as_str(),
                    "discard" | "hold" | "redirect" | "filter" | "prepend" | "bcc"
                ) {
                    warning!("access table {spec}: action {word} is not supported; ignored");
                    return Verdict::Dunno;
                }
                // A restriction name (permit_mynetworks, reject_..., ...).
                self.eval_one(
                    &Item {
                        name,
                        arg: (!text.is_empty()).then(|| text.to_string()),
                    },
                    stage,
                    req,
                )
            }
        }
    }
}

/// An enhanced status code at the start of a REJECT or DEFER text is
/// used (its class made the reply's, as Postfix's smtpd_dsn_fix); else
/// X.7.1. Returns (code, the rest of the text).
fn leading_dsn(text: &str, class: char) -> (String, &str) {
    let (first, rest) = text.split_once(' ').unwrap_or((text, ""));
    if is_dsn(first, '4') || is_dsn(first, '5') {
        (format!("{class}{}", &first[1..]), rest.trim_start())
    } else {
        (format!("{class}.7.1"), text)
    }
}

/// `name: value` with a header name of printable characters.
fn is_header(text: &str) -> bool {
    text.split_once(':')
        .is_some_and(|(n, _)| !n.is_empty() && n.bytes().all(|b| b.is_ascii_graphic() && b != b':'))
}

pub(super) fn is_dsn(d: &str, class: char) -> bool {
    d.starts_with(class)
        && d.split('.').count() == 3
        && d.split('.')
            .all(|p| !p.is_empty() && p.len() <= 3 && p.bytes().all(|b| b.is_ascii_digit()))
}

/// Keys for a host name: itself and its parent domains.
pub(super) fn domain_keys(name: &str) -> Vec<String> {
    let name = name.trim_end_matches('.').to_ascii_lowercase();
    let mut out = vec![name.clone()];
    let mut d = name.as_str();
    while let Some((_, parent)) = d.split_once('.') {
        out.push(parent.to_string());
        d = parent;
    }
    out
}

/// Keys for an address, in access(5) order: the address, its domain and
/// parent domains, `user@`; `<>` for the null address.
pub(super) fn address_keys(a: &str) -> Vec<String> {
    if a.is_empty() {
        return vec!["<>".into()];
    }
    let mut out = vec![a.to_ascii_lowercase()];
    let (local, domain) = addr::split(a);
    if let Some(d) = domain {
        out.extend(domain_keys(d));
    }
    out.push(format!("{}@", local.to_ascii_lowercase()));
    out
}

/// Keys for a client: host name and parents (if known), the address,
/// and for IPv4 its shorter prefixes (`1.2.3`, `1.2`, `1`).
pub(super) fn client_keys(name: &str, ip: IpAddr) -> Vec<String> {
    let mut out = Vec::new();
    if name != "unknown" {
        out.extend(domain_keys(name));
    }
    out.push(ip.to_string());
    if let IpAddr::V4(v4) = ip {
        let o = v4.octets();
        out.push(format!("{}.{}.{}", o[0], o[1], o[2]));
        out.push(format!("{}.{}", o[0], o[1]));
        out.push(format!("{}", o[0]));
    }
    out
}
