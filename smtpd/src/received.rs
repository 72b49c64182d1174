//! The `Received:` header smtpd puts on top of every message, in Postfix's
//! layout:
//!
//! ```text
//! Received: from HELO (NAME [ADDR])
//!     by MYHOSTNAME (MAIL_NAME) with ESMTP id QUEUEID
//!     for <rcpt@example>; Sun, 22 Nov 2026 14:11:42 +0000 (UTC)
//! ```
//!
//! Continuation lines start with a tab. The `for` clause only when the
//! message has exactly one recipient (naming several would disclose Bcc
//! recipients); with several, the date goes on its own line after a `;`.

use std::net::IpAddr;

/// What the header says.
pub struct Received<'a> {
    /// The HELO/EHLO name; the client name when the client sent none.
    pub helo: Option<&'a str>,
    pub client_name: &'a str,
    pub client_addr: IpAddr,
    pub myhostname: &'a str,
    pub mail_name: &'a str,
    /// "SMTP" or "ESMTP".
    pub protocol: &'a str,
    pub queue_id: &'a str,
    /// The recipients, for the `for` clause.
    pub recipients: &'a [&'a str],
    /// RFC 5322 date of arrival.
    pub date: &'a str,
    /// `TLSv1.3 with cipher ... (256/256 bits)` when the session is
    /// encrypted and `smtpd_tls_received_header` is on.
    pub tls: Option<&'a str>,
    /// What Postfix puts on the next line for TLS 1.3: `key-exchange
    /// X25519 server-signature RSA-PSS (2048 bits) server-digest SHA256`.
    pub tls_details: &'a str,
    /// The SASL login, when `smtpd_sasl_authenticated_header` is on.
    pub auth_sender: Option<&'a str>,
}

/// The address as a header shows it: `[1.2.3.4]`'s inside, or `IPv6:...`.
pub fn rfc_addr(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(a) => a.to_string(),
        IpAddr::V6(a) => format!("IPv6:{a}"),
    }
}

impl Received<'_> {
    /// The header lines, LF-terminated, as stored in the queue file.
    pub fn render(&self) -> String {
        let mut s = format!(
            "Received: from {} ({} [{}])\n",
            self.helo.unwrap_or(self.client_name),
            self.client_name,
            rfc_addr(self.client_addr),
        );
        if let Some(t) = self.tls {
            if self.tls_details.is_empty() {
                s.push_str(&format!("\t(using {t})\n"));
            } else {
                s.push_str(&format!("\t(using {t}\n\t {})\n", self.tls_details));
            }
            s.push_str("\t(No client certificate requested)\n");
        }
        if let Some(a) = self.auth_sender {
            s.push_str(&format!("\t(Authenticated sender: {a})\n"));
        }
        s.push_str(&format!(
            "\tby {} ({}) with {}",
            self.myhostname, self.mail_name, self.protocol
        ));
        // No queue file (a before-queue filter gets the message): no id,
        // as Postfix.
        if !self.queue_id.is_empty() {
            s.push_str(&format!(" id {}", self.queue_id));
        }
        if let [one] = self.recipients {
            s.push_str(&format!(
                "\n\tfor <{}>; {}\n",
                postern_common::addr::quote_address(one),
                self.date
            ));
        } else {
            s.push_str(&format!(";\n\t{}\n", self.date));
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hdr(rcpts: &[&str], helo: Option<&str>, ip: &str) -> String {
        Received {
            helo,
            client_name: "localhost",
            client_addr: ip.parse().unwrap(),
            myhostname: "mx.example",
            mail_name: "Postern",
            protocol: "ESMTP",
            queue_id: "4ABCDEF",
            recipients: rcpts,
            date: "Sun, 22 Nov 2026 14:11:42 +0000 (UTC)",
            tls: None,
            tls_details: "",
            auth_sender: None,
        }
        .render()
    }

    #[test]
    fn tls_and_auth() {
        let h = Received {
            helo: Some("c"),
            client_name: "localhost",
            client_addr: "127.0.0.1".parse().unwrap(),
            myhostname: "mx.example",
            mail_name: "Postern",
            protocol: "ESMTPSA",
            queue_id: "Q",
            recipients: &["u@x"],
            date: "D",
            tls: Some("TLSv1.3 with cipher TLS_AES_256_GCM_SHA384 (256/256 bits)"),
            tls_details:
                "key-exchange X25519 server-signature RSA-PSS (2048 bits) server-digest SHA256",
            auth_sender: Some("alice@example.test"),
        }
        .render();
        assert_eq!(
            h,
            "Received: from c (localhost [127.0.0.1])\n\
             \t(using TLSv1.3 with cipher TLS_AES_256_GCM_SHA384 (256/256 bits)\n\
             \t key-exchange X25519 server-signature RSA-PSS (2048 bits) server-digest SHA256)\n\
             \t(No client certificate requested)\n\
             \t(Authenticated sender: alice@example.test)\n\
             \tby mx.example (Postern) with ESMTPSA id Q\n\
             \tfor <u@x>; D\n"
        );
    }

    #[test]
    fn layout() {
        assert_eq!(
            hdr(&["u@example.test"], Some("client.example"), "127.0.0.1"),
            "Received: from client.example (localhost [127.0.0.1])\n\
             \tby mx.example (Postern) with ESMTP id 4ABCDEF\n\
             \tfor <u@example.test>; Sun, 22 Nov 2026 14:11:42 +0000 (UTC)\n"
        );
        assert_eq!(
            hdr(&["a@x", "b@x"], None, "::1"),
            "Received: from localhost (localhost [IPv6:::1])\n\
             \tby mx.example (Postern) with ESMTP id 4ABCDEF;\n\
             \tSun, 22 Nov 2026 14:11:42 +0000 (UTC)\n"
        );
    }
}
