//! pickup: moves locally submitted mail from `maildrop/` to cleanup.
//!
//! Who talks to it: sendmail wakes it through `public/pickup` after
//! dropping a file; master wakes it every `wakeup` seconds (60 in the
//! default master.cf). What it does: for each complete maildrop file (mode
//! with the owner-execute bit and an end record), reads it as hostile input (only the records a
//! maildrop file may hold, bounded sizes), submits it to cleanup
//! (`public/cleanup`), and removes the file only after cleanup answered
//! Queued. What it may touch: `maildrop/` (read, remove, move to
//! `corrupt/`). It runs as `mail_owner`.
//!
//! Modules: [`scan`] (the maildrop directory), [`submit`] (one file to
//! cleanup).

pub mod scan;
pub mod submit;
