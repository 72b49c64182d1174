//! `defer_if_permit` and `defer_if_reject` (and the access(5) actions
//! `DEFER_IF_PERMIT` / `DEFER_IF_REJECT`): flags a restriction raises
//! that change the outcome of a check later, as Postfix's smtpd_check.c.
//!
//! - defer_if_permit: when the check ends without a reject (the lists
//!   accept, or have no opinion), the client gets this 450 instead. Raised
//!   by the client, HELO and sender lists it holds for the recipient check
//!   (`smtpd_delay_reject = yes`); the DATA and end-of-data checks start
//!   without it.
//! - defer_if_reject: a later 5xx reject within the same stage's lists is
//!   answered with this 450 instead (the reject might not have happened
//!   without the earlier temporary trouble).
//!
//! Once both are raised a list stops, as Postfix's: nothing can change the
//! outcome any more. With `smtpd_delay_reject = no` the session keeps the
//! flags its connect, HELO and MAIL checks raised ([`Defers`] in the
//! session), and the recipient check starts from its defer_if_permit.

use super::{Request, Restrictions, Stage, Verdict};
use std::cell::RefCell;

/// The raised flags, each with the reply it stands for (the first one
/// raised wins).
#[derive(Debug, Default)]
pub struct Defers {
    if_permit: RefCell<Option<String>>,
    if_reject: RefCell<Option<String>>,
}

impl Defers {
    /// A new stage: defer_if_reject does not carry over.
    pub(super) fn new_stage(&self) {
        self.if_reject.replace(None);
    }

    fn raise(slot: &RefCell<Option<String>>, reply: String) {
        let mut s = slot.borrow_mut();
        if s.is_none() {
            *s = Some(reply);
        }
    }

    /// defer_if_permit raised earlier in the session (the client, HELO
    /// and sender lists with `smtpd_delay_reject = no`), for the
    /// recipient check.
    pub(super) fn carry_permit_from(&self, earlier: &Defers) {
        if let Some(r) = earlier.if_permit.borrow().clone() {
            Defers::raise(&self.if_permit, r);
        }
    }

    /// Raises defer_if_permit with `reply` (a check's tempfail action).
    pub(super) fn raise_permit(&self, reply: String) {
        Defers::raise(&self.if_permit, reply);
    }

    /// defer_if_permit's reply, if raised.
    pub fn permit_reply(&self) -> Option<String> {
        self.if_permit.borrow().clone()
    }

    /// Puts defer_if_permit back as an earlier stage left it (Postfix:
    /// HELO starts from what the client list raised, MAIL from what the
    /// client and HELO lists raised).
    pub fn set_permit(&self, reply: Option<String>) {
        self.if_permit.replace(reply);
    }

    pub(super) fn both_raised(&self) -> bool {
        self.if_permit.borrow().is_some() && self.if_reject.borrow().is_some()
    }

    /// A reject of the stage's lists, after defer_if_reject: its 450.
    pub(super) fn soften(&self, v: Verdict) -> Verdict {
        match v {
            Verdict::Reject(r) if r.starts_with('5') => match self.if_reject.borrow_mut().take() {
                Some(d) => Verdict::Reject(d),
                None => Verdict::Reject(r),
            },
            v => v,
        }
    }

    /// The end of a check: its outcome, or defer_if_permit's 450 when the
    /// check did not reject.
    pub(super) fn finish(&self, outcome: Option<String>) -> Option<String> {
        outcome.or_else(|| self.if_permit.borrow().clone())
    }
}

impl Restrictions {
    /// `defer_if_permit` / `defer_if_reject` in a list, or the access(5)
    /// actions of the same names (`code`, `dsn`, `text`); Dunno.
    pub(super) fn raise_defer(
        name: &str,
        stage: Stage,
        req: &Request<'_>,
        code: &str,
        dsn: &str,
        text: &str,
    ) -> Verdict {
        let Some(d) = req.defers else {
            return Verdict::Dunno;
        };
        let Verdict::Reject(reply) = Self::reject(stage, req, code, dsn, text) else {
            return Verdict::Dunno;
        };
        if name.eq_ignore_ascii_case("defer_if_permit") {
            Defers::raise(&d.if_permit, reply);
        } else {
            Defers::raise(&d.if_reject, reply);
        }
        Verdict::Dunno
    }
}
