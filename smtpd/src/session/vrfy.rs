//! VRFY: the recipient restrictions applied to an address, without a
//! transaction.

use super::{Done, Session};
use postern_common::smtp_command::{self as protocol, Token};

impl Session {
    pub(super) fn vrfy(&mut self, args: &[Token]) -> Done {
        if self.cfg.disable_vrfy {
            return self.fail("502 5.5.1 VRFY command is disabled");
        }
        if args.len() < 2 {
            return self.fail("501 5.5.4 Syntax: VRFY address");
        }
        // RFC 6531: `VRFY address SMTPUTF8`.
        let (args, smtputf8) = match args.split_last() {
            Some((last, rest))
                if rest.len() > 1 && self.smtputf8_requested(std::slice::from_ref(last)) =>
            {
                (rest, true)
            }
            _ => (args, false),
        };
        let words: Vec<&str> = args[1..].iter().map(|t| t.text.as_str()).collect();
        let given = words.join(" ");
        let address = match protocol::extract_address(&given) {
            Ok(a)
                if !a.is_empty()
                    && !args.iter().any(|t| t.unterminated)
                    && self.utf8_syntax_ok(&args[1], &a, smtputf8) =>
            {
                a
            }
            _ => return self.fail("501 5.1.3 Bad recipient address syntax"),
        };
        let refused = self.check_recipient(&address);
        let verb = postern_common::smtp_command::Verb::Vrfy;
        if self.await_verify(verb) || self.await_sleep(Some(verb)) {
            return Done::Pending;
        }
        if let Some(reply) = refused {
            let sender = self.tx.as_ref().map(|t| t.sender.clone());
            return self.reject(&reply, sender.as_deref(), Some(&address));
        }
        self.reply(&format!("252 2.0.0 {given}"));
        Done::Ok
    }
}
