//! MTA-STS (RFC 8461) in the client: which deliveries ask for a policy,
//! what an `enforce` or `testing` policy makes of each MX host, and how a
//! session's TLS outcome is told to TLS-RPT (RFC 8460).
//!
//! The policy itself (TXT record, HTTPS fetch, cache shared by every smtp
//! process under `data_directory/mta-sts`) is `postern_common::mta_sts`;
//! here is only what the delivery agent does with it:
//! - a delivery by MX lookup (a next hop `domain` or `domain:port`, never
//!   `[host]`, an IP address or LMTP) with no `smtp_tls_policy_maps`
//!   entry of its own and a level below `verify` asks for the policy of
//!   the next-hop domain (as postfix-mta-sts-resolver answers Postfix's
//!   policy lookup for the next hop); at level `dane` a server with
//!   usable TLSA records keeps DANE, which wins (RFC 8461 section 2);
//! - `enforce`: an MX host the policy does not list gets nothing ("MX
//!   host ... does not match the MTA-STS policy of ..."); a listed one
//!   gets level `secure` with its own name to match (Postfix's `secure
//!   match=MX-NAME`) and the WebPKI roots (system bundle and
//!   `smtp_tls_CAfile`/`smtp_tls_CApath`), so a failure defers and never
//!   falls back to clear text;
//! - `testing`: delivery as the level says, the certificate checked the
//!   same way only to log and report what `enforce` would have refused;
//! - `none` (or no policy): nothing changes.
//!
//! Each TLS attempt under a policy (and each policy that could not be
//! fetched), and each DANE session ([`dane_attempt`]), is one line in the
//! TLS-RPT store when `smtp_tls_report_enable` is on.

use crate::deliver::Plan;
use crate::nexthop::{Failure, Server};
use crate::tls::{self, Observed, Trust};
use postern_common::dns::BlockingResolver;
use postern_common::mta_sts::{self, Mode, Policy};
use postern_common::time::now_secs;
use postern_common::tls_rpt::{Attempt, Store};
use postern_common::{info, warning};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The policies of this process and where their results go.
pub struct StsClient {
    policies: mta_sts::Sts,
    dns_servers: Vec<SocketAddr>,
    dns_timeout: Duration,
    /// Started on first use, shared by the delivery threads.
    dns: Mutex<Option<Arc<BlockingResolver>>>,
    /// `smtp_tls_report_enable`: the TLS-RPT store.
    report: Option<Store>,
}

/// The RFC 8460 result type of an MX host an `enforce` policy does not
/// list (RFC 8460 section 4.3.2.1's general failure).
pub const VALIDATION_FAILURE: &str = "validation-failure";

impl StsClient {
    /// `smtp_mta_sts_enable` (None when off); policies cached under
    /// `data_directory/mta-sts`, fetched trusting the WebPKI roots.
    pub fn from_config(cfg: &postern_conf::Config, lmtp: bool) -> Option<StsClient> {
        if lmtp || !cfg.get_bool("smtp_mta_sts_enable").unwrap_or(true) {
            return None;
        }
        let data = PathBuf::from(cfg.get("data_directory"));
        let roots = postern_common::https::web_roots(
            &cfg.get("smtp_tls_CAfile"),
            &cfg.get("smtp_tls_CApath"),
        );
        let report = report_store(cfg);
        Some(StsClient {
            policies: mta_sts::Sts::new(Some(data.join("mta-sts")), roots),
            dns_servers: postern_common::dns::servers_from_config(cfg),
            dns_timeout: Duration::from_secs(cfg.get_time("dns_resolver_timeout").unwrap_or(5)),
            dns: Mutex::new(None),
            report,
        })
    }

    fn resolver(&self) -> Result<Arc<BlockingResolver>, String> {
        let mut r = self.dns.lock().map_err(|_| "resolver lock poisoned")?;
        if r.is_none() {
            *r = Some(Arc::new(BlockingResolver::new(
                &self.dns_servers,
                self.dns_timeout,
            )?));
        }
        Ok(r.as_ref().expect("just set").clone())
    }

    /// The `enforce` or `testing` policy of `domain`, if it has one. A
    /// policy that could not be fetched is reported to TLS-RPT.
    pub fn policy(&self, domain: &str) -> Option<Arc<Policy>> {
        let dns = match self.resolver() {
            Ok(r) => r,
            Err(e) => {
                warning!("MTA-STS: {e}");
                return None;
            }
        };
        let found = self.policies.lookup(domain, &*dns, now_secs());
        if let Some((kind, why)) = &found.failure {
            self.record(&Attempt {
                domain: domain.to_ascii_lowercase(),
                policy_type: "sts".into(),
                policy_string: Vec::new(),
                mx_host: Vec::new(),
                result: Some(kind.to_string()),
                receiving_mx_hostname: String::new(),
                receiving_ip: String::new(),
                reason: why.clone(),
            });
        }
        found.policy.filter(|p| p.mode != Mode::None).map(Arc::new)
    }

