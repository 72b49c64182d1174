//! The one table of every parameter Postern knows, with its default.
//!
//! Names and defaults are Postfix's wherever the meaning is the same; the
//! few Postern-only parameters are marked in their comment. A default may
//! refer to other parameters with `$name`; it is expanded when read.
//! Defaults that depend on the machine (`myhostname`, `mynetworks`, ...)
//! are computed in [`crate::Config`] and are written here as `""`.

/// (name, default). Keep sorted by area, not alphabetically: related
/// parameters sit together so that a reader sees them side by side.
pub const PARAMS: &[(&str, &str)] = &[
    // Identity.
    ("mail_name", "Postern"),
    ("mail_version", env!("CARGO_PKG_VERSION")),
    ("myhostname", ""),
    ("mydomain", ""),
    ("myorigin", "$myhostname"),
    (
        "mydestination",
        "$myhostname, localhost.$mydomain, localhost",
    ),
    ("mynetworks", ""),
    (
        "mynetworks_style",
        "${{$compatibility_level} <level {2} ? {subnet} : {host}}",
    ),
    (
        "relay_domains",
        "${{$compatibility_level} <level {2} ? {$mydestination} : {}}",
    ),
    ("inet_interfaces", "all"),
    ("inet_protocols", "all"),
    (
        "append_dot_mydomain",
        "${{$compatibility_level} <level {1} ? {yes} : {no}}",
    ),
    // The defaults above (and smtputf8_enable) change with it as in
    // Postfix 3.7. Postern-only default: Postfix 3.7's is 0, with which
    // Postfix uses the pre-2.x defaults and logs a warning each time;
    // Postern's defaults are those of level 3.6 unless main.cf asks for
    // an older level.
    ("compatibility_level", "3.6"),
    // Where things are.
    ("config_directory", "/etc/postern"),
    ("queue_directory", "/var/spool/postern"),
    ("data_directory", "/var/lib/postern"),
    ("daemon_directory", "/usr/libexec/postern"),
    ("command_directory", "/usr/sbin"),
    ("sendmail_path", "/usr/sbin/sendmail"),
    ("newaliases_path", "/usr/bin/newaliases"),
    ("mailq_path", "/usr/bin/mailq"),
    ("manpage_directory", "/usr/share/man"),
    ("process_id_directory", "pid"),
    // The queue directories split into one-character subdirectories
    // (common::queue::Hashing), as Postfix's.
    ("hash_queue_names", "deferred, defer"),
    ("hash_queue_depth", "1"),
    // Accounts.
    ("mail_owner", "postern"),
    ("setgid_group", "postdrop"),
    ("default_privs", "nobody"),
    // Logging.
    ("syslog_facility", "mail"),
    ("syslog_name", "postfix"),
    ("maillog_file", ""),
    // Postern-only: the accounting log (one record per received,
    // delivered, deferred, bounced, expired or deleted recipient, and per
    // site mode change), written by the daemon that saw the event
    // (common/src/accounting.rs); empty: none.
    ("accounting_log_file", ""),
    // Postern-only: `json` (KumoMTA's log record) or `csv` (PowerMTA's
    // accounting file, a header line first).
    ("accounting_log_format", "json"),
    // Postern-only: tables mapping a failure's one-line reply
    // "<code> <enhanced> <text>" to its bounce class
    // (common/src/bounce_class.rs); empty: the rules shipped in
    // conf/etc/bounce_classes, compiled in.
    ("bounce_classifier_maps", ""),
    // master.
    ("default_process_limit", "100"),
    ("max_idle", "100s"),
    ("max_use", "100"),
    ("service_throttle_time", "60s"),
    ("ipc_timeout", "3600s"),
    // Postern-only: how many sessions one smtpd process serves before
    // master starts another one on the same listener.
    ("smtpd_client_session_limit", "1000"),
    // Postern-only: master starts the daemons of unix and fifo services
    // under the kernel's batch scheduling policy (SCHED_BATCH), so that a
    // daemon woken by another one does not preempt it halfway through its
    // work; inet services (smtpd) keep the normal policy.
    ("daemon_sched_batch", "yes"),
    // postscreen (postscreen/): the access list, the pregreet test, the
    // DNSBL score, the cache, the dummy SMTP dialogue of `enforce`; the
    // `pass` service it hands clients to; the deep protocol tests. STARTTLS
    // in postscreen is not offered (postfix-params.tsv says so).
    ("postscreen_access_list", "permit_mynetworks"),
    (
        "postscreen_denylist_action",
        "${postscreen_blacklist_action?{$postscreen_blacklist_action}:{ignore}}",
    ),
    ("postscreen_greet_action", "ignore"),
    ("postscreen_greet_banner", "$smtpd_banner"),
    ("postscreen_greet_ttl", "1d"),
    ("postscreen_greet_wait", "${stress?{2}:{6}}s"),
    (
        "postscreen_cache_map",
        "btree:$data_directory/postscreen_cache",
    ),
    ("postscreen_cache_retention_time", "7d"),
    ("postscreen_cache_cleanup_interval", "12h"),
    ("postscreen_discard_ehlo_keywords", "$smtpd_discard_ehlo_keywords"),
    ("postscreen_command_count_limit", "20"),
    ("postscreen_command_time_limit", "${stress?{10}:{300}}s"),
    ("postscreen_dnsbl_sites", ""),
    ("postscreen_dnsbl_threshold", "1"),
    (
        "postscreen_dnsbl_allowlist_threshold",
        "${postscreen_dnsbl_whitelist_threshold?{$postscreen_dnsbl_whitelist_threshold}:{0}}",
    ),
    ("postscreen_dnsbl_action", "ignore"),
    ("postscreen_dnsbl_reply_map", ""),
    ("postscreen_dnsbl_min_ttl", "60s"),
    (
        "postscreen_dnsbl_max_ttl",
        "${postscreen_dnsbl_ttl?{$postscreen_dnsbl_ttl}:{1}}h",
    ),
    ("postscreen_dnsbl_timeout", "10s"),
    ("smtpd_service_name", "smtpd"),
    ("postscreen_tls_security_level", "$smtpd_tls_security_level"),
    (
        "postscreen_client_connection_count_limit",
        "$smtpd_client_connection_count_limit",
    ),
    ("postscreen_pre_queue_limit", "$default_process_limit"),
    ("postscreen_pipelining_enable", "no"),
    ("postscreen_pipelining_action", "enforce"),
    ("postscreen_pipelining_ttl", "30d"),
    ("postscreen_non_smtp_command_enable", "no"),
    ("postscreen_non_smtp_command_action", "drop"),
    ("postscreen_non_smtp_command_ttl", "30d"),
    ("postscreen_bare_newline_enable", "no"),
    ("postscreen_bare_newline_action", "ignore"),
    ("postscreen_bare_newline_ttl", "30d"),
    ("postscreen_forbidden_commands", "$smtpd_forbidden_commands"),
    // smtpd.
    ("smtpd_banner", "$myhostname ESMTP $mail_name"),
    ("smtpd_timeout", "300s"),
    // smtpd's policy delegation (check_policy_service, SMTPD_POLICY_README).
    ("smtpd_policy_service_timeout", "100s"),
    ("smtpd_policy_service_max_idle", "300s"),
    ("smtpd_policy_service_max_ttl", "1000s"),
    ("smtpd_policy_service_request_limit", "0"),
    ("smtpd_policy_service_try_limit", "2"),
    ("smtpd_policy_service_retry_delay", "1s"),
    (
        "smtpd_policy_service_default_action",
        "451 4.3.5 Server configuration problem",
    ),
    ("smtpd_policy_service_policy_context", ""),
    ("smtpd_helo_required", "no"),
    ("smtpd_recipient_limit", "1000"),
    ("smtpd_soft_error_limit", "10"),
    ("smtpd_hard_error_limit", "20"),
    ("smtpd_error_sleep_time", "1s"),
    ("smtpd_client_restrictions", ""),
    ("smtpd_helo_restrictions", ""),
    ("smtpd_sender_restrictions", ""),
    // Postfix's default ends in defer_unauth_destination (454); Postern
    // answers an unauthorized relay attempt with a permanent 554 5.7.1 so
    // that a misdirected client learns at once, as `reject_unauth_destination`.
    (
        "smtpd_relay_restrictions",
        "permit_mynetworks, permit_sasl_authenticated, reject_unauth_destination",
    ),
    ("smtpd_recipient_restrictions", ""),
    ("smtpd_data_restrictions", ""),
    ("smtpd_delay_reject", "yes"),
    ("smtpd_peername_lookup", "yes"),
    ("smtpd_delay_open_until_valid_rcpt", "yes"),
    ("unknown_client_hostname_reject_code", "450"),
    ("unknown_hostname_reject_code", "450"),
    ("plaintext_reject_code", "450"),
    ("multi_recipient_bounce_reject_code", "550"),
    ("relay_domains_reject_code", "554"),
    ("permit_mx_backup_networks", ""),
    ("smtpd_discard_ehlo_keywords", ""),
    ("smtpd_command_filter", ""),
    ("smtpd_tls_ask_ccert", "no"),
    ("smtpd_tls_CAfile", ""),
    ("relay_clientcerts", ""),
    (
        "smtpd_tls_fingerprint_digest",
        "${{$compatibility_level} <level {3.6} ? {md5} : {sha256}}",
    ),
    ("smtpd_discard_ehlo_keyword_address_maps", ""),
    ("smtpd_reject_unlisted_recipient", "yes"),
    ("smtpd_reject_unlisted_sender", "no"),
    ("smtpd_sasl_auth_enable", "no"),
    ("smtpd_sasl_type", "dovecot"),
    ("smtpd_sasl_path", "private/auth"),
    ("smtpd_tls_security_level", ""),
    ("smtpd_tls_cert_file", ""),
    ("smtpd_tls_key_file", "$smtpd_tls_cert_file"),
    ("smtpd_tls_chain_files", ""),
    ("smtpd_tls_wrappermode", "no"),
    ("smtpd_tls_auth_only", "no"),
    ("smtpd_tls_received_header", "no"),
    ("smtpd_tls_eccert_file", ""),
    ("smtpd_tls_eckey_file", "$smtpd_tls_eccert_file"),
    ("smtpd_tls_protocols", ">=TLSv1"),
    ("smtpd_tls_mandatory_protocols", ">=TLSv1"),
    ("smtpd_tls_ciphers", "medium"),
    ("smtpd_tls_mandatory_ciphers", "medium"),
    ("smtpd_tls_exclude_ciphers", ""),
    ("smtpd_tls_mandatory_exclude_ciphers", ""),
    ("tls_preempt_cipherlist", "no"),
    ("smtpd_tls_loglevel", "0"),
    ("smtpd_tls_session_cache_timeout", "3600s"),
    // Empty: no session tickets (common::tls::smtpd_server_config).
    ("tls_session_ticket_cipher", "aes-256-cbc"),
    ("smtpd_sasl_authenticated_header", "no"),
    ("smtpd_sasl_service", "smtp"),
    ("broken_sasl_auth_clients", "no"),
    ("smtpd_sender_login_maps", ""),
    ("smtpd_client_connection_count_limit", "50"),
    ("smtpd_client_connection_rate_limit", "0"),
    ("smtpd_client_message_rate_limit", "0"),
    ("smtpd_client_recipient_rate_limit", "0"),
    ("smtpd_client_event_limit_exceptions", "$mynetworks"),
    ("anvil_rate_time_unit", "60s"),
    ("smtpd_client_auth_rate_limit", "0"),
    ("anvil_status_update_time", "600s"),
    ("smtpd_forbid_bare_newline", "normalize"),
    ("smtpd_forbid_unauth_pipelining", "no"),
    ("disable_vrfy_command", "no"),
    ("message_size_limit", "10240000"),
    ("queue_minfree", "0"),
    ("header_size_limit", "102400"),
    ("hopcount_limit", "50"),
    ("line_length_limit", "2048"),
    (
        "smtputf8_enable",
        "${{$compatibility_level} <level {1} ? {no} : {yes}}",
    ),
    ("strict_smtputf8", "no"),
    ("smtputf8_autodetect_classes", "sendmail, verify"),
    // Postern-only (Postfix has no REQUIRETLS): smtpd offers RFC 8689's
    // REQUIRETLS in EHLO over TLS and takes MAIL FROM's REQUIRETLS there;
    // the smtp client then delivers such a message only over
    // authenticated TLS to a server that offers REQUIRETLS.
    ("smtpd_requiretls_enable", "yes"),
    // cleanup. `cleanup_service_name`: the cleanup service smtpd, pickup
    // and local's forwarding submit to (a master.cf `-o` may name a second
    // one, such as submission's header-scrubbing cleanup).
    ("cleanup_service_name", "cleanup"),
    // The master.cf service name of the running daemon (set from its
    // `-n`; `syslog_name = postfix/$service_name`).
    ("service_name", ""),
    // Restriction classes (smtpd): names of lists usable as restrictions.
    ("smtpd_restriction_classes", ""),
    // After the final dot of DATA, and at ETRN (RFC 1985).
    ("smtpd_end_of_data_restrictions", ""),
    ("smtpd_etrn_restrictions", ""),
    // The domains ETRN may flush (a match list; 459 for the others).
    ("fast_flush_domains", "$relay_domains"),
    // The flush logs (flush/, common/src/flush.rs), kept up by qmgr: a
    // non-empty log not read for this long is compacted (Postfix's
    // refresh delivers its mail instead) ...
    ("fast_flush_refresh_time", "12h"),
    // ... and an empty one not written for this long is removed.
    ("fast_flush_purge_time", "7d"),
    // What cleanup skips for mail from this service (`-o` of a content
    // filter's re-injection service): no_unknown_recipient_checks,
    // no_address_mappings, no_header_body_checks, no_milters. Parsed and
    // passed on; see man/cleanup.8.
    ("receive_override_options", ""),
    (
        "message_drop_headers",
        "bcc, content-length, resent-bcc, return-path",
    ),
    ("always_add_missing_headers", "no"),
    ("local_header_rewrite_clients", "permit_inet_interfaces"),
    // qmgr.
    ("qmgr_message_active_limit", "20000"),
    ("qmgr_message_recipient_limit", "20000"),
    // Postern-only: qmgr keeps deferred/ indexed by retry time and lists
    // the directory again (one stat per file) at most this often on its
    // own: files another program put there come with a D wake-up.
    ("qmgr_deferred_rescan_time", "1h"),
    ("default_destination_concurrency_limit", "20"),
    ("local_destination_concurrency_limit", "2"),
    // Postern-only: messages per delivery request to one destination,
    // taken from a backlog the concurrency window, grown to its limit,
    // leaves waiting. local makes the Maildir deliveries of a batch
    // durable together (one sync of new/); the other agents deliver a
    // batch one message after another, which saves little, so they get
    // batches only when the administrator asks.
    ("default_delivery_batch_limit", "1"),
    ("local_delivery_batch_limit", "10"),
    ("initial_destination_concurrency", "5"),
    (
        "default_destination_concurrency_positive_feedback",
        "1/concurrency",
    ),
    (
        "default_destination_concurrency_negative_feedback",
        "1/concurrency",
    ),
    ("default_destination_concurrency_failed_cohort_limit", "1"),
    ("default_destination_rate_delay", "0s"),
    ("transport_retry_time", "60s"),
    // Postern-only: per-site traffic shaping (qmgr). Tables looked up
    // by recipient domain, `.parent`, `mx:HOST`/`mx:.parent`, `*`; the
    // value is a list of name=value settings (max_connections,
    // max_message_rate=N/s,burst=N, ...: common/src/delivery_policy.rs).
    // Per transport with -o in master.cf. Empty: no sites, Postfix's
    // per-destination limits only.
    ("delivery_policy_maps", ""),
    // Postern-only: regexp:/pcre: tables matched against a remote reply
    // "<code> <enhanced> <text>"; the value is a list of actions (backoff,
    // suspend=DURATION, bounce=DURATION, class=NAME, after=N/PERIOD,
    // site=SUFFIX; defer and bounce are the smtp agent's). Per transport
    // with -o. Replies Postern writes itself never match.
    ("delivery_reply_rules", ""),
    // Postern-only: the status service (status/): the clients (a CIDR
    // list) that may read its page and /metrics; others get 403.
    ("status_access", "127.0.0.0/8"),
    // Postern-only: host:port of a Redis server through which several
    // Postern nodes share each site's connection count and message and
    // connection rates, and its suspensions (qmgr/src/cluster.rs). Empty:
    // every limit is this node's own.
    ("delivery_policy_redis", ""),
    // Postern-only: the nodes sharing delivery_policy_redis; while Redis
    // cannot be reached each node keeps to limit / this (its share).
    ("delivery_policy_cluster_size", "1"),
    // Postern-only: the longest qmgr waits for Redis (connect, each
    // reply); a time in seconds, or milliseconds as "250ms".
    ("delivery_policy_redis_timeout", "500ms"),
    ("default_destination_recipient_limit", "50"),
    ("local_destination_recipient_limit", "1"),
    ("queue_run_delay", "300s"),
    ("minimal_backoff_time", "300s"),
    ("maximal_backoff_time", "4000s"),
    ("maximal_queue_lifetime", "5d"),
    ("bounce_queue_lifetime", "5d"),
    ("delay_warning_time", "0h"),
    ("bounce_notice_recipient", "postmaster"),
    ("2bounce_notice_recipient", "postmaster"),
    ("double_bounce_sender", "double-bounce"),
    // verify(8) (verify/): the cache and the probes' sender.
    ("address_verify_map", "btree:$data_directory/verify_cache"),
    ("address_verify_sender", "$double_bounce_sender"),
    ("address_verify_positive_expire_time", "31d"),
    ("address_verify_positive_refresh_time", "7d"),
    ("address_verify_negative_cache", "yes"),
    ("address_verify_negative_expire_time", "3d"),
    ("address_verify_negative_refresh_time", "3h"),
    ("address_verify_cache_cleanup_interval", "12h"),
    // smtpd's reject_unverified_recipient / reject_unverified_sender:
    // how long to wait for a probe, and how to answer.
    ("address_verify_poll_count", "${stress?{1}:{3}}"),
    ("address_verify_poll_delay", "3s"),
    ("unverified_recipient_reject_code", "450"),
    ("unverified_sender_reject_code", "450"),
    ("unverified_recipient_defer_code", "450"),
    ("unverified_sender_defer_code", "450"),
    ("unverified_recipient_reject_reason", ""),
    ("unverified_sender_reject_reason", ""),
    ("unverified_recipient_tempfail_action", "$reject_tempfail_action"),
    ("unverified_sender_tempfail_action", "$reject_tempfail_action"),
    ("delay_notice_recipient", "postmaster"),
    ("error_notice_recipient", "postmaster"),
    ("bounce_size_limit", "50000"),
    ("notify_classes", "resource, software"),
    // Address resolution.
    ("default_transport", "smtp"),
    ("relay_transport", "relay"),
    ("local_transport", "local:$myhostname"),
    ("relayhost", ""),
    ("transport_maps", ""),
    ("empty_address_recipient", "MAILER-DAEMON"),
    ("recipient_delimiter", ""),
    // The resolver (common/src/resolve.rs) swaps host!user bang paths
    // and takes user%host as user@host, as Postfix.
    ("swap_bangpath", "yes"),
    ("allow_percent_hack", "yes"),
    ("allow_min_user", "no"),
    ("proxy_interfaces", ""),
    (
        "parent_domain_matches_subdomains",
        "debug_peer_list, fast_flush_domains, mynetworks, permit_mx_backup_networks, \
         qmqpd_authorized_clients, relay_domains, smtpd_access_maps",
    ),
    ("relocated_maps", ""),
    // Verbose logging for the sessions with these peers
    // (common/src/debug_peer.rs).
    ("debug_peer_list", ""),
    ("debug_peer_level", "2"),
    ("sender_dependent_default_transport_maps", ""),
    ("empty_address_default_transport_maps_lookup_key", "<>"),
    ("empty_address_relayhost_maps_lookup_key", "<>"),
    // Recipient validation (smtpd_reject_unlisted_recipient).
    ("relay_recipient_maps", ""),
    ("unknown_local_recipient_reject_code", "550"),
    ("unknown_virtual_alias_reject_code", "550"),
    ("unknown_virtual_mailbox_reject_code", "550"),
    ("unknown_relay_recipient_reject_code", "550"),
    ("show_user_unknown_table_name", "yes"),
    // smtp client.
    ("smtp_connect_timeout", "30s"),
    ("smtp_helo_timeout", "300s"),
    ("smtp_mail_timeout", "300s"),
    ("smtp_rcpt_timeout", "300s"),
    ("smtp_data_init_timeout", "120s"),
    ("smtp_data_xfer_timeout", "180s"),
    ("smtp_data_done_timeout", "600s"),
    ("smtp_quit_timeout", "300s"),
    ("smtp_skip_quit_response", "yes"),
    ("smtp_helo_name", "$myhostname"),
    ("smtp_mx_address_limit", "5"),
    ("smtp_mx_session_limit", "2"),
    ("smtp_bind_address", ""),
    ("smtp_bind_address6", ""),
    ("smtp_bind_address_enforce", "no"),
    // Postern-only: a source's warm-up (qmgr): messages per site per day
    // on day 1, 2, ... counted from smtp_warmup_start (YYYY-MM-DD or unix
    // seconds); per transport with -o. Over the day's quota a message
    // goes to another member of its pool, or waits for the next day.
    ("smtp_warmup_schedule", ""),
    // Postern-only: names of pools for the X-Postern-Pool:/X-Virtual-MTA:
    // header of trusted clients (name -> transport or randmap:/weighted:
    // pool).
    ("pool_maps", ""),
    ("smtp_warmup_start", ""),
    ("smtp_tls_security_level", "may"),
    ("smtp_dns_support_level", ""),
    (
        "smtp_tls_dane_insecure_mx_policy",
        "${{$smtp_tls_security_level} == {dane} ? {dane} : {may}}",
    ),
    ("tls_dane_digests", "sha512 sha256"),
    ("lmtp_connect_timeout", "0s"),
    ("smtp_tls_CAfile", ""),
    ("smtp_tls_CApath", ""),
    ("smtp_tls_policy_maps", ""),
    ("smtp_tls_loglevel", "0"),
    ("smtp_tls_protocols", ">=TLSv1"),
    ("smtp_tls_mandatory_protocols", ">=TLSv1"),
    ("smtp_tls_ciphers", "medium"),
    ("smtp_tls_mandatory_ciphers", "medium"),
    ("smtp_tls_exclude_ciphers", ""),
    ("smtp_tls_mandatory_exclude_ciphers", ""),
    ("smtp_tls_session_cache_timeout", "3600s"),
    ("smtp_tls_wrappermode", "no"),
    ("smtp_sasl_auth_enable", "no"),
    ("smtp_sasl_password_maps", ""),
    ("smtp_sasl_security_options", "noplaintext, noanonymous"),
    (
        "smtp_sasl_tls_security_options",
        "$smtp_sasl_security_options",
    ),
    ("smtp_sasl_mechanism_filter", ""),
    ("smtp_sender_dependent_authentication", "no"),
    ("smtp_connection_cache_on_demand", "yes"),
    ("smtp_connection_cache_time_limit", "2s"),
    ("smtp_connection_reuse_time_limit", "300s"),
    ("lmtp_lhlo_name", "$myhostname"),
    ("lmtp_lhlo_timeout", "300s"),
    ("lmtp_skip_quit_response", "no"),
    ("lmtp_tls_security_level", ""),
    ("lmtp_sasl_auth_enable", "no"),
    ("lmtp_sasl_password_maps", ""),
    ("smtp_discard_ehlo_keywords", ""),
    ("lmtp_discard_lhlo_keywords", ""),
    ("smtp_line_length_limit", "998"),
    ("lmtp_line_length_limit", "990"),
    ("sender_dependent_relayhost_maps", ""),
    // Postern-only: name servers to ask instead of /etc/resolv.conf, as
    // `host` or `host:port`, separated by commas or spaces (for tests, or
    // a host with a dedicated resolver).
    ("dns_resolver_addresses", ""),
    // Postern-only: seconds to wait for one DNS answer.
    ("dns_resolver_timeout", "5s"),
    // Postern-only: MTA-STS (RFC 8461) in the smtp client, built in
    // (Postfix needs postfix-mta-sts-resolver through
    // smtp_tls_policy_maps); policies cached in $data_directory/mta-sts.
    ("smtp_mta_sts_enable", "yes"),
    // Postern-only: TLS-RPT (RFC 8460): smtp records each TLS attempt
    // under an MTA-STS policy in $data_directory/tls-rpt, and `postern
    // tls-report send` mails the daily aggregate reports.
    ("smtp_tls_report_enable", "no"),
    // Postern-only: the reporting organization and its contact in the
    // TLS-RPT reports (RFC 8460 `organization-name`, `contact-info`).
    ("smtp_tls_report_organization", "$myhostname"),
    ("smtp_tls_report_contact", "postmaster@$mydomain"),
    // Postern-only: DKIM signing in cleanup (Postfix needs a milter).
    // dkim_signing_table: sender domain (From:) -> DOMAIN:SELECTOR:KEYFILE
    // (OpenDKIM's KeyTable form), `.parent` and `*` keys; empty: no
    // signing.
    ("dkim_signing_table", ""),
    // Postern-only: the headers signed, in h= order; a name given twice
    // is oversigned (a second such header added later breaks the
    // signature); a listed header the message lacks is signed as absent.
    (
        "dkim_sign_headers",
        "From, From, Reply-To, Subject, Date, To, Cc, Message-Id, In-Reply-To, References, MIME-Version, Content-Type, Content-Transfer-Encoding",
    ),
    // Postern-only: which mail is signed: mynetworks (an SMTP client in
    // $mynetworks), authenticated (a SASL-authenticated SMTP client),
    // local (sendmail/pickup).
    ("dkim_sign_classes", "mynetworks, authenticated, local"),
    // Postern-only: checks of mail from outside (not mynetworks, not
    // authenticated, not local) whose results cleanup records in an
    // RFC 8601 Authentication-Results header: spf, dkim, dmarc.
    ("authentication_checks", ""),
    // Postern-only: what to do with mail failing DMARC whose domain's
    // policy asks for it: no (only record), quarantine (hold it for
    // p=quarantine and p=reject), reject (refuse p=reject with 550 5.7.1,
    // hold p=quarantine).
    ("smtpd_reject_dmarc_failures", "no"),
    // local.
    ("alias_maps", "hash:/etc/aliases"),
    ("alias_database", "hash:/etc/aliases"),
    ("home_mailbox", ""),
    ("mail_spool_directory", "/var/mail"),
    ("mailbox_size_limit", "51200000"),
    // local always takes both locks on mbox files, as Postfix on Linux.
    ("mailbox_delivery_lock", "fcntl, dotlock"),
    ("mailbox_command", ""),
    ("mailbox_transport", ""),
    ("luser_relay", ""),
    (
        "local_recipient_maps",
        "proxy:unix:passwd.byname $alias_maps",
    ),
    ("allow_mail_to_commands", "alias, forward"),
    ("allow_mail_to_files", "alias, forward"),
    ("command_time_limit", "1000s"),
    ("prepend_delivered_header", "command, file, forward"),
    ("enable_original_recipient", "yes"),
    ("duplicate_filter_limit", "1000"),
    ("deliver_lock_attempts", "20"),
    ("deliver_lock_delay", "1s"),
    ("stale_lock_time", "500s"),
    ("strict_mailbox_ownership", "yes"),
    // pickup / sendmail.
    ("default_database_type", "hash"),
    // sendmail / postdrop: configuration directories an unprivileged
    // user may name to the set-gid postdrop.
    ("alternate_config_directories", ""),
    ("multi_instance_directories", ""),
    // local: .forward files.
    (
        "forward_path",
        "$home/.forward${recipient_delimiter}${extension}, $home/.forward",
    ),
    // virtual(8) mailboxes.
    ("virtual_mailbox_domains", "$virtual_mailbox_maps"),
    ("virtual_mailbox_maps", ""),
    ("virtual_mailbox_base", ""),
    ("virtual_transport", "virtual"),
    ("virtual_uid_maps", ""),
    ("virtual_gid_maps", ""),
    ("virtual_minimum_uid", "100"),
    ("virtual_mailbox_limit", "51200000"),
    // cleanup: address rewriting and content checks.
    ("virtual_alias_maps", ""),
    ("virtual_alias_domains", "$virtual_alias_maps"),
    ("canonical_maps", ""),
    ("sender_canonical_maps", ""),
    ("recipient_canonical_maps", ""),
    (
        "canonical_classes",
        "envelope_sender, envelope_recipient, header_sender, header_recipient",
    ),
    ("sender_canonical_classes", "envelope_sender, header_sender"),
    (
        "recipient_canonical_classes",
        "envelope_recipient, header_recipient",
    ),
    ("masquerade_domains", ""),
    (
        "masquerade_classes",
        "envelope_sender, header_sender, header_recipient",
    ),
    ("masquerade_exceptions", ""),
    ("header_checks", ""),
    ("body_checks", ""),
    ("mime_header_checks", "$header_checks"),
    ("nested_header_checks", "$header_checks"),
    // Automatic bcc recipients, added by cleanup.
    ("always_bcc", ""),
    ("sender_bcc_maps", ""),
    ("recipient_bcc_maps", ""),
    // After-queue content filters (FILTER_README): smtpd and pickup send
    // content_filter and receive_override_options to cleanup; qmgr sends
    // filtered mail to the filter's transport; XFORWARD keeps the client.
    ("content_filter", ""),
    ("default_filter_nexthop", ""),
    ("receive_override_options", ""),
    ("smtpd_authorized_xforward_hosts", ""),
    // The before-queue content filter (SMTPD_PROXY_README): smtpd
    // passes each transaction through it (smtpd/src/proxy.rs).
    ("smtpd_proxy_filter", ""),
    ("smtpd_proxy_timeout", "100s"),
    ("smtpd_proxy_ehlo", "$myhostname"),
    ("smtpd_proxy_options", ""),
    // Milters (MILTER_README): smtpd asks smtpd_milters at the SMTP
    // stages (smtpd/src/milter.rs), cleanup at the content stages and
    // applies the modifications (cleanup/src/milter.rs); cleanup asks
    // non_smtpd_milters for sendmail/pickup mail. common/src/milter/ is
    // the protocol.
    ("smtpd_milters", ""),
    ("non_smtpd_milters", ""),
    ("milter_protocol", "6"),
    ("milter_default_action", "tempfail"),
    ("milter_connect_timeout", "30s"),
    ("milter_command_timeout", "30s"),
    ("milter_content_timeout", "300s"),
    ("milter_connect_macros", "j {daemon_name} {daemon_addr} v _"),
    ("milter_helo_macros", "{tls_version} {cipher} {cipher_bits} {cert_subject} {cert_issuer}"),
    ("milter_mail_macros", "i {auth_type} {auth_authen} {auth_author} {mail_addr} {mail_host} {mail_mailer}"),
    ("milter_rcpt_macros", "i {rcpt_addr} {rcpt_host} {rcpt_mailer}"),
    ("milter_data_macros", "i"),
    ("milter_end_of_header_macros", "i"),
    ("milter_end_of_data_macros", "i"),
    ("milter_unknown_command_macros", ""),
    ("milter_macro_daemon_name", "$myhostname"),
    ("milter_macro_v", "$mail_name $mail_version"),
    ("milter_macro_defaults", ""),
    ("milter_header_checks", ""),
    ("smtpd_milter_maps", ""),
    ("smtp_send_xforward_command", "no"),
    ("smtp_xforward_timeout", "300s"),
    // The smtp client's header and body checks (lmtp reads these too).
    ("smtp_header_checks", ""),
    ("smtp_mime_header_checks", ""),
    ("smtp_nested_header_checks", ""),
    ("smtp_body_checks", ""),
    // lmtp's own forms, as Postfix's lmtp reads them.
    ("lmtp_header_checks", ""),
    ("lmtp_mime_header_checks", ""),
    ("lmtp_nested_header_checks", ""),
    ("lmtp_body_checks", ""),
    ("lmtp_send_xforward_command", "no"),
    ("lmtp_xforward_timeout", "300s"),
    // postern logrotate (Postfix 3.4's `postfix logrotate`).
    ("maillog_file_compressor", "gzip"),
    ("maillog_file_rotate_suffix", "%Y%m%d-%H%M%S"),
    // postkick.
    ("application_event_drain_time", "100s"),
    // proxymap(8): the tables it serves, the `proxy:` items of these
    // lists (Postfix's default, less the parameters Postern does not have).
    (
        "proxy_read_maps",
        "$local_recipient_maps $mydestination $virtual_alias_maps \
         $virtual_alias_domains $virtual_mailbox_maps $virtual_mailbox_domains \
         $relay_recipient_maps $relay_domains $canonical_maps $sender_canonical_maps \
         $recipient_canonical_maps $relocated_maps $transport_maps $mynetworks \
         $smtpd_sender_login_maps $sender_bcc_maps $recipient_bcc_maps $alias_maps \
         $smtpd_client_restrictions $smtpd_helo_restrictions $smtpd_sender_restrictions \
         $smtpd_relay_restrictions $smtpd_recipient_restrictions $lmtp_sasl_password_maps \
         $sender_dependent_default_transport_maps $sender_dependent_relayhost_maps \
         $smtp_sasl_password_maps $smtp_tls_policy_maps $virtual_gid_maps \
         $virtual_uid_maps $body_checks $header_checks $lmtp_body_checks \
         $lmtp_header_checks $lmtp_mime_header_checks $lmtp_nested_header_checks \
         $mime_header_checks $nested_header_checks $smtp_body_checks \
         $smtp_header_checks $smtp_mime_header_checks $smtp_nested_header_checks",
    ),
    ("proxy_write_maps", "$smtp_sasl_auth_cache_name $lmtp_sasl_auth_cache_name $address_verify_map $postscreen_cache_map"),
    // Postern-only: database connections one proxymap process opens to
    // each server of a table at most (one more only while lookups
    // overlap); the database sees at most maxproc times this per table.
    ("proxymap_connection_limit", "4"),
];

