//! `receive_override_options`, as Postfix's input_transp: what smtpd and
//! pickup leave out for mail that has already had it (typically mail
//! coming back from an after-queue content filter, FILTER_README).
//!
//! `no_unknown_recipient_checks` is smtpd's own (no `reject_unlisted_
//! recipient`); `no_address_mappings` and `no_header_body_checks` become
//! [`cleanup_flags`] bits sent to cleanup with the envelope; so does
//! `no_milters` (cleanup's content milters), which also keeps smtpd from
//! asking `smtpd_milters` at the SMTP stages.

use crate::ipc::cleanup_flags;

/// The parsed parameter.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReceiveOverride {
    /// `no_unknown_recipient_checks`.
    pub no_unknown_recipient_checks: bool,
    /// The [`cleanup_flags`] bits for cleanup.
    pub cleanup_flags: u32,
}

impl ReceiveOverride {
    /// Parses the parameter's words (comma or space separated); an
    /// unknown word is an error naming it.
    pub fn parse(value: &str) -> Result<ReceiveOverride, String> {
        let mut r = ReceiveOverride::default();
        for w in value
            .split([',', ' ', '\t', '\n'])
            .map(str::trim)
            .filter(|w| !w.is_empty())
        {
            match w.to_ascii_lowercase().as_str() {
                "no_unknown_recipient_checks" => r.no_unknown_recipient_checks = true,
                "no_address_mappings" => r.cleanup_flags |= cleanup_flags::NO_ADDRESS_MAPPINGS,
                "no_header_body_checks" => r.cleanup_flags |= cleanup_flags::NO_HEADER_BODY_CHECKS,
                "no_milters" => r.cleanup_flags |= cleanup_flags::NO_MILTERS,
                other => {
                    return Err(format!(
                        "receive_override_options: unknown option \"{other}\""
                    ))
                }
            }
        }
        Ok(r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words() {
        let r = ReceiveOverride::parse(
            "no_unknown_recipient_checks,no_header_body_checks, no_milters no_address_mappings",
        )
        .unwrap();
        assert!(r.no_unknown_recipient_checks);
        assert_eq!(
            r.cleanup_flags,
            cleanup_flags::NO_HEADER_BODY_CHECKS
                | cleanup_flags::NO_ADDRESS_MAPPINGS
                | cleanup_flags::NO_MILTERS
        );
        assert_eq!(
            ReceiveOverride::parse("").unwrap(),
            ReceiveOverride::default()
        );
        assert!(ReceiveOverride::parse("no_such").is_err());
    }
}
