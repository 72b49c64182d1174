//! The queue file reader on arbitrary bytes: qmgr and pickup read files
//! that a crash may have cut short and that a local user may have forged
//! (maildrop). It must return an error, never panic or loop.
#![no_main]
use libfuzzer_sys::fuzz_target;
use postern_common::qfile;
use std::io::{Read, Seek, Write};
use std::os::unix::fs::PermissionsExt;

fuzz_target!(|data: &[u8]| {
    let mut f = tempfile();
    f.write_all(data).unwrap();
    f.rewind().unwrap();
    let _ = f.set_permissions(std::fs::Permissions::from_mode(0o700));
    if let Ok(env) = qfile::read_envelope(&f) {
        let _ = env.pending().count();
        if let Ok(mut c) = qfile::ContentReader::new(&f, env.content_offset) {
            let mut sink = Vec::new();
            let _ = c.read_to_end(&mut sink);
        }
    }
});

fn tempfile() -> std::fs::File {
    let path = std::env::temp_dir().join(format!("postern-fuzz-qf-{}", std::process::id()));
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .unwrap();
    let _ = std::fs::remove_file(&path);
    f
}
