//! smtpd's milters (`smtpd_milters`) at the SMTP stages: connect, HELO,
//! MAIL FROM, RCPT TO and DATA. Postfix's split: smtpd asks the milters
//! about the dialogue; cleanup, on a connection of its own, about the
//! content (headers, body, end of message) and carries out their
//! modifications (cleanup/src/milter.rs). The protocol is
//! [`postern_common::milter`].
//!
//! The session's milter connections ([`Link`]) are used from a helper
//! thread per question, never from the event loop: the session asks for
//! a [`crate::dns::Query::Milter`] and waits for its answer (taking no
//! input) as it waits for a DNS answer; the command then runs again with
//! the milters' [`Outcome`].

use postern_common::milter::{Chain, Outcome, Scope};
use std::sync::{Arc, Mutex};

/// One question to the session's milters: the stage and the macro
/// values known when it was asked.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Ask {
    pub stage: Stage,
    pub macros: Vec<(String, String)>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Stage {
    /// The client's name, address and port.
    Connect(String, Option<(std::net::IpAddr, u16)>),
    Helo(String),
    /// Sender and ESMTP parameters.
    Mail(String, Vec<String>),
    Rcpt(String, Vec<String>),
    /// A recipient smtpd refused, with its parameters and smtpd's reply:
    /// shown only to the milters that asked for it (SMFIP_RCPT_REJ);
    /// their answer does not change the refusal.
    RcptRejected(String, Vec<String>, String),
    Data,
    /// An unknown command line.
    Unknown(String),
}

/// A session's milter connections: opened at the first question, shared
/// with the helper thread that asks.
#[derive(Clone)]
pub struct Link {
    settings: Arc<postern_common::milter::Settings>,
    chain: Arc<Mutex<Option<Chain>>>,
    /// A message was started (MAIL sent): ABORT before the next MAIL.
    in_message: Arc<Mutex<bool>>,
}

impl Link {
    pub fn new(settings: Arc<postern_common::milter::Settings>) -> Link {
        Link {
            settings,
            chain: Arc::new(Mutex::new(None)),
            in_message: Arc::new(Mutex::new(false)),
        }
    }

    /// Asks every milter (blocking: a helper thread's work).
    pub fn ask(&self, ask: &Ask) -> Outcome {
        let Ok(mut guard) = self.chain.lock() else {
            return Outcome::Tempfail(postern_common::milter::TEMPFAIL_TEXT.into());
        };
        let chain = guard.get_or_insert_with(|| Chain::open((*self.settings).clone()));
        let sets = chain.settings.macros.clone();
        let macros = ask.macros.clone();
        let value = move |name: &str| {
            macros
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, v)| v.clone())
        };
        match &ask.stage {
            Stage::Connect(name, addr) => {
                chain.stage(Scope::Session, |m| m.connect(name, *addr, &sets, &value))
            }
            Stage::Helo(name) => chain.stage(Scope::Session, |m| m.helo(name, &sets, &value)),
            Stage::Mail(sender, params) => {
                let mut started = self.in_message.lock().unwrap_or_else(|e| e.into_inner());
                if *started {
                    chain.abort();
                }
                *started = true;
                chain.stage(Scope::Message, |m| m.mail(sender, params, &sets, &value))
            }
            Stage::Rcpt(rcpt, params) => {
                chain.stage(Scope::Message, |m| m.rcpt(rcpt, params, &sets, &value))
            }
            Stage::RcptRejected(rcpt, params, _) => chain.stage(Scope::Message, |m| {
                if m.wants_rejected_recipients() {
                    m.rcpt(rcpt, params, &sets, &value)
                } else {
                    Ok(postern_common::milter::Reply::Continue)
                }
            }),
            Stage::Data => chain.stage(Scope::Message, |m| m.data(&sets, &value)),
            Stage::Unknown(line) => chain.stage(Scope::Session, |m| m.unknown(line, &sets, &value)),
        }
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        // The last holder (the session) ends the milter sessions.
        if Arc::strong_count(&self.chain) == 1 {
            if let Some(chain) = self.chain.lock().ok().and_then(|mut g| g.take()) {
                chain.quit();
            }
        }
    }
}
