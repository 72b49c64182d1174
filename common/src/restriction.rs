//! The language of smtpd's restriction lists (`smtpd_client_restrictions`,
//! `smtpd_helo_restrictions`, `smtpd_sender_restrictions`,
//! `smtpd_relay_restrictions`, `smtpd_recipient_restrictions`,
//! `smtpd_data_restrictions`, `smtpd_end_of_data_restrictions`,
//! `smtpd_etrn_restrictions` and the lists of `smtpd_restriction_classes`),
//! read once: every restriction of Postfix 3.7's postconf(5), the argument
//! it takes, and whether Postern's smtpd carries it out.
//!
//! smtpd parses its lists with [`parse_list`] at start and refuses to run
//! with one that fails; `postern check` and `postern start` run
//! [`check_config`] on main.cf and on every master.cf `-o` override, so
//! that an unknown restriction, a missing argument, or a restriction
//! Postern cannot honour is reported with its file, line and name before
//! any mail arrives (never a run-time `451 4.3.5`).

use postern_conf::Config;

/// One restriction of a list, with its argument when it takes one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Item {
    pub name: String,
    pub arg: Option<String>,
}

/// The argument a restriction takes (the next word of the list).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Arg {
    None,
    /// A lookup table, `type:name`.
    Table,
    /// A DNS list domain, `domain[=d.d.d.d]`.
    DnsList,
    /// A policy server, `inet:host:port` or `unix:path`.
    Server,
    /// Seconds (`sleep`).
    Seconds,
}

/// (name, argument, why Postern does not carry it out; "" = it does).
const RESTRICTIONS: &[(&str, Arg, &str)] = &[
    // Generic.
    ("permit", Arg::None, ""),
    ("reject", Arg::None, ""),
    ("defer", Arg::None, ""),
    ("warn_if_reject", Arg::None, ""),
    ("reject_unauth_pipelining", Arg::None, ""),
    ("defer_if_permit", Arg::None, ""),
    ("defer_if_reject", Arg::None, ""),
    ("sleep", Arg::Seconds, ""),
    ("check_policy_service", Arg::Server, ""),
    // Client.
    ("permit_mynetworks", Arg::None, ""),
    ("permit_sasl_authenticated", Arg::None, ""),
    ("check_client_access", Arg::Table, ""),
    ("check_reverse_client_hostname_access", Arg::Table, ""),
    ("check_client_a_access", Arg::Table, ""),
    ("check_client_mx_access", Arg::Table, ""),
    ("check_client_ns_access", Arg::Table, ""),
    ("check_reverse_client_hostname_a_access", Arg::Table, ""),
    ("check_reverse_client_hostname_mx_access", Arg::Table, ""),
    ("check_reverse_client_hostname_ns_access", Arg::Table, ""),
    ("check_ccert_access", Arg::Table, ""),
    ("check_sasl_access", Arg::Table, ""),
    ("permit_inet_interfaces", Arg::None, ""),
    ("permit_tls_clientcerts", Arg::None, ""),
    ("permit_tls_all_clientcerts", Arg::None, ""),
    ("reject_plaintext_session", Arg::None, ""),
    ("reject_rbl_client", Arg::DnsList, ""),
    ("permit_dnswl_client", Arg::DnsList, ""),
    ("reject_rhsbl_client", Arg::DnsList, ""),
    ("reject_rhsbl_reverse_client", Arg::DnsList, ""),
    ("permit_rhswl_client", Arg::DnsList, ""),
    ("reject_unknown_client_hostname", Arg::None, ""),
    ("reject_unknown_client", Arg::None, ""),
    ("reject_unknown_reverse_client_hostname", Arg::None, ""),
    ("reject_unknown_forward_client_hostname", Arg::None, "not a restriction of Postfix 3.7 (postconf(5) has no such entry; its smtpd answers every client 451 4.3.5 Server configuration error): use reject_unknown_client_hostname"),
    // HELO.
    ("check_helo_access", Arg::Table, ""),
    ("check_helo_a_access", Arg::Table, ""),
    ("check_helo_mx_access", Arg::Table, ""),
    ("check_helo_ns_access", Arg::Table, ""),
    ("reject_invalid_helo_hostname", Arg::None, ""),
    ("reject_invalid_hostname", Arg::None, ""),
    ("reject_non_fqdn_helo_hostname", Arg::None, ""),
    ("reject_non_fqdn_hostname", Arg::None, ""),
    ("reject_unknown_helo_hostname", Arg::None, ""),
    ("reject_unknown_hostname", Arg::None, ""),
    ("reject_rhsbl_helo", Arg::DnsList, ""),
    // Sender.
    ("check_sender_access", Arg::Table, ""),
    ("check_sender_a_access", Arg::Table, ""),
    ("check_sender_mx_access", Arg::Table, ""),
    ("check_sender_ns_access", Arg::Table, ""),
    ("reject_authenticated_sender_login_mismatch", Arg::None, ""),
    ("reject_known_sender_login_mismatch", Arg::None, ""),
    ("reject_sender_login_mismatch", Arg::None, ""),
    ("reject_unauthenticated_sender_login_mismatch", Arg::None, ""),
    ("reject_non_fqdn_sender", Arg::None, ""),
    ("reject_rhsbl_sender", Arg::DnsList, ""),
    ("reject_unknown_sender_domain", Arg::None, ""),
    ("reject_unlisted_sender", Arg::None, ""),
    ("reject_unverified_sender", Arg::None, ""),
    // Recipient.
    ("check_recipient_access", Arg::Table, ""),
    ("check_recipient_a_access", Arg::Table, ""),
    ("check_recipient_mx_access", Arg::Table, ""),
    ("check_recipient_ns_access", Arg::Table, ""),
    ("permit_auth_destination", Arg::None, ""),
    ("reject_unauth_destination", Arg::None, ""),
    ("defer_unauth_destination", Arg::None, ""),
    ("check_relay_domains", Arg::None, ""),
    ("permit_mx_backup", Arg::None, ""),
    ("reject_non_fqdn_recipient", Arg::None, ""),
    ("reject_rhsbl_recipient", Arg::DnsList, ""),
    ("reject_unknown_recipient_domain", Arg::None, ""),
    ("reject_unlisted_recipient", Arg::None, ""),
    ("check_recipient_maps", Arg::None, ""),
    ("reject_unverified_recipient", Arg::None, ""),
    // DATA, end of data.
    ("reject_multi_recipient_bounce", Arg::None, ""),
    // ETRN.
    ("check_etrn_access", Arg::Table, ""),
];

