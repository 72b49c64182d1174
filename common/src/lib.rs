//! What Postern's programs share, defined once.
//!
//! - [`qfile`]: the queue file format (records, streaming writer and
//!   reader, in-place "done" marks).
//! - [`queue`]: the queue tree, queue IDs, moves between queues.
//! - [`ipc`]: every message the programs exchange, and its framing.
//! - [`pass_fd`]: handing a client connection to another process
//!   (SCM_RIGHTS): postscreen to smtpd.
//! - [`dns`]: the DNS resolver smtp and smtpd share.
//! - [`dupfilter`]: duplicate elimination (cleanup's recipients, local's
//!   expansions).
//! - [`delivery`]: the delivery agents' side of a delivery request.
//! - [`flush`]: one site's deferred mail made due now (`postqueue -s`, ETRN).
//! - [`maps`]: lookup tables (`hash:`, `texthash:`, `static:`, `inline:`).
//! - [`cdb`]: the CDB file behind `hash:`, `btree:`, `cdb:` and `lmdb:`.
//! - [`addr`]: envelope addresses.
//! - [`base64`]: base64 for SASL.
//! - [`cidr`]: network blocks (`mynetworks`, `cidr:` tables).
//! - [`match_list`]: Postfix's match lists (`mydestination`,
//!   `relay_domains`, `mynetworks`, ...): names, networks, files, tables,
//!   negation.
//! - [`log`]: logging in Postfix's format.
//! - [`privs`]: accounts and dropping privileges.
//! - [`service`]: the skeleton of a daemon started by master.
//! - [`poll`]: the sockets of the mio event loops (smtpd, anvil).
//! - [`table_watch`]: noticing that a table's file changed under a daemon.
//! - [`time`]: RFC 5322 dates.
//! - [`resolve`]: address classes, transports, next hops and recipient
//!   validation (Postfix's trivial-rewrite and smtpd's unlisted checks).
//! - [`regexp`]: `regexp:` tables (used by [`maps`]).
//! - [`dict`]: tables answered by a server or a program, `pcre:`, and the
//!   stand-in of a table that could not be opened.
//! - [`tls`]: server TLS configuration (rustls, ring provider, PEM files).
//! - [`anvil`]: client session counts and event rates (anvil and smtpd).
//! - [`dsn`]: RFC 3461 DSN parameters (xtext, unitext, NOTIFY, RET, ENVID, ORCPT).
//! - [`hostname`]: host name, address and HELO name syntax.
//! - [`smtp_command`]: the SMTP command grammar smtpd and `sendmail -bs` read.
//! - [`bounce_class`]: bounce classes of failures (`bounce_classifier_maps`).
//! - [`accounting`]: the accounting log (`accounting_log_file`, JSON or CSV).
//! - [`smtputf8`]: SMTPUTF8 flags, UTF-8 address checks, autodetect classes.
//! - [`resp`]: a small Redis client (qmgr's `delivery_policy_redis`).

pub mod accounting;
pub mod addr;
pub mod anvil;
pub mod base64;
pub mod bounce_class;
pub mod cache_file;
pub mod cdb;
pub mod cidr;
pub mod dane;
pub mod debug_peer;
pub mod delivery;
pub mod delivery_policy;
pub mod dict;
pub mod dkim_table;
pub mod dns;
pub mod dsn;
pub mod dupfilter;
pub mod flush;
pub mod header_checks;
pub mod hostname;
pub mod https;
pub mod ipc;
pub mod json;
pub mod log;
pub mod maps;
pub mod match_list;
pub mod milter;
pub mod mta_sts;
pub mod pass_fd;
pub mod poll;
pub mod pool;
pub mod privs;
pub mod proxy_filter;
pub mod qfile;
pub mod queue;
pub mod receive_override;
pub mod regexp;
pub mod resolve;
pub mod resp;
pub mod restriction;
pub mod service;
pub mod smtp_command;
pub mod smtputf8;
pub mod table_watch;
pub mod tcp;
pub mod time;
pub mod tls;
pub mod tls_ccert;
pub mod tls_rpt;
pub mod tls_tickets;
pub mod verify;
