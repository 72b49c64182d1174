//! The parameters smtpd reads, once, at start.

use crate::restrictions::Restrictions;
use postern_common::queue::QueueTree;
use postern_conf::Config;
use std::path::PathBuf;
use std::time::Duration;

/// Everything the sessions and the event loop need from the configuration.
#[derive(Debug, Clone)]
pub struct Settings {
    pub myhostname: String,
    pub mail_name: String,
    /// The text after `220 ` in the greeting.
    pub banner: String,
    /// 0 = no limit.
    pub message_size_limit: u64,
    /// 0 = no limit.
    pub recipient_limit: usize,
    pub hard_error_limit: u32,
    pub helo_required: bool,
    pub disable_vrfy: bool,
    /// Longest command line; content lines longer than this are passed on
    /// in pieces.
    pub line_limit: usize,
    pub restrictions: Restrictions,
    /// Every read from and write to a client.
    pub timeout: Duration,
    /// Waiting for cleanup's answer.
    pub ipc_timeout: Duration,
    /// Exit after this long without a session.
    pub max_idle: Duration,
    /// Sessions one process serves at once.
    pub session_limit: usize,
    /// cleanup's socket (`queue_directory/public/cleanup`, as Postfix's
    /// master.cf declares cleanup public).
    pub cleanup_socket: PathBuf,
}

impl Settings {
    pub fn from_config(cfg: &Config) -> Result<Settings, String> {
        let e = |e: postern_conf::ConfError| e.to_string();
        Ok(Settings {
            myhostname: cfg.get("myhostname"),
            mail_name: cfg.get("mail_name"),
            banner: cfg.get("smtpd_banner"),
            message_size_limit: cfg.get_u64("message_size_limit").map_err(e)?,
            recipient_limit: cfg.get_u64("smtpd_recipient_limit").map_err(e)? as usize,
            hard_error_limit: cfg.get_u64("smtpd_hard_error_limit").map_err(e)?.max(1) as u32,
            helo_required: cfg.get_bool("smtpd_helo_required").map_err(e)?,
            disable_vrfy: cfg.get_bool("disable_vrfy_command").map_err(e)?,
            line_limit: (cfg.get_u64("line_length_limit").map_err(e)? as usize).max(512),
            restrictions: Restrictions::from_config(cfg)?,
            timeout: Duration::from_secs(cfg.get_time("smtpd_timeout").map_err(e)?.max(1)),
            ipc_timeout: Duration::from_secs(cfg.get_time("ipc_timeout").map_err(e)?.max(1)),
            max_idle: Duration::from_secs(cfg.get_time("max_idle").map_err(e)?.max(1)),
            session_limit: cfg.get_u64("smtpd_client_session_limit").map_err(e)?.max(1) as usize,
            cleanup_socket: QueueTree::new(cfg.get("queue_directory")).cleanup_socket(),
        })
    }
}