/// The restriction lists smtpd reads.
pub const LIST_PARAMETERS: &[&str] = &[
    "smtpd_client_restrictions",
    "smtpd_helo_restrictions",
    "smtpd_sender_restrictions",
    "smtpd_relay_restrictions",
    "smtpd_recipient_restrictions",
    "smtpd_data_restrictions",
    "smtpd_end_of_data_restrictions",
    "smtpd_etrn_restrictions",
];

fn lookup(name: &str) -> Option<(Arg, &'static str)> {
    RESTRICTIONS
        .iter()
        .find(|(n, _, _)| *n == name)
        .map(|(_, a, why)| (*a, *why))
}

/// Whether Postern's smtpd carries out restriction `name` (a known one).
pub fn implemented(name: &str) -> bool {
    lookup(name).is_some_and(|(_, why)| why.is_empty())
}

/// The restriction classes of `cfg` (`smtpd_restriction_classes`).
pub fn classes(cfg: &Config) -> Vec<String> {
    cfg.get_list("smtpd_restriction_classes")
}

/// Parses the words of a list. `classes` are the names of
/// `smtpd_restriction_classes`, which may appear as restrictions. Err: the
/// first problem, `NAME: reason`.
pub fn parse_list(words: &[String], classes: &[String]) -> Result<Vec<Item>, String> {
    let mut out = Vec::new();
    let mut it = words.iter();
    while let Some(w) = it.next() {
        let name = w.to_ascii_lowercase();
        if classes.contains(w) {
            out.push(Item {
                name: w.clone(),
                arg: None,
            });
            continue;
        }
        let Some((arg, why)) = lookup(&name) else {
            let hint = if w.contains(':') {
                " (a table must follow a check_*_access restriction)"
            } else {
                ""
            };
            return Err(format!("{w}: unknown restriction{hint}"));
        };
        if !why.is_empty() {
            return Err(format!("{name}: not available in Postern: {why}"));
        }
        let arg = match arg {
            Arg::None => None,
            _ => {
                let Some(a) = it.next() else {
                    return Err(format!("{name}: missing argument ({})", arg_word(arg)));
                };
                let ok = match arg {
                    Arg::Table => crate::match_list::is_table(a),
                    Arg::Seconds => a.parse::<u64>().is_ok(),
                    Arg::Server => match policy_server(a) {
                        Ok(_) => true,
                        Err(e) if a.starts_with('{') => {
                            return Err(format!("{name}: {e}"));
                        }
                        Err(_) => false,
                    },
                    Arg::DnsList => !a.contains(':') && lookup(&a.to_ascii_lowercase()).is_none(),
                    Arg::None => true,
                };
                if !ok {
                    return Err(format!(
                        "{name}: expected {} as its argument, found \"{a}\"",
                        arg_word(arg)
                    ));
                }
                Some(a.clone())
            }
        };
        out.push(Item { name, arg });
    }
    if let Some(last) = out.last() {
        if last.name == "warn_if_reject" {
            return Err("warn_if_reject: no restriction after it".into());
        }
    }
    Ok(out)
}