/// The default of a known parameter, or `None` for a name Postern does not know.
pub fn default_of(name: &str) -> Option<&'static str> {
    PARAMS.iter().find(|(n, _)| *n == name).map(|(_, d)| *d)
}

/// The parameter that configures `smtp_NAME` for the smtp client, or in
/// LMTP mode (`lmtp`) the `lmtp_` form when Postern knows it (as Postfix's
/// lmtp(8) reads its own `lmtp_*` parameters), else the `smtp_` one.
pub fn smtp_client_param(lmtp: bool, smtp_name: &str) -> String {
    if lmtp {
        let rest = smtp_name.strip_prefix("smtp_").unwrap_or(smtp_name);
        let rest = match rest {
            "helo_name" => "lhlo_name",
            "helo_timeout" => "lhlo_timeout",
            "discard_ehlo_keywords" => "discard_lhlo_keywords",
            r => r,
        };
        let name = format!("lmtp_{rest}");
        if default_of(&name).is_some() {
            return name;
        }
    }
    smtp_name.to_string()
}

/// Whether `name` is a known parameter: Postern's, or Postfix's. Per-transport forms of a known
/// `default_*` parameter (`relay_destination_concurrency_limit` for
/// `default_destination_concurrency_limit`) count as known.
pub fn is_known(name: &str) -> bool {
    if default_of(name).is_some() {
        return true;
    }
    // Every Postfix 3.7 parameter is accepted without a warning; what
    // Postern does with each is in the table of crate::postfix_params.
    if crate::postfix_params::status_of(name).is_some() {
        return true;
    }
    // pipe(8)'s `TRANSPORT_time_limit` (default `$command_time_limit`).
    if name.ends_with("_time_limit") {
        return true;
    }
    if let Some((_, rest)) = name.split_once('_') {
        let generic = format!("default_{rest}");
        return default_of(&generic).is_some();
    }
    false
}
