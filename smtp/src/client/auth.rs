//! SASL AUTH (PLAIN or LOGIN) with the credentials for the server.

use super::session::Session;
use super::{End, Extensions};
use crate::nexthop::{temporary_dsn, Failure};
use postern_common::warning;

impl Session<'_, '_> {
    /// AUTH with the first allowed mechanism the server offers.
    pub(super) fn authenticate(
        &mut self,
        auth: &crate::sasl::Auth,
        ext: &Extensions,
    ) -> Result<(), End> {
        use crate::sasl::{plain_response, Mechanism};
        use postern_common::base64;
        let Some(mech) = auth.choose(&ext.auth, self.encrypted) else {
            let f = Failure {
                dsn: "4.7.0".into(),
                reason: format!(
                    "SASL authentication failed; cannot authenticate to server {}: no mechanism available",
                    self.peer.namaddr
                ),
            };
            warning!("{}", f.reason);
            self.quit();
            return Err(self.try_next(f));
        };
        let stage = "performing the AUTH handshake";
        let step = |s: &mut Self, cmd: String| {
            s.command(Some(&cmd))
                .map_err(|e| s.try_next(s.io_failure(&e, stage)))
        };
        let r = match mech {
            Mechanism::Plain => step(self, format!("AUTH PLAIN {}", plain_response(&auth.creds)))?,
            Mechanism::Login => {
                let mut r = step(self, "AUTH LOGIN".into())?;
                if r.code == 334 {
                    r = step(self, base64::encode(auth.creds.user.as_bytes()))?;
                }
                if r.code == 334 {
                    r = step(self, base64::encode(auth.creds.pass.as_bytes()))?;
                }
                r
            }
        };
        if r.class() == 2 {
            return Ok(());
        }
        // As Postfix with smtp_sasl_auth_soft_bounce = yes: never a bounce.
        let f = Failure {
            dsn: temporary_dsn(r.dsn()),
            reason: format!(
                "SASL authentication failed; server {} said: {}",
                self.peer.namaddr,
                r.text()
            ),
        };
        warning!("{}", f.reason);
        if r.code != 421 {
            self.quit();
        }
        Err(self.try_next(f))
    }
}