/// The settings a `check_policy_service { endpoint, name=value, ... }`
/// may override (Postfix 3.7), without their `smtpd_policy_service_`.
pub const POLICY_OVERRIDES: &[&str] = &[
    "timeout",
    "max_idle",
    "max_ttl",
    "request_limit",
    "try_limit",
    "retry_delay",
    "default_action",
    "policy_context",
];

/// A `check_policy_service` argument: `inet:host:port`, `unix:path`, or
/// Postfix 3.7's `{ endpoint, name=value, ... }` (a value with spaces in
/// its own braces: `{ default_action = 451 4.3.5 text }`). Returns the
/// endpoint and the overrides (names of [`POLICY_OVERRIDES`]).
pub fn policy_server(arg: &str) -> Result<(String, Vec<(String, String)>), String> {
    let endpoint_ok = |a: &str| {
        a.strip_prefix("inet:")
            .and_then(|hp| hp.rsplit_once(':'))
            .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok())
            || a.strip_prefix("unix:").is_some_and(|p| !p.is_empty())
    };
    let Some(inner) = arg
        .trim()
        .strip_prefix('{')
        .and_then(|r| r.strip_suffix('}'))
    else {
        return if endpoint_ok(arg) {
            Ok((arg.to_string(), Vec::new()))
        } else {
            Err(format!(
                "\"{arg}\": expected inet:host:port or unix:pathname"
            ))
        };
    };
    let parts = postern_conf::split_braced(inner, true);
    let Some((endpoint, rest)) = parts.split_first() else {
        return Err("{ }: no policy server named".into());
    };
    if !endpoint_ok(endpoint) {
        return Err(format!(
            "\"{endpoint}\": expected inet:host:port or unix:pathname first in {{ }}"
        ));
    }
    let mut overrides = Vec::new();
    for p in rest {
        let p = p
            .strip_prefix('{')
            .and_then(|r| r.strip_suffix('}'))
            .unwrap_or(p);
        let Some((n, v)) = p.split_once('=') else {
            return Err(format!("\"{p}\": expected name=value"));
        };
        let n = n.trim();
        if !POLICY_OVERRIDES.contains(&n) {
            return Err(format!(
                "\"{n}\": unknown policy service setting (expected one of {})",
                POLICY_OVERRIDES.join(", ")
            ));
        }
        overrides.push((n.to_string(), v.trim().to_string()));
    }
    Ok((endpoint.clone(), overrides))
}

fn arg_word(a: Arg) -> &'static str {
    match a {
        Arg::Table => "a type:table",
        Arg::DnsList => "a DNS list domain",
        Arg::Server => "a policy server",
        Arg::Seconds => "a number of seconds",
        Arg::None => "nothing",
    }
}

/// The words of a list value: commas and white space separate, `{...}`
/// groups stay whole.
pub fn words(value: &str) -> Vec<String> {
    postern_conf::split_braced(value, true)
}

/// A restriction class that reaches itself through the classes its list
/// names (it would never end): the first such class.
pub fn class_loop(cfg: &Config) -> Option<String> {
    let classes = classes(cfg);
    let members = |c: &str| -> Vec<String> {
        words(&cfg.get(c))
            .into_iter()
            .filter(|w| classes.contains(w))
            .collect()
    };
    for start in &classes {
        let mut seen: Vec<String> = Vec::new();
        let mut todo = members(start);
        while let Some(c) = todo.pop() {
            if c == *start {
                return Some(start.clone());
            }
            if !seen.contains(&c) {
                todo.extend(members(&c));
                seen.push(c);
            }
        }
    }
    None
}