    /// The TLS of `srv` under `policy` (see the module doc); `base` is
    /// what the level alone would give it. An MX host an `enforce`
    /// policy does not list is a failure (and a TLS-RPT one).
    pub fn plan(
        &self,
        queue_id: &str,
        policy: &Arc<Policy>,
        srv: &Server,
        base: Plan,
    ) -> Result<Plan, Failure> {
        let name = srv.name.trim_end_matches('.').to_ascii_lowercase();
        if !policy.lists(&name) {
            self.record(&attempt(
                policy,
                srv,
                Some(VALIDATION_FAILURE),
                "mx-not-in-policy",
            ));
            let why = format!(
                "MX host {name} does not match the MTA-STS policy of {}",
                policy.domain
            );
            if policy.mode == Mode::Enforce {
                return Err(Failure {
                    dsn: "4.7.5".into(),
                    reason: why,
                });
            }
            info!("{queue_id}: {why} (testing mode: delivering anyway)");
        }
        let level = if policy.mode == Mode::Enforce {
            tls::Level::Secure
        } else {
            base.policy.level
        };
        Ok(Plan {
            policy: tls::Policy {
                level,
                matches: vec![name],
            },
            dane: None,
            sts: Some(policy.clone()),
        })
    }

    /// What the session with `srv` under `policy` found of its TLS
    /// (`observed`; None: no TLS was tried, nothing to tell): logged in
    /// `testing` mode when `enforce` would have refused it, and reported.
    pub fn outcome(
        &self,
        queue_id: &str,
        policy: &Policy,
        srv: &Server,
        observed: Option<Observed>,
    ) {
        let Some(o) = observed else { return };
        let (result, detail) = match result_type(&o) {
            None => (None, String::new()),
            Some((r, d)) => (Some(r), d),
        };
        if let (Some(r), Mode::Testing) = (result, policy.mode) {
            info!(
                "{queue_id}: MTA-STS policy of {} (testing mode): {} would fail: {r}: {detail}",
                policy.domain,
                srv.relay()
            );
        }
        self.record(&attempt(policy, srv, result, &detail));
    }

    fn record(&self, a: &Attempt) {
        record(self.report.as_ref(), a);
    }
}

/// The TLS-RPT store when `smtp_tls_report_enable` is on.
pub fn report_store(cfg: &postern_conf::Config) -> Option<Store> {
    cfg.get_bool("smtp_tls_report_enable")
        .unwrap_or(false)
        .then(|| Store {
            dir: PathBuf::from(cfg.get("data_directory")).join("tls-rpt"),
        })
}

/// Appends `a` to the TLS-RPT store, if there is one.
pub fn record(store: Option<&Store>, a: &Attempt) {
    let Some(store) = store else { return };
    if let Err(e) = store.record(a, now_secs()) {
        warning!(
            "TLS-RPT: cannot record a result under {}: {e}",
            store.dir.display()
        );
    }
}

/// The TLS-RPT attempt of a DANE session with `srv` of `domain` under
/// `records` (policy type `tlsa`, the records as the policy string);
/// None when no TLS was tried.
pub fn dane_attempt(
    domain: &str,
    records: &[postern_common::dane::Tlsa],
    srv: &Server,
    observed: Option<Observed>,
) -> Option<Attempt> {
    let o = observed?;
    let (result, reason) = match result_type(&o) {
        None => (None, String::new()),
        Some((r, d)) => (Some(r.to_string()), d),
    };
    Some(Attempt {
        domain: domain.trim_end_matches('.').to_ascii_lowercase(),
        policy_type: "tlsa".into(),
        policy_string: records.iter().map(|t| t.text()).collect(),
        mx_host: Vec::new(),
        result,
        receiving_mx_hostname: srv.name.trim_end_matches('.').to_ascii_lowercase(),
        receiving_ip: srv.addr.to_string(),
        reason,
    })
}

fn attempt(policy: &Policy, srv: &Server, result: Option<&str>, reason: &str) -> Attempt {
    Attempt {
        domain: policy.domain.clone(),
        policy_type: "sts".into(),
        policy_string: policy.lines(),
        mx_host: policy.mx.clone(),
        result: result.map(str::to_string),
        receiving_mx_hostname: srv.name.trim_end_matches('.').to_ascii_lowercase(),
        receiving_ip: srv.addr.to_string(),
        reason: if result.is_some() {
            reason.to_string()
        } else {
            String::new()
        },
    }
}

/// The RFC 8460 result type (and a short detail) of a session's TLS;
/// None: success, a certificate verified for the MX host name.
pub fn result_type(o: &Observed) -> Option<(&'static str, String)> {
    match o {
        Observed::NoStarttls => Some(("starttls-not-supported", "no STARTTLS".into())),
        Observed::HandshakeFailed(why) => Some(("validation-failure", why.clone())),
        Observed::Established(Trust::Verified) => None,
        Observed::Established(Trust::Trusted) => Some((
            "certificate-host-mismatch",
            "certificate does not match the MX host name".into(),
        )),
        Observed::Established(Trust::Untrusted(why)) if why.contains("expired") => {
            Some(("certificate-expired", why.clone()))
        }
        Observed::Established(Trust::Untrusted(why)) => {
            Some(("certificate-not-trusted", why.clone()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn results() {
        assert_eq!(result_type(&Observed::Established(Trust::Verified)), None);
        assert_eq!(
            result_type(&Observed::Established(Trust::Untrusted(
                "untrusted issuer".into()
            )))
            .map(|r| r.0),
            Some("certificate-not-trusted")
        );
        assert_eq!(
            result_type(&Observed::NoStarttls).map(|r| r.0),
            Some("starttls-not-supported")
        );
        assert_eq!(
            result_type(&Observed::Established(Trust::Trusted)).map(|r| r.0),
            Some("certificate-host-mismatch")
        );
    }
}