/// Restrictions smtpd carries out everywhere but after the final dot:
/// the verify service's answer is waited for at a command, and there is
/// none to wait at then.
const NOT_AT_END_OF_DATA: &[&str] = &["reject_unverified_sender", "reject_unverified_recipient"];

/// `smtpd_end_of_data_restrictions` (or a restriction class it names)
/// with a restriction smtpd does not carry out there; refused rather
/// than quietly passed over. Call only when there is no class loop.
pub fn end_of_data_problem(cfg: &Config) -> Option<String> {
    let classes = classes(cfg);
    let mut todo = vec!["smtpd_end_of_data_restrictions".to_string()];
    let mut seen: Vec<String> = Vec::new();
    while let Some(list) = todo.pop() {
        if seen.contains(&list) {
            continue;
        }
        for w in words(&cfg.get(&list)) {
            let name = w.to_ascii_lowercase();
            if NOT_AT_END_OF_DATA.contains(&name.as_str()) {
                return Some(format!(
                    "{name}: not carried out after the final dot (use it in \
                     smtpd_sender_restrictions, smtpd_recipient_restrictions or \
                     smtpd_data_restrictions)"
                ));
            }
            if classes.contains(&w) {
                todo.push(w);
            }
        }
        seen.push(list);
    }
    None
}

/// Every restriction list of `cfg` (its main.cf with any `-o` overrides
/// applied) and of its restriction classes, parsed; Err((parameter,
/// reason)) for each list that fails.
pub fn check_config(cfg: &Config) -> Vec<(String, String)> {
    let classes = classes(cfg);
    let mut out = Vec::new();
    for name in LIST_PARAMETERS
        .iter()
        .map(|s| s.to_string())
        .chain(classes.iter().cloned())
    {
        if let Err(e) = parse_list(&words(&cfg.get(&name)), &classes) {
            out.push((name, e));
        }
    }
    if let Some(c) = class_loop(cfg) {
        out.push((c, "the restriction class refers to itself".into()));
    } else if let Some(e) = end_of_data_problem(cfg) {
        out.push(("smtpd_end_of_data_restrictions".into(), e));
    }
    // Client certificate fingerprints are made with a digest Postern has.
    if cfg.get_bool("smtpd_tls_ask_ccert").unwrap_or(false) {
        if let Err(e) = crate::tls_ccert::digest_of(&cfg.get("smtpd_tls_fingerprint_digest")) {
            out.push(("smtpd_tls_fingerprint_digest".into(), e));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(s: &str) -> Vec<String> {
        words(s)
    }

    #[test]
    fn arguments_are_taken_and_checked() {
        let l = parse_list(
            &w("permit_mynetworks, check_sender_access hash:/etc/a, reject_rbl_client zen.example=127.0.0.2, reject_rhsbl_sender dbl.example, check_sasl_access inline:{ a=OK }, warn_if_reject reject_unknown_client_hostname"),
            &[],
        )
        .unwrap();
        assert_eq!(l.len(), 7);
        assert_eq!(l[1].arg.as_deref(), Some("hash:/etc/a"));
        assert_eq!(l[4].arg.as_deref(), Some("inline:{ a=OK }"));
        assert!(parse_list(&w("check_sender_access"), &[])
            .unwrap_err()
            .contains("missing argument"));
        assert!(parse_list(&w("check_sender_access permit"), &[])
            .unwrap_err()
            .contains("expected a type:table"));
        assert!(parse_list(&w("reject_rbl_client reject"), &[]).is_err());
        assert_eq!(
            parse_list(&w("permit_mynetworks reject_bogus"), &[]).unwrap_err(),
            "reject_bogus: unknown restriction"
        );
        // Carried out by smtpd with the verify(8) service, but not after
        // the final dot.
        let cfg = |text: &str| Config::from_main_cf_text(text).unwrap();
        assert!(end_of_data_problem(&cfg(
            "smtpd_end_of_data_restrictions = reject_unverified_sender\n"
        ))
        .unwrap()
        .contains("not carried out after the final dot"));
        assert!(end_of_data_problem(&cfg(
            "smtpd_restriction_classes = c\nc = reject_unverified_recipient\n\
             smtpd_end_of_data_restrictions = c\n"
        ))
        .is_some());
        assert!(end_of_data_problem(&cfg(
            "smtpd_sender_restrictions = reject_unverified_sender\n"
        ))
        .is_none());
        assert!(parse_list(
            &w("reject_unverified_recipient reject_unverified_sender"),
            &[]
        )
        .is_ok());
        assert_eq!(
            parse_list(&w("check_policy_service unix:private/policy"), &[]).unwrap()[0]
                .arg
                .as_deref(),
            Some("unix:private/policy")
        );
        assert!(parse_list(&w("check_policy_service inet:127.0.0.1:10023"), &[]).is_ok());
        // Postfix 3.7's `{ endpoint, name=value }` form.
        assert!(parse_list(
            &w("check_policy_service { inet:127.0.0.1:1, timeout=10s, { default_action = 451 4.3.5 x } }"),
            &[]
        )
        .is_ok());
        assert_eq!(
            policy_server("{ inet:127.0.0.1:1, timeout=10s, { default_action = DEFER no } }")
                .unwrap(),
            (
                "inet:127.0.0.1:1".to_string(),
                vec![
                    ("timeout".to_string(), "10s".to_string()),
                    ("default_action".to_string(), "DEFER no".to_string())
                ]
            )
        );
        assert!(parse_list(
            &w("check_policy_service { inet:127.0.0.1:1, bogus=1 }"),
            &[]
        )
        .unwrap_err()
        .contains("unknown policy service setting"));
        assert!(parse_list(&w("check_policy_service private/policy"), &[]).is_err());
        let c = vec!["internal_only".to_string()];
        assert_eq!(
            parse_list(&w("internal_only"), &c).unwrap()[0].name,
            "internal_only"
        );
    }

    #[test]
    fn postconf_restrictions_postern_now_carries_out() {
        let l = parse_list(
            &w(
                "sleep 1, defer_if_permit, defer_if_reject, permit_inet_interfaces, \
                check_client_mx_access hash:/a, check_reverse_client_hostname_ns_access hash:/b, \
                check_ccert_access hash:/c, permit_tls_clientcerts, permit_mx_backup, \
                reject_multi_recipient_bounce, reject_plaintext_session, check_relay_domains",
            ),
            &[],
        )
        .unwrap();
        assert_eq!(l[0].arg.as_deref(), Some("1"));
        assert_eq!(l.len(), 12);
        assert!(parse_list(&w("sleep soon"), &[])
            .unwrap_err()
            .contains("a number of seconds"));
        // Not a restriction of Postfix 3.7 (its smtpd answers 451 4.3.5).
        assert!(
            parse_list(&w("reject_unknown_forward_client_hostname"), &[])
                .unwrap_err()
                .contains("not a restriction of Postfix 3.7")
        );
    }

    #[test]
    fn a_fingerprint_digest_postern_lacks_fails_the_check() {
        let cfg = |digest: &str| {
            Config::from_text(
                std::path::Path::new("/nonexistent"),
                &format!("smtpd_tls_ask_ccert = yes\nsmtpd_tls_fingerprint_digest = {digest}\n"),
                std::path::Path::new("main.cf"),
            )
            .unwrap()
        };
        assert!(check_config(&cfg("sha256")).is_empty());
        let errs = check_config(&cfg("md5"));
        assert_eq!(errs[0].0, "smtpd_tls_fingerprint_digest");
    }

    #[test]
    fn every_list_and_class_of_a_configuration() {
        let cfg = Config::from_text(
            std::path::Path::new("/nonexistent"),
            "smtpd_restriction_classes = strict\nstrict = reject_bogus\n\
             smtpd_helo_restrictions = check_helo_access\n\
             smtpd_recipient_restrictions = strict, reject_unauth_destination\n",
            std::path::Path::new("main.cf"),
        )
        .unwrap();
        let errs = check_config(&cfg);
        assert_eq!(
            errs,
            vec![
                (
                    "smtpd_helo_restrictions".to_string(),
                    "check_helo_access: missing argument (a type:table)".to_string()
                ),
                (
                    "strict".to_string(),
                    "reject_bogus: unknown restriction".to_string()
                ),
            ]
        );
    }
}
